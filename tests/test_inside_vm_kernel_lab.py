"""Issue 8, inside the VM: the lab and hatun with KERNEL WireGuard (backend auto-detection picks it),
the behaviour the userspace backend is tested for on the host: tunnels up, traffic through each,
failover and failback, drift repair after `ip link del`, reload, clean stop.

These run only inside the test VM (tests/test_vm_kernel.py boots it and runs them there). The VM
emulates its CPU (20-30x slower than the host), so waits are generous and Python processes few.
"""

from __future__ import annotations

import os
import signal

import pytest
import trio

from hatun.lab import topology, traffic
from tests.labutil import HatunProcess, edit_config, hatun_cli, lab_name, ns_output

pytestmark = [
    pytest.mark.vm_inside,
    pytest.mark.skipif(os.environ.get("HATUN_IN_VM") != "1", reason="runs inside the test VM (tests/test_vm_kernel.py)"),
]
SLOW = 60.0  # seconds for anything that takes a second on the host


@pytest.fixture(scope="module")
def lab():
    name = lab_name()
    lab = trio.run(topology.lab_up, name, 3, "auto", False)
    try:
        yield lab
    finally:
        trio.run(topology.lab_down, name)


@pytest.fixture(scope="module")
def hatun(lab):
    h = HatunProcess(lab, args=("--log-level", "info"))
    h.start(timeout=5 * SLOW)
    try:
        yield h
    finally:
        if h.proc.poll() is None:
            h.stop(timeout=SLOW)


def members(s):
    return s["route"]["members"]


def test_auto_detection_picks_the_kernel(lab, hatun):
    assert lab.backend == "kernel"
    s = hatun.wait(lambda s: len(members(s)) == 3, SLOW, "all in route")
    assert s["backend"] == "kernel"
    kinds = ns_output(lab.runner, "ip", "-d", "-o", "link", "show", "type", "wireguard")
    assert all(lab.runner_ifname(i) in kinds for i in (1, 2, 3))
    assert "wireguard-go" not in ns_output(lab.runner, "ps", "-eo", "args", check=False)


def test_traffic_goes_through_every_tunnel(lab, hatun):
    before = {t["name"]: t["tx_bytes"] or 0 for t in hatun.status()["tunnels"]}
    run = trio.run(lambda: traffic.udp_flows(lab.runner, topology.SERVICE, flows=30, rate=60, duration=3.0))
    assert set(run.share()) == {"gw1", "gw2", "gw3"}, run.share()
    after = {t["name"]: t["tx_bytes"] for t in hatun.status()["tunnels"]}
    assert all(after[n] > before[n] for n in before)


def test_failover_and_failback(lab, hatun):
    trio.run(topology.lab_fail, lab.name, "gw2", "blackhole")
    hatun.wait(lambda s: members(s) == ["gw1", "gw3"], SLOW, "gw2 out")
    run = trio.run(lambda: traffic.udp_flows(lab.runner, topology.SERVICE, flows=20, rate=40, duration=2.0))
    assert "gw2" not in run.share()
    trio.run(topology.lab_heal, lab.name, "gw2")
    hatun.wait(lambda s: members(s) == ["gw1", "gw2", "gw3"], 2 * SLOW, "gw2 back")


def test_a_deleted_device_is_recreated(lab, hatun):
    ns_output(lab.runner, "ip", "link", "del", lab.runner_ifname(3))
    hatun.wait(lambda s: members(s) == ["gw1", "gw2", "gw3"] and
               next(t for t in s["tunnels"] if t["name"] == "gw3")["present"], 2 * SLOW, "gw3 re-created")
    assert lab.runner_ifname(3) in ns_output(lab.runner, "ip", "-o", "link", "show", "type", "wireguard")


def test_reload(lab, hatun):
    edit_config(lab, tunnels={"gw1": {"weight": "2"}})
    res = hatun_cli(None, "reload", "--socket", lab.control_socket, timeout=3 * SLOW)
    assert res.returncode == 0 and "~gw1" in res.stdout, res.stdout + res.stderr
    assert hatun.tunnel("gw1")["weight"] == 2


def test_clean_stop(lab, hatun):
    assert hatun.stop(signal.SIGTERM, timeout=2 * SLOW) == 0
    assert ns_output(lab.runner, "ip", "-o", "link", "show", "type", "wireguard").strip() == ""
    assert "proto 147" not in ns_output(lab.runner, "ip", "rule")
    assert ns_output(lab.runner, "ip", "nexthop").strip() == ""
