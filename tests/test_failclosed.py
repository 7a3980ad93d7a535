"""Issue 12, item 11: fail closed. With `when_all_down = "unreachable"` no packet for a steered prefix
leaves through the underlay in clear text: not while every tunnel is down, not in the gap of a
restart (SIGTERM, then a new hatun), not after a crash whose tunnel devices vanished (the kernel then
deletes the nexthops, the group and the routes over it). A packet capture on every underlay link of
the runner counts the clear-text packets, while a sender keeps sending to the LAN's service host.

The runner gets a main-table route for the LAN via gateway 1's underlay address: a host whose
default route would leak. The lab's gateway forwards into the LAN, so without the fail-closed gate a
packet would really go there, in clear, as the last phase (after `hatun down`) shows.
"""

from __future__ import annotations

import ipaddress
import select
import signal
import socket
import threading
import time

import pytest
import trio

from hatun.lab import topology
from hatun.netns import run_in_netns
from tests.labutil import edit_config, hatun_cli, ns_output, routes_json, wait_until

pytestmark = pytest.mark.netns

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
STUB_METRIC = 0xFFFFFF00


class UnderlayCapture:
    """Counts, per phase, the IPv4 packets leaving through the runner's underlay links (AF_PACKET,
    ETH_P_ALL) whose destination is inside PREFIX (clear text), and all outgoing ones. A thread,
    bounded by `close()`."""

    def __init__(self, netns: str, ifnames: list[str], prefix: str) -> None:
        self.prefix = ipaddress.ip_network(prefix)
        self.phase = "start"
        self.clear: dict[str, int] = {}
        self.outgoing: dict[str, int] = {}
        self.examples: list[str] = []

        def make(ifname: str) -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((ifname, ETH_P_ALL))
            s.setblocking(False)
            return s

        self.socks = [run_in_netns(netns, lambda i=i: make(i)) for i in ifnames]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select(self.socks, [], [], 0.05)
            for s in ready:
                for _ in range(256):  # bounded per wakeup
                    try:
                        frame, addr = s.recvfrom(2048)
                    except BlockingIOError:
                        break
                    if addr[2] == PACKET_OUTGOING:
                        self._count(frame, addr[0])

    def _count(self, frame: bytes, ifname: str) -> None:
        phase = self.phase
        self.outgoing[phase] = self.outgoing.get(phase, 0) + 1
        if len(frame) >= 34 and int.from_bytes(frame[12:14], "big") == ETH_P_IP:
            dst = ipaddress.IPv4Address(frame[30:34])
            if dst in self.prefix:
                self.clear[phase] = self.clear.get(phase, 0) + 1
                if len(self.examples) < 5:
                    self.examples.append(f"{phase}: {ifname} -> {dst} proto {frame[23]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for s in self.socks:
            s.close()


class Sender:
    """Sends a UDP datagram to TARGET every few ms from NETNS (unconnected: every send is routed
    afresh), counting sends accepted and refused by the kernel, per phase of CAPTURE. Bounded."""

    def __init__(self, netns: str, target: tuple[str, int], capture: UnderlayCapture, limit: float = 300.0) -> None:
        self.target, self.capture, self.limit = target, capture, limit
        self.sock = run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.sent: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            phase = self.capture.phase
            try:
                self.sock.sendto(b"hatun fail-closed probe", self.target)
                self.sent[phase] = self.sent.get(phase, 0) + 1
            except OSError:
                self.refused[phase] = self.refused.get(phase, 0) + 1
            time.sleep(0.003)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def steering_table(lab) -> list[dict]:
    return routes_json(lab.runner, "route", "show", "table", "51820")


def only_the_stub(lab) -> bool:
    table = steering_table(lab)
    return [(r.get("type"), r["dst"], r.get("metric")) for r in table] == [("unreachable", str(topology.LAN), STUB_METRIC)]


def test_no_clear_text_while_down_across_restart_and_after_a_crash(lab_factory, hatun_factory):
    lab = lab_factory(2)
    edit_config(lab, routing={"when_all_down": '"unreachable"'})
    gw1_underlay = topology.underlay(1)[1].split("/")[0]
    # A route that would leak the LAN's traffic in clear text through gateway 1's underlay.
    ns_output(lab.runner, "ip", "route", "add", str(topology.LAN), "via", gw1_underlay, "dev", "ul1")
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: len(s["route"]["members"]) == 2, 10, "both in route")
    capture = UnderlayCapture(lab.runner, [f"ul{i}" for i in range(1, lab.gateways + 1)], str(topology.LAN))
    sender = Sender(lab.runner, (topology.SERVICE, 9000), capture)
    try:
        # 0. Tunnels up: the traffic leaves encrypted (and the capture sees outgoing packets).
        capture.phase = "up"
        wait_until(lambda: sender.sent.get("up", 0) >= 100, "traffic through the tunnels", 10)
        assert capture.outgoing.get("up", 0) > 0

        # (a) hatun runs, every tunnel failed: the prefixes are unreachable, not leaked.
        capture.phase = "all-down"
        for i in range(1, lab.gateways + 1):
            trio.run(topology.lab_fail, lab.name, f"gw{i}", "blackhole")
        hatun.wait(lambda s: s["route"]["all_down"] and s["route"]["unreachable"], 5, "all down")
        wait_until(lambda: sender.refused.get("all-down", 0) >= 100, "sends refused while all down", 10)
        for i in range(1, lab.gateways + 1):
            trio.run(topology.lab_heal, lab.name, f"gw{i}")
        capture.phase = "healing"
        hatun.wait(lambda s: len(s["route"]["members"]) == 2, 15, "both back in route")

        # (b) a restart: SIGTERM, a gap without hatun, a new hatun that adopts the gate.
        capture.phase = "restart"
        assert hatun.stop(signal.SIGTERM) == 0
        assert "stay unreachable (fail closed)" in hatun.log()
        # What a stop leaves: the stub and the steering rule, nothing else of hatun's.
        assert only_the_stub(lab), steering_table(lab)
        rules = [line for line in ns_output(lab.runner, "ip", "rule").splitlines() if "proto 147" in line]
        assert len(rules) == 1 and rules[0].startswith("5202:") and "lookup 51820" in rules[0], rules
        assert ns_output(lab.runner, "ip", "nexthop") == ""
        assert "hatun" not in ns_output(lab.runner, "nft", "list", "tables")
        assert f"hl{lab.name}r" not in ns_output(lab.runner, "ip", "-o", "link")
        gap_refused = sender.refused.get("restart", 0)
        wait_until(lambda: sender.refused.get("restart", 0) >= gap_refused + 100, "sends refused in the gap", 10)
        hatun = hatun_factory(lab)
        hatun.wait(lambda s: len(s["route"]["members"]) == 2, 15, "both in route after the restart")
        assert any(r.get("metric") == STUB_METRIC for r in steering_table(lab))
        capture.phase = "restarted"
        wait_until(lambda: sender.sent.get("restarted", 0) >= 100, "traffic through the tunnels again", 10)
        time.sleep(0.5)
        assert "repaired drift" not in hatun.log()

        # (c) a crash, then the tunnel devices vanish: the kernel flushes nexthops, group and routes.
        capture.phase = "crash"
        hatun.kill9()
        for i in range(1, lab.gateways + 1):
            ns_output(lab.runner, "ip", "link", "del", lab.runner_ifname(i))
        wait_until(lambda: only_the_stub(lab), "the kernel to flush the routes over the devices", 5)
        assert ns_output(lab.runner, "ip", "nexthop") == ""
        crash_refused = sender.refused.get("crash", 0)
        wait_until(lambda: sender.refused.get("crash", 0) >= crash_refused + 100, "sends refused after the crash", 10)

        assert capture.clear == {}, f"clear-text packets to {topology.LAN}: {capture.clear} {capture.examples}"

        # Sanity: `hatun down` opens the gate; the leaking route then carries the packets in clear,
        # and the capture sees them.
        capture.phase = "opened"
        res = hatun_cli(lab.runner, "down", lab.config_path)
        assert res.returncode == 0, res.stderr
        assert steering_table(lab) == []
        assert not [line for line in ns_output(lab.runner, "ip", "rule").splitlines() if "proto 147" in line]
        wait_until(lambda: capture.clear.get("opened", 0) >= 10, "clear-text packets once the gate is open", 10)
        assert set(capture.clear) == {"opened"}
    finally:
        sender.close()
        capture.close()


def hatun_rules(lab, family: str = "-4") -> list[str]:
    return [line for line in ns_output(lab.runner, "ip", family, "rule").splitlines() if "proto 147" in line]


def stubs(lab, family: str) -> list[str]:
    return [r["dst"] for r in routes_json(lab.runner, family, "route", "show", "table", "51820")
            if r.get("type") == "unreachable" and r.get("metric") == STUB_METRIC]


def test_stop_keeps_the_gate_in_both_families_and_a_restart_adopts_it(lab_factory, hatun_factory):
    """Dual stack: the stubs of both families read back as hatun wrote them (no drift loop), stay
    after a SIGTERM with their rules, are adopted by the next hatun unchanged, and `hatun down`
    removes them."""
    lab = lab_factory(1, ipv6=True)
    edit_config(lab, routing={"when_all_down": '"unreachable"'})
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: len(s["route"]["members"]) == 1, 10, "in route")
    wait_until(lambda: (stubs(lab, "-4"), stubs(lab, "-6")) == ([str(topology.LAN)], [str(topology.LAN6)]),
               "the fail-closed stubs of both families", 5)
    assert hatun.stop(signal.SIGTERM) == 0
    assert (stubs(lab, "-4"), stubs(lab, "-6")) == ([str(topology.LAN)], [str(topology.LAN6)])
    assert len(routes_json(lab.runner, "-6", "route", "show", "table", "51820")) == 1
    for family in ("-4", "-6"):
        assert [line.split(":")[0] for line in hatun_rules(lab, family)] == ["5202"]
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: len(s["route"]["members"]) == 1, 10, "in route after the restart")
    time.sleep(0.5)
    log = hatun.log()
    assert "repaired drift" not in log and "route 2001:2:0:77::/64 table 51820 -> unreachable" not in log
    assert (stubs(lab, "-4"), stubs(lab, "-6")) == ([str(topology.LAN)], [str(topology.LAN6)])
    res = hatun_cli(lab.runner, "down", lab.config_path)
    assert res.returncode == 0, res.stderr
    assert routes_json(lab.runner, "route", "show", "table", "51820") == []
    assert routes_json(lab.runner, "-6", "route", "show", "table", "51820") == []
    assert hatun_rules(lab, "-4") == [] and hatun_rules(lab, "-6") == []


def test_keep_mode_stop_removes_everything(lab_factory, hatun_factory):
    """With "keep" (the default) a stop removes every object, the steering table included."""
    lab = lab_factory(1)
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: len(s["route"]["members"]) == 1, 10, "in route")
    assert not any(r.get("metric") == STUB_METRIC for r in steering_table(lab))
    assert hatun.stop(signal.SIGTERM) == 0
    assert steering_table(lab) == []
    assert hatun_rules(lab) == []
    assert "fail closed" not in hatun.log()
