"""Tunnel devices: one model, two backends (kernel WireGuard, wireguard-go), chosen here."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable

from hatun.wireguard.model import BackendUnavailable, DeviceTimeout, WireGuardError

__all__ = ["BackendUnavailable", "DeviceTimeout", "WireGuardError", "kernel_has_wireguard", "select_backend"]

USERSPACE_HINT = "install the wireguard-go package (Debian/Ubuntu: apt-get install wireguard-go)"


async def kernel_has_wireguard(netns: str | None = None) -> bool:
    """True when the kernel has the generic netlink family "wireguard".

    Asking for the family makes the kernel load the module if it is installed but not loaded, so this
    answers "can the kernel do WireGuard", not "is the module loaded". Raises NetlinkError/OSError when
    netlink itself fails.
    """
    from pyroute2.netlink import NETLINK_GENERIC

    from hatun.netlink.core import open_netlink
    from hatun.netlink.genl import FamilyNotFound, resolve_family

    async with open_netlink(NETLINK_GENERIC, netns=netns) as sock:
        try:
            await resolve_family(sock, "wireguard")
        except FamilyNotFound:
            return False
    return True


async def select_backend(
    kind: str = "auto", *,
    kernel_supported: Callable[[], Awaitable[bool]] = kernel_has_wireguard,
    which: Callable[[str], str | None] = shutil.which,
) -> str:
    """The backend to use, "kernel" or "userspace", for the configured KIND.

    Args:
        kind: "auto" (kernel WireGuard where the kernel has it, else wireguard-go), "kernel" or "userspace".
        kernel_supported, which: probes, injectable for tests.

    Raises BackendUnavailable (saying what to install) when the wanted backend cannot work here, and
    ValueError for an unknown KIND.
    """
    if kind not in ("auto", "kernel", "userspace"):
        raise ValueError(f"unknown WireGuard backend {kind!r}: expected auto, kernel or userspace")
    if kind in ("auto", "kernel") and await kernel_supported():
        return "kernel"
    if kind == "kernel":
        raise BackendUnavailable("this kernel has no WireGuard (no module, or it cannot be loaded): use a"
                                 f" kernel with WireGuard, or backend \"userspace\" and {USERSPACE_HINT}")
    if which("wireguard-go") is not None:
        return "userspace"
    if kind == "userspace":
        raise BackendUnavailable(f"wireguard-go not found on PATH: {USERSPACE_HINT}")
    raise BackendUnavailable(f"no WireGuard available: {USERSPACE_HINT} or a kernel with WireGuard")
