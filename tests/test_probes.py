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

from hatun.probes import LATE_WINDOW, ProbeStream, Scheduler
from tests.nsutil import ip, ns_exec


class FakePeer:
    """Answers each probe after `rtt` seconds while `alive`, never while dead."""

    def __init__(self, scheduler, nursery, rtt: float = 0.002) -> None:
        self.scheduler, self.nursery, self.rtt = scheduler, nursery, rtt
        self.alive = True
        self.sent: list[tuple[int, float]] = []
        self.stream: ProbeStream | None = None

    def send(self, seq):
        self.sent.append((seq, trio.current_time()))
        if self.alive:
            self.nursery.start_soon(self._answer, seq)
        return None

    async def _answer(self, seq):
        await trio.sleep(self.rtt)
        self.scheduler.reply(self.stream, seq)


async def probe_for(seconds, *, rtt=0.002, chaos=None, alive=True, **kw):
    """Run one stream against a FakePeer for SECONDS; return (results, peer)."""
    results = []
    sched = Scheduler(random.Random(1))
    async with trio.open_nursery() as n:
        await n.start(sched.run)
        peer = FakePeer(sched, n, rtt)
        peer.alive = alive
        stream = ProbeStream("t", on_result=lambda ok, r, reason: results.append(
            (round(trio.current_time(), 4), ok, r, reason)), **kw)
        peer.stream = stream
        stream.sender = peer.send
        sched.start(stream)
        if chaos:
            n.start_soon(chaos, peer)
        await trio.sleep(seconds)
        n.cancel_scope.cancel()
    return results, peer


async def test_interval_and_successes(autojump_clock):
    results, peer = await probe_for(0.95, rtt=0.003, interval=0.1, timeout=0.25, jitter=0.0)
    assert len(peer.sent) == 10
    assert all(ok for _, ok, _, _ in results) and len(results) == 10
    assert all(rtt == pytest.approx(0.003) for _, _, rtt, _ in results)


async def test_unanswered_probes_are_missed_after_the_timeout_then_lost(autojump_clock):
    lost = []
    results, _ = await probe_for(2.6, alive=False, interval=0.1, timeout=0.25, jitter=0.0,
                                 on_lost=lambda sent: lost.append(round(trio.current_time(), 4)))
    # Probes sent at 0.0, 0.1, ... are missed 0.25 s later (fall 1: no re-probes) ...
    assert [r[0] for r in results][:3] == [0.25, 0.35, 0.45]
    assert all(not ok and reason == "no reply within 250 ms" for _, ok, _, reason in results)
    # ... and lost once no late reply came within LATE_WINDOW of their sending.
    assert lost[:3] == [LATE_WINDOW, LATE_WINDOW + 0.1, LATE_WINDOW + 0.2]


async def test_a_missed_probe_is_followed_at_once_by_another_until_fall(autojump_clock):
    """A dead path is judged within `fall` timeouts of its first missed probe, not `fall` intervals."""
    async def kill_later(peer):
        await trio.sleep(0.55)
        peer.alive = False

    results, peer = await probe_for(1.0, chaos=kill_later, rto=lambda: 0.01, fall=3,
                                    interval=0.1, timeout=0.25, jitter=0.0)
    failures = [r[0] for r in results if not r[1]]
    sends = [round(t, 3) for _, t in peer.sent]
    # Sent 0.6, missed 0.61: again at once, missed 0.62, again, missed 0.63 (the third: no more).
    assert failures[:3] == [0.61, 0.62, 0.63]
    assert sends[sends.index(0.6):sends.index(0.6) + 4] == [0.6, 0.61, 0.62, 0.7]
    # Then regular probes only, while it stays dead.
    assert failures[3:5] == [0.71, 0.81]
    assert all(reason == "no reply within 10 ms" for _, ok, _, reason in results if not ok)


async def test_a_slow_path_gets_no_chain_of_reprobes(autojump_clock):
    """Replies slower than the timeout: each probe is missed, then answered late. Only `fall` misses in
    a row get an immediate re-probe; late replies do not start a new run (else each regular probe
    would start a chain of re-probes on a slow path, the load where a path is congested)."""
    late = []

    async def speed_up(peer):
        await trio.sleep(0.45)
        peer.rtt = 0.002  # a timely reply ends the run: the next miss gets its re-probe again
        await trio.sleep(0.2)
        peer.alive = False

    results, peer = await probe_for(0.8, rtt=0.015, rto=lambda: 0.01, fall=2, interval=0.1, timeout=0.25,
                                    jitter=0.0, on_late=late.append, chaos=speed_up)
    assert late and all(r == pytest.approx(0.015) for r in late)
    sends = [round(t, 3) for _, t in peer.sent]
    assert sends[:6] == [0.0, 0.01, 0.1, 0.2, 0.3, 0.4]  # one re-probe, then regular probes only
    assert 0.71 in sends  # the first miss after timely replies: a re-probe at once


async def test_no_probe_storm_on_a_path_slower_than_the_ceiling(autojump_clock):
    results, peer = await probe_for(10.0, rtt=0.3, rto=lambda: 0.2, fall=10, interval=0.03, timeout=0.2,
                                    jitter=0.0)
    assert len(peer.sent) <= 10.0 / 0.03 + 10 + 2


async def test_jitter_spreads_sends(autojump_clock):
    _, peer = await probe_for(2.0, interval=0.1, timeout=0.25, jitter=0.1)
    gaps = [b - a for (_, a), (_, b) in zip(peer.sent, peer.sent[1:])]
    assert all(0.09 - 0.003 <= g <= 0.11 + 0.003 for g in gaps)
    assert len({round(g, 4) for g in gaps}) > 3


async def test_many_streams_share_one_scheduler(autojump_clock):
    sched = Scheduler(random.Random(2))
    counts = {}
    async with trio.open_nursery() as n:
        await n.start(sched.run)
        streams = []
        for i in range(50):
            peer = FakePeer(sched, n)
            s = ProbeStream(f"t{i}", interval=0.1, timeout=0.25, jitter=0.1,
                            on_result=lambda ok, r, reason, i=i: counts.__setitem__(i, counts.get(i, 0) + ok))
            peer.stream, s.sender = s, peer.send
            sched.start(s, trio.current_time() + random.Random(i).uniform(0, 0.1))
            streams.append(s)
        await trio.sleep(1.0)
        sched.stop(streams[0])
        await trio.sleep(1.0)
        n.cancel_scope.cancel()
    assert 9 <= counts[0] <= 11  # stopped after 1 s
    assert all(18 <= counts[i] <= 22 for i in range(1, 50))


@pytest.mark.parametrize("ident, seq", [(1, 2), (0xFFFF, 0xFFFF), (0x4242, 9), (0, 0)])
def test_echo_checksum(ident, seq):
    """The incremental checksum equals RFC 1071's sum over the whole message (which sums to zero)."""
    import struct

    from hatun.probes import ECHO_REQUEST_V4, PAYLOAD, PAYLOAD_SUM, _echo_checksum

    cks = _echo_checksum(ident, seq, PAYLOAD_SUM, ECHO_REQUEST_V4)
    msg = struct.pack("!BBHHH", ECHO_REQUEST_V4, 0, cks, ident, seq) + PAYLOAD
    total = sum(struct.unpack(f"!{len(msg) // 2}H", msg))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF


PROBE_SCRIPT = textwrap.dedent(
    """
    import ipaddress, json, socket, sys, trio
    from hatun.probes import ProbeStream, open_probe_engine
    kind, ifname, host, port, seconds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    results = []
    async def main():
        async with open_probe_engine() as engine:
            s = ProbeStream("t", interval=0.05, timeout=0.3, jitter=0.0,
                            on_result=lambda ok, rtt, reason: results.append([ok, rtt, reason]))
            if kind == "icmp":
                engine.add_icmp(s, ipaddress.ip_address(host), socket.if_nametoindex(ifname))
            else:
                engine.add_tcp(s, ipaddress.ip_address(host), int(port), ifname)
            await trio.sleep(seconds)
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


async def test_misses_and_replies_keep_working_across_the_sequence_wrap(autojump_clock):
    """Sequence numbers wrap at 16 bits; outstanding probes are judged in the order they were sent."""
    async def kill_later(peer):
        peer.stream.seq, peer.stream.sent = 0xFFF0, 40000  # far past half the sequence space
        await trio.sleep(0.55)
        peer.alive = False

    results, peer = await probe_for(1.0, chaos=kill_later, rto=lambda: 0.01, fall=3,
                                    interval=0.1, timeout=0.25, jitter=0.0)
    assert [r[1] for r in results][:6] == [True] * 6
    assert [r[0] for r in results if not r[1]][:3] == [0.61, 0.62, 0.63]


async def test_rtt_is_immune_to_wall_clock_steps(autojump_clock):
    """The kernel's receive stamp and the send time are wall-clock times: a step between them must
    not turn into an RTT of minutes or a negative one (issue 12, item 9)."""
    offset = [1_800_000_000.0]
    sched = Scheduler(random.Random(1), wall=lambda: offset[0] + trio.current_time())
    results = []

    async def answer(stream, seq, step):
        await trio.sleep(0.003)
        offset[0] += step  # the wall clock steps while the probe is on its way
        sched.reply(stream, seq, received_wall=offset[0] + trio.current_time())

    steps = iter([0.0, 600.0, -3600.0, 0.0])
    async with trio.open_nursery() as n:
        await n.start(sched.run)
        stream = ProbeStream("t", interval=0.1, timeout=0.25, jitter=0.0,
                             on_result=lambda ok, rtt, reason: results.append((ok, rtt)))
        stream.sender = lambda seq: n.start_soon(answer, stream, seq, next(steps, 0.0))
        sched.start(stream)
        await trio.sleep(0.35)
        n.cancel_scope.cancel()
    assert len(results) == 4
    assert all(ok and rtt == pytest.approx(0.003, abs=1e-6) for ok, rtt in results), results


async def test_late_replies_are_reported_but_do_not_count_as_success(autojump_clock):
    """A reply after the timeout is a miss for the liveness and a late reply (an answer, not a loss)
    for the RTT estimate, the loss ratio and the congestion guard."""
    late, lost = [], []
    results, peer = await probe_for(1.0, rtt=0.4, interval=0.1, timeout=0.25, jitter=0.0,
                                    on_late=late.append, on_lost=lambda sent: lost.append(1))
    assert results and all(not ok and reason == "no reply within 250 ms" for _, ok, _, reason in results)
    assert len(late) >= 5 and all(r == pytest.approx(0.4) for r in late)
    assert not lost
