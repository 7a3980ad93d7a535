"""Decide -> plan -> apply against an in-memory kernel (tests/fakekernel.py): the steering loop's
sync, drift repair, devices that vanish, adoption after a crash, teardown with the fail-closed gate,
and that nothing of anybody else's is touched. No root needed; the netns tests do the same for real."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import Counter

import pytest
import trio

from hatun.adoption import adopt, ownership_problems
from hatun.health import State
from hatun.layout import Layout
from hatun.netlink.rtnl import Address, Nexthop, Route, Rule
from hatun.pinning import PinningError
from hatun.plan import fail_closed_gate
from hatun.router import Router, choose_mode
from hatun.serving import RateLimitedLog
from hatun.steerer import Steerer
from tests.fakekernel import FakeKernel, FakePinning
from tests.fakes import make_config, make_env, make_runner

NAMES = ("gw1", "gw2", "gw3")


class Host:
    """A config of three tunnels, their devices in a fake kernel, runners and a steering loop."""

    def __init__(self, *, routing: str = 'source = "198.18.99.1"\nmode = "resilient"', kernel: FakeKernel | None = None,
                 pinning: FakePinning | None = None, slots: dict[str, int] | None = None) -> None:
        self.config = make_config(list(NAMES), routing=routing)
        self.layout = Layout.from_routing(self.config.routing)
        self.kernel = kernel or FakeKernel()
        self.pinning = pinning or FakePinning()
        self.router = Router(self.kernel, self.layout, 1, self.pinning if self.config.routing.pin_flows else None)
        env = make_env()
        self.runners = {}
        for i, t in enumerate(self.config.tunnels):
            link = next((l for l in self.kernel.db.links.values() if l.name == t.ifname), None)
            if link is None:
                link = self.kernel.add_device(t.ifname)
            r = make_runner(t.name, config=self.config, slot=(slots or {}).get(t.name, 2 + i), env=env)
            r.ifindex, r.link_up = link.index, True
            self.runners[t.name] = r
        self.repairs = Counter()
        self.steerer = Steerer(self.config, self.layout, self.router, self.config.routing.mode, 1,
                               lambda: list(self.runners.items()), repairs=self.repairs,
                               errors=RateLimitedLog(logging.getLogger("hatun")))

    def up(self, *names: str) -> None:
        for n in names or NAMES:
            h = self.runners[n].health
            for _ in range(h.rise):
                h.record(True, trio.current_time(), rtt=0.001)
            assert h.health is State.UP

    def down(self, name: str) -> None:
        h = self.runners[name].health
        for _ in range(h.fall):
            h.record(False, trio.current_time(), reason="timeout")
        h.confirm_down(trio.current_time())
        assert h.health is State.DOWN

    def group_members(self, family: int = 4) -> set[str]:
        group = self.kernel.db.nexthops.get(self.layout.group(family))
        names = {l.index: l.name for l in self.kernel.db.links.values()}
        return {names[self.kernel.db.nexthops[m].oif] for m, _ in group.group} if group else set()

    def steering_route(self) -> Route | None:
        return next((r for r in self.kernel.db.routes.values() if r.table == self.layout.table
                     and r.dst == ipaddress.ip_network("198.19.77.0/24") and r.priority is None), None)


async def test_first_sync_writes_everything_and_a_second_changes_nothing():
    host = Host()
    host.up()
    assert await host.steerer.sync_once()
    assert host.group_members() == {"hat-gw1", "hat-gw2", "hat-gw3"}
    assert host.steering_route().nh_id == host.layout.group(4)
    assert Address(1, ipaddress.ip_interface("198.18.99.1/32")) in host.kernel.db.addresses
    assert host.pinning.marks == {f"hat-{n}": host.layout.mark(2 + i) for i, n in enumerate(NAMES)}
    assert {r.priority for r in host.kernel.db.rules} == {5200, 5202}  # pinned tables, steering
    calls = len(host.kernel.calls)
    assert await host.steerer.sync_once()
    assert len(host.kernel.calls) == calls and host.repairs == Counter()  # idempotent


async def test_a_tunnel_that_goes_down_leaves_the_group_and_keeps_no_pinned_route():
    host = Host()
    host.up()
    await host.steerer.sync_once()
    host.down("gw2")
    await host.steerer.sync_once()
    assert host.group_members() == {"hat-gw1", "hat-gw3"}
    pinned = {r.table for r in host.kernel.db.routes.values() if r.table != host.layout.table}
    assert pinned == {host.layout.pinned_table(2), host.layout.pinned_table(4)}
    assert host.repairs == Counter()  # a change hatun wanted is no drift


@pytest.mark.parametrize("damage, kind", [
    (lambda k, lay: k.db.routes.pop(next(key for key, r in k.db.routes.items() if r.table == lay.table)), "route"),
    (lambda k, lay: k.db.rules.pop(), "rule"),
    (lambda k, lay: k.db.nexthops.pop(lay.group(4)), "nexthop"),
    (lambda k, lay: k.db.addresses.clear(), "address"),
])
async def test_drift_is_repaired_and_counted(damage, kind):
    host = Host()
    host.up()
    await host.steerer.sync_once()
    before = (dict(host.kernel.db.routes), list(host.kernel.db.rules), dict(host.kernel.db.nexthops))
    damage(host.kernel, host.layout)
    await host.steerer.sync_once()
    assert host.repairs[kind] >= 1
    assert (dict(host.kernel.db.routes), list(host.kernel.db.rules), dict(host.kernel.db.nexthops)) == before


async def test_a_vanished_device_leaves_the_group_and_comes_back_with_its_nexthop():
    host = Host()
    host.up()
    await host.steerer.sync_once()
    host.kernel.remove_device("hat-gw1")  # the kernel drops its nexthop from the group
    host.runners["gw1"].set_link(None)
    assert await host.steerer.sync_once()
    assert host.group_members() == {"hat-gw2", "hat-gw3"}
    link = host.kernel.add_device("hat-gw1")  # re-created, new index
    host.runners["gw1"].set_link(link)
    assert await host.steerer.sync_once()
    assert host.group_members() == {"hat-gw1", "hat-gw2", "hat-gw3"}


async def test_nothing_of_anybody_elses_is_touched():
    kernel = FakeKernel()
    eth = kernel.add_device("eth0", kind=None)
    foreign = [
        Route(socket.AF_INET, 254, "0.0.0.0/0", oif=eth.index, protocol=4),  # main table, static
        Route(socket.AF_INET, 51820, "198.19.0.0/16", oif=eth.index, protocol=186),  # our table, a daemon's protocol
        Route(socket.AF_INET, 100, "198.19.77.0/24", oif=eth.index, protocol=147),  # our protocol, not our table
    ]
    for r in foreign:
        await kernel.replace_route(r)
    rules = [Rule(socket.AF_INET, 5201, 100, protocol=186), Rule(socket.AF_INET, 5300, 51820, protocol=147),
             Rule(socket.AF_INET, 5202, 51820, protocol=12)]
    kernel.db.rules += rules
    kernel.db.addresses.append(Address(1, ipaddress.ip_interface("127.0.0.1/8")))
    await kernel.replace_nexthop(Nexthop(7, socket.AF_INET, oif=eth.index, protocol=147))  # below our id range
    host = Host(kernel=kernel)
    host.up()
    await host.steerer.sync_once()
    await host.router.remove_all(None)
    assert all(r in kernel.db.routes.values() for r in foreign)
    assert all(r in kernel.db.rules for r in rules) and 7 in kernel.db.nexthops
    assert Address(1, ipaddress.ip_interface("127.0.0.1/8")) in kernel.db.addresses
    ours = [r for r in kernel.db.routes.values() if r.protocol == 147 and r.table in host.layout.tables]
    assert ours == [] and not [n for n in kernel.db.nexthops if n in host.layout.nexthop_ids]


async def test_remove_all_keeps_the_fail_closed_gate():
    host = Host(routing='when_all_down = "unreachable"\nmode = "resilient"')
    host.up()
    await host.steerer.sync_once()
    gate = fail_closed_gate(host.config.routing.prefixes, host.layout)
    res = await host.router.remove_all(gate)
    assert not res.errors and host.pinning.marks is None
    assert set(host.kernel.db.routes.values()) == set(gate.routes)
    assert set(host.kernel.db.rules) == set(gate.rules) and host.kernel.db.nexthops == {}


async def test_adoption_after_a_crash_changes_nothing_in_the_kernel():
    """A previous run left its objects; the new one finds the same slots and members and, while its
    tunnels have no verdict yet, wants exactly what is there: not one change."""
    first = Host(slots={"gw1": 5, "gw2": 3, "gw3": 7})
    first.up()
    await first.steerer.sync_once()
    kernel, pinning = first.kernel, first.pinning
    router = Router(kernel, first.layout, 1, pinning)
    adopted = adopt(first.config, first.layout, await router.read(), await kernel.links(), await router.read_marks())
    assert adopted.slots == {"gw1": 5, "gw2": 3, "gw3": 7}
    assert adopted.members == {"hat-gw1", "hat-gw2", "hat-gw3"}
    second = Host(kernel=kernel, pinning=pinning, slots=adopted.slots)
    for r in second.runners.values():  # no verdict yet: presumed up, as adopted
        r.presumed_up = r.ifname in adopted.members
    second.router.owned_addresses.update(kernel.db.addresses)
    calls = len(kernel.calls)
    assert await second.steerer.sync_once()
    assert kernel.calls[calls:] == []


async def test_adoption_slots_come_from_nexthops_when_the_pinning_table_is_gone():
    first = Host(slots={"gw1": 4, "gw2": 2, "gw3": 3})
    first.up()
    await first.steerer.sync_once()
    adopted = adopt(first.config, first.layout, await first.router.read(), await first.kernel.links(), None)
    assert adopted.slots == {"gw1": 4, "gw2": 2, "gw3": 3}


async def test_a_foreign_pinning_table_is_an_error_not_a_crash():
    pinning = FakePinning()
    pinning.foreign = True
    host = Host(pinning=pinning)
    host.up()
    assert not await host.steerer.sync_once()
    assert "not made by hatun" in host.steerer.last_error
    with pytest.raises(PinningError):
        await pinning.apply({})


async def test_a_failing_netlink_call_is_retried_and_reported():
    from hatun.netlink.core import NetlinkError

    host = Host()
    host.up()
    host.kernel.fail_next["replace_route"] = NetlinkError(105, "No buffer space available")
    assert not await host.steerer.sync_once()
    assert "No buffer space" in host.steerer.last_error
    assert await host.steerer.sync_once() and host.steerer.last_error is None
    assert host.steering_route() is not None


async def test_choose_mode_probes_and_cleans_up():
    kernel = FakeKernel()
    layout = Layout.from_routing(make_config(["gw1"]).routing)
    assert await choose_mode(kernel, layout, "auto") == "resilient"
    assert kernel.db.nexthops == {}  # the probe's nexthops are gone again
    assert await choose_mode(kernel, layout, "multipath") == "multipath"


def test_ownership_problems_name_what_is_someone_elses():
    from hatun.netlink.rtnl import Link

    config = make_config(["gw1", "gw2"], routing='source = "198.18.99.1"')
    links = [Link(1, "lo", None, True, True, 65536), Link(2, "hat-gw1", "bridge", True, True, 1500),
             Link(3, "hat-gw2", "tun", True, True, 1420), Link(4, "eth0", None, True, True, 1500)]
    addresses = [Address(4, ipaddress.ip_interface("198.18.99.1/24"))]
    problems = ownership_problems(config, links, addresses, backend="userspace", lo_index=1, our_ifnames=set(),
                                  our_sources=set(), state_path="/run/hatun/state.json")
    assert len(problems) == 2
    assert "interface hat-gw1 already exists as a bridge device" in problems[0]
    assert "198.18.99.1 is already an address of eth0" in problems[1]
    on_lo = [Address(1, ipaddress.ip_interface("198.18.99.1/32"))]
    assert "did not put it there" in ownership_problems(
        config, links[:1], on_lo, backend="kernel", lo_index=1, our_ifnames=set(), our_sources=set(),
        state_path="/x")[0]
    assert ownership_problems(config, links[:1], on_lo, backend="kernel", lo_index=1, our_ifnames=set(),
                              our_sources={"198.18.99.1"}, state_path="/x") == []
