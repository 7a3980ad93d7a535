"""A client for wireguard-go's UAPI socket (the cross-platform configuration protocol).

The protocol: connect to `/run/wireguard/IFNAME.sock`, send `get=1` or `set=1` followed by
`key=value` lines and a blank line; the reply is `key=value` lines (for `get`) ending in `errno=N`
and a blank line. The server keeps the connection open for further requests, so a reply ends at
`errno=N\\n\\n`, never at EOF. Keys travel as hex, fwmark and ports as decimal.

The `get` reply carries the device's PRIVATE key (and peers' preshared keys). `parse_get` drops them
while parsing: only the derived public key leaves this module, never the secret, not even in an
error message.
"""

from __future__ import annotations

import builtins
import errno as errno_mod
import ipaddress
import os
import socket
import struct
from collections.abc import Sequence

import trio

from hatun.keys import PrivateKey, PublicKey, key_fingerprint
from hatun.wireguard.model import DeviceSettings, DeviceStatus, DeviceTimeout, PeerStatus, WireGuardError
from hatun.wireguard.diff import diff_device

SOCKET_DIR = "/run/wireguard"
TIMEOUT = 2.0  # seconds for one request: wireguard-go answers in well under a millisecond
MAX_REPLY = 1 << 20  # a reply larger than this is not from wireguard-go
_SECRET_KEYS = frozenset({"private_key", "preshared_key"})


class UapiProtocolError(WireGuardError):
    """wireguard-go's reply could not be understood (the message names the line, never a secret)."""


class NotRunning(WireGuardError):
    """No wireguard-go answers for this interface (no socket, or a stale one left by SIGKILL)."""


class UapiTimeout(DeviceTimeout):
    """Something serves the UAPI socket but did not answer in time: a stopped or deadlocked
    wireguard-go still accepts connections (and SO_PEERCRED names it), then never replies."""


class UapiRefused(WireGuardError):
    """wireguard-go answered a request with errno != 0 (it is alive; it refused this request)."""


def socket_path(ifname: str, socket_dir: str = SOCKET_DIR) -> str:
    """Path of the UAPI socket of IFNAME."""
    return os.path.join(socket_dir, f"{ifname}.sock")


# --- pure parsing ------------------------------------------------------------------------------


def _parse_key(name: str, value: str, lineno: int) -> bytes:
    if len(value) != 64:
        raise UapiProtocolError(f"UAPI reply line {lineno}: {name} is not 64 hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise UapiProtocolError(f"UAPI reply line {lineno}: {name} is not 64 hex digits") from None


def _parse_int(name: str, value: str, lineno: int) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise UapiProtocolError(f"UAPI reply line {lineno}: {name} is not a number: {value!r}") from None
    if n < 0:
        raise UapiProtocolError(f"UAPI reply line {lineno}: {name} is negative: {value!r}")
    return n


def parse_endpoint(value: str) -> tuple[str, int]:
    """`198.18.0.1:51820` or `[fd00::1]:51820` -> (ip, port). Raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"endpoint without port: {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    addr = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    p = int(port, 10)
    if not 0 < p < 65536:
        raise ValueError(f"endpoint port out of range: {value!r}")
    return str(addr), p


def format_endpoint(endpoint: tuple[str, int]) -> str:
    """(ip, port) -> the UAPI form (IPv6 in brackets). Raises ValueError for a bad address."""
    addr = ipaddress.ip_address(endpoint[0])
    return f"[{addr}]:{endpoint[1]}" if addr.version == 6 else f"{addr}:{endpoint[1]}"


def split_reply(data: bytes) -> tuple[list[str], int]:
    """Split a complete reply into its `key=value` lines and the errno (0 = success).

    Raises UapiProtocolError when the reply does not end with `errno=N` and a blank line.
    """
    if not data.endswith(b"\n\n"):
        raise UapiProtocolError("UAPI reply is incomplete (no blank line at the end)")
    try:
        text = data[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise UapiProtocolError("UAPI reply is not ASCII") from None
    lines = text.split("\n")
    key, _, value = lines[-1].partition("=")
    if key != "errno":
        raise UapiProtocolError(f"UAPI reply does not end with errno=N (last key {key!r})")
    try:
        code = int(value)
    except ValueError:
        raise UapiProtocolError(f"UAPI reply: errno is not a number: {value!r}") from None
    return lines[:-1], code


def parse_get(ifname: str, lines: Sequence[str]) -> DeviceStatus:
    """Turn the `key=value` lines of a `get=1` reply into a DeviceStatus.

    The private key is replaced by its public key and preshared keys by fingerprints, so the result (and
    any exception raised here) never carries a secret. Unknown keys are ignored (newer versions add
    some). Raises UapiProtocolError naming the line that cannot be parsed.
    """
    public_key: PublicKey | None = None
    listen_port = fwmark = 0
    peers: list[PeerStatus] = []
    peer: dict | None = None

    def close_peer() -> None:
        if peer is not None:
            sec, nsec = peer.pop("hs_sec", 0), peer.pop("hs_nsec", 0)
            peer["last_handshake"] = sec + nsec / 1e9 if sec or nsec else None
            peer["allowed_ips"] = tuple(peer["allowed_ips"])
            peers.append(PeerStatus(**peer))

    for lineno, line in enumerate(lines, 1):
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiProtocolError(f"UAPI reply line {lineno}: expected key=value, got {key[:40]!r}")
        if key == "private_key":
            raw = _parse_key(key, value, lineno)
            public_key = PrivateKey(raw).public_key if any(raw) else None
        elif key == "public_key":
            close_peer()
            peer = dict(public_key=PublicKey(_parse_key(key, value, lineno)), endpoint=None, keepalive=0,
                        allowed_ips=[], rx_bytes=0, tx_bytes=0, preshared_key_fingerprint=None)
        elif peer is None:
            if key == "listen_port":
                listen_port = _parse_int(key, value, lineno)
            elif key == "fwmark":
                fwmark = _parse_int(key, value, lineno)
        elif key == "endpoint":
            try:
                peer["endpoint"] = parse_endpoint(value)
            except ValueError:
                raise UapiProtocolError(f"UAPI reply line {lineno}: bad endpoint {value!r}") from None
        elif key == "allowed_ip":
            try:
                peer["allowed_ips"].append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                raise UapiProtocolError(f"UAPI reply line {lineno}: bad allowed_ip {value!r}") from None
        elif key in ("rx_bytes", "tx_bytes"):
            peer[key] = _parse_int(key, value, lineno)
        elif key == "persistent_keepalive_interval":
            peer["keepalive"] = _parse_int(key, value, lineno)
        elif key == "last_handshake_time_sec":
            peer["hs_sec"] = _parse_int(key, value, lineno)
        elif key == "last_handshake_time_nsec":
            peer["hs_nsec"] = _parse_int(key, value, lineno)
        elif key == "preshared_key":  # kept as a fingerprint only
            raw = _parse_key(key, value, lineno)
            peer["preshared_key_fingerprint"] = key_fingerprint(raw) if any(raw) else None
        # protocol_version and unknown keys are ignored on purpose
    close_peer()
    return DeviceStatus(ifname=ifname, public_key=public_key, listen_port=listen_port, fwmark=fwmark,
                        peers=tuple(peers))


def describe_errno(code: int) -> str:
    """`-22` -> `errno=-22 (EINVAL: Invalid argument)`."""
    n = abs(code)
    name = errno_mod.errorcode.get(n)
    return f"errno={code} ({name}: {os.strerror(n)})" if name else f"errno={code}"


def diff_lines(wanted: DeviceSettings, current: DeviceStatus | None, *,
               reset_peer: bool = False) -> tuple[list[str], builtins.set[str]]:
    """The `set=1` lines that make CURRENT match WANTED, and the names of the settings they change:
    `diff.diff_device`, encoded for wireguard-go. Only what differs is sent, so applying the same
    settings again sends nothing and keeps the handshake. Lines are applied in order, so a peer
    removed and configured again in one request (RESET_PEER) is never missing."""
    d = diff_device(wanted, current, reset_peer=reset_peer)
    lines: list[str] = []
    if d.private_key is not None:
        lines.append(f"private_key={d.private_key.hex}")
    if d.listen_port is not None:
        lines.append(f"listen_port={d.listen_port}")
    if d.fwmark is not None:
        lines.append(f"fwmark={d.fwmark}")
    for key in d.remove_peers:
        lines += [f"public_key={key.hex}", "remove=true"]
    if d.peer is not None:
        lines.append(f"public_key={d.peer.hex}")
        if d.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(d.endpoint)}")
        if d.keepalive is not None:
            lines.append(f"persistent_keepalive_interval={d.keepalive}")
        if d.preshared_key is not None:
            lines.append(f"preshared_key={d.preshared_key.hex}")
        if d.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines += [f"allowed_ip={net}" for net in d.allowed_ips]
    return lines, builtins.set(d.changed)


# --- I/O ---------------------------------------------------------------------------------------


async def _connect(ifname: str, socket_dir: str) -> trio.socket.SocketType:
    path = socket_path(ifname, socket_dir)
    try:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as e:  # EMFILE, ENFILE, ENOMEM: ours to report, not to crash on
        raise WireGuardError(f"cannot open a socket to talk to wireguard-go for {ifname}: "
                             f"{e.strerror or e}") from None
    try:
        await sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise NotRunning(f"no wireguard-go answers for {ifname} ({path} missing or stale)") from None
    except OSError as e:
        sock.close()
        raise WireGuardError(f"cannot connect to {path}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _request(ifname: str, request: bytes, socket_dir: str, timeout: float) -> tuple[list[str], int]:
    # One connection per request: after a failed `set`, wireguard-go has consumed an unknown part of
    # our lines, so the connection cannot be reused safely anyway.
    with trio.move_on_after(timeout) as scope:
        sock = await _connect(ifname, socket_dir)
        with sock:
            await _sendall(sock, request, ifname)
            buf = bytearray()
            while not buf.endswith(b"\n\n"):
                try:
                    chunk = await sock.recv(65536)
                except OSError as e:
                    raise WireGuardError(f"UAPI of {ifname}: {e.strerror or e}") from None
                if not chunk:
                    raise NotRunning(f"wireguard-go for {ifname} closed its UAPI connection mid-reply")
                buf += chunk
                if len(buf) > MAX_REPLY:
                    raise UapiProtocolError(f"UAPI reply of {ifname} exceeds {MAX_REPLY} bytes")
            return split_reply(bytes(buf))
    assert scope.cancelled_caught
    raise UapiTimeout(f"wireguard-go for {ifname} did not answer on its UAPI socket within {timeout:g}s")


async def _sendall(sock: trio.socket.SocketType, data: bytes, ifname: str) -> None:
    view = memoryview(data)
    while view:
        try:
            n = await sock.send(view)
        except (BrokenPipeError, ConnectionResetError):
            raise NotRunning(f"wireguard-go for {ifname} closed its UAPI connection") from None
        except OSError as e:
            raise WireGuardError(f"UAPI of {ifname}: {e.strerror or e}") from None
        view = view[n:]


async def get(ifname: str, *, socket_dir: str = SOCKET_DIR, timeout: float = TIMEOUT) -> DeviceStatus:
    """Read IFNAME's configuration and counters (`get=1`), without its private key.

    Raises NotRunning when no wireguard-go answers, UapiTimeout when it is connected but does not
    answer within TIMEOUT seconds, UapiRefused for errno != 0, UapiProtocolError for a reply that
    cannot be parsed, WireGuardError when the socket cannot be made (EMFILE...).
    """
    lines, code = await _request(ifname, b"get=1\n\n", socket_dir, timeout)
    if code:
        raise UapiRefused(f"wireguard-go {ifname}: get failed with {describe_errno(code)}")
    return parse_get(ifname, lines)


async def set(ifname: str, lines: Sequence[str], *, socket_dir: str = SOCKET_DIR,  # noqa: A001
              timeout: float = TIMEOUT) -> None:
    """Send one `set=1` request made of LINES (`key=value`, keys hex, as the protocol wants).

    Raises NotRunning when no wireguard-go answers; UapiTimeout when it does not answer in time;
    UapiRefused when it answers errno != 0 (the message names the keys sent, never their values;
    wireguard-go's log says why); WireGuardError when the socket cannot be made (EMFILE...).
    """
    for line in lines:
        if "=" not in line or "\n" in line:
            key = line.partition("=")[0]
            raise ValueError(f"UAPI line for key {key[:40]!r} is not one key=value line")
    request = ("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n").encode("ascii")
    _, code = await _request(ifname, request, socket_dir, timeout)
    if code:
        keys = ", ".join(dict.fromkeys(line.partition("=")[0] for line in lines))
        raise UapiRefused(
            f"wireguard-go {ifname} refused the configuration ({describe_errno(code)}; keys sent: {keys})")


async def server_pid(ifname: str, *, socket_dir: str = SOCKET_DIR, timeout: float = TIMEOUT) -> int:
    """PID of the wireguard-go process that serves IFNAME's UAPI socket (SO_PEERCRED).

    Raises NotRunning when nothing answers, UapiTimeout when the connection is not accepted in
    time (a hung server whose backlog is full), WireGuardError when the socket cannot be made.
    """
    with trio.move_on_after(timeout):
        with await _connect(ifname, socket_dir) as sock:
            try:
                cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            except OSError as e:
                raise WireGuardError(f"UAPI socket of {ifname}: cannot read its peer: {e.strerror or e}") from None
            pid, _uid, _gid = struct.unpack("3i", cred)
            return pid
    raise UapiTimeout(f"UAPI socket of {ifname} did not accept a connection within {timeout:g}s")
