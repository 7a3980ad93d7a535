"""Traffic through the lab: many UDP flows and long-lived TCP connections from the runner to the
service host, recording which gateway carried each packet and what was lost.

Sockets are made inside the runner's namespace (hatun.netns), so this runs in any process: tests,
benchmarks, the demo. The UDP echo of the service host appends the address it saw (the gateway's:
they masquerade), which names the tunnel a flow used.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import trio

from hatun.lab.services import gateway_of
from hatun.netns import run_in_netns

HEADER = struct.Struct("!IId")  # flow, seq, send time (trio clock)


@dataclass
class Flow:
    index: int
    port: int = 0  # its source port
    sent: dict[int, float] = field(default_factory=dict)  # seq -> send time
    received: dict[int, tuple[float, str]] = field(default_factory=dict)  # seq -> (receive time, gateway)

    def gateways(self) -> list[str]:
        """Gateways this flow used, in order of use (a change means the flow moved)."""
        out: list[str] = []
        for seq in sorted(self.received):
            gw = self.received[seq][1]
            if not out or out[-1] != gw:
                out.append(gw)
        return out

    def lost(self, start: float | None = None, end: float | None = None) -> list[int]:
        """Sequence numbers sent (within [start, end)) that never came back."""
        return [s for s, t in self.sent.items() if s not in self.received
                and (start is None or t >= start) and (end is None or t < end)]

    def loss_window(self) -> float:
        """Time from the first lost packet to the first packet after it that came back (0: none lost)."""
        lost = self.lost()
        if not lost:
            return 0.0
        first = min(lost)
        after = [s for s in self.received if s > first]
        end = self.sent[min(after)] if after else max(self.sent.values())
        return end - self.sent[first]


def longest_gap(flows: list[Flow], start: float, end: float) -> tuple[float, float]:
    """The loss window of FLOWS taken together: the longest time between the send times of two
    consecutive answered packets (any of the flows) sent within [START, END], and the resolution of
    that figure (the median spacing of their packets: the window is known to about that much).
    Together, flows answer far more often than any one of them (64 flows at 1000 packets/s: each
    sends every 64 ms, a third of them every 3 ms)."""
    answered = sorted(t for f in flows for s, t in f.sent.items() if s in f.received and start <= t <= end)
    sent = sorted(t for f in flows for t in f.sent.values() if start <= t <= end)
    gaps = [b - a for a, b in zip(answered, answered[1:])]
    spacing = sorted(b - a for a, b in zip(sent, sent[1:]))
    return max(gaps, default=0.0), spacing[len(spacing) // 2] if spacing else 0.0


@dataclass
class UdpRun:
    flows: list[Flow]
    started: float
    ended: float

    def share(self, since: float | None = None) -> dict[str, float]:
        """Share of received packets per gateway (since a time, if given)."""
        counts: dict[str, int] = {}
        for f in self.flows:
            for t, gw in f.received.values():
                if since is None or t >= since:
                    counts[gw] = counts.get(gw, 0) + 1
        total = sum(counts.values()) or 1
        return {gw: n / total for gw, n in sorted(counts.items())}

    def flows_on(self, gateway: str, before: float) -> list[Flow]:
        """Flows whose last packet back before BEFORE came through GATEWAY."""
        out = []
        for f in self.flows:
            seen = [(t, gw) for t, gw in f.received.values() if t < before]
            if seen and max(seen)[1] == gateway:
                out.append(f)
        return out


def udp_socket(netns: str | None, target: str, port: int = 9000) -> socket.socket:
    family = socket.AF_INET6 if ":" in target else socket.AF_INET

    def make() -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        s.connect((target, port))
        return s

    return run_in_netns(netns, make)


async def udp_flows(netns: str | None, target: str, *, flows: int = 64, rate: float = 1000.0, duration: float = 5.0,
                    payload: int = 64, port: int = 9000, on_start=None, linger: float = 1.0) -> UdpRun:
    """Send FLOWS UDP flows (one socket each: distinct source ports) at RATE packets/s in total for
    DURATION seconds to the lab's UDP echo; collect the echoes for LINGER more seconds. Bounded in
    count and time."""
    raws = [udp_socket(netns, target, port) for _ in range(flows)]
    socks = [trio.socket.from_stdlib_socket(r) for r in raws]  # for receiving; raws send without awaiting
    result = [Flow(i, r.getsockname()[1]) for i, r in enumerate(raws)]
    pad = b"x" * max(0, payload - HEADER.size)

    async def receive(i: int) -> None:
        s = socks[i]
        while True:
            try:
                data = await s.recv(2048)
            except OSError:  # e.g. ECONNREFUSED from an ICMP error: a lost packet, keep going
                continue
            body, _, src = data.rpartition(b"|")
            if len(body) >= HEADER.size:
                flow, seq, _ = HEADER.unpack_from(body)
                if flow == i:
                    result[i].received[seq] = (trio.current_time(), gateway_of(src.decode(errors="replace")))

    started = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            for i in range(flows):
                nursery.start_soon(receive, i)
            if on_start is not None:
                nursery.start_soon(on_start)
            interval = 1.0 / rate
            total = int(duration * rate)
            next_at = trio.current_time()
            for n in range(total):
                i, seq = n % flows, n // flows
                now = trio.current_time()
                try:
                    raws[i].send(HEADER.pack(i, seq, now) + pad)
                except (BlockingIOError, OSError):
                    pass  # no route / buffer full: counted as lost
                result[i].sent[seq] = now
                next_at += interval
                if next_at > trio.current_time():
                    await trio.sleep_until(next_at)
            await trio.sleep(linger)
            nursery.cancel_scope.cancel()
    finally:
        for s in socks:
            s.close()
    return UdpRun(result, started, trio.current_time())


@dataclass
class TcpConn:
    index: int
    gateway: str | None = None
    exchanges: int = 0
    broken: str | None = None


async def tcp_connections(netns: str | None, target: str, *, count: int = 8, duration: float = 5.0,
                          interval: float = 0.2, port: int = 7,
                          established: trio.Event | None = None) -> list[TcpConn]:
    """Keep COUNT TCP connections to the lab's echo service for DURATION seconds, exchanging a
    message every INTERVAL; report each connection's fate (broken: why). ESTABLISHED is set once
    every connection knows its gateway (or has failed)."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    conns = [TcpConn(i) for i in range(count)]
    pending = [count]

    def settled() -> None:
        pending[0] -= 1
        if pending[0] == 0 and established is not None:
            established.set()

    async def one(c: TcpConn) -> None:
        raw = run_in_netns(netns, lambda: socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC))
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            with trio.fail_after(5):
                await sock.connect((target, port))
            stream = trio.SocketStream(sock)
            greeting = b""
            with trio.fail_after(3):
                while not greeting.endswith(b"\n"):
                    chunk = await stream.receive_some(256)
                    if not chunk:
                        raise ConnectionResetError("closed by peer")
                    greeting += chunk
            c.gateway = greeting.decode(errors="replace").split()[-1]
            settled()
            deadline = trio.current_time() + duration
            while trio.current_time() < deadline:
                msg = f"hatun {c.index} {c.exchanges}\n".encode()
                with trio.fail_after(3):
                    await stream.send_all(msg)
                    got = b""
                    while len(got) < len(msg):
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            raise ConnectionResetError("closed by peer")
                        got += chunk
                c.exchanges += 1
                await trio.sleep(interval)
            await stream.aclose()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
            c.broken = type(e).__name__ + (f": {e}" if str(e) else "")
            if c.gateway is None:
                settled()
        finally:
            sock.close()

    async with trio.open_nursery() as nursery:
        for c in conns:
            nursery.start_soon(one, c)
    return conns
