"""Checks that span fields, tunnels or the host, and the warnings of `hatun check`.

The cross-field checks run even when some fields are wrong, so that one mistake does not hide a
conflict elsewhere. They never read the raw document directly: `_Table` reads each field through
the model's own type (hatun.config.models), so a field is either its validated, typed value, its
default when absent, or None when it does not validate. Nothing here can meet a value of a type it
does not expect, whatever the file holds.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import stat
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from hatun.config.models import Config, Control, Health, HealthOverrides, Routing, Tunnel
from hatun.config.problems import Problem
from hatun.config.values import (
    DEFAULT_INTERFACE_PREFIX,
    Interface,
    Network,
    Probe,
    SourceAddress,
    interface_name_problem,
    mark_problem,
    max_slot,
    table_range_problem,
)
from hatun.durations import format_duration
from hatun.keys import (
    InvalidKey,
    PublicKey,
    TunnelKeys,
    load_preshared_key_env,
    load_preshared_key_file,
    load_private_key_env,
    load_private_key_file,
)


@functools.cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter:
    info = model.model_fields[name]
    annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(annotation, config={"strict": True})


@functools.cache
def _item_adapter(item_type: Any) -> TypeAdapter:
    return TypeAdapter(item_type, config={"strict": True})


def _valid(adapter: TypeAdapter, value: Any) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


class _Table:
    """One table of the raw document, each field read through MODEL's type for it."""

    def __init__(self, model: type[BaseModel], raw: Any) -> None:
        self.model = model
        self.raw: dict[str, Any] = raw if isinstance(raw, dict) else {}

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def get(self, name: str) -> Any:
        """The field's validated value; its default when absent; None when it does not validate or is
        required and absent."""
        if name not in self.raw:
            info = self.model.model_fields[name]
            return None if info.is_required() else info.get_default(call_default_factory=True)
        return _valid(_field_adapter(self.model, name), self.raw[name])

    def given(self, name: str) -> bool:
        """Whether the field is set at all (to any value)."""
        return name in self.raw

    def items(self, name: str, item_type: Any, one_or_many: bool = False) -> list[Any]:
        """The elements of a list field, each validated on its own (None where it does not)."""
        value = self.raw.get(name)
        if one_or_many and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return []
        adapter = _item_adapter(item_type)
        return [_valid(adapter, v) for v in value]


# What an enrolled tunnel gets from its gateway's enrollment service (and so must not give itself).
ENROLLED_KEYS = frozenset({"private_key_file", "private_key_env", "preshared_key_file", "preshared_key_env",
                           "address", "peer_public_key", "endpoint"})


@dataclass
class _LooseTunnel:
    """The parts of a tunnel table that validate on their own."""

    index: int
    name: str | None
    ifname: str | None
    explicit_ifname: bool
    key_file_given: bool
    key_env_given: bool
    key_file: str | None
    key_env: str | None
    psk_file: str | None
    psk_env: str | None
    listen_port: int | None
    given: frozenset[str]  # the keys the table has (valid or not)
    addresses: list[Any]
    probe_given: bool
    probe: Probe | None
    peer_key: PublicKey | None


def _loose_tunnels(raw: dict[str, Any]) -> list[_LooseTunnel]:
    tunnels = raw.get("tunnels")
    if not isinstance(tunnels, list):
        return []
    out = []
    for i, table in enumerate(tunnels):
        if not isinstance(table, dict):
            continue
        t = _Table(Tunnel, table)
        name = t.get("name")
        iface = t.get("interface")
        peer = t.get("peer_public_key")
        out.append(_LooseTunnel(
            index=i,
            name=name,
            ifname=iface if iface is not None else (DEFAULT_INTERFACE_PREFIX + name if name else None),
            explicit_ifname=iface is not None,
            key_file_given=t.given("private_key_file"),
            key_env_given=t.given("private_key_env"),
            key_file=t.get("private_key_file"),
            key_env=t.get("private_key_env"),
            psk_file=t.get("preshared_key_file"),
            psk_env=t.get("preshared_key_env"),
            listen_port=t.get("listen_port"),
            given=frozenset(k for k in table if isinstance(k, str)),
            addresses=[a for a in t.items("address", Interface, one_or_many=True) if a is not None],
            probe_given=t.given("probe"),
            probe=t.get("probe"),
            peer_key=PublicKey.from_base64(peer) if peer is not None else None,
        ))
    return out


def _health_problems(raw: dict[str, Any]) -> list[Problem]:
    """Limits that contradict each other, in [health] and in each tunnel's settings (its own keys over
    [health]'s); a section that does not validate is reported by the schema check instead."""
    try:
        base = Health.model_validate(raw.get("health", {}))
    except ValidationError:
        return []
    problems = _health_conflicts("health", base)
    tunnels = raw.get("tunnels")
    for i, t in enumerate(tunnels if isinstance(tunnels, list) else []):
        own = t.get("health") if isinstance(t, dict) else None
        if own is None:
            continue
        try:
            merged = base.merged(HealthOverrides.model_validate(own))
        except ValidationError:
            continue
        known = {(p.loc.rsplit(".", 1)[1], p.message, p.got) for p in problems}
        problems += [p for p in _health_conflicts(f"tunnels[{i}].health", merged)
                     if (p.loc.rsplit(".", 1)[1], p.message, p.got) not in known]
    return problems


def _health_conflicts(where: str, h: Health) -> list[Problem]:
    out = []
    if h.min_timeout > h.timeout:
        out.append(Problem(f"{where}.min_timeout", f"the probe timeout's floor is above its ceiling (timeout"
                                                   f" {format_duration(h.timeout)}): the timeout could never adapt",
                           format_duration(h.min_timeout)))
    if h.max_loss is not None and h.max_loss < 1 and h.recover_loss > h.max_loss:
        out.append(Problem(f"{where}.recover_loss", f"above max_loss ({h.max_loss:g}): a tunnel would leave"
                                                    " and come back at the same loss, again and again",
                           f"{h.recover_loss:g}"))
    if h.max_rtt is not None and h.recover_rtt is not None and h.recover_rtt.relative == h.max_rtt.relative \
            and h.recover_rtt.value > h.max_rtt.value:
        out.append(Problem(f"{where}.recover_rtt", f"above max_rtt ({h.max_rtt}): a tunnel would leave and come"
                                                   " back at the same RTT, again and again", str(h.recover_rtt)))
    return out


def semantic_problems(raw: dict[str, Any]) -> list[Problem]:
    """Checks that span fields or tunnels, over every field that validates on its own."""
    problems: list[Problem] = _health_problems(raw)
    tunnels = _loose_tunnels(raw)
    routing = _Table(Routing, raw.get("routing"))
    if any("enroll" in t.given for t in tunnels):
        if routing.get("source"):
            problems.append(Problem("routing.source", "not with enrolled tunnels: each gateway knows only the address"
                                    " it handed out, so hatun masquerades each tunnel's traffic to it; remove source"))
        if routing.get("pin_flows") is False:
            problems.append(Problem("routing.pin_flows", "enrolled tunnels need it: the masquerading to each"
                                    " tunnel's address lives in hatun's nftables table"))

    seen_names: dict[str, int] = {}
    seen_ifnames: dict[str, int] = {}
    seen_ports: dict[int, int] = {}
    for t in tunnels:
        i = t.index
        if t.listen_port is not None:
            if t.listen_port in seen_ports:
                problems.append(Problem(f"tunnels[{i}].listen_port", f"port {t.listen_port} is already"
                                        f" tunnels[{seen_ports[t.listen_port]}]'s: each tunnel needs a UDP port of its own"))
            else:
                seen_ports[t.listen_port] = i
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
        if "enroll" in t.given:
            for key in sorted(ENROLLED_KEYS & t.given):
                problems.append(Problem(f"tunnels[{i}].{key}", "comes from the enrollment (enroll is set): remove it"))
            if "enroll_audience" not in t.given:
                problems.append(Problem(f"tunnels[{i}].enroll_audience",
                                        "required with enroll: the `aud` the gateway's enrollment service accepts"))
        else:
            for key in ("address", "peer_public_key", "endpoint"):
                if key not in t.given:
                    problems.append(Problem(f"tunnels[{i}].{key}", "required key missing"))
            for key in sorted({"enroll_audience", "enroll_pin"} & t.given):
                problems.append(Problem(f"tunnels[{i}].{key}", "only with enroll"))
        if "enroll" not in t.given and t.key_file_given == t.key_env_given:
            problems.append(Problem(
                f"tunnels[{i}]",
                "exactly one of private_key_file and private_key_env must be set"
                + (" (both are)" if t.key_file_given else " (neither is)"),
            ))
        if t.psk_file is not None and t.psk_env is not None:
            problems.append(Problem(f"tunnels[{i}]", "at most one of preshared_key_file and preshared_key_env may be set"))
        families = [a.version for a in t.addresses]
        if not t.probe_given and t.addresses:
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

    problems += _overlap_problems(tunnels)

    sources = [x for x in routing.items("source", SourceAddress, one_or_many=True) if x is not None]
    fams = [x.version for x in sources]
    if len(set(fams)) != len(fams):
        problems.append(Problem("routing.source", "at most one IPv4 and one IPv6 source address"))
    prefixes = routing.items("prefixes", Network)
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
    problems += _layout_problems(routing, len(tunnels))
    return problems


MAX_OVERLAPS = 1000  # overlapping pairs reported; identical addresses in thousands of tunnels are n squared


def _overlap_problems(tunnels: list[_LooseTunnel]) -> list[Problem]:
    """Tunnel subnets that overlap: the kernel would route one tunnel's gateway via another.

    A sweep over the networks sorted by their first address: CIDR networks are nested or disjoint,
    so the earlier networks still open at a network's start are exactly those that contain it.
    """
    pairs = []
    for version in (4, 6):
        entries = sorted(((a, t, pos) for t in tunnels for pos, a in enumerate(t.addresses) if a.version == version),
                         key=lambda e: (e[0].network.network_address, e[0].network.prefixlen))
        open_: list[tuple[Any, _LooseTunnel, int]] = []
        for a, t, pos in entries:
            start = a.network.network_address
            open_ = [o for o in open_ if o[0].network.broadcast_address >= start]
            for o in open_:
                if o[1] is not t:
                    first, second = (o, (a, t, pos)) if o[1].index < t.index else ((a, t, pos), o)
                    pairs.append((second[1].index, first[1].index, first[2], second[2], first, second))
            open_.append((a, t, pos))
            if len(pairs) > MAX_OVERLAPS:
                break
    problems = []
    for *_, (na, ta, _), (nb, tb, _) in sorted(pairs, key=lambda p: p[:4])[:MAX_OVERLAPS]:
        problems.append(Problem(
            f"tunnels[{tb.index}].address",
            f"{nb} overlaps tunnels[{ta.index}].address {na}" + (f" (tunnel '{ta.name}')" if ta.name else ""),
        ))
    return problems


def _layout_problems(routing: _Table, n_tunnels: int) -> list[Problem]:
    """The marks and routing tables hatun would use, against the kernel's own."""
    problems = []
    mask = routing.get("fwmark_mask")
    slots = 0
    if mask is not None:
        problem = mark_problem(mask)
        if problem:
            problems.append(Problem("routing.fwmark_mask", problem, hex(mask)))
        elif n_tunnels + 1 >= (1 << bin(mask).count("1")):
            problems.append(Problem("routing.fwmark_mask", f"too few bits for {n_tunnels} tunnels", hex(mask)))
        else:
            slots = max_slot(mask)
    table = routing.get("table")
    if table is not None:
        problem = table_range_problem(table, slots)
        if problem:
            problems.append(Problem("routing.table", problem, repr(table)))
    return problems


@dataclass
class Secrets:
    """Each tunnel's keys (private, and preshared if any) by tunnel name, loaded by `load_secrets`."""

    keys: dict[str, TunnelKeys] = field(default_factory=dict)


def secret_problems(raw: dict[str, Any], secrets: Secrets, environ: dict[str, str] | None, check_mode: bool) -> list[Problem]:
    """Load each tunnel's private key into SECRETS; return the problems met (never showing a key)."""
    problems: list[Problem] = []
    for t in _loose_tunnels(raw):
        i = t.index
        try:
            if t.key_file_given and not t.key_env_given:
                if t.key_file is None:
                    continue  # reported by the structural checks
                key = load_private_key_file(t.key_file, check_mode=check_mode)
                source = "private_key_file"
            elif t.key_env_given and not t.key_file_given:
                if t.key_env is None:
                    continue
                key = load_private_key_env(t.key_env, environ)
                source = "private_key_env"
            else:
                continue
        except InvalidKey as e:
            problems.append(Problem(f"tunnels[{i}].{'private_key_file' if t.key_file_given else 'private_key_env'}", str(e)))
            continue
        if t.peer_key is not None and t.peer_key.raw == key.raw:
            problems.append(Problem(
                f"tunnels[{i}].peer_public_key",
                f"is this tunnel's own private key (from {source}): paste the gateway's public key here, and make"
                " a new private key, since this one is exposed in the config file",
            ))
        elif t.peer_key is not None and key.public_key == t.peer_key:
            problems.append(Problem(
                f"tunnels[{i}].peer_public_key",
                f"equals this tunnel's own public key (from {source}): paste the gateway's public key here",
            ))
        psk = None
        if t.psk_file is not None or t.psk_env is not None:
            source = "preshared_key_file" if t.psk_file is not None else "preshared_key_env"
            try:
                if t.psk_file is not None:
                    psk = load_preshared_key_file(t.psk_file, check_mode=check_mode)
                else:
                    psk = load_preshared_key_env(t.psk_env or "", environ)
            except InvalidKey as e:
                problems.append(Problem(f"tunnels[{i}].{source}", str(e)))
                continue
            if psk.raw in (key.raw, key.public_key.raw) or (t.peer_key is not None and psk.raw == t.peer_key.raw):
                problems.append(Problem(
                    f"tunnels[{i}].{source}",
                    "holds a private or public key of this tunnel, not a preshared key: the gateway's config has"
                    " the peer's PresharedKey (or make a new one with `wg genpsk` on both sides)",
                ))
                continue
        if t.name is not None:
            secrets.keys[t.name] = TunnelKeys(key, psk)
    return problems


def host_problems(raw: dict[str, Any]) -> list[Problem]:
    """What this host's files say against the config: a control socket path taken by something else.

    hatun removes what it finds at its socket path at start (a socket left by a hatun that died), so
    the path must be free or hold a socket. Needs no privileges: an inaccessible path is left to start time.
    """
    path = _Table(Control, raw.get("control")).get("socket")
    if path is None:
        return []
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        return [Problem("control.socket", f"a parent of {path} is not a directory", repr(path))]
    except (OSError, ValueError):
        return []
    if stat.S_ISSOCK(st.st_mode):
        return []
    kind = ("a regular file" if stat.S_ISREG(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
            else "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a socket")
    return [Problem(
        "control.socket",
        f"{path} exists and is {kind}, not a socket: hatun needs that path for its socket and never"
        " removes what is there; choose another path",
    )]


# ---------------------------------------------------------------- warnings


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def config_warnings(config: Config) -> list[str]:
    """What is valid but probably unwanted in CONFIG, one line each ("metrics.listen: ...").

    Pure: `hatun check` prints these and `hatun run` logs them at start; neither refuses the config.
    """
    warnings = []
    address = config.metrics.address
    if address is not None and not _is_loopback_host(address[0]):
        host = address[0]
        where = ("every address of this host" if ipaddress.ip_address(host).is_unspecified
                 else f"{host}, not a loopback address")
        warnings.append(
            f"metrics.listen: {config.metrics.listen} listens on {where}: /metrics, /healthz and /readyz"
            " (tunnel names, states, endpoints and counters) can be read from other hosts;"
            " listen on 127.0.0.1 unless a firewall protects the port"
        )
    if config.health.recover_rtt is not None and config.health.max_rtt is None:
        warnings.append("health.recover_rtt: does nothing without max_rtt")
    for i, t in enumerate(config.tunnels):
        if t.health is not None and t.health.recover_rtt is not None and config.health_for(t).max_rtt is None:
            warnings.append(f"tunnels[{i}].health.recover_rtt: does nothing without max_rtt")
    return warnings


__all__ = ["Secrets", "config_warnings", "host_problems", "secret_problems", "semantic_problems"]
