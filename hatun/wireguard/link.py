"""The rtnetlink side of a tunnel device, common to both backends: addresses, MTU, link up, delete.

The WireGuard part (keys, peer) differs per backend; the device itself is an ordinary link.
`configure_link` changes only what differs, so applying the same settings again causes no link flap
and no address churn.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from contextlib import AsyncExitStack
from typing import NamedTuple

from hatun.netlink.core import NetlinkError, NetlinkTimeout
from hatun.netlink.rtnl import Rtnl, open_rtnl
from hatun.netns import NetnsNotFound
from hatun.wireguard.model import IPInterface, WireGuardError

# What a netlink call may raise: the kernel's refusal, no answer, or a plain OSError from the
# socket itself (ENOBUFS, ENOMEM when sending). All of them become WireGuardError here.
NETLINK_FAILURES = (NetlinkError, NetlinkTimeout, OSError)

_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


class LinkState(NamedTuple):
    ifindex: int
    addresses: tuple[IPInterface, ...]  # global ones only: link-local addresses are the kernel's
    mtu: int
    up: bool


def describe(exc: OSError) -> str:
    """A netlink failure in words: NetlinkError/NetlinkTimeout say it themselves, a bare OSError by
    its strerror."""
    if isinstance(exc, (NetlinkError, NetlinkTimeout)) or not exc.strerror:
        return str(exc)
    return exc.strerror


async def enter_rtnl(stack: AsyncExitStack, netns: str | None) -> Rtnl:
    """An rtnetlink socket in NETNS (None: ours), closed with STACK.

    Raises NetnsNotFound, WireGuardError when no socket can be had (EMFILE, ENOBUFS...).
    """
    try:
        return await stack.enter_async_context(open_rtnl(netns=netns))
    except NetnsNotFound:
        raise
    except OSError as exc:
        raise WireGuardError(f"cannot open an rtnetlink socket: {exc.strerror or exc}") from None


def _is_global(interface: IPInterface) -> bool:
    return not any(interface.ip in net for net in _LINK_LOCAL if net.version == interface.version)


async def link_state(rtnl: Rtnl, ifname: str) -> LinkState | None:
    """IFNAME's index, global addresses, MTU and administrative state; None if it does not exist.

    Raises WireGuardError when the kernel cannot be read.
    """
    try:
        link = await rtnl.link(ifname)
        if link is None:
            return None
        addrs = await rtnl.addresses(link.index)
    except NETLINK_FAILURES as exc:
        raise WireGuardError(f"{ifname}: cannot read the device: {describe(exc)}") from exc
    return LinkState(link.index, tuple(a.interface for a in addrs if _is_global(a.interface)), link.mtu, link.up)


async def configure_link(rtnl: Rtnl, ifname: str, *, addresses: Iterable[IPInterface], mtu: int,
                         up: bool = True) -> set[str]:
    """Make IFNAME carry exactly ADDRESSES (global ones; link-local are left alone), MTU and state UP.

    Missing addresses are added before unwanted ones are removed. Returns the names of what
    changed among {"mtu", "addresses", "up"}; an empty set when everything already matched.
    Raises WireGuardError when the device does not exist or the kernel refuses a change.
    """
    wanted = [ipaddress.ip_interface(a) for a in addresses]
    state = await link_state(rtnl, ifname)
    if state is None:
        raise WireGuardError(f"{ifname}: no such device")
    changed: set[str] = set()
    try:
        if state.mtu != mtu:
            await rtnl.set_link(state.ifindex, mtu=mtu)
            changed.add("mtu")
        for interface in wanted:
            if interface not in state.addresses:
                await rtnl.add_address(state.ifindex, interface)
                changed.add("addresses")
        for interface in state.addresses:
            if interface not in wanted:
                await rtnl.delete_address(state.ifindex, interface)
                changed.add("addresses")
        if state.up != up:
            await rtnl.set_link(state.ifindex, up=up)
            changed.add("up")
    except NETLINK_FAILURES as exc:
        raise WireGuardError(f"{ifname}: cannot configure the device: {describe(exc)}") from exc
    return changed


async def delete_link(rtnl: Rtnl, ifname: str) -> bool:
    """Delete device IFNAME; False when it did not exist. Raises WireGuardError on failure."""
    try:
        return await rtnl.delete_link(ifname)
    except NETLINK_FAILURES as exc:
        raise WireGuardError(f"{ifname}: cannot delete the device: {describe(exc)}") from exc
