"""The gateway's WireGuard device, as the enrollment service changes it: one peer added or removed at
a time, every other peer left alone. The device belongs to the gateway (wg-quick, kernel or
wireguard-go); hatun never creates or deletes it.
"""

from __future__ import annotations

import ipaddress
import os
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from typing import Protocol

from hatun.keys import PublicKey
from hatun.wireguard import uapi
from hatun.wireguard.model import WireGuardError


class PeerDevice(Protocol):
    ifname: str

    async def add(self, key: PublicKey, address: str) -> None:
        """Peer KEY may send from ADDRESS (one host) only."""

    async def remove(self, key: PublicKey) -> None:
        """Peer KEY is gone (a missing peer is not an error)."""

    async def peers(self) -> dict[PublicKey, tuple]:
        """The device's peers now, with the networks each may send from."""

    async def public_key(self) -> PublicKey:
        """The device's own public key; WireGuardError when it has no private key yet."""


def _own_key(ifname: str, status) -> PublicKey:
    if status is None or status.public_key is None:
        raise WireGuardError(f"{ifname} has no private key: configure the gateway's WireGuard first")
    return status.public_key


def _host(address: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    ip = ipaddress.ip_address(address)
    return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")


class UserspacePeers:
    """A wireguard-go device, through its UAPI socket."""

    def __init__(self, ifname: str, socket_dir: str = uapi.SOCKET_DIR) -> None:
        self.ifname, self.socket_dir = ifname, socket_dir

    async def add(self, key: PublicKey, address: str) -> None:
        await uapi.set(self.ifname, [f"public_key={key.hex}", "replace_allowed_ips=true",
                                     f"allowed_ip={_host(address)}"], socket_dir=self.socket_dir)

    async def remove(self, key: PublicKey) -> None:
        await uapi.set(self.ifname, [f"public_key={key.hex}", "remove=true"], socket_dir=self.socket_dir)

    async def peers(self) -> dict[PublicKey, tuple]:
        return {p.public_key: p.allowed_ips for p in (await uapi.get(self.ifname, socket_dir=self.socket_dir)).peers}

    async def public_key(self) -> PublicKey:
        return _own_key(self.ifname, await uapi.get(self.ifname, socket_dir=self.socket_dir))


class KernelPeers:
    """A kernel WireGuard device, through generic netlink."""

    def __init__(self, backend, ifname: str) -> None:
        self.backend, self.ifname = backend, ifname

    async def add(self, key: PublicKey, address: str) -> None:
        await self.backend.set_peer(self.ifname, key, [_host(address)])

    async def remove(self, key: PublicKey) -> None:
        await self.backend.set_peer(self.ifname, key, remove=True)

    async def peers(self) -> set[PublicKey]:
        status = await self.backend.get(self.ifname, with_link=False)
        if status is None:
            raise WireGuardError(f"{self.ifname}: no such WireGuard device")
        return {p.public_key: p.allowed_ips for p in status.peers}

    async def public_key(self) -> PublicKey:
        return _own_key(self.ifname, await self.backend.get(self.ifname, with_link=False))


@asynccontextmanager
async def open_peer_device(ifname: str, socket_dir: str = uapi.SOCKET_DIR) -> AsyncIterator[PeerDevice]:
    """IFNAME's peers: wireguard-go's when its UAPI socket is there, else the kernel's. Raises
    WireGuardError (BackendUnavailable) when neither has such a device."""
    if os.path.exists(uapi.socket_path(ifname, socket_dir)):
        yield UserspacePeers(ifname, socket_dir)
        return
    from hatun.wireguard.kernel import open_kernel_backend

    async with open_kernel_backend() as backend:
        yield KernelPeers(backend, ifname)
