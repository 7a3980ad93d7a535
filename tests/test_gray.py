"""Issue 14: gray failures through the lab, with hatun running for real: a lossy or slow tunnel leaves
service once and comes back once, whether traffic flows through it or not, and no other tunnel's flow
moves. Faults are the lab's own (`hatun lab fail --mode loss:N | delay:D`)."""

from __future__ import annotations

import pytest
import trio

from hatun.lab import topology, traffic
from tests.labutil import routes_json, wait_until
from tests.test_failover import members, start, wait_status

pytestmark = [pytest.mark.netns, pytest.mark.slow]

FAULT_SECONDS = 60.0
RECOVER = '"3s"'


async def _gray_episode(lab, hatun, mode, *, with_traffic, seconds=FAULT_SECONDS):
    """Fault gw2 with MODE for SECONDS (traffic through every tunnel meanwhile, if asked), heal it,
    and return (transitions of every tunnel since the fault, the UDP run or None)."""
    before = {t["name"]: dict(t["transitions"]) for t in (await wait_status(hatun, lambda s: True))["tunnels"]}
    run = None

    async def fault():
        await topology.lab_fail(lab.name, "gw2", mode)
        await wait_status(hatun, lambda s: "gw2" not in members(s), 30, "gw2 out of service")
        await trio.sleep(seconds)
        await topology.lab_heal(lab.name, "gw2")

    if with_traffic:
        async def on_start():
            await trio.sleep(1.0)
            await fault()

        # Flows on every tunnel for the whole episode (bounded: FAULT_SECONDS + 10 s at 300 packets/s).
        run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=48, rate=300, duration=seconds + 10,
                                      on_start=on_start, linger=1.0)
    else:
        await fault()
    status = await wait_status(hatun, lambda s: "gw2" in members(s), 60, "gw2 back in service after the heal")
    moved = {t["name"]: {k: v - before[t["name"]].get(k, 0) for k, v in t["transitions"].items()
                         if v - before[t["name"]].get(k, 0)} for t in status["tunnels"]}
    return moved, run


@pytest.mark.timeout(240)
@pytest.mark.parametrize("with_traffic", [False, True], ids=["idle", "with-traffic"])
async def test_random_loss_takes_the_tunnel_out_once_and_back_once(lab_factory, hatun_factory, with_traffic):
    """30 % loss on each direction of gw2's path (about 51 % of round trips) for 60 s: gw2 leaves service
    once and comes back once, after the heal and its recovery time; gw1 and gw3 are untouched. With
    traffic flowing through gw2 its receive counter keeps growing: that must not hide the loss."""
    lab, hatun = await start(lab_factory, hatun_factory,
                             config_edit={"health": {"recover_time": RECOVER}})
    moved, run = await _gray_episode(lab, hatun, "loss:30", with_traffic=with_traffic)
    assert moved["gw2"] == {"down": 1, "up": 1}, moved
    assert not moved["gw1"] and not moved["gw3"], moved
    if run is not None:
        healthy = [f for f in run.flows if f.gateways()[:1] in (["gw1"], ["gw3"])]
        assert healthy and all(len(f.gateways()) == 1 for f in healthy), "a healthy tunnel's flow moved"


@pytest.mark.timeout(180)
async def test_added_delay_past_max_rtt_takes_the_tunnel_out_until_it_is_fast_again(lab_factory, hatun_factory):
    """80 ms more round trip on gw2 with max_rtt = 20 ms: out once, back once after the heal."""
    lab, hatun = await start(lab_factory, hatun_factory,
                             config_edit={"health": {"recover_time": RECOVER, "max_rtt": '"20ms"'}})
    moved, _ = await _gray_episode(lab, hatun, "delay:80ms", with_traffic=False, seconds=15)
    assert moved["gw2"] == {"down": 1, "up": 1}, moved
    assert not moved["gw1"] and not moved["gw3"], moved


def _group_weights(lab) -> dict[str, int]:
    """Weight of each tunnel device in hatun's IPv4 nexthop group, from the kernel."""
    hops = routes_json(lab.runner, "nexthop", "show")
    dev = {h["id"]: h.get("dev") for h in hops if "dev" in h}
    groups = [h for h in hops if h.get("group")]
    return {dev[m["id"]]: m.get("weight", 1) for g in groups[:1] for m in g["group"]}


@pytest.mark.timeout(180)
async def test_reduce_keeps_a_lossy_tunnel_with_a_smaller_weight(lab_factory, hatun_factory):
    """on_degraded = "reduce": gw2 stays in service, its weight in the kernel's group shrinks while it
    loses packets and is whole again after it recovered."""
    lab, hatun = await start(lab_factory, hatun_factory, config_edit={
        "health": {"recover_time": RECOVER, "on_degraded": '"reduce"', "fall": "1000"}})
    gw2 = lab.runner_ifname(2)
    assert len(set(_group_weights(lab).values())) == 1
    await topology.lab_fail(lab.name, "gw2", "loss:30")
    await trio.to_thread.run_sync(lambda: wait_until(
        lambda: (w := _group_weights(lab)) and w[gw2] < min(v for k, v in w.items() if k != gw2),
        "gw2's weight reduced", 30))
    s = await wait_status(hatun, lambda s: True)
    assert members(s) == ["gw1", "gw2", "gw3"]
    await topology.lab_heal(lab.name, "gw2")
    await trio.to_thread.run_sync(lambda: wait_until(
        lambda: len(set(_group_weights(lab).values())) == 1, "gw2's weight whole again", 60))
    s = await wait_status(hatun, lambda s: True)
    assert all(not t["transitions"].get("down") for t in s["tunnels"]), s["tunnels"]
