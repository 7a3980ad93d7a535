"""Turn wg-quick configs (one tunnel each) into a hatun config (`hatun import`).

Parsing is pure: `parse_wgquick(text, name)` returns a `WgQuickTunnel` or raises `ImportProblem`.
Rendering is pure too. Only `write_key_files` touches the disk: private keys go into files of their
own (mode 0600) that the generated config references, never onto standard output.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from hatun.config import interface_name_problem, parse_endpoint
from hatun.keys import InvalidKey, PrivateKey, PublicKey, load_private_key_file, write_private_key_file
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
    endpoint: str | None
    allowed_ips: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    keepalive: int | None = None
    mtu: int | None = None
    listen_port: int | None = None
    dropped: list[str] = field(default_factory=list)


def tunnel_name_from_path(path: str) -> str:
    """wg0.conf -> "wg0": the tunnel name, made safe for hatun's naming rules."""
    stem = os.path.basename(path)
    stem = stem[: -len(".conf")] if stem.endswith(".conf") else stem
    name = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-_")
    return name[:11] or "tunnel"


def parse_wgquick(text: str, name: str, source: str = "<input>") -> WgQuickTunnel:
    """Parse one wg-quick file. Raises ImportProblem (never showing a key's value)."""
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
    if "presharedkey" in peer:
        raise ImportProblem(
            f"{source}:{peer['presharedkey'][0]}: PresharedKey is not supported by hatun yet;"
            " the tunnel would not come up without it"
        )
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
    for part in _split(value):
        try:
            allowed.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ImportProblem(f"{source}:{lineno}: AllowedIPs: '{part}' is not a network") from None
    endpoint = None
    if "endpoint" in peer:
        lineno, value = peer["endpoint"]
        try:
            endpoint = str(parse_endpoint(value))
        except ValueError as e:
            raise ImportProblem(f"{source}:{lineno}: Endpoint: {e}") from None
    tunnel = WgQuickTunnel(name, private_key, addresses, peer_key, endpoint, allowed)
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
    unknown += sorted(set(peer) - {"publickey", "allowedips", "endpoint", "persistentkeepalive"})
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


def render_config(tunnels: list[WgQuickTunnel], key_files: dict[str, str]) -> str:
    """The hatun config (TOML) for TUNNELS, private keys referenced by KEY_FILES[name]."""
    prefixes: list = []
    tunnel_nets = [a.network for t in tunnels for a in t.addresses]
    for t in tunnels:
        for net in t.allowed_ips:
            # AllowedIPs usually also hold the tunnel subnet: hatun routes that by itself.
            if net not in prefixes and not any(net == tn or net.subnet_of(tn) for tn in tunnel_nets if tn.version == net.version):
                prefixes.append(net)
    lines = [
        "# Generated by `hatun import` from wg-quick configs. Review it, then run `hatun check` on it.",
        "",
        "[routing]",
        f"prefixes = [{', '.join(repr_str(str(p)) for p in prefixes)}]",
        "",
    ]
    for t in tunnels:
        lines += ["[[tunnels]]", f"name = {repr_str(t.name)}", f"private_key_file = {repr_str(key_files[t.name])}"]
        addrs = [str(a) for a in t.addresses]
        lines.append(f"address = {repr_str(addrs[0])}" if len(addrs) == 1 else f"address = [{', '.join(map(repr_str, addrs))}]")
        lines.append(f"peer_public_key = {repr_str(t.peer_public_key.base64)}")
        lines.append(f"endpoint = {repr_str(t.endpoint)}" if t.endpoint else "# endpoint = \"HOST:PORT\"  # the wg-quick file had none: required")
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
            lines.append(f"# probe = \"icmp://ADDRESS\"  # {comment}")
        if t.dropped:
            lines.append(f"# not imported (no meaning for hatun): {', '.join(t.dropped)}")
        lines.append("")
    return "\n".join(lines)


def repr_str(value: str) -> str:
    """A TOML basic string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_key_files(tunnels: list[WgQuickTunnel], key_dir: str) -> dict[str, str]:
    """Write each tunnel's private key to KEY_DIR/NAME.key (mode 0600); return name -> path.

    An existing file with the same key is reused; a different one is never overwritten
    (raises ImportProblem).
    """
    os.makedirs(key_dir, mode=0o700, exist_ok=True)
    paths = {}
    for t in tunnels:
        path = os.path.join(os.path.abspath(key_dir), f"{t.name}.key")
        if os.path.exists(path):
            try:
                same = load_private_key_file(path, check_mode=False) == t.private_key
            except InvalidKey:
                same = False
            if not same:
                raise ImportProblem(f"{path} exists and holds another key: not overwritten (use --key-dir)")
        else:
            write_private_key_file(path, t.private_key)
        paths[t.name] = path
    return paths
