"""The failover benchmark's baseline (hatun.lab.bfd): BIRD2 with BFD over the tunnels hatun leaves
with keep_on_exit, routing the lab's LAN with an ECMP route that follows the BFD sessions."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess

import pytest
import trio

from hatun.lab import bfd, topology, traffic
from hatun.lab.topology import LAN, SOURCE, Lab, LabError, tunnel_net
from tests.labutil import assert_nothing_lost, edit_config, routes_json

needs_bird = pytest.mark.skipif(shutil.which("bird") is None, reason="needs BIRD 2 (apt-get install bird2)")


@needs_bird
@pytest.mark.parametrize("gateways", [[1], [1, 2, 3], [2, 120]])
def test_configs_are_valid_bird_configs(tmp_path, gateways):
    lab = Lab("cfg", 120, "userspace")
    texts = {"runner": bfd.runner_config(lab, gateways, 50, 3)}
    texts.update({f"gw{i}": bfd.gateway_config(lab, i, 50, 3) for i in gateways})
    for name, text in texts.items():
        path = tmp_path / f"{name}.conf"
        path.write_text(text)
        res = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"{name}: {res.stderr}\n{text}"
    hops = [f"via {tunnel_net(i)[1]}%'{lab.runner_ifname(i)}' bfd" for i in gateways]
    assert f"route {LAN} {' '.join(hops)};" in texts["runner"]
    assert f"krt_prefsrc = {SOURCE};" in texts["runner"]


def test_sessions_and_next_hops_are_read_per_gateway():
    devices = {"hlxr1": 1, "hlxr2": 2, "hlxr3": 3}
    text = ("BIRD 2.0.12 ready.\nbfd1:\nIP address                Interface  State      Since         Interval  Timeout\n"
            "198.18.102.1              hlxr2      Down       15:43:01.867    1.000    0.000\n"
            "198.18.101.1              hlxr1      Up         15:42:56.491    0.050    0.150\n")
    assert bfd.parse_sessions(text, devices) == {1: "Up", 2: "Down"}
    multipath = {"dst": str(LAN), "protocol": "bird", "nexthops": [{"gateway": "198.18.103.1", "dev": "hlxr3"},
                                                                   {"gateway": "198.18.101.1", "dev": "hlxr1"}]}
    single = {"dst": str(LAN), "protocol": "bird", "gateway": "198.18.102.1", "dev": "hlxr2"}
    by_hand = {"dst": str(LAN), "protocol": "boot", "nexthops": [{"dev": "hlxr2"}]}
    assert bfd.parse_next_hops([multipath, by_hand], devices) == [1, 3]
    assert bfd.parse_next_hops([single], devices) == [2]
    assert bfd.parse_next_hops([], devices) == []


async def tunnels_of_hatun(lab_factory, hatun_factory, gateways: int):
    """A lab whose runner has the tunnels of a hatun started with keep_on_exit = true (still running)."""
    lab = await trio.to_thread.run_sync(lambda: lab_factory(gateways))
    edit_config(lab, top={"keep_on_exit": "true"})
    hatun = await trio.to_thread.run_sync(hatun_factory, lab)
    await trio.to_thread.run_sync(lambda: hatun.wait(lambda s: len(s["route"]["members"]) == gateways, 10, "all in route"))
    return lab, hatun


async def hand_over(lab: Lab, hatun) -> None:
    """Stop hatun (its tunnels stay) and remove its steering, as the benchmark does."""
    await trio.to_thread.run_sync(lambda: hatun.stop(timeout=30))
    await bfd.clear_hatun_steering(lab)


def birds_in(lab: Lab) -> list[int]:
    """BIRD processes (zombies aside) in the lab's namespaces."""
    found = []
    for ns in lab.namespaces():
        for pid in topology.namespace_pids(ns):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    head, tail = f.read().rsplit(")", 1)
            except OSError:
                continue
            if head.split("(", 1)[1] == "bird" and tail.split()[0] != "Z":
                found.append(pid)
    return found


def assert_nothing_left(lab: Lab, pids: dict[str, int]) -> None:
    """No BIRD (PIDS: those seen while it ran, ended and reaped), no file, no route."""
    assert birds_in(lab) == []
    assert [p for p in pids.values() if os.path.exists(f"/proc/{p}")] == []
    assert not os.path.exists(os.path.join(lab.dir, "bfd"))
    assert routes_json(lab.runner, "route", "show", str(LAN)) == []


def hops_of(lab: Lab) -> list[tuple[str, str]]:
    [route] = routes_json(lab.runner, "route", "show", str(LAN))
    assert route["protocol"] == "bird" and route["prefsrc"] == SOURCE, route
    return sorted((h["dev"], h["gateway"]) for h in route["nexthops"])


@pytest.mark.netns
@pytest.mark.slow
@needs_bird
async def test_bfd_routes_over_every_tunnel_and_follows_a_failed_gateway(lab_factory, hatun_factory):
    lab, hatun = await tunnels_of_hatun(lab_factory, hatun_factory, 3)
    await hand_over(lab, hatun)
    async with bfd.bfd_routing(lab, [3, 1, 2]) as routing:
        pids = routing.pids
        assert sorted(pids) == ["gw1", "gw2", "gw3", "runner"]
        state = await routing.wait_up(10)
        assert state.sessions == {1: "Up", 2: "Up", 3: "Up"}
        assert hops_of(lab) == [(lab.runner_ifname(i), str(tunnel_net(i)[1])) for i in (1, 2, 3)]
        # Traffic reaches the service through all three tunnels.
        run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=32, rate=500, duration=1.5)
        assert set(run.share()) == {"gw1", "gw2", "gw3"}, run.share()
        assert_nothing_lost(run.flows, "flows over the BFD-guarded route")

        # gw2 fails under load (as `hatun lab bench failover` does it) and heals.
        seen = {}

        async def chaos():
            await trio.sleep(2.0)
            await topology.lab_fail(lab.name, "gw2", "blackhole")
            seen["out"] = await routing.wait_for(lambda s: s.next_hops == [1, 3], "gw2's next hop withdrawn", 10)
            await trio.sleep(1.0)
            await topology.lab_heal(lab.name, "gw2")

        run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=64, rate=1000, duration=7.0, on_start=chaos)
        assert seen["out"].sessions[2] != "Up" and seen["out"].sessions[1] == seen["out"].sessions[3] == "Up"
        await routing.wait_up(20)  # healed: gw2's next hop is back
        assert hops_of(lab) == [(lab.runner_ifname(i), str(tunnel_net(i)[1])) for i in (1, 2, 3)]
        failed = [f for f in run.flows if f.gateways()[:1] == ["gw2"]]
        others = [f for f in run.flows if f.gateways()[:1] in (["gw1"], ["gw3"])]
        assert failed and others
        for f in failed:
            assert f.gateways()[1:2] in (["gw1"], ["gw3"]), f.gateways()  # moved to a healthy tunnel
            assert 0 < f.loss_window() < 5.0, f.loss_window()
        windows = [1000 * f.loss_window() for f in failed]
        print(f"\nBFD baseline (50 ms x 3), gw2 blackholed, {len(failed)} of 64 flows on it:"
              f" loss window median {statistics.median(windows):.0f} ms (min {min(windows):.0f}, max {max(windows):.0f});"
              f" packets lost on the other tunnels {sum(len(f.lost(end=run.ended - 1.0)) for f in others)};"
              f" flows that changed tunnel {100 * sum(len(f.gateways()) > 1 for f in run.flows) / 64:.0f}%")
    assert_nothing_left(lab, pids)


@pytest.mark.netns
@pytest.mark.slow
@needs_bird
async def test_bfd_refuses_while_hatun_steers_and_leaves_nothing_after_an_error(lab_factory, hatun_factory):
    lab, hatun = await tunnels_of_hatun(lab_factory, hatun_factory, 2)
    with pytest.raises(LabError, match="hatun's rules .* clear_hatun_steering"):
        async with bfd.bfd_routing(lab, [1, 2]):
            pass
    assert not os.path.exists(os.path.join(lab.dir, "bfd"))
    await hand_over(lab, hatun)
    with pytest.raises(LabError, match="no gateway '3'"):
        async with bfd.bfd_routing(lab, [1, 2, 3]):
            pass
    with pytest.raises(RuntimeError, match="the caller failed"):
        async with bfd.bfd_routing(lab, [1, 2]) as routing:
            await routing.wait_up(10)
            pids = routing.pids
            raise RuntimeError("the caller failed")
    assert_nothing_left(lab, pids)
    # Cancelled as soon as the first BIRD has its control socket, while the others start: nothing
    # is left either.
    async def baseline():
        async with bfd.bfd_routing(lab, [1, 2]):
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(baseline)
        with trio.fail_after(20):
            while not os.path.exists(os.path.join(lab.dir, "bfd", "gw1.ctl")):
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert_nothing_left(lab, {})
