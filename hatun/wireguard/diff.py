"""What must change on a WireGuard device to make it match the wanted settings. Pure.

The one diff behind both backends, in the spirit of `wg syncconf`: `diff_device` compares, the
encoders turn the result into wireguard-go's UAPI lines (`uapi.diff_lines`) or kernel genetlink
messages (`kernel.diff_messages`). Rules: the private key is compared through its public key; the
listen port only when one is configured; a preshared key through its fingerprint; an endpoint is never removed (the protocols cannot: wanting
none leaves whatever the peer roamed to); allowed IPs are replaced as a whole, and only when the set
differs; one device has one peer, so any other peer is removed. Nothing differs: an empty diff.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hatun.keys import PresharedKey, PrivateKey, PublicKey
from hatun.wireguard.model import DeviceSettings, DeviceStatus, IPNetwork


# All zeros: how both WireGuard interfaces spell "no preshared key".
NO_PRESHARED_KEY = PresharedKey(bytes(32))


@dataclass(frozen=True)
class DeviceDiff:
    """The changes, each None (or empty) where nothing changes. `changed` names them: private_key,
    listen_port, fwmark, peer (the wanted peer added, or another removed), endpoint, keepalive,
    allowed_ips, preshared_key."""

    private_key: PrivateKey | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    remove_peers: tuple[PublicKey, ...] = ()  # in this order, before the wanted peer is touched
    peer: PublicKey | None = None  # the wanted peer, when it is added or anything of it changes
    endpoint: tuple[str, int] | None = None
    keepalive: int | None = None
    allowed_ips: tuple[IPNetwork, ...] | None = None  # replace the peer's allowed IPs with these
    changed: frozenset[str] = frozenset()
    # Set the peer's preshared key to this one (NO_PRESHARED_KEY: remove it).
    preshared_key: PresharedKey | None = None

    def __bool__(self) -> bool:
        return bool(self.changed)


def same_endpoint(a: tuple[str, int] | None, b: tuple[str, int] | None) -> bool:
    """Equal endpoints, whatever the spelling of the address ("fd00::2" and "fd00:0::2")."""
    if a is None or b is None:
        return a is b
    return ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0]) and a[1] == b[1]


def diff_device(wanted: DeviceSettings, current: DeviceStatus | None, *, reset_peer: bool = False) -> DeviceDiff:
    """What makes CURRENT (None: a fresh device) match WANTED. RESET_PEER: remove the wanted peer too
    and add it afresh in the same request, which drops its session without a moment without peer."""
    changed: set[str] = set()
    private_key = listen_port = fwmark = None
    if current is None or current.public_key != wanted.private_key.public_key:
        private_key = wanted.private_key
        changed.add("private_key")
    if wanted.listen_port is not None and (current is None or current.listen_port != wanted.listen_port):
        listen_port = wanted.listen_port
        changed.add("listen_port")
    if wanted.fwmark != (current.fwmark if current else 0):
        fwmark = wanted.fwmark
        changed.add("fwmark")

    want = wanted.peer
    remove: list[PublicKey] = []
    have = None
    for p in current.peers if current else ():
        if p.public_key == want.public_key and not reset_peer:
            have = p
        else:  # one device, one peer: anything else was not configured by us
            remove.append(p.public_key)
            changed.add("peer")
    if have is None:
        changed.add("peer")
    endpoint = keepalive = allowed_ips = None
    if want.endpoint is not None and not same_endpoint(want.endpoint, have.endpoint if have else None):
        endpoint = want.endpoint
        changed.add("endpoint")
    if want.keepalive != (have.keepalive if have else 0):
        keepalive = want.keepalive
        changed.add("keepalive")
    if set(want.allowed_ips) != set(have.allowed_ips if have else ()):
        allowed_ips = tuple(dict.fromkeys(want.allowed_ips))
        changed.add("allowed_ips")
    psk = None
    want_psk = want.preshared_key.fingerprint if want.preshared_key is not None else None
    if want_psk != (have.preshared_key_fingerprint if have else None):
        psk = want.preshared_key or NO_PRESHARED_KEY
        changed.add("preshared_key")
    touched = (have is None or endpoint is not None or keepalive is not None or allowed_ips is not None
               or psk is not None)
    return DeviceDiff(private_key, listen_port, fwmark, tuple(remove), want.public_key if touched else None,
                      endpoint, keepalive, allowed_ips, frozenset(changed), psk)
