"""Typed rtnetlink helpers against a real kernel, inside namespaces the tests create.

Bridges stand in for tunnel devices: this kernel has no dummy or wireguard links, and an up bridge
without ports has carrier, which nexthop objects require.
"""

import errno
import ipaddress
import socket

import pytest
import trio

from hatun.netlink import (
    Address,
    EventsOverflow,
    Hop,
    Link,
    NetlinkError,
    Nexthop,
    Resilient,
    Route,
    RtnlEvent,
    Rule,
    open_rtnl,
    open_rtnl_events,
)
from tests.nsutil import ip

pytestmark = pytest.mark.netns

V4, V6, UNSPEC = socket.AF_INET, socket.AF_INET6, socket.AF_UNSPEC
TABLE, PROTO = 51820, 147


async def bridges(rtnl, *names, up=True):
    links = []
    for name in names:
        link = await rtnl.add_link(name, "bridge")
        if up:
            await rtnl.set_link(link.index, up=True)
        links.append(await rtnl.link(link.index))
    return links


async def test_links_add_set_get_delete(namespaces):
    ns = namespaces.new("links")
    async with open_rtnl(ns) as rtnl:
        created = await rtnl.add_link("br-a", "bridge")
        assert (created.name, created.kind, created.up) == ("br-a", "bridge", False)
        await rtnl.set_link(created.index, up=True, mtu=1420)
        assert await rtnl.link("br-a") == Link(created.index, "br-a", "bridge", True, True, 1420)
        assert await rtnl.link(created.index) == await rtnl.link("br-a")
        assert [lk.name for lk in await rtnl.links()] == ["lo", "br-a"]
        with pytest.raises(NetlinkError) as caught:
            await rtnl.add_link("br-a", "bridge")
        assert caught.value.errno == errno.EEXIST
        assert await rtnl.link("br-missing") is None
        with pytest.raises(NetlinkError, match="add nosuchkind link x: Operation not supported"):
            await rtnl.add_link("x", "nosuchkind")
        assert await rtnl.delete_link("br-a") is True
        assert await rtnl.delete_link("br-a") is False
        assert await rtnl.delete_link(created.index) is False


async def test_addresses_v4_and_v6(namespaces):
    ns = namespaces.new("addr")
    async with open_rtnl(ns) as rtnl:
        (br,) = await bridges(rtnl, "br-a")
        v4, v6 = ipaddress.ip_interface("198.18.1.2/30"), ipaddress.ip_interface("2001:2::2/64")
        for addr in (v4, v6, v4):  # adding twice is harmless
            await rtnl.add_address(br.index, addr)
        mine = [a for a in await rtnl.addresses(br.index) if not a.interface.is_link_local]
        assert mine == [Address(br.index, v4), (br.index, v6)]
        assert all(a.index == br.index for a in await rtnl.addresses(br.index))
        assert (1, ipaddress.ip_interface("127.0.0.1/8")) in await rtnl.addresses()
        # NODAD: the IPv6 address is usable at once, not "tentative".
        shown = ip("-6", "addr", "show", "dev", "br-a", netns=ns).stdout
        assert "inet6 2001:2::2/64 scope global nodad \n" in shown
        assert await rtnl.delete_address(br.index, v6) is True
        assert await rtnl.delete_address(br.index, v6) is False
        assert v6 not in [a.interface for a in await rtnl.addresses(br.index)]


async def test_routes_in_a_custom_table_are_dumped_and_filtered(namespaces):
    ns = namespaces.new("routes")
    async with open_rtnl(ns) as rtnl:
        (br,) = await bridges(rtnl, "br-a")
        await rtnl.add_address(br.index, ipaddress.ip_interface("198.18.1.1/30"))
        ours = [
            Route(V4, TABLE, "198.18.10.0/24", protocol=PROTO, oif=br.index, prefsrc="198.18.1.1"),
            Route(V4, TABLE, "198.18.11.0/24", protocol=PROTO, oif=br.index, priority=20),
            Route(V4, TABLE, "198.18.12.0/24", type="unreachable", protocol=PROTO),
            Route(V4, TABLE, "198.18.13.0/24", type="blackhole", protocol=PROTO),
        ]
        theirs = [
            Route(V4, TABLE, "198.18.20.0/24", protocol=4, oif=br.index),  # same table, other protocol
            Route(V4, 254, "198.18.21.0/24", protocol=PROTO, oif=br.index),  # main table
        ]
        for route in ours + theirs:
            await rtnl.add_route(route)
        assert await rtnl.routes(V4, table=TABLE, protocol=PROTO) == ours
        assert set(await rtnl.routes(V4, table=TABLE)) == set(ours) | {theirs[0]}
        assert theirs[1] in await rtnl.routes(V4)
        assert await rtnl.routes(V4, table=4242) == []  # a table that does not exist
        assert await rtnl.routes(V6, table=TABLE) == []

        with pytest.raises(NetlinkError) as caught:
            await rtnl.add_route(ours[0])
        assert caught.value.errno == errno.EEXIST
        moved = Route(V4, TABLE, "198.18.10.0/24", protocol=PROTO, type="unreachable")
        await rtnl.replace_route(moved)
        assert moved in await rtnl.routes(V4, table=TABLE)
        assert await rtnl.delete_route(moved) is True
        assert await rtnl.delete_route(moved) is False


async def test_weighted_multipath_route_reads_back_with_its_weights(namespaces):
    ns = namespaces.new("mpath")
    async with open_rtnl(ns) as rtnl:
        a, b, c = await bridges(rtnl, "br-a", "br-b", "br-c")
        route = Route(V4, TABLE, "198.18.30.0/24", protocol=PROTO,
                      multipath=[(a.index, 1), (b.index, 7), (c.index, 256)])
        await rtnl.add_route(route)
        assert await rtnl.routes(V4, table=TABLE) == [route]
        assert route.multipath[2] == Hop(c.index, 256)
        assert "weight 256" in ip("route", "show", "table", str(TABLE), netns=ns).stdout
        reweighted = Route(V4, TABLE, "198.18.30.0/24", protocol=PROTO, multipath=[(a.index, 2), (b.index, 2)])
        await rtnl.replace_route(reweighted)
        assert await rtnl.routes(V4, table=TABLE) == [reweighted]


async def test_ipv6_routes_and_multipath(namespaces):
    ns = namespaces.new("v6")
    async with open_rtnl(ns) as rtnl:
        a, b = await bridges(rtnl, "br-a", "br-b")
        plain = Route(V6, TABLE, "2001:2:1::/64", protocol=PROTO, oif=a.index)
        await rtnl.add_route(plain)
        # No priority given: the kernel puts IPv6 routes at metric 1024 and says so.
        assert await rtnl.routes(V6, table=TABLE) == [Route(V6, TABLE, "2001:2:1::/64", protocol=PROTO,
                                                            oif=a.index, priority=1024)]
        # IPv6 refuses device-only multipath hops; with gateways it works, as one route.
        with pytest.raises(NetlinkError, match="Device only routes can not be added for IPv6"):
            await rtnl.add_route(Route(V6, TABLE, "2001:2:2::/64", multipath=[(a.index, 1), (b.index, 2)]))
        mp = Route(V6, TABLE, "2001:2:2::/64", protocol=PROTO, priority=10,
                   multipath=[(a.index, 2, "fe80::1"), (b.index, 5, "fe80::2")])
        await rtnl.add_route(mp)
        reject = Route(V6, TABLE, "2001:2:3::/64", type="unreachable", protocol=PROTO, priority=10)
        await rtnl.add_route(reject)  # the kernel hangs it on `lo`; it reads back without oif
        assert set(await rtnl.routes(V6, table=TABLE)) == {mp, reject, Route(V6, TABLE, "2001:2:1::/64",
                                                                             protocol=PROTO, oif=a.index,
                                                                             priority=1024)}
        reweighted = Route(V6, TABLE, "2001:2:2::/64", protocol=PROTO, priority=10,
                           multipath=[(a.index, 1, "fe80::1"), (b.index, 1, "fe80::2")])
        await rtnl.replace_route(reweighted)
        assert reweighted in await rtnl.routes(V6, table=TABLE)
        # A deleted device takes only its own hop out of an IPv6 multipath route (IPv4 loses the route).
        await rtnl.delete_link(b.index)
        assert Route(V6, TABLE, "2001:2:2::/64", protocol=PROTO, priority=10, oif=a.index,
                     gateway="fe80::1") in await rtnl.routes(V6, table=TABLE)
        assert await rtnl.delete_route(reweighted) is True


async def test_resilient_group_reads_back_and_carries_a_route(namespaces):
    ns = namespaces.new("resil")
    async with open_rtnl(ns) as rtnl:
        a, b = await bridges(rtnl, "br-a", "br-b")
        await rtnl.add_address(a.index, ipaddress.ip_interface("198.18.99.1/32"))
        members = [Nexthop(518200004, V4, oif=a.index, protocol=PROTO),
                   Nexthop(518200006, V4, oif=b.index, protocol=PROTO)]
        group = Nexthop(518201000, UNSPEC, protocol=PROTO, group=[(518200004, 1), (518200006, 3)],
                        resilient=Resilient(buckets=32, idle_timer=2.5, unbalanced_timer=10))
        for nh in members + [group]:
            await rtnl.add_nexthop(nh)
        assert await rtnl.nexthops() == members + [group]
        assert "buckets 32 idle_timer 2.5 unbalanced_timer 10" in ip("nexthop", "show", "id", "518201000",
                                                                    netns=ns).stdout
        route = Route(V4, TABLE, "198.19.77.0/24", protocol=PROTO, nh_id=group.id, prefsrc="198.18.99.1")
        await rtnl.add_route(route)
        assert await rtnl.routes(V4, table=TABLE) == [route]  # the expanded nexthops are not echoed

        # Members and weights may change in place; the route keeps using the group.
        replaced = Nexthop(group.id, UNSPEC, protocol=PROTO, group=[(518200004, 2)], resilient=group.resilient)
        await rtnl.replace_nexthop(replaced)
        assert replaced in await rtnl.nexthops()
        assert await rtnl.routes(V4, table=TABLE) == [route]
        # The bucket count and the group type are fixed at creation.
        with pytest.raises(NetlinkError, match="bucket") as caught:
            await rtnl.replace_nexthop(Nexthop(group.id, UNSPEC, group=[(518200004, 1)],
                                               resilient=Resilient(buckets=64)))
        assert caught.value.errno == errno.EINVAL
        with pytest.raises(NetlinkError) as caught:
            await rtnl.replace_nexthop(Nexthop(group.id, UNSPEC, group=[(518200004, 1)]))
        assert caught.value.errno == errno.EINVAL
        assert await rtnl.delete_nexthop(group.id) is True  # takes its route with it
        assert await rtnl.delete_nexthop(group.id) is False
        assert await rtnl.routes(V4, table=TABLE) == []


async def test_nexthop_needs_an_up_device_and_vanishes_with_it(namespaces):
    ns = namespaces.new("nhgone")
    async with open_rtnl(ns) as rtnl:
        a, b, c = await bridges(rtnl, "br-a", "br-b", "br-c")
        (down,) = await bridges(rtnl, "br-down", up=False)
        with pytest.raises(NetlinkError, match="Nexthop device is not up"):
            await rtnl.add_nexthop(Nexthop(1, V4, oif=down.index))
        for nh_id, link in ((1, a), (2, b), (3, c)):
            await rtnl.add_nexthop(Nexthop(nh_id, V4, oif=link.index))
        await rtnl.add_nexthop(Nexthop(100, UNSPEC, group=[(1, 1), (2, 1)], resilient=Resilient(buckets=16)))
        await rtnl.add_nexthop(Nexthop(101, UNSPEC, group=[(3, 1)]))
        await rtnl.add_route(Route(V4, TABLE, "198.18.40.0/24", nh_id=100))
        await rtnl.add_route(Route(V4, TABLE, "198.18.41.0/24", nh_id=101))

        await rtnl.delete_link(a.index)  # member 1 leaves every group
        await rtnl.set_link(c.index, up=False)  # down is enough: the last member of 101 goes...
        by_id = {nh.id: nh for nh in await rtnl.nexthops()}
        assert set(by_id) == {2, 100}  # ...and takes group 101 with it
        assert by_id[100].group == ((2, 1),)
        assert [r.dst for r in await rtnl.routes(V4, table=TABLE)] == [ipaddress.ip_network("198.18.40.0/24")]
        await rtnl.set_link(c.index, up=True)  # nothing comes back by itself
        assert {nh.id for nh in await rtnl.nexthops()} == {2, 100}


async def test_rules_with_fwmark_mask_invert_and_protocol(namespaces):
    ns = namespaces.new("rules")
    async with open_rtnl(ns) as rtnl:
        rules = [
            Rule(V4, 5200, TABLE + 2, fwmark=0x20000, fwmask=0xFF0000, protocol=PROTO),
            Rule(V4, 5201, TABLE, fwmark=0x10000, fwmask=0xFF0000, invert=True, protocol=PROTO),
            Rule(V6, 5201, TABLE, fwmark=0x10000, fwmask=0xFF0000, invert=True, protocol=PROTO),
            Rule(V6, 5202, TABLE, fwmark=0, fwmask=0xFF0000, protocol=PROTO),  # "no hatun mark"
            Rule(V4, 5203, 100, fwmark=7),  # mask defaults to 0xffffffff, as in the kernel
        ]
        for rule in rules:
            await rtnl.add_rule(rule)
        assert [r for r in await rtnl.rules(V4) if r.priority in (5200, 5201, 5203)] == [rules[0], rules[1], rules[4]]
        assert [r for r in await rtnl.rules(V6) if 5200 <= r.priority < 6000] == rules[2:4]
        assert "not from all fwmark 0x10000/0xff0000 lookup 51820 proto 147" in ip("rule", netns=ns).stdout
        with pytest.raises(NetlinkError) as caught:
            await rtnl.add_rule(rules[0])
        assert caught.value.errno == errno.EEXIST
        assert await rtnl.delete_rule(rules[1]) is True
        assert await rtnl.delete_rule(rules[1]) is False
        assert rules[1] not in await rtnl.rules(V4)


def in_table(event):
    return isinstance(event.obj, Route) and event.obj.table == TABLE


async def next_event(events, match, timeout=5.0):
    with trio.fail_after(timeout):
        async for event in events:
            if match(event):
                return event


async def test_events_report_a_route_deleted_from_outside(namespaces):
    ns = namespaces.new("events")
    async with open_rtnl(ns) as rtnl, open_rtnl_events(ns) as events:
        (br,) = await bridges(rtnl, "br-a")
        route = Route(V4, TABLE, "198.18.50.0/24", protocol=PROTO, oif=br.index)
        await rtnl.add_route(route)
        assert await next_event(events, lambda e: e.obj == route) == RtnlEvent("new", route)
        ip("route", "del", "198.18.50.0/24", "table", str(TABLE), netns=ns)
        assert await next_event(events, in_table) == RtnlEvent("del", route)

        v6 = Route(V6, TABLE, "2001:2:5::/64", protocol=PROTO, oif=br.index, priority=1024)
        await rtnl.add_route(v6)
        assert await next_event(events, lambda e: in_table(e) and e.obj.family == V6) == RtnlEvent("new", v6)
        await rtnl.add_nexthop(Nexthop(7, V4, oif=br.index))
        assert (await next_event(events, lambda e: isinstance(e.obj, Nexthop))).obj.id == 7
        await rtnl.add_rule(Rule(V4, 5200, TABLE, fwmark=1, protocol=PROTO))
        assert (await next_event(events, lambda e: isinstance(e.obj, Rule))).action == "new"
        await rtnl.set_link(br.index, mtu=1300)
        # Link events also come late from the kernel's linkwatch (operstate), so wait for ours.
        link_event = await next_event(events, lambda e: isinstance(e.obj, Link) and e.obj.mtu == 1300)
        assert link_event.obj.index == br.index


async def test_events_overflow_is_signalled_and_iteration_resumes(namespaces):
    ns = namespaces.new("evover")
    async with open_rtnl(ns) as rtnl, open_rtnl_events(ns, rcvbuf=4096) as events:
        (br,) = await bridges(rtnl, "br-a")
        for i in range(200):
            await rtnl.add_route(Route(V4, TABLE, f"198.18.60.{i}/32", protocol=PROTO, oif=br.index))
        with trio.fail_after(5), pytest.raises(EventsOverflow):
            async for _ in events:
                pass
        # The caller re-reads the state here; afterwards events flow again.
        assert len(await rtnl.routes(V4, table=TABLE)) == 200
        await rtnl.delete_route(Route(V4, TABLE, "198.18.60.7/32", protocol=PROTO))
        deleted = await next_event(events, lambda e: e.action == "del" and isinstance(e.obj, Route))
        assert deleted.obj.dst == ipaddress.ip_network("198.18.60.7/32")
