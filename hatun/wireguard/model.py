"""What a tunnel device should look like, what it looks like, and the backend interface.

One device has exactly one peer (the gateway). Both backends (kernel, userspace) take a
`DeviceSettings` and make the device match it, changing only what differs, so that applying the
same settings twice changes nothing (no handshake reset, no link flap).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Protocol

from hatun.keys import PresharedKey, PrivateKey, PublicKey

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class WireGuardError(Exception):
    """A tunnel device could not be created, configured, read or deleted. The message says why."""


class BackendUnavailable(WireGuardError):
    """The requested backend cannot work on this host (message says what to install)."""


class DeviceTimeout(WireGuardError):
    """The device was reached but did not answer in time (a hung wireguard-go, a kernel that did
    not reply): unlike a missing device, it may still hold its routes and flows."""


@dataclass(frozen=True)
class PeerSettings:
    public_key: PublicKey
    # Resolved (ip, port); None leaves the peer without endpoint (it can still answer).
    endpoint: tuple[str, int] | None
    keepalive: int = 0  # persistent keepalive seconds, 0 = off
    allowed_ips: tuple[IPNetwork, ...] = ()
    preshared_key: PresharedKey | None = None


@dataclass(frozen=True)
class DeviceSettings:
    ifname: str
    private_key: PrivateKey
    peer: PeerSettings
    fwmark: int = 0
    listen_port: int | None = None  # None: whatever the device has (random at creation)
    addresses: tuple[IPInterface, ...] = ()
    mtu: int = 1420


@dataclass(frozen=True)
class PeerStatus:
    public_key: PublicKey
    endpoint: tuple[str, int] | None
    keepalive: int
    allowed_ips: tuple[IPNetwork, ...]
    rx_bytes: int
    tx_bytes: int
    last_handshake: float | None  # wall-clock seconds since the epoch; None: never
    # `keys.key_fingerprint` of the peer's preshared key (None: none); the key itself is never read back.
    preshared_key_fingerprint: bytes | None = None


@dataclass(frozen=True)
class DeviceStatus:
    """A device as read back. It never carries the private key: compare `public_key` instead."""

    ifname: str
    public_key: PublicKey | None
    listen_port: int
    fwmark: int
    peers: tuple[PeerStatus, ...] = ()
    ifindex: int = 0
    addresses: tuple[IPInterface, ...] = ()
    mtu: int = 0
    up: bool = False

    @property
    def peer(self) -> PeerStatus | None:
        return self.peers[0] if self.peers else None


@dataclass
class Changes:
    """What an `apply` changed, by setting name (e.g. {"endpoint", "allowed_ips"}); empty: nothing."""

    created: bool = False
    changed: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return self.created or bool(self.changed)


class Backend(Protocol):
    """One tunnel device: get / set / list / delete, whatever implements WireGuard underneath."""

    name: str  # "kernel" or "userspace"

    async def apply(self, settings: DeviceSettings) -> Changes:
        """Create the device if missing and make it match SETTINGS, touching only what differs."""

    async def get(self, ifname: str, *, with_link: bool = True, timeout: float | None = None) -> DeviceStatus | None:
        """The device as it is now, or None when it does not exist (WITH_LINK=False: WireGuard
        state and counters only, without the link's index, addresses and MTU). TIMEOUT: seconds
        for the device's answer (None: the backend's default); DeviceTimeout when it does not come."""

    async def list(self) -> list[str]:
        """Names of the WireGuard devices this backend sees."""

    async def delete(self, ifname: str) -> None:
        """Remove the device (and stop whatever runs it). Deleting a missing device is not an error."""

    async def reset_peer(self, settings: DeviceSettings) -> None:
        """Drop the peer's session and set it up again, so that the next packet starts a handshake."""


def valid_ifname(ifname: str) -> bool:
    return _IFNAME.fullmatch(ifname) is not None


def check_ifname(ifname: str) -> None:
    """Raise WireGuardError unless IFNAME is safe as an interface name, a file name and an argument.

    A leading '-' would be taken for a flag by wireguard-go (`--help` creates an interface named so).
    """
    if not _IFNAME.fullmatch(ifname):
        raise WireGuardError(f"bad interface name {ifname!r}: 1-15 characters of A-Z a-z 0-9 _ . -,"
                             " not starting with '-' or '.'")
