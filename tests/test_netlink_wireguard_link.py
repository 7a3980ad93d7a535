"""hatun.wireguard.link: the rtnetlink side of a tunnel device (a bridge stands in for it here)."""

import ipaddress

import pytest
import trio

from hatun.netlink import Address, Link, open_rtnl, open_rtnl_events
from hatun.wireguard.link import LinkState, configure_link, delete_link, link_state
from hatun.wireguard.model import WireGuardError

pytestmark = pytest.mark.netns

ADDRS = (ipaddress.ip_interface("198.18.101.2/30"), ipaddress.ip_interface("2001:2:101::2/64"))


async def test_configure_link_changes_only_what_differs(namespaces):
    ns = namespaces.new("wglink")
    async with open_rtnl(ns) as rtnl:
        link = await rtnl.add_link("hat-a", "bridge")
        assert await configure_link(rtnl, "hat-a", addresses=ADDRS, mtu=1420) == {"addresses", "mtu", "up"}
        assert await link_state(rtnl, "hat-a") == LinkState(link.index, ADDRS, 1420, True)

        # Applying the same settings again changes nothing: no link flap, no address churn. (IPv6
        # link-local DAD may still finish meanwhile and be notified: that is the kernel's own doing.)
        async with open_rtnl_events(ns) as events:
            # First let the kernel's own follow-ups of the first configure settle (IPv6 address work
            # runs from a workqueue and may be notified late on a busy machine): 0.5 s without events.
            with trio.fail_after(15):
                while True:
                    with trio.move_on_after(0.5) as quiet:
                        await events.__anext__()
                    if quiet.cancelled_caught:
                        break
            assert await configure_link(rtnl, "hat-a", addresses=ADDRS, mtu=1420) == set()
            with trio.move_on_after(0.3):
                async for event in events:
                    ours = isinstance(event.obj, Link) or (
                        isinstance(event.obj, Address) and not event.obj.interface.is_link_local)
                    assert not ours, f"a no-op configure_link caused {event}"

        # An address put there by someone else goes; link-local ones are the kernel's and stay.
        await rtnl.add_address(link.index, ipaddress.ip_interface("198.18.200.1/24"))
        new = (ipaddress.ip_interface("198.18.102.2/30"), ADDRS[1])
        assert await configure_link(rtnl, "hat-a", addresses=new, mtu=1420) == {"addresses"}
        state = await link_state(rtnl, "hat-a")
        assert set(state.addresses) == set(new)
        assert any(a.interface.is_link_local for a in await rtnl.addresses(link.index))

        assert await configure_link(rtnl, "hat-a", addresses=new, mtu=1420, up=False) == {"up"}
        assert (await link_state(rtnl, "hat-a")).up is False


async def test_missing_device_and_delete(namespaces):
    ns = namespaces.new("wgdel")
    async with open_rtnl(ns) as rtnl:
        assert await link_state(rtnl, "hat-none") is None
        with pytest.raises(WireGuardError, match="hat-none: no such device"):
            await configure_link(rtnl, "hat-none", addresses=ADDRS, mtu=1420)
        await rtnl.add_link("hat-b", "bridge")
        assert await delete_link(rtnl, "hat-b") is True
        assert await delete_link(rtnl, "hat-b") is False


async def test_kernel_refusal_becomes_a_wireguard_error(namespaces):
    ns = namespaces.new("wgerr")
    async with open_rtnl(ns) as rtnl:
        await rtnl.add_link("hat-c", "bridge")
        with pytest.raises(WireGuardError, match="hat-c: cannot configure the device: set link .*Invalid argument"):
            await configure_link(rtnl, "hat-c", addresses=ADDRS, mtu=70000)
