"""The Trio netlink socket, in namespaces the tests create."""

import errno
import os
import socket

import pytest
import trio
from pyroute2.netlink import NETLINK_GENERIC, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_NEWLINK, RTNLGRP_IPV4_ROUTE
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from hatun.netlink import (
    EventsOverflow,
    FamilyNotFound,
    NetlinkError,
    NetlinkTimeout,
    NetnsNotFound,
    Nexthop,
    Route,
    open_netlink,
    open_rtnl,
    resolve_family,
)

pytestmark = pytest.mark.netns


async def bridge(rtnl, name, up=True):
    link = await rtnl.add_link(name, "bridge")
    if up:
        await rtnl.set_link(link.index, up=True)
    return link


async def test_kernel_error_carries_ext_ack_text(namespaces):
    ns = namespaces.new("extack")
    async with open_rtnl(ns) as rtnl:
        down = await bridge(rtnl, "br-down", up=False)
        with pytest.raises(NetlinkError) as caught:
            await rtnl.add_nexthop(Nexthop(518200004, socket.AF_INET, oif=down.index))
    err = caught.value
    assert err.errno == errno.ENETDOWN
    assert err.message == "Nexthop device is not up"
    assert str(err) == "add nexthop 518200004: Network is down (Nexthop device is not up)"


async def test_socket_lives_in_the_namespace_and_the_thread_does_not_move(namespaces):
    ns = namespaces.new("where")
    before = os.readlink("/proc/thread-self/ns/net")
    async with open_rtnl(ns) as rtnl:
        await bridge(rtnl, "br-here")
        names = {link.name for link in await rtnl.links()}
    assert names == {"lo", "br-here"}
    assert os.readlink("/proc/thread-self/ns/net") == before


async def test_missing_namespace_is_a_clear_error_and_is_not_created():
    name = "hatun-no-such-namespace"
    with pytest.raises(NetnsNotFound) as caught:
        async with open_netlink(netns=name):
            pass
    assert str(caught.value) == f"network namespace '{name}' does not exist (/run/netns/{name})"
    assert not os.path.exists(f"/run/netns/{name}")


async def test_many_concurrent_requests_on_one_socket(namespaces):
    ns = namespaces.new("conc")
    async with open_rtnl(ns) as rtnl:
        made = [await bridge(rtnl, f"br{i}", up=False) for i in range(8)]
        results = {}

        async def ask(i):
            link = made[i % len(made)]
            if i % 5 == 0:
                results[i] = len(await rtnl.links())
            else:
                results[i] = (await rtnl.link(link.name)).index

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(ask, i)
    assert all(results[i] == (9 if i % 5 == 0 else made[i % len(made)].index) for i in range(300))


async def test_unanswered_request_times_out_and_the_socket_stays_usable(namespaces):
    ns = namespaces.new("timeout")
    async with open_rtnl(ns) as rtnl:
        link = await bridge(rtnl, "br-t", up=False)
        msg = ifinfmsg()
        msg["index"] = link.index
        msg["attrs"] = [("IFLA_MTU", 1400)]
        # Without NLM_F_ACK the kernel says nothing on success: the wait must end by itself.
        with pytest.raises(NetlinkTimeout, match="set mtu: no answer"):
            await rtnl.sock.request(msg, RTM_NEWLINK, NLM_F_REQUEST, timeout=0.2, what="set mtu")
        assert (await rtnl.link("br-t")).mtu == 1400
        # A request cancelled halfway leaves nothing behind that a later request could mistake.
        with trio.move_on_after(0):
            await rtnl.link("br-t")
        assert (await rtnl.link("lo")).index == 1


async def test_a_dump_abandoned_halfway_does_not_block_the_next_one(namespaces):
    ns = namespaces.new("abandon")
    async with open_rtnl(ns) as rtnl:
        br = await bridge(rtnl, "br-a")
        wanted = {Route(socket.AF_INET, 51820, f"198.18.{i // 256}.{i % 256}/32", protocol=147, oif=br.index)
                  for i in range(600)}  # several datagrams' worth
        for route in wanted:
            await rtnl.add_route(route)
        # The kernel keeps one dump per socket running until it is read to its end (else EBUSY).
        for _ in range(3):
            with trio.move_on_after(0):
                await rtnl.routes(socket.AF_INET, table=51820)
        assert set(await rtnl.routes(socket.AF_INET, table=51820)) == wanted
        assert [lk.name for lk in await rtnl.links()] == ["lo", "br-a"]


async def test_event_socket_overflow_is_reported_and_the_socket_recovers(namespaces):
    ns = namespaces.new("overflow")
    async with open_rtnl(ns) as rtnl, \
            open_netlink(netns=ns, groups=[RTNLGRP_IPV4_ROUTE], rcvbuf=4096) as events:
        br = await bridge(rtnl, "br-o")
        for i in range(200):  # a burst, not read meanwhile: far more than 4 KiB of notifications
            await rtnl.add_route(Route(socket.AF_INET, 51820, f"198.18.7.{i}/32", protocol=147, oif=br.index))
        with trio.fail_after(5), pytest.raises(EventsOverflow):
            await events.receive_events()
        await rtnl.delete_route(Route(socket.AF_INET, 51820, "198.18.7.0/32", protocol=147))
        seen = []
        with trio.fail_after(5):  # what was queued before the overflow may still come first
            while 25 not in seen:  # RTM_DELROUTE
                seen += [msg["header"]["type"] for msg in await events.receive_events()]


async def test_open_close_cycles_leak_no_file_descriptors(namespaces):
    ns = namespaces.new("fds")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(100):
        async with open_rtnl(ns) as rtnl:
            await rtnl.links()
        async with open_netlink(netns=ns, groups=[RTNLGRP_IPV4_ROUTE]):
            pass
        with pytest.raises(NetnsNotFound):
            async with open_netlink(netns="hatun-no-such-namespace"):
                pass
    assert len(os.listdir("/proc/self/fd")) == before


async def test_generic_netlink_family_lookup(namespaces):
    ns = namespaces.new("genl")
    async with open_netlink(NETLINK_GENERIC, netns=ns) as sock:
        assert await resolve_family(sock, "nlctrl") == 0x10
        with pytest.raises(FamilyNotFound) as caught:
            await resolve_family(sock, "hatunnofamily")
        assert "no generic netlink family 'hatunnofamily'" in str(caught.value)
        if not os.path.exists("/sys/module/wireguard"):
            with pytest.raises(FamilyNotFound):
                await resolve_family(sock, "wireguard")


class FailingSocket:
    """A netlink socket whose send or receive fails with ERRNO (the kernel short of memory, ...)."""

    def __init__(self, sock, *, send: int | None = None, recv: int | None = None) -> None:
        self.sock, self.send_errno, self.recv_errno = sock, send, recv

    def send(self, data):
        if self.send_errno:
            raise OSError(self.send_errno, os.strerror(self.send_errno))
        return self.sock.send(data)

    def recvmsg(self, *args):
        if self.recv_errno:
            raise OSError(self.recv_errno, os.strerror(self.recv_errno))
        return self.sock.recvmsg(*args)

    def __getattr__(self, name):
        return getattr(self.sock, name)


async def test_socket_errors_are_netlink_errors_and_the_socket_stays_usable(namespaces):
    ns = namespaces.new("nobufs")
    async with open_rtnl(ns) as rtnl, open_netlink(netns=ns, groups=[RTNLGRP_IPV4_ROUTE]) as events:
        real = rtnl.sock._sock
        rtnl.sock._sock = FailingSocket(real, send=errno.ENOBUFS)
        with pytest.raises(NetlinkError) as caught:
            await rtnl.links()
        assert caught.value.errno == errno.ENOBUFS and str(caught.value).startswith("dump links: ")
        with pytest.raises(NetlinkError, match="get link lo: .*sending the request failed"):
            await rtnl.link("lo")
        rtnl.sock._sock = FailingSocket(real, recv=errno.ENOMEM)
        with pytest.raises(NetlinkError) as caught:
            await rtnl.link("lo")
        assert caught.value.errno == errno.ENOMEM
        rtnl.sock._sock = real
        assert (await rtnl.link("lo")).index == 1
        # On an event socket a receive error means events may be lost: reported as an overflow.
        events._sock = FailingSocket(events._sock, recv=errno.ENOMEM)
        br = await bridge(rtnl, "br-e")
        await rtnl.add_route(Route(socket.AF_INET, 51820, "198.18.9.0/24", protocol=147, oif=br.index))
        with trio.fail_after(5), pytest.raises(EventsOverflow):
            await events.receive_events()
        events._sock = events._sock.sock
        with pytest.raises(NetlinkError):
            events.join_group(100_000)  # no such group
