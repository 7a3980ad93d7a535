"""hatun's configuration: pydantic models, pure parsing, loading, and the checks `hatun check` runs.

`parse_config(text)` is pure (no file or network access); `load_config(path)` reads the file and
the private keys. Every problem found is reported, not only the first: a `ConfigError` carries a list
of `Problem`s, each naming where it is (`tunnels[1].endpoint`), what is wrong and what was given.
Private keys never appear in a problem: inputs that look like keys are redacted.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from hatun.durations import format_duration, parse_duration
from hatun.keys import InvalidKey, PrivateKey, PublicKey, decode_key, load_private_key_env, load_private_key_file

IFNAMSIZ = 15  # bytes in a Linux interface name, without the terminating NUL
DEFAULT_INTERFACE_PREFIX = "hat-"
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9_-]*[a-z0-9])?$")
# Interface names: what the kernel accepts (dev_valid_name), minus characters that make trouble in
# shells, metric labels and nftables sets.
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
KEY_SHAPE_RE = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")


# ---------------------------------------------------------------- value types


def _duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be a positive duration")
    return seconds


def _non_negative_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m|h)\s*$"},
        {"type": "number", "exclusiveMinimum": 0},
    ],
    "description": 'a duration: "250ms", "2s", "1m", "1h", or a number of seconds',
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
    WithJsonSchema({**_DURATION_SCHEMA, "anyOf": [_DURATION_SCHEMA["anyOf"][0], {"type": "number", "minimum": 0}]}),
]


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
            if len(host) > 253 or not all(DNS_LABEL_RE.match(label) for label in labels):
                raise ValueError(f"'{host}' is neither an IP address nor a valid DNS name") from None
    if not port_text.isdigit():
        raise ValueError(f"port '{port_text}' is not a number" if port_text else "port missing")
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


# ---------------------------------------------------------------- models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthOverrides(_Model):
    """Health settings a tunnel may override (unset: the [health] value)."""

    interval: Duration | None = Field(None, description="time between probes")
    timeout: Duration | None = Field(None, description="a probe without reply by then has failed")
    rise: int | None = Field(None, ge=1, le=1000, description="consecutive successes to (re)enter service")
    fall: int | None = Field(None, ge=1, le=1000, description="consecutive failures to leave service")
    handshake_timeout: Duration | None = Field(
        None, description="a tunnel whose last WireGuard handshake is older than this counts as failing"
    )
    jitter: float | None = Field(None, ge=0, le=0.5, description="random spread of probe times, as a share of the interval")


class Health(_Model):
    """Defaults for every tunnel's health checks."""

    interval: Duration = Field(0.1, description="time between probes")
    timeout: Duration = Field(0.25, description="a probe without reply by then has failed")
    rise: int = Field(3, ge=1, le=1000, description="consecutive successes to (re)enter service")
    fall: int = Field(2, ge=1, le=1000, description="consecutive failures to leave service")
    handshake_timeout: Duration = Field(
        180.0,
        description="a tunnel whose last WireGuard handshake is older than this counts as failing"
        " (WireGuard drops session keys after 180 s without a new handshake)",
    )
    jitter: float = Field(0.1, ge=0, le=0.5, description="random spread of probe times, as a fraction of the interval")

    def merged(self, override: HealthOverrides | None) -> Health:
        if override is None:
            return self
        return self.model_copy(update={k: v for k, v in override.model_dump(exclude_none=True, mode="python").items()})


class Routing(_Model):
    prefixes: list[Network] = Field(..., min_length=1, description="private networks reached through the tunnels")
    source: Annotated[list[HostAddress], BeforeValidator(_one_or_many)] = Field(
        default_factory=list,
        description="stable source address(es) for traffic into the tunnels, at most one IPv4 and one IPv6;"
        " hatun puts it on the loopback device",
    )
    when_all_down: Literal["keep", "unreachable"] = Field(
        "keep",
        description="when every tunnel is down: keep the route on the last tunnels, or make the prefixes"
        " unreachable (never a fall-back to the default route)",
    )
    mode: Literal["auto", "resilient", "multipath"] = Field(
        "auto", description="resilient nexthop group where the kernel has one (auto), or classic multipath route"
    )
    buckets: int = Field(512, ge=8, le=32768, description="hash buckets of the resilient nexthop group")
    idle_timer: NonNegativeDuration = Field(
        1.0, description="a bucket idle this long may move to another tunnel (resilient groups)"
    )
    unbalanced_timer: NonNegativeDuration = Field(
        0.0,
        description="force a rebalance when the group stays unbalanced this long, moving busy flows"
        " (0: never; see README)",
    )
    hash_policy: Literal["l3", "l4", "keep"] = Field(
        "l4", description="fib_multipath_hash_policy: l4 spreads flows by ports too; keep leaves the sysctl alone"
    )
    pin_flows: bool = Field(
        True, description="pin established flows to their tunnel with conntrack marks (nftables), so failback moves none"
    )
    table: int = Field(51820, ge=1, le=0xFFFFFF00, description="routing table of the steered prefixes")
    rule_priority: int = Field(5200, ge=1, le=32000, description="priority of hatun's first policy routing rule")
    protocol: int = Field(147, ge=5, le=254, description="route protocol id that marks hatun's routes, rules and nexthops")
    nexthop_id: int = Field(518200000, ge=1, le=0xFFFF0000, description="first nexthop object id hatun uses")
    fwmark_mask: Mark = Field(0x00FF0000, description="bits of the packet and conntrack mark that hatun uses")
    nft_table: str = Field("hatun", pattern=r"^[a-z][a-z0-9_]{0,30}$", description="nftables table (family inet)")
    drain_timeout: Duration = Field(10.0, description="how long a removed tunnel keeps its existing flows before teardown")


class Metrics(_Model):
    listen: str | None = Field("127.0.0.1:9469", description="address:port for /metrics, /healthz, /readyz; empty: off")

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        ep = parse_endpoint(value)
        if ep.is_dns and ep.host != "localhost":
            raise ValueError(f"'{ep.host}' is not an IP address")
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        ep = parse_endpoint(self.listen)
        return (ep.host, ep.port)


class Control(_Model):
    socket: str = Field("/run/hatun/hatun.sock", description="control socket path (mode 0600)")


class Tunnel(_Model):
    name: str = Field(..., description="used in interface names, metric labels and the CLI")
    private_key_file: str | None = Field(None, description="file holding this host's private key (mode 0600)")
    private_key_env: str | None = Field(None, description="environment variable holding this host's private key")
    address: Annotated[list[Interface], BeforeValidator(_one_or_many)] = Field(
        ..., min_length=1, description="this host's address(es) inside the tunnel, with prefix length"
    )
    peer_public_key: str = Field(..., description="the gateway's public key (base64)")
    endpoint: EndpointField = Field(..., description="the gateway: IPv4:port, [IPv6]:port or dns-name:port")
    weight: int = Field(1, ge=1, le=256, description="share of flows")
    priority: int = Field(0, ge=0, le=1000, description="tier: a worse (higher) tier is used only while every better tier is down")
    keepalive: int | None = Field(None, ge=0, le=65535, description="persistent keepalive seconds (0 or unset: off)")
    probe: ProbeField | None = Field(None, description="icmp://ADDRESS or tcp://ADDRESS:PORT; default ICMP to the gateway's tunnel address")
    interface: str | None = Field(None, description="interface name (default hat-NAME), at most 15 bytes")
    mtu: int = Field(1420, ge=1280, le=9000, description="tunnel MTU")
    listen_port: int | None = Field(None, ge=1, le=65535, description="local UDP port (default: random)")
    allowed_ips: Annotated[list[Network], BeforeValidator(_one_or_many)] = Field(
        default_factory=list, description="extra networks accepted from the gateway besides the steered prefixes"
    )
    health: HealthOverrides | None = Field(None, description="this tunnel's own health settings")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not NAME_RE.match(value) or len(value) > 32:
            raise ValueError(
                "use 1-32 lowercase letters, digits, '-' or '_', starting and ending with a letter or digit"
            )
        return value

    @field_validator("peer_public_key")
    @classmethod
    def _check_peer_key(cls, value: str) -> str:
        decode_key(value)
        return value.strip()

    @field_validator("private_key_env")
    @classmethod
    def _check_env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("not a valid environment variable name")
        return value

    @field_validator("interface")
    @classmethod
    def _check_interface(cls, value: str | None) -> str | None:
        if value is not None:
            problem = interface_name_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    @property
    def ifname(self) -> str:
        return self.interface or DEFAULT_INTERFACE_PREFIX + self.name

    @property
    def peer_key(self) -> PublicKey:
        return PublicKey.from_base64(self.peer_public_key)

    @property
    def probe_target(self) -> Probe:
        """The configured probe, or ICMP to the gateway's tunnel address (the first other host of the subnet)."""
        if self.probe is not None:
            return self.probe
        return Probe("icmp", default_peer_address(self.address[0]))


class Config(_Model):
    backend: Literal["auto", "kernel", "userspace"] = Field(
        "auto", description="WireGuard implementation: kernel where available (auto), else wireguard-go"
    )
    keep_on_exit: bool = Field(False, description="leave tunnels and routes in place when hatun stops")
    run_dir: str = Field("/run/hatun", description="runtime files: wireguard-go logs, state")
    resolve_interval: Duration = Field(300.0, description="how often DNS endpoints are resolved again")
    routing: Routing
    health: Health = Field(default_factory=Health)
    metrics: Metrics = Field(default_factory=Metrics)
    control: Control = Field(default_factory=Control)
    tunnels: list[Tunnel] = Field(..., min_length=1)

    def tunnel(self, name: str) -> Tunnel:
        for t in self.tunnels:
            if t.name == name:
                return t
        raise KeyError(name)

    def health_for(self, tunnel: Tunnel) -> Health:
        return self.health.merged(tunnel.health)


def interface_name_problem(name: str) -> str | None:
    """Why NAME cannot be a Linux interface name, or None when it can."""
    if not name:
        return "empty interface name"
    if len(name.encode()) > IFNAMSIZ:
        return f"interface name '{name}' is {len(name.encode())} bytes, at most {IFNAMSIZ} are allowed"
    if name in (".", "..") or not IFNAME_RE.match(name):
        return f"interface name '{name}' may use only letters, digits, '.', '-' and '_'"
    return None


def default_peer_address(address: ipaddress.IPv4Interface | ipaddress.IPv6Interface):
    """The gateway's address in a point-to-point tunnel subnet: the other usable host.

    For 198.18.101.2/30 that is 198.18.101.1; for a /31 the other address; for wider subnets the
    first host that is not ours.
    """
    net = address.network
    if net.prefixlen >= net.max_prefixlen - 1:
        others = [a for a in (net.network_address, net.broadcast_address) if a != address.ip]
        return others[0] if others else address.ip
    for host in net.hosts():
        if host != address.ip:
            return host
    return address.ip


# ---------------------------------------------------------------- problems


_KEYLIKE = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=|\b[0-9a-fA-F]{64}\b")


def redact_keys(text: str) -> str:
    """TEXT with anything shaped like a WireGuard key (base64 or hex) replaced: whatever a user put
    where, a problem report never repeats a private key."""
    return _KEYLIKE.sub("<redacted>", text)


@dataclass(frozen=True)
class Problem:
    """One mistake in a config: where (`tunnels[1].endpoint`), what, and what was given."""

    loc: str
    message: str
    got: str | None = None
    line: int | None = None
    column: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", redact_keys(self.message))
        if self.got is not None:
            object.__setattr__(self, "got", redact_keys(self.got))

    def __str__(self) -> str:
        where = self.loc
        if self.line is not None:
            where = f"line {self.line}, column {self.column}" + (f" ({self.loc})" if self.loc else "")
        text = f"{where}: {self.message}" if where else self.message
        if self.got is not None:
            text += f" (got {self.got})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class ConfigError(Exception):
    """A config with problems. `problems` lists every one of them."""

    def __init__(self, problems: list[Problem], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(str(p) for p in problems))


class ConfigUnreadable(Exception):
    """The config file cannot be read at all (missing, permission denied, not a file)."""


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _show_input(value: Any) -> str | None:
    """A short, safe rendering of a bad input; None when it should not be shown."""
    if isinstance(value, (dict, list)):
        return None
    if isinstance(value, str):
        if KEY_SHAPE_RE.match(value.strip()) or len(value) > 120:
            return "<redacted>"
        return repr(value)
    if isinstance(value, (int, float, bool)):
        return repr(value)
    return None


_MESSAGES = {
    "missing": "required key missing",
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
}


def _problem_from_pydantic(err: dict[str, Any], raw: Any) -> Problem | None:
    loc = tuple(err["loc"])
    # Unions and Annotated validators add internal loc parts such as 'function-before[...]'.
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("list", "str", "int"))))
    etype = err["type"]
    # A single string given where a list is accepted ("address = ...") is reported without "[0]".
    if loc and isinstance(loc[-1], int) and isinstance(_lookup(raw, loc[:-1]), str):
        loc = loc[:-1]
    where = _loc(loc)
    inp = err.get("input")
    if etype == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        parent = _model_for_loc(loc[:-1])
        if key == "private_key":
            return Problem(where, "inline private keys are not accepted: put the key in a file (private_key_file,"
                                  " mode 0600) or an environment variable (private_key_env)")
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(key, list(parent.model_fields), n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
            else:
                hint = f"; known keys: {', '.join(parent.model_fields)}"
        what = "section" if isinstance(inp, dict) else "key"
        return Problem(where, f"unknown {what} '{key}'{hint}")
    if etype in _MESSAGES:
        msg = _MESSAGES[etype]
    elif etype == "value_error":
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
    elif etype == "literal_error":
        msg = "expected one of " + err["ctx"]["expected"]
    elif etype in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        op = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}[etype]
        bound = next(iter(err["ctx"].values()))
        msg = f"must be {op} {bound}"
    elif etype == "too_short":
        msg = "must not be empty" if err["ctx"].get("min_length") == 1 else err["msg"]
    elif etype == "string_pattern_mismatch":
        msg = "invalid value"
    else:
        msg = err["msg"]
    # Values of key fields are never echoed: a private key pasted in the wrong place must not leak.
    secret_field = bool(loc) and isinstance(loc[-1], str) and loc[-1].endswith("key")
    return Problem(where, msg, None if etype == "missing" or secret_field else _show_input(inp))


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _model_for_loc(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = None
        for candidate in (Routing, Health, HealthOverrides, Metrics, Control, Tunnel):
            if ann is candidate or candidate.__name__ in str(ann):
                model = candidate
                break
    return model


# ---------------------------------------------------------------- parsing and checks


@dataclass
class Secrets:
    """Private keys by tunnel name, loaded by `load_secrets`."""

    keys: dict[str, PrivateKey] = field(default_factory=dict)


def _toml_problem(e: tomllib.TOMLDecodeError, source: str) -> Problem:
    text = str(e)
    m = re.search(r"\(at line (\d+), column (\d+)\)$", text)
    if m:
        return Problem("", "TOML syntax: " + text[: m.start()].strip(), line=int(m.group(1)), column=int(m.group(2)))
    m = re.search(r"\(at end of document\)$", text)
    if m:
        lines = source.split("\n")
        return Problem("", "TOML syntax: " + text[: m.start()].strip() + " at end of file",
                       line=len(lines), column=len(lines[-1]) + 1)
    return Problem("", "TOML syntax: " + text)


def parse_config(text: str) -> Config:
    """Validate config TEXT (TOML) structurally and semantically, without touching files or secrets.

    Raises ConfigError listing every problem found.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_toml_problem(e, text)]) from None
    problems: list[Problem] = []
    config: Config | None = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            p = _problem_from_pydantic(err, raw)
            if p is not None and p not in problems:
                problems.append(p)
    problems += _semantic_problems(raw)
    if problems:
        raise ConfigError(_in_file_order(problems, raw))
    assert config is not None
    return config


def _in_file_order(problems: list[Problem], raw: dict[str, Any]) -> list[Problem]:
    """Sort problems as their places appear in the file: sections in order, tunnels by index."""
    order = {key: n for n, key in enumerate(raw)}

    def key(p: Problem) -> tuple[int, int]:
        m = re.match(r"([A-Za-z_]+)(?:\[(\d+)\])?", p.loc)
        if not m:
            return (-1, 0)
        return (order.get(m.group(1), len(order)), int(m.group(2) or 0))

    return sorted(problems, key=key)


def _try(fn: Any, value: Any) -> Any:
    try:
        return fn(value)
    except (ValueError, TypeError, InvalidKey):
        return None


@dataclass
class _LooseTunnel:
    """The parts of a tunnel table that parse on their own: cross-checks run over these, so that a
    mistake in one field does not hide a conflict in another."""

    index: int
    name: str | None
    ifname: str | None
    explicit_ifname: bool
    key_file: Any
    key_env: Any
    addresses: list[Any]
    probe: Probe | None
    peer_key: PublicKey | None


def _loose_tunnels(raw: dict[str, Any]) -> list[_LooseTunnel]:
    tunnels = raw.get("tunnels")
    if not isinstance(tunnels, list):
        return []
    out = []
    for i, t in enumerate(tunnels):
        if not isinstance(t, dict):
            continue
        name = t.get("name")
        name = name if isinstance(name, str) and _try(Tunnel._check_name, name) else None
        iface = t.get("interface")
        explicit = isinstance(iface, str) and interface_name_problem(iface) is None
        ifname = iface if explicit else (DEFAULT_INTERFACE_PREFIX + name if name else None)
        addrs = [a for a in (_try(_interface, v) for v in (_try(_one_or_many, t.get("address")) or [])) if a]
        peer = t.get("peer_public_key")
        out.append(_LooseTunnel(
            i, name, ifname, explicit, t.get("private_key_file"), t.get("private_key_env"), addrs,
            _try(parse_probe, t.get("probe")) if "probe" in t else None,
            _try(PublicKey.from_base64, peer) if isinstance(peer, str) else None,
        ))
    return out


def _semantic_problems(raw: dict[str, Any]) -> list[Problem]:
    """Checks that span fields or tunnels, over every part that parses on its own."""
    problems: list[Problem] = []
    tunnels = _loose_tunnels(raw)
    routing = raw.get("routing") if isinstance(raw.get("routing"), dict) else {}

    seen_names: dict[str, int] = {}
    seen_ifnames: dict[str, int] = {}
    for t in tunnels:
        i = t.index
        if t.name is not None:
            if t.name in seen_names:
                problems.append(Problem(f"tunnels[{i}].name", f"duplicate tunnel name, already used by tunnels[{seen_names[t.name]}]", repr(t.name)))
            else:
                seen_names[t.name] = i
        if t.ifname is not None:
            problem = None if t.explicit_ifname else interface_name_problem(t.ifname)
            if problem:
                problems.append(Problem(f"tunnels[{i}].name", f"{problem}: shorten the name or set 'interface'", repr(t.name)))
            elif t.ifname in seen_ifnames:
                if t.explicit_ifname or seen_names.get(t.name) == i:
                    problems.append(Problem(f"tunnels[{i}].interface", f"interface name '{t.ifname}' already used by tunnels[{seen_ifnames[t.ifname]}]"))
            else:
                seen_ifnames[t.ifname] = i
        if (t.key_file is None) == (t.key_env is None):
            problems.append(Problem(
                f"tunnels[{i}]",
                "exactly one of private_key_file and private_key_env must be set"
                + (" (both are)" if t.key_file is not None else " (neither is)"),
            ))
        families = [a.version for a in t.addresses]
        if t.probe is None and "probe" not in (raw["tunnels"][i] or {}) and t.addresses:
            first = t.addresses[0]
            if first.network.prefixlen == first.max_prefixlen:
                problems.append(Problem(
                    f"tunnels[{i}].probe",
                    f"required: the tunnel address {first} is a single host, so there is no gateway address"
                    " to probe by default; set probe = \"icmp://ADDRESS\" (an address behind the gateway that answers)",
                ))
        if len(set(families)) != len(families):
            problems.append(Problem(f"tunnels[{i}].address", "at most one IPv4 and one IPv6 address per tunnel"))
        if t.probe is not None and families:
            if t.probe.host.version not in families:
                problems.append(Problem(
                    f"tunnels[{i}].probe",
                    f"probe target is IPv{t.probe.host.version} but the tunnel has no IPv{t.probe.host.version} address",
                    repr(str(t.probe)),
                ))
            elif any(t.probe.host == a.ip for a in t.addresses):
                problems.append(Problem(f"tunnels[{i}].probe", "probe target is this host's own tunnel address", repr(str(t.probe))))

    # Overlapping tunnel subnets would make the kernel route one tunnel's gateway via another.
    for k, a in enumerate(tunnels):
        for b in tunnels[k + 1:]:
            for na in a.addresses:
                for nb in b.addresses:
                    if na.version == nb.version and na.network.overlaps(nb.network):
                        problems.append(Problem(
                            f"tunnels[{b.index}].address",
                            f"{nb} overlaps tunnels[{a.index}].address {na}" + (f" (tunnel '{a.name}')" if a.name else ""),
                        ))

    sources = [x for x in (_try(_host_address, v) for v in (_try(_one_or_many, routing.get("source")) or [])) if x]
    fams = [x.version for x in sources]
    if len(set(fams)) != len(fams):
        problems.append(Problem("routing.source", "at most one IPv4 and one IPv6 source address"))
    raw_prefixes = routing.get("prefixes") if isinstance(routing.get("prefixes"), list) else []
    prefixes = [_try(_network, v) for v in raw_prefixes]
    seen: set[Any] = set()
    for k, p in enumerate(prefixes):
        if p is None:
            continue
        if p in seen:
            problems.append(Problem(f"routing.prefixes[{k}]", "duplicate prefix", repr(str(p))))
        seen.add(p)
    prefix_fams = {p.version for p in prefixes if p is not None}
    for t in tunnels:
        if not t.addresses:
            continue
        tfams = {a.version for a in t.addresses}
        for fam in sorted(prefix_fams - tfams):
            problems.append(Problem(
                f"tunnels[{t.index}].address",
                f"routing.prefixes has IPv{fam} networks but " + (f"tunnel '{t.name}'" if t.name else "this tunnel")
                + f" has no IPv{fam} address",
            ))
    mask = _try(_mark, routing.get("fwmark_mask", 0x00FF0000))
    if mask is not None:
        if mask == 0 or ((mask + (mask & -mask)) & mask) != 0:
            problems.append(Problem("routing.fwmark_mask", "must be one contiguous run of bits, e.g. 0x00ff0000", hex(mask)))
        elif bin(mask).count("1") < 3:
            problems.append(Problem("routing.fwmark_mask", "needs at least 3 bits (one mark per tunnel plus one)", hex(mask)))
        elif len(tunnels) + 1 >= (1 << bin(mask).count("1")):
            problems.append(Problem("routing.fwmark_mask", f"too few bits for {len(tunnels)} tunnels", hex(mask)))
    return problems


def _secret_problems(raw: dict[str, Any], secrets: Secrets, environ: dict[str, str] | None, check_mode: bool) -> list[Problem]:
    """Load each tunnel's private key into SECRETS; return the problems met (never showing a key)."""
    problems: list[Problem] = []
    for t in _loose_tunnels(raw):
        i = t.index
        try:
            if isinstance(t.key_file, str) and t.key_env is None:
                key = load_private_key_file(t.key_file, check_mode=check_mode)
                source = "private_key_file"
            elif isinstance(t.key_env, str) and t.key_file is None:
                if _try(Tunnel._check_env_name, t.key_env) is None:
                    continue
                key = load_private_key_env(t.key_env, environ)
                source = "private_key_env"
            else:
                continue  # reported by the structural checks
        except InvalidKey as e:
            field_name = "private_key_file" if t.key_env is None else "private_key_env"
            problems.append(Problem(f"tunnels[{i}].{field_name}", str(e)))
            continue
        if t.peer_key is not None and key.public_key == t.peer_key:
            problems.append(Problem(
                f"tunnels[{i}].peer_public_key",
                f"equals this tunnel's own public key (from {source}): paste the gateway's public key here",
            ))
        if t.name is not None:
            secrets.keys[t.name] = key
    return problems


def load_secrets(config: Config, *, environ: dict[str, str] | None = None, check_mode: bool = True) -> Secrets:
    """Load every tunnel's private key (file or environment). Raises ConfigError listing all problems.

    Also checks that no peer key equals the tunnel's own public key (a copy-paste slip that makes the
    tunnel talk to itself).
    """
    secrets = Secrets()
    problems = _secret_problems(config.model_dump(mode="json"), secrets, environ, check_mode)
    if problems:
        raise ConfigError(problems)
    return secrets


def read_config_text(path: str) -> str:
    """Read a config file. Raises ConfigUnreadable with the reason."""
    try:
        with open(path, "rb") as f:
            data = f.read(4 * 1024 * 1024 + 1)
    except FileNotFoundError:
        raise ConfigUnreadable(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigUnreadable(f"{path}: is a directory") from None
    except OSError as e:
        raise ConfigUnreadable(f"{path}: {e.strerror}") from None
    if len(data) > 4 * 1024 * 1024:
        raise ConfigUnreadable(f"{path}: larger than 4 MiB, not a hatun config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigUnreadable(f"{path}: not UTF-8 text (byte {e.start})") from None


def load_config(path: str, *, skip_secrets: bool = False, environ: dict[str, str] | None = None) -> tuple[Config, Secrets]:
    """Read, parse and check PATH, and load the private keys (unless SKIP_SECRETS).

    Raises ConfigUnreadable (file cannot be read) or ConfigError (every problem, structural,
    semantic and secrets, together).
    """
    text = read_config_text(path)
    secrets = Secrets()
    try:
        config = parse_config(text)
    except ConfigError as e:
        e.source = path
        if not skip_secrets and not any(p.line is not None for p in e.problems):
            e.problems += _secret_problems(tomllib.loads(text), secrets, environ, True)
            e.args = ("\n".join(str(p) for p in e.problems),)
        raise
    if skip_secrets:
        return config, secrets
    problems = _secret_problems(tomllib.loads(text), secrets, environ, True)
    if problems:
        raise ConfigError(problems, path)
    return config, secrets


def json_schema() -> dict[str, Any]:
    """The JSON schema of a config file, for editors (config/hatun.schema.json)."""
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "hatun configuration"
    return schema


def environ_keys_used(config: Config) -> list[str]:
    """Environment variables the config reads private keys from."""
    return [t.private_key_env for t in config.tunnels if t.private_key_env]


__all__ = [
    "Config", "ConfigError", "ConfigUnreadable", "Endpoint", "Health", "Problem", "Probe", "Routing",
    "Secrets", "Tunnel", "load_config", "load_secrets", "parse_config", "parse_endpoint", "parse_probe",
    "read_config_text", "json_schema", "default_peer_address",
]
