"""Probes: the scheduler with Trio's autojump clock (no real time), and real pinned probes in
network namespaces (a probe bound to one link leaves through it whatever the routes say)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest
import trio
import trio.testing

from hatun.probes import run_probes
from tests.nsutil import ip, ns_exec


class FakeTransport:
    """Answers each probe after `rtt` seconds while `alive`, never while dead."""

    def __init__(self, rtt: float = 0.002) -> None:
        self.rtt = rtt
        self.alive = True
        self.sent: list[tuple[int, float]] = []
        self._send, self.replies = trio.open_memory_channel(100)
        self._nursery = None

    async def open(self, nursery):
        self._nursery = nursery

    def send(self, seq):
        self.sent.append((seq, trio.current_time()))
        if self.alive:
            self._nursery.start_soon(self._answer, seq)
        return None

    async def _answer(self, seq):
        await trio.sleep(self.rtt)
        await self._send.send((seq, True, None))

    def close(self):
        pass


async def probe_for(transport, seconds, **kw):
    results = []

    def on_result(ok, rtt, reason):
        results.append((round(trio.current_time(), 4), ok, rtt, reason))

    rtt = kw.pop("rtt_hint", lambda: None)
    with trio.move_on_after(seconds):
        await run_probes(transport, on_result=on_result, rtt_hint=rtt, rng=random.Random(1), **kw)
    return results


async def test_interval_and_successes(autojump_clock):
    t = FakeTransport(rtt=0.003)
    results = await probe_for(t, 0.95, interval=0.1, timeout=0.25, jitter=0.0)
    assert len(t.sent) == 10
    assert all(ok for _, ok, _, _ in results) and len(results) == 10
    assert all(rtt == pytest.approx(0.003) for _, _, rtt, _ in results)


async def test_timeouts_fail_after_timeout(autojump_clock):
    t = FakeTransport()
    t.alive = False
    results = await probe_for(t, 1.0, interval=0.1, timeout=0.25, jitter=0.0)
    # Probes sent at 0.0, 0.1, ... fail 0.25 s later.
    assert [r[0] for r in results][:3] == [0.25, 0.35, 0.45]
    assert all(not ok and reason == "timeout" for _, ok, _, reason in results)


async def test_overdue_probe_triggers_one_extra_probe(autojump_clock):
    """A dead path gets its second failure ~80 ms sooner than with regular probes alone."""
    t = FakeTransport(rtt=0.002)

    async def kill_later():
        await trio.sleep(0.55)
        t.alive = False

    async with trio.open_nursery() as n:
        n.start_soon(kill_later)
        results = await probe_for(t, 1.2, interval=0.1, timeout=0.25, jitter=0.0, rtt_hint=lambda: 0.002)
    failures = [r[0] for r in results if not r[1]]
    # First probe after the failure: sent 0.6, overdue at 0.62 -> extra probe; both fail 0.25 s after sending.
    assert failures[:2] == [0.85, 0.87]
    sends = [s for _, s in t.sent]
    assert round(sends[sends.index(0.6) + 1], 3) == 0.62


async def test_jitter_spreads_sends(autojump_clock):
    t = FakeTransport()
    await probe_for(t, 2.0, interval=0.1, timeout=0.25, jitter=0.1)
    gaps = [b - a for (_, a), (_, b) in zip(t.sent, t.sent[1:])]
    assert all(0.09 - 1e-9 <= g <= 0.11 + 1e-9 for g in gaps)
    assert len({round(g, 4) for g in gaps}) > 3


PROBE_SCRIPT = textwrap.dedent(
    """
    import json, sys, trio, ipaddress
    from hatun.probes import run_probes, make_transport
    kind, ifname, host, port, seconds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    results = []
    async def main():
        t = make_transport(kind, ifname, ipaddress.ip_address(host), int(port) if port != "-" else None, 0.3)
        with trio.move_on_after(seconds):
            await run_probes(t, interval=0.05, timeout=0.3, jitter=0.0,
                             on_result=lambda ok, rtt, reason: results.append([ok, rtt, reason]))
    trio.run(main)
    print(json.dumps(results))
    """
)


def probe_in(netns, kind, ifname, host, port="-", seconds=0.6):
    res = ns_exec(netns, sys.executable, "-c", PROBE_SCRIPT, kind, ifname, host, str(port), str(seconds))
    return json.loads(res.stdout)


@pytest.fixture
def two_paths(namespaces):
    """Host A with two links to host B (p1: 198.18.201.0/30, p2: 198.18.202.0/30). B owns 198.18.250.1
    on lo, reachable over both; A's route to it goes via p2 only."""
    a, b = namespaces.new("a"), namespaces.new("b")
    namespaces.veth(a, "p1", b, "q1")
    namespaces.veth(a, "p2", b, "q2")
    ip("addr", "add", "198.18.201.1/30", "dev", "p1", netns=a)
    ip("addr", "add", "198.18.201.2/30", "dev", "q1", netns=b)
    ip("addr", "add", "198.18.202.1/30", "dev", "p2", netns=a)
    ip("addr", "add", "198.18.202.2/30", "dev", "q2", netns=b)
    ip("addr", "add", "198.18.250.1/32", "dev", "lo", netns=b)
    ip("-6", "addr", "add", "2001:2:0:201::1/64", "dev", "p1", "nodad", netns=a)
    ip("-6", "addr", "add", "2001:2:0:201::2/64", "dev", "q1", "nodad", netns=b)
    ip("route", "add", "198.18.250.1/32", "via", "198.18.202.2", netns=a)
    # Replies leave B by the route back to A's address of the link the probe used.
    for ns in (a, b):
        ns_exec(ns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2")
    return a, b


def test_icmp_probe_pinned_to_its_link(two_paths):
    a, b = two_paths
    ok = probe_in(a, "icmp", "p1", "198.18.250.1")
    assert ok and all(r[0] for r in ok)
    # Pinned: with p1 dead the probes through p1 fail, although the route (via p2) works.
    ip("link", "set", "q1", "down", netns=b)
    dead = probe_in(a, "icmp", "p1", "198.18.250.1")
    assert dead and not any(r[0] for r in dead)
    assert probe_in(a, "icmp", "p2", "198.18.250.1")[0][0]


def test_icmp_probe_ipv6(two_paths):
    a, _ = two_paths
    res = probe_in(a, "icmp", "p1", "2001:2:0:201::2")
    assert res and all(r[0] for r in res)


def test_tcp_probe(two_paths):
    a, b = two_paths
    server = subprocess.Popen(
        ["ip", "netns", "exec", b, sys.executable, "-c",
         "import socket,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
         "s.bind(('198.18.250.1',8443));s.listen(64)\nwhile True:\n c,_=s.accept();c.close()"],
    )
    try:
        for _ in range(50):  # bounded wait for the listener
            if "8443" in ns_exec(b, "ss", "-ltn").stdout:
                break
            trio.run(trio.sleep, 0.05)
        res = probe_in(a, "tcp", "p1", "198.18.250.1", 8443)
        assert res and all(r[0] for r in res)
        refused = probe_in(a, "tcp", "p1", "198.18.250.1", 8444)
        assert refused and all(r == [False, None, "connection refused"] for r in refused)
    finally:
        server.kill()
        server.wait(timeout=5)
