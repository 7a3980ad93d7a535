"""Issue 5: hatun as a service and in runner mode, in the lab: stop and clean-up, crash-only restart,
reload, runner mode with diagnoses, status, drain, logs, readiness."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
import trio

from hatun.keys import PrivateKey
from hatun.netns import run_in_netns
from hatun.lab import topology, traffic
from tests.labutil import assert_nothing_lost, edit_config, hatun_cli, ns_output, routes_json

pytestmark = pytest.mark.netns


def members(s):
    return s["route"]["members"]


def hatun_leftovers(lab) -> list[str]:
    """Everything hatun made in the runner namespace that is still there."""
    ns = lab.runner
    found = []
    for table in ("51820", "51822", "51823", "51824"):
        found += [f"route table {table}: {r['dst']}" for r in routes_json(ns, "route", "show", "table", table)]
    found += [line for line in ns_output(ns, "ip", "rule").splitlines() if "proto 147" in line]
    found += [line for line in ns_output(ns, "ip", "nexthop").splitlines()]
    found += [line for line in ns_output(ns, "nft", "list", "tables").splitlines() if "hatun" in line]
    found += [line for line in ns_output(ns, "ip", "-o", "link").splitlines() if f"hl{lab.name}r" in line]
    found += [line for line in ns_output(ns, "ip", "-o", "addr", "show", "dev", "lo").splitlines() if "198.18.99.1" in line]
    found += [f"/run/wireguard/{f}" for f in os.listdir("/run/wireguard") if f.startswith(f"hl{lab.name}r")]
    for key in ("net.ipv4.fib_multipath_hash_policy", "net.ipv4.conf.all.src_valid_mark"):
        value = ns_output(ns, "sysctl", "-n", key).strip()
        if value != "0":
            found.append(f"{key} = {value}")
    for path in (lab.control_socket, os.path.join(lab.dir, "run", "state.json")):
        if os.path.exists(path):
            found.append(path)
    return found


def test_sigterm_removes_everything_and_keep_on_exit_keeps_it(lab_factory, hatun_factory):
    lab = lab_factory(2)
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: len(members(s)) == 2, 10, "both in route")
    assert hatun_leftovers(lab)  # sanity: the check sees hatun's objects
    assert hatun.stop(signal.SIGTERM) == 0
    assert hatun_leftovers(lab) == []
    assert "removed hatun's routes" in hatun.log()

    edit_config(lab, top={"keep_on_exit": "true"})
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: len(members(s)) == 2, 10, "both in route")
    assert hatun.stop(signal.SIGINT) == 0
    left = hatun_leftovers(lab)
    assert any("table 51820" in x for x in left) and any(f"hl{lab.name}r1" in x for x in left)
    # `hatun down` removes what a keep_on_exit (or crashed) hatun left.
    res = hatun_cli(lab.runner, "down", lab.config_path)
    assert res.returncode == 0, res.stderr
    assert "removed leftover" in res.stdout
    assert hatun_leftovers(lab) == []


async def test_kill9_and_restart_adopt_without_losing_a_packet(lab_factory, hatun_factory):
    lab = await trio.to_thread.run_sync(lab_factory, 3)
    hatun = await trio.to_thread.run_sync(hatun_factory, lab)
    await trio.to_thread.run_sync(lambda: hatun.wait(lambda s: len(members(s)) == 3, 10, "all in route"))
    before = {t["name"]: t for t in hatun.status()["tunnels"]}
    links_before = ns_output(lab.runner, "ip", "-o", "link")
    def runner_children() -> list[str]:
        # pgrep sees every namespace's processes (network namespaces share the PID space): keep this
        # lab's runner-side wireguard-go only, whatever else runs on the machine.
        return [line for line in ns_output(lab.runner, "pgrep", "-a", "wireguard-go").splitlines()
                if line.split()[-1].startswith(f"hl{lab.name}r")]

    pids_before = runner_children()
    observed = {}

    async def crash_and_restart():
        await trio.sleep(1.0)
        await trio.to_thread.run_sync(hatun.kill9)
        await trio.sleep(0.3)
        # While no hatun runs, the kernel keeps routing: tunnels and routes stay.
        observed["route"] = routes_json(lab.runner, "route", "show", "table", "51820")
        observed["new"] = await trio.to_thread.run_sync(hatun_factory, lab)

    run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=48, rate=600, duration=5.0,
                                  on_start=crash_and_restart)
    assert observed["route"] and observed["route"][0].get("nhid") == 518201000
    assert_nothing_lost(run.flows, "kill -9 and restart")
    assert all(len(f.gateways()) == 1 for f in run.flows), "flows moved"
    new = observed["new"]
    assert "adopting the kernel state" in new.log()
    assert runner_children() == pids_before  # same processes
    assert ns_output(lab.runner, "ip", "-o", "link").split("\n")[:4] == links_before.split("\n")[:4]
    after = {t["name"]: t for t in new.status()["tunnels"]}
    for name in before:
        assert (after[name]["rx_bytes"] or 0) >= (before[name]["rx_bytes"] or 0), "counters kept: same devices"


def test_reload_changes_only_what_changed(lab_factory, hatun_factory):
    lab = lab_factory(3)
    edit_config(lab, drop=["gw3"])
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: members(s) == ["gw1", "gw2"], 10, "gw1, gw2 in route")
    links = {line.split(":")[1].strip(): line.split(":")[0] for line in ns_output(lab.runner, "ip", "-o", "link").splitlines()}
    gw1 = hatun.tunnel("gw1")
    time.sleep(1.0)
    # Add gw3, change gw2's weight, leave gw1 alone.
    edit_config(lab, tunnels={"gw2": {"weight": "3"}})
    res = hatun_cli(None, "reload", "--socket", lab.control_socket)
    assert res.returncode == 0, res.stderr
    assert "+gw3" in res.stdout and "~gw2" in res.stdout and "gw1" not in res.stdout
    s = hatun.wait(lambda s: members(s) == ["gw1", "gw2", "gw3"], 10, "gw3 joined")
    gw1_after = next(t for t in s["tunnels"] if t["name"] == "gw1")
    assert gw1_after["rx_bytes"] > gw1["rx_bytes"] and gw1_after["last_handshake"] == gw1["last_handshake"]
    assert gw1_after["transitions"] == gw1["transitions"] and gw1_after["state"] == "up"
    new_links = {line.split(":")[1].strip(): line.split(":")[0] for line in ns_output(lab.runner, "ip", "-o", "link").splitlines()}
    assert new_links[f"hl{lab.name}r1"] == links[f"hl{lab.name}r1"], "gw1's device untouched"
    assert next(t for t in s["tunnels"] if t["name"] == "gw2")["weight"] == 3
    # Remove gw2: drained (no new flows) and then torn down.
    edit_config(lab, drop=["gw2"])
    os.kill(hatun.proc.pid, signal.SIGHUP)
    hatun.wait(lambda s: "gw2" not in members(s), 5, "gw2 draining")
    hatun.wait(lambda s: "gw2" not in [t["name"] for t in s["tunnels"]], 15, "gw2 torn down")
    assert f"hl{lab.name}r2" not in ns_output(lab.runner, "ip", "-o", "link")
    assert hatun.status()["reload"]["counts"] == {"success": 2}


def test_invalid_reload_keeps_running_the_old_config(lab_factory, hatun_factory):
    lab = lab_factory(2)
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: len(members(s)) == 2, 10, "both in route")
    with open(lab.config_path) as f:
        good = f.read()
    with open(lab.config_path, "w") as f:
        f.write(good.replace('name = "gw2"', 'name = "gw2"\nweight = 0'))
    res = hatun_cli(None, "reload", "--socket", lab.control_socket)
    assert res.returncode == 1
    assert "reload refused" in res.stderr and "weight: must be >= 1" in res.stderr
    s = hatun.status()
    assert members(s) == ["gw1", "gw2"] and s["reload"]["ok"] is False
    # A key that decides where hatun's objects live cannot change under a running hatun.
    with open(lab.config_path, "w") as f:
        f.write(good.replace("[routing]", "[routing]\ntable = 4000"))
    res = hatun_cli(None, "reload", "--socket", lab.control_socket)
    assert res.returncode == 1 and "routing.table cannot change while hatun runs" in res.stderr
    with open(lab.config_path, "w") as f:
        f.write(good)
    assert hatun_cli(None, "reload", "--socket", lab.control_socket).returncode == 0
    assert hatun.status()["reload"]["counts"] == {"failure": 2, "success": 1}


def test_a_failing_tunnel_does_not_take_the_others_down(lab_factory, hatun_factory):
    """gw2's listen port is taken, so its device cannot be configured: gw2 is retried with backoff
    alone, the others serve; once the port is free, gw2 comes up on its own."""
    lab = lab_factory(3)
    edit_config(lab, tunnels={"gw2": {"listen_port": "40000"}})
    blocker = run_in_netns(lab.runner, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    blocker.bind(("0.0.0.0", 40000))
    try:
        hatun = hatun_factory(lab)
        s = hatun.wait(lambda s: members(s) == ["gw1", "gw3"], 10, "gw1, gw3 in route")
        gw2 = next(t for t in s["tunnels"] if t["name"] == "gw2")
        hatun.wait(lambda s: next(t for t in s["tunnels"] if t["name"] == "gw2")["restarts"] >= 1, 10, "gw2 retried")
        assert "address already in use" in (hatun.tunnel("gw2")["last_error"] or "") or "in use" in hatun.log()
        assert gw2["state"] != "up"
    finally:
        blocker.close()
    hatun.wait(lambda s: members(s) == ["gw1", "gw2", "gw3"], 25, "gw2 recovered by itself")


def test_runner_mode_up_and_down(lab_factory):
    lab = lab_factory(2)
    res = hatun_cli(lab.runner, "up", lab.config_path, "--wait", "20", "--min-healthy", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 of 2 tunnels healthy" in res.stdout
    res = hatun_cli(lab.runner, "up", lab.config_path, "--wait", "5")  # already up: fine
    assert res.returncode == 0
    for _ in range(2):  # idempotent
        res = hatun_cli(lab.runner, "down", lab.config_path)
        assert res.returncode == 0, res.stderr
    assert hatun_leftovers(lab) == []


def test_down_after_a_killed_hatun_and_an_interrupted_up_leave_nothing(lab_factory):
    """kill -9 of the background hatun, then `down`: its stale control socket goes too. SIGTERM to
    `up` while it waits (a cancelled CI job): it stops what it started."""

    lab = lab_factory(2)
    res = hatun_cli(lab.runner, "up", lab.config_path, "--wait", "20", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    os.kill(json.loads(res.stdout)["pid"], signal.SIGKILL)
    res = hatun_cli(lab.runner, "down", lab.config_path)
    assert res.returncode == 0, res.stderr
    assert f"control socket {lab.control_socket}" in res.stdout
    assert hatun_leftovers(lab) == []

    # Neither gateway answers: `up` waits (up to 120 s) until it is told to stop.
    for gw in ("gw1", "gw2"):
        trio.run(topology.lab_fail, lab.name, gw, "blackhole")
    up = start_up(lab, "--wait", "120")
    try:
        if not background_hatun_answers(lab):
            pytest.fail("the background hatun never answered")
        up.send_signal(signal.SIGTERM)
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(timeout=10)
    assert up.returncode == 130, out + err
    assert hatun_leftovers(lab) == []


def start_up(lab, *args: str):
    """`hatun up` of the lab's config in the background, in the runner namespace."""
    import subprocess
    import sys

    return subprocess.Popen(["ip", "netns", "exec", lab.runner, sys.executable, "-m", "hatun", "up", lab.config_path,
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def background_hatun_answers(lab) -> bool:
    """Bounded wait until the background hatun answers on the lab's control socket."""
    for _ in range(300):
        if hatun_cli(None, "status", "--socket", lab.control_socket, timeout=10).returncode == 0:
            return True
        time.sleep(0.1)
    return False


def wait_sigterm_handled(pid: int, timeout: float = 60) -> None:
    """Until process PID catches SIGTERM (its SigCgt mask): `hatun up` installed its handler."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.02)
    pytest.fail(f"pid {pid} never caught SIGTERM")


def test_up_and_down_never_stop_or_remove_what_is_not_theirs(lab_factory, hatun_factory):
    """`up` attached to a hatun it did not start: SIGTERM ends `up` only. `down` leaves a live socket
    that something else answers on."""
    import threading

    lab = lab_factory(2)
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: len(members(s)) == 2, 15, "both in route")
    trio.run(topology.lab_fail, lab.name, "gw2", "blackhole")
    hatun.wait(lambda s: members(s) == ["gw1"], 15, "gw2 out")
    up = start_up(lab, "--wait", "120", "--min-healthy", "2")
    try:
        wait_sigterm_handled(up.pid)
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(timeout=10)
    assert up.returncode == 130
    assert hatun.proc.poll() is None and hatun_cli(None, "status", "--socket", lab.control_socket).returncode == 0
    hatun.stop(signal.SIGTERM)

    # Something else listens on the control socket's path and answers nonsense.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(lab.control_socket)
    listener.listen(8)
    stop = threading.Event()

    def answer() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                conn.sendall(b"nonsense\n")
            except OSError:  # the client may have gone already
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        res = hatun_cli(lab.runner, "down", lab.config_path)
        assert res.returncode == 0, res.stderr
        assert os.path.exists(lab.control_socket) and "control socket" not in res.stdout
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        os.unlink(lab.control_socket)


def test_a_second_sigterm_does_not_cut_the_clean_up_short(lab_factory):

    lab = lab_factory(2)
    for gw in ("gw1", "gw2"):
        trio.run(topology.lab_fail, lab.name, gw, "blackhole")
    up = start_up(lab, "--wait", "120")
    try:
        background_hatun_answers(lab)
        up.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(timeout=10)
    assert up.returncode == 130 and "interrupted" in err
    assert hatun_leftovers(lab) == []


def test_runner_mode_diagnoses(lab_factory):
    lab = lab_factory(2)
    # gw1: the gateway does not know this key (no handshake); gw2: handshake, but the probe target
    # does not answer (a wrong probe address behind the gateway).
    stranger = PrivateKey.generate()
    key_path = os.path.join(lab.dir, "stranger.key")
    with open(key_path, "w") as f:
        f.write(stranger.base64 + "\n")
    os.chmod(key_path, 0o600)
    edit_config(lab, tunnels={"gw1": {"private_key_file": f'"{key_path}"'},
                              "gw2": {"probe": '"icmp://198.19.77.250"'}},
                health={"handshake_timeout": '"2s"'})
    res = hatun_cli(lab.runner, "up", lab.config_path, "--wait", "6", "--json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert "no handshake with the gateway" in doc["tunnels"]["gw1"]
    assert "handshake OK" in doc["tunnels"]["gw2"] and "probes to icmp://198.19.77.250 fail" in doc["tunnels"]["gw2"]
    assert stranger.base64 not in res.stdout + res.stderr
    assert hatun_leftovers(lab) == []  # a failed `up` cleans up after itself


def test_status_json_watch_and_drain_through_the_socket(lab_factory, hatun_factory):
    lab = lab_factory(2)
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: len(members(s)) == 2, 10, "both in route")
    res = hatun_cli(None, "status", "--json", "--socket", lab.control_socket)
    s = json.loads(res.stdout)
    t = s["tunnels"][0]
    for key in ("state", "since", "rtt_seconds", "loss", "weight", "rx_rate", "tx_rate", "handshake_age_seconds", "in_route"):
        assert key in t
    res = hatun_cli(None, "status", "--watch", "--count", "2", "--socket", lab.control_socket)
    assert res.returncode == 0 and res.stdout.count("tunnel  state") == 2
    res = hatun_cli(None, "drain", "gw1", "--socket", lab.control_socket)
    assert res.stdout.strip() == "gw1: draining"
    hatun.wait(lambda s: members(s) == ["gw2"], 5, "gw1 drained")
    res = hatun_cli(None, "drain", "nope", "--socket", lab.control_socket)
    assert res.returncode == 1 and "no tunnel named 'nope'" in res.stderr
    res = hatun_cli(None, "undrain", "gw1", "--socket", lab.control_socket)
    assert res.stdout.strip() == "gw1: up"
    res = hatun_cli(None, "status", "--socket", "/nonexistent/hatun.sock")
    assert res.returncode == 3 and "not running" in res.stderr
    # Secrets never show: not in status, not in the log.
    key = PrivateKey.from_base64(open(os.path.join(lab.dir, "runner1.key")).read())
    assert key.base64 not in res.stdout and key.base64 not in hatun.log() and key.hex not in hatun.log()


def test_json_logs_and_readiness_notification(lab_factory, hatun_factory, tmp_path):
    lab = lab_factory(2)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    notify.bind(path)
    notify.settimeout(20)
    hatun = hatun_factory(lab, args=("--log-format", "json"), env={"NOTIFY_SOCKET": path})
    message = notify.recv(4096).decode()
    assert message.startswith("READY=1") and "2/2 tunnels in service" in message
    trio.run(topology.lab_fail, lab.name, "gw2", "blackhole")
    hatun.wait(lambda s: members(s) == ["gw1"], 5, "gw2 down")
    hatun.stop()
    lines = [json.loads(line) for line in hatun.log().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "message"} <= set(d) for d in lines)
    down = [d for d in lines if d.get("tunnel") == "gw2" and d.get("state") == "down"]
    assert down and "probes failed" in down[0]["message"]


def test_dns_endpoint_is_resolved_and_followed(lab_factory, hatun_factory):
    """An endpoint by name is resolved at start, and again while handshakes fail (dynamic DNS)."""
    lab = lab_factory(1)
    hosts_dir = f"/etc/netns/{lab.runner}"
    os.makedirs(hosts_dir, exist_ok=True)
    try:
        with open(f"{hosts_dir}/hosts", "w") as f:
            f.write("198.18.1.2 gw1.lab.test\n")
        edit_config(lab, tunnels={"gw1": {"endpoint": '"gw1.lab.test:51820"'}})
        hatun = hatun_factory(lab)
        s = hatun.wait(lambda s: members(s) == ["gw1"], 10, "gw1 up via its DNS name")
        assert s["tunnels"][0]["endpoint"] == "198.18.1.2:51820"
        # The gateway moves to another address and DNS follows; hatun follows DNS.
        ns_output(lab.gw_ns(1), "ip", "addr", "add", "198.18.98.2/30", "dev", "ul")
        ns_output(lab.runner, "ip", "addr", "add", "198.18.98.1/30", "dev", "ul1")
        with open(f"{hosts_dir}/hosts", "w") as f:
            f.write("198.18.98.2 gw1.lab.test\n")
        ns_output(lab.gw_ns(1), "ip", "addr", "del", "198.18.1.2/30", "dev", "ul")
        hatun.wait(lambda s: s["tunnels"][0]["endpoint"] == "198.18.98.2:51820", 45, "endpoint re-resolved")
        hatun.wait(lambda s: members(s) == ["gw1"] and s["tunnels"][0]["state"] == "up", 20, "gw1 up again")
    finally:
        import shutil

        shutil.rmtree(hosts_dir, ignore_errors=True)


async def test_reload_loses_no_packet(lab_factory, hatun_factory):
    """Flows run through a reload that adds a tunnel and changes another's weight: not one packet
    is lost and no flow moves."""
    lab = await trio.to_thread.run_sync(lab_factory, 3)
    edit_config(lab, drop=["gw3"])
    hatun = await trio.to_thread.run_sync(hatun_factory, lab)
    await trio.to_thread.run_sync(lambda: hatun.wait(lambda s: members(s) == ["gw1", "gw2"], 10, "in route"))

    async def reload():
        await trio.sleep(1.0)
        edit_config(lab, tunnels={"gw2": {"weight": "3"}})
        res = await trio.to_thread.run_sync(lambda: hatun_cli(None, "reload", "--socket", lab.control_socket))
        assert res.returncode == 0, res.stderr

    run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=32, rate=500, duration=4.0, on_start=reload)
    assert_nothing_lost(run.flows, "reload")
    assert all(len(f.gateways()) == 1 for f in run.flows)
    await trio.to_thread.run_sync(lambda: hatun.wait(lambda s: members(s) == ["gw1", "gw2", "gw3"], 10, "gw3 joined"))


def test_reload_edge_cases_and_bad_requests(lab_factory, hatun_factory):
    """A tunnel removed and re-added before its drain ends keeps running; replacing one tunnel by
    another in one reload gives the newcomer a slot of its own; malformed control requests are
    refused and hatun keeps running."""
    lab = lab_factory(3)
    edit_config(lab, routing={"drain_timeout": '"20s"'}, drop=["gw3"])
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: members(s) == ["gw1", "gw2"], 10, "gw1, gw2")
    # Remove gw2 (it drains), then bring it back before the drain ends.
    edit_config(lab, routing={"drain_timeout": '"20s"'}, drop=["gw2", "gw3"])
    assert hatun_cli(None, "reload", "--socket", lab.control_socket).returncode == 0
    hatun.wait(lambda s: members(s) == ["gw1"], 5, "gw2 draining")
    edit_config(lab, routing={"drain_timeout": '"20s"'}, drop=["gw3"])
    assert hatun_cli(None, "reload", "--socket", lab.control_socket).returncode == 0
    hatun.wait(lambda s: members(s) == ["gw1", "gw2"], 5, "gw2 back")
    # Replace gw2 by gw3 in one reload: gw2 drains while gw3 joins, each with its own mark slot.
    edit_config(lab, routing={"drain_timeout": '"20s"'}, drop=["gw2"])
    assert hatun_cli(None, "reload", "--socket", lab.control_socket).returncode == 0
    s = hatun.wait(lambda s: members(s) == ["gw1", "gw3"], 10, "gw3 joined")
    assert {t["name"] for t in s["tunnels"]} == {"gw1", "gw2", "gw3"}  # gw2 still draining
    nexthops = ns_output(lab.runner, "ip", "nexthop").splitlines()
    ids = [line.split()[1] for line in nexthops]
    assert len(ids) == len(set(ids))
    time.sleep(1.0)
    assert "repaired drift" not in hatun.log()
    for req in ({"command": "drain", "tunnel": [1]}, {"command": "stop", "cleanup": "false"}, {"command": 7}):
        reply = hatun.control(req)
        assert reply["ok"] is False and reply["error"]
    assert hatun.proc.poll() is None and members(hatun.status()) == ["gw1", "gw3"]
