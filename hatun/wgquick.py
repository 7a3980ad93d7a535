"""Turn wg-quick configs (one tunnel each) into a hatun config (`hatun import`).

Parsing is pure: `parse_wgquick(text, name)` returns a `WgQuickTunnel` or raises `ImportProblem`.
What counts as valid follows wg-quick and `wg setconf` (checked against them in tests/test_wgquick.py):
keys in any case, `#` comments anywhere, CRLF line ends, wg-quick's own keys (DNS, Table, PostUp, ...)
dropped with a note. Rendering is pure too, and `import_config` checks the rendered config as
`hatun check` would, so an import never yields a config that check refuses. Only `write_key_files`
touches the disk: private and preshared keys go into files of their own (mode 0600) that the
generated config references, never onto standard output.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from hatun.config import interface_name_problem, parse_endpoint
from hatun.keys import (
    InvalidKey,
    PresharedKey,
    PrivateKey,
    PublicKey,
    load_preshared_key_file,
    load_private_key_file,
    write_private_key_file,
)
from hatun.logs import safe_text

# Keys wg-quick knows that have no meaning for hatun: dropped with a note in the output.
_IGNORED_INTERFACE_KEYS = {"dns", "table", "preup", "postup", "predown", "postdown", "saveconfig", "fwmark"}


class ImportProblem(ValueError):
    """A wg-quick file hatun cannot import; the message names the file, line and reason.

    The message is made safe once, here: whatever part of the file it quotes, a key-shaped value is
    redacted and control characters are escaped.
    """

    def __init__(self, message: str) -> None:
        super().__init__(safe_text(message))


@dataclass
class WgQuickTunnel:
    name: str
    private_key: PrivateKey
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
    peer_public_key: PublicKey
    endpoint: str
    allowed_ips: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    keepalive: int | None = None
    mtu: int | None = None
    listen_port: int | None = None
    preshared_key: PresharedKey | None = None
    dropped: list[str] = field(default_factory=list)


def tunnel_name_from_path(path: str) -> str:
    """wg0.conf -> "wg0": the tunnel name, made safe for hatun's naming rules."""
    stem = os.path.basename(path)
    stem = stem[: -len(".conf")] if stem.endswith(".conf") else stem
    name = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-_")
    return name[:11].rstrip("-_") or "tunnel"


def parse_wgquick(text: str, name: str, source: str = "<input>") -> WgQuickTunnel:
    """Parse one wg-quick file. Raises ImportProblem (never showing a key's value)."""
    if text.startswith("\ufeff"):
        raise ImportProblem(f"{source}: starts with a byte order mark, which wg and wg-quick refuse:"
                            " save it as plain UTF-8 (without BOM)")
    section = None
    iface: dict[str, tuple[int, str]] = {}
    peers: list[dict[str, tuple[int, str]]] = []
    multi = {"address", "allowedips", "dns"}
    # Lines end at '\n' only, as for wg-quick: splitlines() would also break at \x85, \u2028, ...
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            if section == "peer":
                peers.append({})
            elif section != "interface":
                raise ImportProblem(f"{source}:{lineno}: unknown section [{line[1:-1]}]")
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ImportProblem(f"{source}:{lineno}: expected 'Key = Value'")
        key, value = key.strip().lower(), value.strip()
        if not key:
            raise ImportProblem(f"{source}:{lineno}: a value without a key name")
        if section is None:
            raise ImportProblem(f"{source}:{lineno}: '{key}' outside of [Interface] or [Peer]")
        target = iface if section == "interface" else peers[-1]
        if key in multi and key in target:
            target[key] = (target[key][0], target[key][1] + "," + value)
        else:
            target[key] = (lineno, value)

    def need(table: dict[str, tuple[int, str]], key: str, where: str) -> tuple[int, str]:
        if key not in table:
            raise ImportProblem(f"{source}: [{where}] has no {key_names.get(key, key)}")
        return table[key]

    key_names = {"privatekey": "PrivateKey", "publickey": "PublicKey", "address": "Address", "allowedips": "AllowedIPs"}
    if not iface:
        raise ImportProblem(f"{source}: no [Interface] section")
    if len(peers) != 1:
        raise ImportProblem(
            f"{source}: has {len(peers)} [Peer] sections; a hatun tunnel has exactly one gateway"
            + (": split the file, one peer each" if peers else "")
        )
    peer = peers[0]
    lineno, value = need(iface, "privatekey", "Interface")
    try:
        private_key = PrivateKey.from_base64(value)
    except InvalidKey as e:
        raise ImportProblem(f"{source}:{lineno}: PrivateKey: {e}") from None
    lineno, value = need(peer, "publickey", "Peer")
    try:
        peer_key = PublicKey.from_base64(value)
    except InvalidKey as e:
        raise ImportProblem(f"{source}:{lineno}: PublicKey: {e}") from None
    if peer_key.raw == private_key.raw:
        raise ImportProblem(f"{source}:{lineno}: PublicKey is this file's own PrivateKey: paste the gateway's"
                            " public key there (and make a new private key: this one has been exposed)")
    if peer_key == private_key.public_key:
        raise ImportProblem(f"{source}:{lineno}: PublicKey is this host's own public key: paste the gateway's there")
    psk = None
    if "presharedkey" in peer:
        lineno, value = peer["presharedkey"]
        try:
            psk = PresharedKey.from_base64(value)
        except InvalidKey as e:
            raise ImportProblem(f"{source}:{lineno}: PresharedKey: {e}") from None
        if not any(psk.raw):
            psk = None  # all zeros: wg's way of saying "none"
        elif psk.raw in (peer_key.raw, private_key.raw, private_key.public_key.raw):
            raise ImportProblem(f"{source}:{lineno}: PresharedKey is one of the tunnel's own keys, not a"
                                " preshared key (make one with `wg genpsk`, on both sides)")
    lineno, value = need(iface, "address", "Interface")
    addresses = []
    for part in _split(value):
        try:
            addr = ipaddress.ip_interface(part)
        except ValueError:
            raise ImportProblem(f"{source}:{lineno}: Address: '{part}' is not an address") from None
        if "/" not in part:
            addr = ipaddress.ip_interface(f"{part}/{addr.max_prefixlen}")
        addresses.append(addr)
    lineno, value = need(peer, "allowedips", "Peer")
    allowed = []
    if any(not p.strip() for p in value.split(",")):
        raise ImportProblem(f"{source}:{lineno}: AllowedIPs: an empty entry (a stray comma, or an empty"
                            " AllowedIPs line), which wg refuses")
    for part in _split(value):
        try:
            allowed.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ImportProblem(f"{source}:{lineno}: AllowedIPs: '{part}' is not a network") from None
    if "endpoint" not in peer:
        raise ImportProblem(
            f"{source}: [Peer] has no Endpoint: hatun dials each gateway, so it needs the gateway's address;"
            " add `Endpoint = HOST:PORT` under [Peer] (this looks like the gateway's side of a tunnel, or a"
            " peer that only answers)")
    lineno, value = peer["endpoint"]
    try:
        endpoint = str(parse_endpoint(value))
    except ValueError as e:
        raise ImportProblem(f"{source}:{lineno}: Endpoint: {e}") from None
    tunnel = WgQuickTunnel(name, private_key, addresses, peer_key, endpoint, allowed, preshared_key=psk)
    for key, conv, attr in (("persistentkeepalive", _keepalive, "keepalive"), ("mtu", int, "mtu"), ("listenport", int, "listen_port")):
        table = peer if key == "persistentkeepalive" else iface
        if key in table:
            lineno, value = table[key]
            try:
                setattr(tunnel, attr, conv(value))
            except ValueError:
                raise ImportProblem(f"{source}:{lineno}: {key}: '{value}' is not a number") from None
    tunnel.dropped = sorted(k for k in iface if k in _IGNORED_INTERFACE_KEYS)
    unknown = sorted(set(iface) - _IGNORED_INTERFACE_KEYS - {"privatekey", "address", "mtu", "listenport"})
    unknown += sorted(set(peer) - {"publickey", "allowedips", "endpoint", "persistentkeepalive", "presharedkey"})
    if unknown:
        raise ImportProblem(f"{source}: unknown key(s): {', '.join(unknown)}")
    return tunnel


def _split(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def _keepalive(value: str) -> int:
    return 0 if value.strip().lower() == "off" else int(value)


def _probe_guess(t: WgQuickTunnel) -> tuple[str | None, str]:
    """A probe for a tunnel whose address has no gateway address: (probe, comment)."""
    first = t.addresses[0]
    if first.network.prefixlen < first.max_prefixlen:
        return None, ""
    for net in sorted(t.allowed_ips, key=lambda n: -n.prefixlen):
        if net.version == first.version and net.prefixlen > 0 and net.num_addresses > 1:
            host = next(net.hosts()) if net.num_addresses > 2 else net.network_address
            target = f"[{host}]" if host.version == 6 else str(host)
            return f"icmp://{target}", "guessed: an address behind the gateway that must answer ping; check it"
    return None, "set an address behind the gateway that answers ping (the tunnel address is a single host)"


def steered_prefixes(tunnels: list[WgQuickTunnel]) -> list:
    """The networks behind the gateways: every AllowedIPs network that is not a tunnel's own subnet
    (wg-quick files usually list that too; hatun routes it by itself)."""
    prefixes: dict = {}  # ordered, and a fast membership test for files with many AllowedIPs
    tunnel_nets = {a.network for t in tunnels for a in t.addresses}
    for t in tunnels:
        for net in t.allowed_ips:
            if net not in prefixes and not any(net == tn or net.subnet_of(tn) for tn in tunnel_nets if tn.version == net.version):
                prefixes[net] = None
    return list(prefixes)


def render_config(tunnels: list[WgQuickTunnel], key_files: dict[str, str], psk_files: dict[str, str]) -> str:
    """The hatun config (TOML) for TUNNELS, private keys referenced by KEY_FILES[name] and preshared
    keys by PSK_FILES[name]. Raises ImportProblem when the files name no network to steer."""
    prefixes = steered_prefixes(tunnels)
    if not prefixes:
        own = ", ".join(sorted({str(a.network) for t in tunnels for a in t.addresses}))
        raise ImportProblem(
            f"nothing to steer: AllowedIPs hold only the tunnels' own subnets ({own}); add the private"
            " networks behind the gateways to AllowedIPs (e.g. `AllowedIPs = 10.0.0.0/8`)")
    lines = [
        "# Generated by `hatun import` from wg-quick configs. Review it, then run `hatun check` on it.",
        "",
        "[routing]",
        f"prefixes = [{', '.join(repr_str(str(p)) for p in prefixes)}]",
    ]
    if any(p.prefixlen == 0 for p in prefixes):
        lines.append("# A /0 prefix sends ALL traffic through the tunnels (as the wg-quick files did).")
    lines.append("")
    for t in tunnels:
        lines += ["[[tunnels]]", f"name = {repr_str(t.name)}", f"private_key_file = {repr_str(key_files[t.name])}"]
        if t.name in psk_files:
            lines.append(f"preshared_key_file = {repr_str(psk_files[t.name])}")
        addrs = [str(a) for a in t.addresses]
        lines.append(f"address = {repr_str(addrs[0])}" if len(addrs) == 1 else f"address = [{', '.join(map(repr_str, addrs))}]")
        lines.append(f"peer_public_key = {repr_str(t.peer_public_key.base64)}")
        lines.append(f"endpoint = {repr_str(t.endpoint)}")
        if t.keepalive:
            lines.append(f"keepalive = {t.keepalive}")
        if t.mtu:
            lines.append(f"mtu = {t.mtu}")
        if t.listen_port:
            lines.append(f"listen_port = {t.listen_port}")
        if interface_name_problem("hat-" + t.name):
            lines.append(f"interface = {repr_str(t.name[:15])}")
        probe, comment = _probe_guess(t)
        if probe:
            lines.append(f"probe = {repr_str(probe)}  # {comment}")
        elif comment:
            raise ImportProblem(f"tunnel {t.name}: {comment}")
        if t.dropped:
            lines.append(f"# not imported (no meaning for hatun): {', '.join(t.dropped)}")
        lines.append("")
    return "\n".join(lines)


def import_config(tunnels: list[WgQuickTunnel], key_dir: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """The hatun config for TUNNELS whose key files go in KEY_DIR: (text, key files, preshared key
    files), checked as `hatun check` checks a config, without writing anything yet.

    Raises ImportProblem listing what `hatun check` would refuse in it (never a key's value)."""
    from hatun.config import ConfigError, parse_config

    key_dir = os.path.abspath(key_dir)
    key_files = {t.name: os.path.join(key_dir, f"{t.name}.key") for t in tunnels}
    psk_files = {t.name: os.path.join(key_dir, f"{t.name}.psk") for t in tunnels if t.preshared_key is not None}
    text = render_config(tunnels, key_files, psk_files)
    try:
        parse_config(text)
    except ConfigError as e:
        listed = "; ".join(str(p) for p in e.problems)
        raise ImportProblem(f"the wg-quick files give a config that hatun would refuse: {listed}") from None
    return text, key_files, psk_files


def repr_str(value: str) -> str:
    """A TOML basic string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_key_files(tunnels: list[WgQuickTunnel], key_files: dict[str, str], psk_files: dict[str, str]) -> None:
    """Write each tunnel's private key to KEY_FILES[name] and preshared key to PSK_FILES[name] (mode
    0600). An existing file with the same key is reused; a different one is never overwritten
    (raises ImportProblem before anything is written).
    """
    wanted = [(key_files[t.name], t.private_key, load_private_key_file) for t in tunnels]
    wanted += [(psk_files[t.name], t.preshared_key, load_preshared_key_file) for t in tunnels if t.name in psk_files]
    todo = []
    for path, key, load in wanted:
        if os.path.lexists(path):
            try:
                same = load(path, check_mode=False) == key
            except InvalidKey:
                same = False
            if not same:
                raise ImportProblem(f"{path} exists and holds another key: not overwritten (use --key-dir)")
            try:
                load(path, check_mode=True)
            except InvalidKey as e:  # the same key, readable by others: hatun check would refuse it
                raise ImportProblem(str(e)) from None
        else:
            todo.append((path, key))
    for path, key in todo:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_private_key_file(path, key)
