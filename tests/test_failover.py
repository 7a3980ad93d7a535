"""Issue 4: failover through the lab with hatun running for real (wireguard-go tunnels, kernel routes,
nexthop groups, nftables pinning), observed with real traffic."""

from __future__ import annotations

import time

import pytest
import trio

from hatun.lab import topology, traffic
from tests.labutil import assert_nothing_lost, edit_config, ns_output, routes_json

pytestmark = pytest.mark.netns


async def start(lab_factory, hatun_factory, gateways=3, config_edit=None, **lab_kw):
    lab = await trio.to_thread.run_sync(lambda: lab_factory(gateways, **lab_kw))
    if config_edit:
        edit_config(lab, **config_edit)
    hatun = await trio.to_thread.run_sync(hatun_factory, lab)
    await trio.to_thread.run_sync(lambda: hatun.wait(lambda s: len(s["route"]["members"]) == gateways, 10, "all in route"))
    return lab, hatun


async def wait_status(hatun, predicate, timeout=10.0, what="condition"):
    return await trio.to_thread.run_sync(lambda: hatun.wait(predicate, timeout, what))


def members(s):
    return s["route"]["members"]


async def test_failover_and_failback_with_flows(lab_factory, hatun_factory):
    lab, hatun = await start(lab_factory, hatun_factory)
    marks = {}

    async def chaos():
        await trio.sleep(1.5)
        marks["fail"] = trio.current_time()
        await topology.lab_fail(lab.name, "gw2", "blackhole")
        await wait_status(hatun, lambda s: "gw2" not in members(s), 10, "gw2 out of the route")
        await trio.sleep(0.5)  # its flows settle on the others before it comes back
        marks["heal"] = trio.current_time()
        await topology.lab_heal(lab.name, "gw2")

    run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=64, rate=1000, duration=7.0, on_start=chaos)
    on_gw2 = [f for f in run.flows if f.gateways()[:1] == ["gw2"]]
    healthy = [f for f in run.flows if f.gateways()[:1] in (["gw1"], ["gw3"])]
    assert on_gw2 and healthy and len(on_gw2) + len(healthy) == 64
    # Flows on healthy tunnels: nothing lost (beyond the machine's noise), never moved.
    assert_nothing_lost(healthy, "flows on healthy tunnels")
    assert all(len(f.gateways()) == 1 for f in healthy)
    # The failed tunnel's flows moved to the others, after a loss window well under a second.
    for f in on_gw2:
        assert f.gateways()[1] in ("gw1", "gw3"), f.gateways()
        assert 0 < f.loss_window() < 5.0, f.loss_window()  # the figure: `hatun lab bench failover`
    s = await wait_status(hatun, lambda s: "gw2" in members(s), 10, "gw2 back in the route")
    t = next(t for t in s["tunnels"] if t["name"] == "gw2")
    assert t["state"] == "up" and t["transitions"].get("down") == 1


async def test_tcp_connections_on_healthy_tunnels_stay_open(lab_factory, hatun_factory):
    lab, hatun = await start(lab_factory, hatun_factory)

    established = trio.Event()

    async def chaos():
        with trio.fail_after(30):
            await established.wait()  # every connection has its gateway
        await trio.sleep(0.5)
        await topology.lab_fail(lab.name, "gw1", "blackhole")

    async with trio.open_nursery() as n:
        n.start_soon(chaos)
        conns = await traffic.tcp_connections(lab.runner, topology.SERVICE, count=16, duration=5.0,
                                              established=established)
    assert [(c.index, c.broken) for c in conns if c.gateway is None] == []  # all were up before the failure
    healthy = [c for c in conns if c.gateway in ("gw2", "gw3")]
    assert healthy, [c.gateway for c in conns]  # 16 connections, 2/3 of them expected there
    assert [(c.index, c.gateway, c.broken) for c in healthy if c.broken] == []
    assert all(c.exchanges >= 10 for c in healthy)  # ~25 in 5 s; at least 10 reach well past the failure


async def test_failback_moves_no_flow_and_new_flows_use_the_recovered_tunnel(lab_factory, hatun_factory):
    lab, hatun = await start(lab_factory, hatun_factory)
    await topology.lab_fail(lab.name, "gw2", "blackhole")
    await wait_status(hatun, lambda s: "gw2" not in members(s), 5, "gw2 out")

    async def heal():
        await trio.sleep(1.0)
        await topology.lab_heal(lab.name, "gw2")

    async with trio.open_nursery() as n:
        n.start_soon(heal)
        conns_task = []

        async def tcp():
            conns_task.extend(await traffic.tcp_connections(lab.runner, topology.SERVICE, count=8, duration=6.0))

        n.start_soon(tcp)
        old = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=32, rate=500, duration=6.0)
    # Existing flows stayed where they were across the failback: none moved, no TCP connection broke.
    assert [f.gateways() for f in old.flows if len(f.gateways()) != 1] == []
    assert [c for c in conns_task if c.broken] == []
    assert "gw2" in members(await wait_status(hatun, lambda s: "gw2" in members(s), 5, "gw2 back"))
    # New flows reach the recovered tunnel at once (its weighted share, ~1/3).
    new = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=60, rate=600, duration=1.5)
    share = new.share()
    assert 0.08 <= share.get("gw2", 0) <= 0.60, share  # 60 flows at 1/3: 4 standard deviations either way


async def test_priority_tiers(lab_factory, hatun_factory):
    lab = await trio.to_thread.run_sync(lab_factory, 3)
    edit_config(lab, tunnels={"gw3": {"priority": "1"}})
    hatun = await trio.to_thread.run_sync(hatun_factory, lab)
    s = await wait_status(hatun, lambda s: members(s) == ["gw1", "gw2"], 10, "tier 0 in service")
    assert s["route"]["tier"] == 0
    await topology.lab_fail(lab.name, "gw1", "blackhole")
    await wait_status(hatun, lambda s: members(s) == ["gw2"], 5, "gw2 alone")
    await topology.lab_fail(lab.name, "gw2", "blackhole")
    s = await wait_status(hatun, lambda s: members(s) == ["gw3"], 5, "backup tier")
    assert s["route"]["tier"] == 1
    run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=8, rate=200, duration=0.5)
    assert run.share() == {"gw3": 1.0}
    await topology.lab_heal(lab.name, "gw1")
    await wait_status(hatun, lambda s: members(s) == ["gw1"], 5, "tier 0 back")


async def test_drain_keeps_existing_flows_and_takes_no_new_ones(lab_factory, hatun_factory):
    lab, hatun = await start(lab_factory, hatun_factory)

    async def drain():
        await trio.sleep(1.0)
        reply = await trio.to_thread.run_sync(hatun.control, {"command": "drain", "tunnel": "gw1"})
        assert reply == {"ok": True, "tunnel": "gw1", "state": "draining"}

    old = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=32, rate=500, duration=3.0, on_start=drain)
    # A drain loses nothing and moves nothing.
    assert_nothing_lost(old.flows, "drain")
    assert all(len(f.gateways()) == 1 for f in old.flows)
    assert any(f.gateways() == ["gw1"] for f in old.flows)
    s = hatun.status()
    gw1 = next(t for t in s["tunnels"] if t["name"] == "gw1")
    assert (gw1["state"], gw1["weight"], gw1["in_route"], gw1["pinned"]) == ("draining", 0, False, True)
    new = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=30, rate=300, duration=1.0)
    # A new flow that happens to reuse an old flow's source port is that old flow to conntrack (its
    # entry lives on): it stays pinned where it was. Every other new flow avoids gw1.
    reused = {f.port for f in old.flows}
    assert not [f for f in new.flows if f.port not in reused and "gw1" in f.gateways()]
    await trio.to_thread.run_sync(hatun.control, {"command": "undrain", "tunnel": "gw1"})
    await wait_status(hatun, lambda s: "gw1" in members(s), 5, "gw1 back")


@pytest.mark.parametrize("mode", ["keep", "unreachable"])
async def test_all_tunnels_down(lab_factory, hatun_factory, mode):
    lab, hatun = await start(lab_factory, hatun_factory, gateways=2,
                             config_edit={"routing": {"when_all_down": f'"{mode}"'}})
    for gw in ("gw1", "gw2"):
        await topology.lab_fail(lab.name, gw, "blackhole")
    s = await wait_status(hatun, lambda s: s["route"]["all_down"], 5, "all down")
    table = routes_json(lab.runner, "route", "show", "table", "51820")
    if mode == "keep":
        # The route stays on the last group in service (the tunnel that failed last).
        assert members(s) in (["gw1"], ["gw2"], ["gw1", "gw2"]) and not s["route"]["unreachable"]
        assert table[0].get("nhid") == 518201000
    else:
        assert s["route"]["unreachable"]
        assert table[0]["type"] == "unreachable"
        # Never a silent fall-back to another route: the kernel refuses at once.
        with pytest.raises(OSError):
            traffic.udp_socket(lab.runner, topology.SERVICE).send(b"x")
    await topology.lab_heal(lab.name, "gw2")
    await wait_status(hatun, lambda s: members(s) == ["gw2"] and not s["route"]["all_down"], 5, "gw2 back")


async def test_drift_is_repaired_within_a_second(lab_factory, hatun_factory):
    lab, hatun = await start(lab_factory, hatun_factory)
    ns = lab.runner

    def repaired(check, what, timeout=1.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if check():
                return time.monotonic() - t0
            time.sleep(0.02)
        raise AssertionError(f"{what} not repaired within {timeout} s:\n{hatun.log()[-2000:]}")

    def steering_route():
        return [r for r in routes_json(ns, "route", "show", "table", "51820") if r["dst"] == "198.19.77.0/24"]

    def group():
        return ns_output(ns, "ip", "nexthop", "show", "id", "518201000", check=False)

    def rules():
        return ns_output(ns, "ip", "rule")

    checks = [
        (["ip", "route", "del", "198.19.77.0/24", "table", "51820"], lambda: steering_route(), "deleted route"),
        (["ip", "route", "replace", "blackhole", "198.19.77.0/24", "table", "51820", "proto", "147"],
         lambda: steering_route() and steering_route()[0].get("nhid") == 518201000, "replaced route"),
        (["ip", "nexthop", "del", "id", "518201000"], lambda: "518200004" in group() and steering_route(), "deleted group"),
        (["ip", "nexthop", "del", "id", "518200006"], lambda: "518200006" in group(), "deleted nexthop"),
        (["ip", "rule", "del", "pref", "5202"], lambda: "lookup 51820 proto 147" in rules(), "deleted rule"),
        (["ip", "route", "del", "198.19.77.0/24", "table", "51823"],
         lambda: routes_json(ns, "route", "show", "table", "51823"), "deleted pinned route"),
    ]
    took = []
    for cmd, check, what in checks:
        ns_output(ns, *cmd)
        took.append(await trio.to_thread.run_sync(repaired, check, what))
    # A tunnel device deleted behind hatun's back comes back, and into the route.
    ns_output(ns, "ip", "link", "del", lab.runner_ifname(3))
    await wait_status(hatun, lambda s: "gw3" not in members(s) or not next(t for t in s["tunnels"] if t["name"] == "gw3")["present"],
                      2, "gw3 gone")
    await wait_status(hatun, lambda s: "gw3" in members(s), 10, "gw3 back in the route")
    assert "repaired drift" in hatun.log()


async def test_weights_are_respected(lab_factory, hatun_factory):
    lab = await trio.to_thread.run_sync(lab_factory, 3)
    edit_config(lab, tunnels={"gw1": {"weight": "1"}, "gw2": {"weight": "2"}, "gw3": {"weight": "3"}})
    hatun = await trio.to_thread.run_sync(hatun_factory, lab)
    await wait_status(hatun, lambda s: len(members(s)) == 3, 10, "all in route")
    run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=400, rate=2000, duration=1.0)
    counts = {}
    for f in run.flows:
        gws = f.gateways()
        if gws:
            counts[gws[0]] = counts.get(gws[0], 0) + 1
    total = sum(counts.values())
    for gw, weight in (("gw1", 1), ("gw2", 2), ("gw3", 3)):
        assert abs(counts.get(gw, 0) / total - weight / 6) <= 0.10, counts


async def test_ipv6_prefixes_and_probes(lab_factory, hatun_factory):
    lab, hatun = await start(lab_factory, hatun_factory, gateways=2, ipv6=True)
    table = routes_json(lab.runner, "-6", "route", "show", "table", "51820")
    assert any(r["dst"] == "2001:2:0:77::/64" and r.get("nhid") == 518201001 for r in table), table
    run = await traffic.udp_flows(lab.runner, topology.SERVICE6, flows=16, rate=400, duration=1.0)
    assert set(run.share()) == {"gw1", "gw2"}
    assert_nothing_lost(run.flows, "IPv6")
    await topology.lab_fail(lab.name, "gw1", "blackhole")
    await wait_status(hatun, lambda s: members(s) == ["gw2"], 5, "gw1 out")
    run = await traffic.udp_flows(lab.runner, topology.SERVICE6, flows=16, rate=400, duration=1.0)
    assert run.share() == {"gw2": 1.0}


async def test_classic_multipath_mode(lab_factory, hatun_factory):
    lab, hatun = await start(lab_factory, hatun_factory, gateways=2,
                             config_edit={"routing": {"mode": '"multipath"'}})
    assert hatun.status()["mode"] == "multipath"
    route = routes_json(lab.runner, "route", "show", "table", "51820")[0]
    assert len(route["nexthops"]) == 2
    await topology.lab_fail(lab.name, "gw1", "blackhole")
    await wait_status(hatun, lambda s: members(s) == ["gw2"], 5, "gw1 out")
    route = routes_json(lab.runner, "route", "show", "table", "51820")[0]
    assert route["dev"] == lab.runner_ifname(2)
    run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=8, rate=200, duration=0.5)
    assert run.share() == {"gw2": 1.0}


async def test_default_route_prefix_keeps_encrypted_packets_out_of_the_tunnels(lab_factory, hatun_factory):
    """With 0.0.0.0/0 steered, the gateways' endpoints are covered too: the fwmark bypass keeps
    WireGuard's own packets on the underlay, and the tunnels still come up and carry traffic."""
    lab, hatun = await start(lab_factory, hatun_factory, gateways=2,
                             config_edit={"routing": {"prefixes": '["0.0.0.0/0"]'}})
    run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=16, rate=400, duration=1.0)
    assert set(run.share()) == {"gw1", "gw2"}
    assert_nothing_lost(run.flows, "default route")
    assert "suppress_prefixlength 0" in ns_output(lab.runner, "ip", "rule")
