"""Value types of the config: durations, networks, endpoints, probes, marks, names and paths.

Each parser takes any value a TOML document can hold (str, int, float, bool, datetime, list, table)
and either returns the typed value or raises ValueError saying what is accepted. The ownership rules
(table names, route protocols, rule priorities, source addresses, interface names) live here too, as
checks of single values: a value that would make hatun treat what another program owns as its own is
refused before hatun touches the host.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema

from hatun.durations import format_duration, parse_duration
from hatun.health import RttLimit
from hatun.keys import decode_key, redact

IFNAMSIZ = 15  # bytes in a Linux interface name, without the terminating NUL
DEFAULT_INTERFACE_PREFIX = "hat-"
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9_-]*[a-z0-9])?")
# Interface names: what the kernel accepts (dev_valid_name), minus characters that make trouble in
# shells, metric labels and nftables sets.
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_DURATION = 86400.0  # one day: longer timers are mistakes, and overflow the kernel's u32 clock ticks
MIN_DURATION = 0.001  # shorter intervals would spin the event loop, not probe
SUN_PATH_MAX = 107  # bytes of a Unix socket path (sun_path is 108, with its NUL)


# ---------------------------------------------------------------- durations


def _duration_in_range(seconds: float) -> float:
    if seconds > MAX_DURATION:
        raise ValueError("must be at most 1 day (24h)")
    return seconds


def _duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be a positive duration")
    if seconds < MIN_DURATION:
        raise ValueError("must be at least 1ms")
    return _duration_in_range(seconds)


def _non_negative_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError("must not be negative")
    if 0 < seconds < MIN_DURATION:
        raise ValueError("must be 0 or at least 1ms")
    return _duration_in_range(seconds)


_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m|h)\s*$"},
        {"type": "number", "minimum": MIN_DURATION, "maximum": MAX_DURATION},
    ],
    "description": 'a duration: "250ms", "2s", "1m", "1h", or a number of seconds (1ms to 24h)',
}

Duration = Annotated[
    float,
    BeforeValidator(_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(_DURATION_SCHEMA),
]
NonNegativeDuration = Annotated[
    float,
    BeforeValidator(_non_negative_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({**_DURATION_SCHEMA, "anyOf": [_DURATION_SCHEMA["anyOf"][0],
                                                  {"type": "number", "minimum": 0, "maximum": MAX_DURATION}]}),
]


def _rtt_limit(value: Any) -> RttLimit:
    if isinstance(value, RttLimit):
        return value
    if isinstance(value, str) and value.strip().lower().endswith("x"):
        try:
            factor = float(value.strip()[:-1])
        except ValueError:
            factor = math.nan
        if not math.isfinite(factor) or not 1.0 < factor <= 1000.0:
            raise ValueError("a relative limit is a factor of the tunnel's baseline RTT above 1, e.g. \"5x\"")
        return RttLimit(factor, relative=True)
    return RttLimit(_duration(value))


RttLimitField = Annotated[
    RttLimit,
    BeforeValidator(_rtt_limit),
    PlainSerializer(lambda v: f"{v.value:g}x" if v.relative else format_duration(v.value), return_type=str),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m|h|x)\s*$"},
                              {"type": "number", "minimum": MIN_DURATION, "maximum": MAX_DURATION}],
                    "description": 'an RTT: "150ms" (absolute), or "5x" (5 times the tunnel\'s baseline RTT)'}),
]


# ---------------------------------------------------------------- addresses


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError("expected a CIDR string such as \"198.19.77.0/24\"")
    if "/" not in value:
        raise ValueError("prefix length missing (write e.g. \"198.19.77.0/24\", or /32 for one host)")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        try:
            net = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"not an IP network: {e}") from None
        raise ValueError(f"host bits are set: did you mean {net}?") from None


def _interface(value: Any) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if not isinstance(value, str):
        raise ValueError("expected an address with prefix length such as \"198.18.101.2/30\"")
    if "/" not in value:
        raise ValueError("prefix length missing (write e.g. \"198.18.101.2/30\")")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as e:
        raise ValueError(f"not an address with prefix length: {e}") from None
    if iface.ip == iface.network.network_address and iface.network.prefixlen < iface.max_prefixlen - 1:
        raise ValueError(f"{iface.ip} is the network address of {iface.network}, not a host address")
    return iface


def _host_address(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(value, str):
        raise ValueError("expected an IP address")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("not an IP address (write it without prefix length, e.g. \"198.18.99.1\")") from None


def source_address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why IP cannot be hatun's source address, or None when it can.

    hatun adds the source address to lo and removes it when it stops: an address the host needs
    for itself (loopback) would go with it, and addresses that are not unicast host addresses
    cannot be routed back by the gateways.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"{ip} is an IPv4-mapped IPv6 address: write the IPv4 address {ip.ipv4_mapped} itself"
    if ip.is_unspecified:
        return f"{ip} is the unspecified address, not a source address"
    if ip.is_loopback:
        return (f"{ip} is a loopback address: hatun adds the source to lo and removes it when it stops,"
                " which would take this host's own loopback address, and no gateway can route it back;"
                " use an address that the gateways route back to this host")
    if ip.is_multicast:
        return f"{ip} is a multicast address, not a source address"
    if ip.is_link_local:
        return f"{ip} is a link-local address: it is not routed through the tunnels"
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return f"{ip} is the broadcast address, not a source address"
    return None


def _source_address(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = _host_address(value)
    problem = source_address_problem(ip)
    if problem:
        raise ValueError(problem)
    return ip


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(_network),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "an IPv4 or IPv6 network in CIDR form, host bits clear"}),
]
Interface = Annotated[
    ipaddress.IPv4Interface | ipaddress.IPv6Interface,
    BeforeValidator(_interface),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "an address with prefix length, e.g. 198.18.101.2/30"}),
]
HostAddress = Annotated[
    ipaddress.IPv4Address | ipaddress.IPv6Address,
    BeforeValidator(_host_address),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "an IPv4 or IPv6 address"}),
]
SourceAddress = Annotated[
    ipaddress.IPv4Address | ipaddress.IPv6Address,
    BeforeValidator(_source_address),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "a unicast IPv4 or IPv6 address (not loopback)"}),
]


# ---------------------------------------------------------------- endpoints and probes


@dataclass(frozen=True)
class Endpoint:
    """A gateway endpoint: host (IP literal or DNS name) and UDP port."""

    host: str
    port: int

    @property
    def is_dns(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
            return False
        except ValueError:
            return True

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(value: Any) -> Endpoint:
    """Parse "IPv4:port", "[IPv6]:port" or "dns-name:port". Raises ValueError saying what is wrong."""
    if isinstance(value, Endpoint):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected \"host:port\", e.g. \"198.18.1.2:51820\" or \"gw.example.net:51820\"")
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError("missing ']' after the IPv6 address")
        if not rest:
            raise ValueError("port missing")
        if not rest.startswith(":"):
            raise ValueError("expected ':port' after ']'")
        port_text = rest[1:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"'{host}' in brackets is not an IPv6 address") from None
    else:
        if text.count(":") > 1:
            try:
                ipaddress.IPv6Address(text)
                raise ValueError(f"port missing (an IPv6 endpoint is written [{text}]:51820)")
            except ipaddress.AddressValueError:
                raise ValueError("an IPv6 endpoint must be in brackets: [2001:db8::1]:51820") from None
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("port missing")
        if not host:
            raise ValueError("host missing")
        try:
            ipaddress.IPv4Address(host)
        except ipaddress.AddressValueError:
            if re.fullmatch(r"[0-9.]+", host):
                raise ValueError(f"'{host}' is not a valid IPv4 address") from None
            labels = host.rstrip(".").split(".")
            if len(host) > 253 or not all(DNS_LABEL_RE.fullmatch(label) for label in labels):
                raise ValueError(f"'{host}' is neither an IP address nor a valid DNS name") from None
            # A 43-character label of letters and digits passes as a DNS name, but it is a key pasted in
            # the wrong place; endpoints are shown in status, metrics and generated configs.
            if redact(host) != host:
                raise ValueError("that looks like a WireGuard key, not a host name") from None
    # isdigit() is true for other scripts' digits too ('٣'), which int() would then accept.
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"port '{port_text}' is not a number" if port_text else "port missing")
    if len(port_text) > 5:
        raise ValueError(f"port {port_text} is out of range 1-65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return Endpoint(host, port)


EndpointField = Annotated[
    Endpoint,
    BeforeValidator(parse_endpoint),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "IPv4:port, [IPv6]:port or dns-name:port"}),
]


@dataclass(frozen=True)
class Probe:
    """How a tunnel is probed: ICMP echo to `host`, or a TCP connect to `host:port`."""

    kind: Literal["icmp", "tcp"]
    host: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{self.kind}://{host}" + (f":{self.port}" if self.port else "")


def parse_probe(value: Any) -> Probe:
    """Parse "icmp://HOST" or "tcp://HOST:PORT" (HOST an IP address). Raises ValueError."""
    if isinstance(value, Probe):
        return value
    if not isinstance(value, str):
        raise ValueError("expected \"icmp://ADDRESS\" or \"tcp://ADDRESS:PORT\"")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("icmp", "tcp"):
        raise ValueError("expected \"icmp://ADDRESS\" or \"tcp://ADDRESS:PORT\"")
    if scheme == "icmp":
        host = rest[1:-1] if rest.startswith("[") and rest.endswith("]") else rest
        try:
            return Probe("icmp", ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"'{rest}' is not an IP address (probes go to an address behind the tunnel)") from None
    try:
        ep = parse_endpoint(rest)
    except ValueError as e:
        raise ValueError(f"tcp probe: {e}") from None
    if ep.is_dns:
        raise ValueError(f"'{ep.host}' is not an IP address (probes go to an address behind the tunnel)")
    return Probe("tcp", ipaddress.ip_address(ep.host), ep.port)


ProbeField = Annotated[
    Probe,
    BeforeValidator(parse_probe),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "pattern": "^(icmp|tcp)://", "description": "icmp://ADDRESS or tcp://ADDRESS:PORT"}),
]


# ---------------------------------------------------------------- marks and ownership markers


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _mark(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ValueError("expected a number such as 0x00ff0000") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected a number such as 0x00ff0000")
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError("must fit in 32 bits")
    return value


Mark = Annotated[int, BeforeValidator(_mark), WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}]})]


def mark_problem(mask: int) -> str | None:
    """Why MASK cannot be hatun's fwmark mask (whatever the tunnels), or None."""
    if mask == 0 or ((mask + (mask & -mask)) & mask) != 0:
        return "must be one contiguous run of bits, e.g. 0x00ff0000"
    if bin(mask).count("1") < 3:
        return "needs at least 3 bits (one mark per tunnel plus one)"
    return None


def max_slot(mask: int) -> int:
    """The largest mark slot of a (contiguous) MASK, as hatun.steering.Layout counts them."""
    return mask >> ((mask & -mask).bit_length() - 1)


def _nft_table(value: str) -> str:
    if not value.startswith("hatun"):
        raise ValueError("nftables table names must start with 'hatun' so that hatun never deletes another"
                         " program's table (e.g. \"hatun\" or \"hatun_ci\")")
    if not re.fullmatch(r"hatun[a-z0-9_]{0,26}", value):
        raise ValueError("use 'hatun' followed by at most 26 lowercase letters, digits or '_'")
    return value


NftTable = Annotated[str, AfterValidator(_nft_table)]

# The kernel's tables (rtnetlink.h RT_TABLE_*): hatun flushes and rewrites the tables it uses.
RESERVED_TABLES = {0: "unspec", 252: "compat", 253: "default", 254: "main", 255: "local"}


def table_range_problem(table: int, slots: int) -> str | None:
    """Why tables TABLE..TABLE+SLOTS cannot be hatun's, or None."""
    last = table + slots
    used = (f"hatun uses routing tables {table}..{last} (this table plus one per mark slot of fwmark_mask)")
    if last > 0xFFFFFFFF:
        return f"{used}, beyond the largest table id 4294967295: choose a smaller table"
    hit = [n for n in RESERVED_TABLES if table <= n <= last]
    if not hit:
        return None
    if slots == 0:
        return (f"{table} is the kernel's '{RESERVED_TABLES[table]}' table: hatun's routes need tables of their own;"
                " choose another, e.g. 51820")
    names = _and([f"{n} ({RESERVED_TABLES[n]})" for n in hit])
    return (f"{used}, which include the kernel's table{'s' if len(hit) > 1 else ''} {names}: choose a table so"
            " that the range avoids 0 and 252-255, e.g. 51820")


# The kernel's rules: 0 looks up local, 32766 main, 32767 default.
RESERVED_RULES = {0: "local", 32766: "main", 32767: "default"}
RULES_USED = 3  # hatun's rules take rule_priority .. rule_priority + 2


def _rule_priority(value: int) -> int:
    last = value + RULES_USED - 1
    hit = [n for n in RESERVED_RULES if value <= n <= last]
    if hit:
        names = _and([f"{n} (the kernel's rule for the {RESERVED_RULES[n]} table)" for n in hit])
        raise ValueError(f"hatun uses rule priorities {value}..{last}, which include {names}: choose 1..32763")
    if value > 32766:
        raise ValueError(f"hatun's rules ({value}..{last}) would come after the kernel's rule for the main"
                         " table (32766), which would send the steered prefixes out by the default route: choose 1..32763")
    return value


RulePriority = Annotated[int, AfterValidator(_rule_priority)]

# iproute2's rt_protos (and FRRouting's rt_protos.d): the route protocols of the kernel and of real
# routing daemons. hatun deletes every route, rule and nexthop that carries its protocol.
RESERVED_PROTOCOLS = {
    0: ("unspec", "routes added without a protocol"),
    1: ("redirect", "routes learnt from ICMP redirects"),
    2: ("kernel", "the kernel's own routes"),
    3: ("boot", "routes added at boot and by `ip route` without a protocol"),
    4: ("static", "routes added by an administrator"),
    8: ("gated", "the GateD routing daemon"),
    9: ("ra", "router advertisement daemons"),
    10: ("mrt", "the MRT routing daemon"),
    11: ("zebra", "FRRouting's and Quagga's zebra"),
    12: ("bird", "the BIRD routing daemon"),
    13: ("dnrouted", "the DECnet routing daemon"),
    14: ("xorp", "the XORP routing daemon"),
    15: ("ntk", "the Netsukuku routing daemon"),
    16: ("dhcp", "DHCP clients"),
    17: ("mrouted", "the mrouted multicast routing daemon"),
    18: ("keepalived", "keepalived"),
    42: ("babel", "the Babel routing daemon"),
    99: ("openr", "the Open/R routing platform"),
    186: ("bgp", "FRRouting's BGP daemon"),
    187: ("isis", "FRRouting's IS-IS daemon"),
    188: ("ospf", "FRRouting's OSPF daemon"),
    189: ("rip", "FRRouting's RIP daemon"),
    190: ("ripng", "FRRouting's RIPng daemon"),
    191: ("nhrp", "FRRouting's NHRP daemon"),
    192: ("eigrp", "FRRouting's EIGRP daemon"),
    193: ("ldp", "FRRouting's LDP daemon"),
    194: ("sharp", "FRRouting's sharp daemon"),
    195: ("pbr", "FRRouting's PBR daemon"),
    196: ("zstatic", "FRRouting's static routes"),
    197: ("openfabric", "FRRouting's OpenFabric daemon"),
    198: ("srte", "FRRouting's segment routing"),
}


def _protocol(value: int) -> int:
    if value in RESERVED_PROTOCOLS:
        name, owner = RESERVED_PROTOCOLS[value]
        raise ValueError(f"{value} is the route protocol of {owner} ('{name}' in iproute2's rt_protos): hatun deletes"
                         " every route, rule and nexthop with its protocol, so it needs an id of its own (default 147)")
    return value


RouteProtocol = Annotated[int, AfterValidator(_protocol)]


# ---------------------------------------------------------------- names and paths


def interface_name_problem(name: str) -> str | None:
    """Why NAME cannot be a tunnel interface name, or None when it can."""
    if not name:
        return "empty interface name"
    if len(name.encode()) > IFNAMSIZ:
        return f"interface name '{name}' is {len(name.encode())} bytes, at most {IFNAMSIZ} are allowed"
    if name in (".", "..") or not IFNAME_RE.fullmatch(name):
        return f"interface name '{name}' may use only letters, digits, '.', '-' and '_'"
    if name == "lo":
        return "'lo' is the loopback device: hatun creates and deletes its tunnel interfaces by name"
    if name in ("all", "default"):
        return (f"'{name}' is reserved: /proc/sys/net/ipv4/conf/{name} holds the settings for"
                f" {'every interface' if name == 'all' else 'new interfaces'}, not a device of that name")
    return None


def _tunnel_name(value: str) -> str:
    if not NAME_RE.fullmatch(value) or len(value) > 32:
        raise ValueError("use 1-32 lowercase letters, digits, '-' or '_', starting and ending with a letter or digit")
    return value


def _peer_key(value: str) -> str:
    decode_key(value)
    return value.strip()


def _env_name(value: str) -> str:
    if not ENV_NAME_RE.fullmatch(value):
        raise ValueError("not a valid environment variable name")
    return value


def _interface_name(value: str) -> str:
    problem = interface_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _path(value: str) -> str:
    if "\x00" in value:
        raise ValueError("a path cannot contain a NUL character")
    if not value:
        raise ValueError("must not be empty")
    return value


def _absolute_path(value: str) -> str:
    _path(value)
    if not value.startswith("/"):
        raise ValueError("must be an absolute path (starting with '/')")
    return value


def _socket_path(value: str) -> str:
    _absolute_path(value)
    if len(value.encode()) > SUN_PATH_MAX:
        raise ValueError(f"is {len(value.encode())} bytes, longer than the {SUN_PATH_MAX} a Unix socket path may have")
    return value


TunnelName = Annotated[str, AfterValidator(_tunnel_name)]
PeerKey = Annotated[str, AfterValidator(_peer_key)]
EnvName = Annotated[str, AfterValidator(_env_name)]
InterfaceName = Annotated[str, AfterValidator(_interface_name)]
Path = Annotated[str, AfterValidator(_path)]
AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]
SocketPath = Annotated[str, AfterValidator(_socket_path)]


def _listen(value: str | None) -> str | None:
    if value in (None, ""):
        return None
    ep = parse_endpoint(value)
    if ep.is_dns and ep.host != "localhost":
        raise ValueError(f"'{ep.host}' is not an IP address")
    return value


Listen = Annotated[str, AfterValidator(_listen)]


def _enroll_url(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError("expected https://HOST:PORT of the gateway's enrollment service")
    if parts.scheme == "http":
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError("http:// only on a loopback address (labs, tests): the token must not travel in clear")
    if parts.query or parts.fragment or parts.username or parts.password or parts.path not in ("", "/"):
        raise ValueError("just https://HOST:PORT (no path, query or user)")
    return value.rstrip("/")


def _cert_pin(value: str) -> str:
    digits = value.lower().removeprefix("sha256:").replace(":", "")
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError("expected the SHA-256 of the certificate: 64 hex digits (':' between pairs allowed)")
    return digits


EnrollUrl = Annotated[str, AfterValidator(_enroll_url)]
CertPin = Annotated[str, AfterValidator(_cert_pin)]
