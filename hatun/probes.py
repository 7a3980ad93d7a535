"""Probes pinned to one tunnel: ICMP echo or TCP connect, sent through that tunnel's device only.

One `ProbeEngine` serves every tunnel, because per-tunnel sockets and timers cost a wakeup each:
- ICMP: one raw socket per address family for all tunnels. Each probe names its tunnel's device in
  IP_PKTINFO / IPV6_PKTINFO, which pins it to that device exactly like SO_BINDTODEVICE (it leaves
  through that tunnel whatever the routes say: also while the tunnel is out of the route, never via
  another tunnel or the underlay). A reply counts only when it came in through that same device
  (its ifindex, from the reply's PKTINFO) with that tunnel's echo identifier. A BPF socket filter
  keeps every other ICMP message of the namespace (other pings' replies, floods) in the kernel.
- TCP: a connect per probe, from a socket bound to the device; it succeeds on the SYN-ACK.
- Timers: one task sends every tunnel's probes in batches (one per shortest interval), reads the
  replies, and times out and rechecks outstanding probes; while all is well it wakes twice per
  interval (to send, and to see the replies), whatever the number of tunnels.

Per tunnel: one probe every `interval` (with jitter). A probe is missed when no reply came within
the tunnel's adaptive timeout (`rto()`: from its RTT statistics, see `health.TunnelHealth.rto`); a
missed probe is followed at once by another (while fewer than `fall` were missed in a row), so a dead
path is found within `fall` timeouts of its first unanswered probe, not `fall` intervals. A missed
probe may still be answered (a late reply, for LATE_WINDOW); else it is lost.
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import itertools
import logging
import math
import os
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from hatun import bpf

log = logging.getLogger("hatun.probes")

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IP_PKTINFO = 8
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
SOL_RAW = 255
ICMP_FILTER = 1  # linux/icmp.h: a bitmask of ICMP types to DROP on a raw socket
ICMP6_FILTER = 1
ECHO_REPLY_V4, ECHO_REQUEST_V4 = 0, 8
ECHO_REQUEST_V6, ECHO_REPLY_V6 = 128, 129
# A missed probe is remembered this long: a reply that still comes proves that the path works both
# ways (a slow or congested tunnel, not a dead one): a late reply, never a timely success. Without
# one by then, the probe is lost (what the loss ratio counts).
LATE_WINDOW = 2.0
LATE_KEEP = 256  # missed probes remembered per tunnel, at most (older ones count as lost)
# One task does everything, and wakes as rarely as it can: a wakeup costs 50-300 us of CPU (epoll,
# timers and Trio's deadline machinery), far more than the work of a probe. So every probe due within
# the shortest interval goes out in one batch (each tunnel still probes once per interval: the
# batches settle on that rhythm), and the task wakes again only when a probe is overdue (for a
# recheck) or times out: while all is well, twice per interval.
MIN_GAP = 0.005  # never wakes sooner than this after the previous wakeup
MAX_SLEEP = 1.0  # it looks again at least this often
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
ICMP_RCVBUF = 4 << 20
PAYLOAD_MARK = b"hatun-probe\0"
# The marker plus 8 random bytes of this process: the kernel filter lets through only replies that
# carry them, so a forged flood of "hatun" replies (the marker is public) cannot fill the socket's
# buffer and starve the real ones. An even length: its checksum words are summed once.
PAYLOAD = PAYLOAD_MARK + os.urandom(8)
PAYLOAD_SUM = sum(struct.unpack(f"!{len(PAYLOAD) // 2}H", PAYLOAD))
_ECHO = struct.Struct("!BBHHH")
RECEIVE_BATCH = 1024  # replies read per wakeup at most: a flood waits for the next wakeup, never blocks the rest

OnResult = Callable[[bool, "float | None", "str | None"], None]
OnLate = Callable[[float], None]
OnLost = Callable[[float], None]  # the lost probe's send time


def round_trip(sent_mono: float, sent_wall: float, received_wall: float | None, now_mono: float) -> float:
    """The RTT of a reply: from the kernel's receive stamp (exact however late we read it) when it is
    plausible, else from the monotonic clock (an upper bound: it includes our reading delay).

    The receive stamp is wall-clock time, as is SENT_WALL: a clock step between send and receive
    would make that difference wrong (negative, or minutes). The true RTT lies between 0 and the
    monotonic difference, so a wall difference outside that range means the clock moved.
    """
    upper = max(0.0, now_mono - sent_mono)
    if received_wall is not None:
        rtt = received_wall - sent_wall
        if 0.0 <= rtt <= upper + 0.001:
            return rtt
    return upper


def _echo_checksum(ident: int, seq: int, payload_sum: int, echo_type: int) -> int:
    """The ICMP checksum of an echo message: type/code, identifier, sequence and the payload's
    16-bit words (summed once, PAYLOAD_SUM) added up, carries folded, complemented."""
    s = (echo_type << 8) + ident + seq + payload_sum
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _missed(timeout: float) -> str:
    return f"no reply within {timeout * 1000:.0f} ms"


def _error_reason(e: OSError) -> str:
    if e.errno in (errno.ENODEV, errno.ENXIO):
        return "tunnel device missing"
    if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "no route through the tunnel"
    if e.errno == errno.ENOKEY:
        return "no WireGuard session (handshake missing)"
    return os.strerror(e.errno or 0) or str(e)


class ProbeStream:
    """One tunnel's probes: settings, outstanding probes, and where results go."""

    def __init__(self, key: str, *, interval: float, timeout: float, jitter: float, on_result: OnResult,
                 rto: Callable[[], float] | None = None, fall: int = 1, on_late: OnLate | None = None,
                 on_lost: OnLost | None = None) -> None:
        self.key = key
        self.interval, self.timeout, self.jitter = interval, timeout, jitter
        self.on_result = on_result  # a probe answered in time (its RTT), or missed or failed (why)
        self.on_late = on_late  # a reply to a missed probe (its RTT)
        self.on_lost = on_lost or (lambda sent: None)  # a missed or failed probe (sent then) will never be answered
        self.rto = rto or (lambda: timeout)  # the current probe timeout (at most `timeout`)
        self.fall = fall  # after this many misses in a row, no more immediate re-probes
        self.misses = 0  # probes missed in a row (a timely reply ends the run)
        self.sender: Callable[[int], str | None] = lambda seq: "not started"
        # seq -> (send time on Trio's clock, wall clock, probe number)
        self.pending: dict[int, tuple[float, float, int]] = {}
        self.late: dict[int, tuple[float, float]] = {}  # timed-out probes: seq -> (Trio time, wall) sent
        self.seq = 0  # on the wire: 1..0xFFFF, wrapping
        self.sent = 0  # probes sent so far (never wraps): orders probes across the wrap
        self.generation = 0  # bumped when settings change: older SEND events are void
        self.removed = False
        self.ident: tuple[int, int] | None = None  # (IP version, ICMP echo identifier)
        self.ifindex: int | None = None  # the tunnel device's index (None: missing, probes fail)


class Scheduler:
    """The timers of many probe streams, in one task that wakes as rarely as it can.

    Only the next send of each stream is a heap entry; misses and losses are found by looking at the
    oldest outstanding probe of each stream that has one, on every wakeup (cheaper than an entry per
    probe). Replies are read by `poll()` (set by the engine) on every wakeup: they wait in
    the socket buffer until then, and their RTT comes from the kernel's receive timestamp, so the
    wait costs no accuracy; before a probe is declared lost the socket is read."""

    def __init__(self, rng: random.Random | None = None, wall: Callable[[], float] = time.time) -> None:
        self.rng = rng or random.Random()
        self.wall = wall  # the wall clock that kernel receive stamps are compared with (tests step it)
        self._heap: list[tuple[float, int, ProbeStream, int]] = []  # next sends
        self._counter = itertools.count()
        self._outstanding: set[ProbeStream] = set()  # streams with probes awaiting a reply (or a late one)
        self._streams: set[ProbeStream] = set()  # streams being probed
        self._wake = trio.Event()
        self._wake_at = math.inf  # when the timer task plans to look next
        self.batch = MAX_SLEEP  # sends due within this long go out together (early); the shortest interval
        self.jitter = 0.0  # the batches' period varies by this share (the largest jitter of a stream)
        self._next_batch = -math.inf
        # Reads the replies waiting in the sockets; called on every wakeup, before timeouts are judged.
        self.poll: Callable[[], None] = lambda: None

    def _push(self, when: float, stream: ProbeStream, generation: int) -> None:
        heapq.heappush(self._heap, (when, next(self._counter), stream, generation))
        if when < self._wake_at:
            self._wake.set()  # e.g. a new stream: look now rather than at the planned time

    def start(self, stream: ProbeStream, first: float | None = None) -> None:
        """Begin probing STREAM (again, with its current settings); the first probe at FIRST (default: now)."""
        stream.removed = False
        stream.generation += 1
        self._streams.add(stream)
        self._rhythm()
        self._push(trio.current_time() if first is None else first, stream, stream.generation)

    def stop(self, stream: ProbeStream) -> None:
        stream.removed = True
        stream.pending.clear()
        stream.late.clear()
        self._outstanding.discard(stream)
        self._streams.discard(stream)
        self._rhythm()

    def _rhythm(self) -> None:
        # Batches follow the shortest interval of the streams there are now (and the largest jitter).
        self.batch = max(MIN_GAP, min((st.interval for st in self._streams), default=MAX_SLEEP))
        self.jitter = max((st.jitter for st in self._streams), default=0.0)

    def reply(self, stream: ProbeStream, seq: int, ok: bool = True, reason: str | None = None,
              received_wall: float | None = None) -> None:
        """A probe of STREAM completed (a reply, or a definite failure such as a refused connection).
        RECEIVED_WALL: the kernel's receive time (wall clock), for an RTT unaffected by our delays."""
        pending = stream.pending
        sent = pending.pop(seq, None)
        if not pending and not stream.late:
            self._outstanding.discard(stream)
        if stream.removed:
            return
        now = trio.current_time()
        if sent is None:
            late = stream.late.pop(seq, None)
            if late is not None:
                if ok:
                    if stream.on_late is not None:
                        stream.on_late(round_trip(late[0], late[1], received_wall, now))
                else:
                    stream.on_lost(late[0])
            return
        if not ok:
            stream.on_result(False, None, reason)
            stream.on_lost(sent[0])
            return
        stream.misses = 0
        rtt = round_trip(sent[0], sent[1], received_wall, now)
        timeout = stream.rto()
        if rtt <= timeout:
            stream.on_result(True, rtt, None)
        else:  # came after its timeout, before we looked: missed, and answered late
            stream.on_result(False, None, _missed(timeout))
            if stream.on_late is not None:
                stream.on_late(rtt)

    def _fire(self, stream: ProbeStream, now: float, wall: float) -> None:
        seq = stream.seq = stream.seq % 0xFFFF + 1
        stream.sent += 1
        failure = stream.sender(seq)
        if failure is not None:
            stream.on_result(False, None, failure)
            stream.on_lost(now)
            return
        stream.pending[seq] = (now, wall, stream.sent)
        self._outstanding.add(stream)

    def _check_outstanding(self, now: float) -> float:
        """Judge outstanding probes: missed after the stream's timeout (then another goes out at
        once), lost once LATE_WINDOW passed without a reply. Returns when this is due next."""
        next_due = math.inf
        for stream in tuple(self._outstanding):
            if stream.removed:
                self._outstanding.discard(stream)
                continue
            pending, late = stream.pending, stream.late
            while late:  # oldest first
                seq = next(iter(late))
                if now < late[seq][0] + LATE_WINDOW and len(late) <= LATE_KEEP:
                    next_due = min(next_due, late[seq][0] + LATE_WINDOW)
                    break
                stream.on_lost(late.pop(seq)[0])
            timeout = stream.rto()
            while pending:  # oldest first: sequence numbers go up with time
                seq = next(iter(pending))
                sent = pending[seq][0]
                if now < sent + timeout:
                    next_due = min(next_due, sent + timeout)
                    break
                late[seq] = pending.pop(seq)[:2]
                next_due = min(next_due, late[seq][0] + LATE_WINDOW)
                stream.misses += 1
                stream.on_result(False, None, _missed(timeout))
                # Another probe at once, unless one is on its way already: a path slower than the
                # timeout (answering late) must not start a chain of probes per regular one.
                if stream.misses < stream.fall and not pending and not stream.removed:
                    self._fire(stream, now, self.wall())
                    next_due = min(next_due, now + timeout)
            if not pending and not late:
                self._outstanding.discard(stream)
        return next_due

    def run_due(self, now: float) -> float:
        """Read replies; judge outstanding probes (never early); send what is due within a batch
        (early). Returns when something is due next."""
        self.poll()
        heap = self._heap
        due = self._check_outstanding(now)
        if heap and heap[0][0] <= now + (self.batch if now >= self._next_batch else 0.0):
            # The jitter goes on the batches: probe times vary, and no stream drifts out of its batch.
            jitter = self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
            self._next_batch = now + self.batch * (1 + jitter) - MIN_GAP
            later = []  # each stream's next send, pushed after the batch: one probe per stream per batch
            wall = self.wall()
            while heap and heap[0][0] < now + self.batch:
                when, _, stream, generation = heapq.heappop(heap)
                if stream.removed or generation != stream.generation:
                    continue  # stopped, or settings changed since: a newer chain of sends runs
                self._fire(stream, now, wall)
                due = min(due, now + stream.rto())  # a look when it may be missed
                later.append((max(when, now - self.batch) + stream.interval, stream, generation))
            for item in later:
                self._push(*item)
        send_due = max(heap[0][0], self._next_batch) if heap else math.inf
        return min(due, send_due)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Handle timer events forever (cancel to stop)."""
        task_status.started()
        while True:
            now = trio.current_time()
            self._wake_at = math.inf  # sends pushed while handling are seen below
            after = self.run_due(now)
            self._wake_at = min(max(after, now + MIN_GAP), now + MAX_SLEEP)
            self._wake = trio.Event()
            with trio.move_on_at(self._wake_at):
                await self._wake.wait()


def echo_reply_filter(version: int) -> bytes:
    """A BPF program that lets through only echo replies carrying hatun's PAYLOAD.

    A raw ICMP socket receives every ICMP message of its namespace: the replies of any other ping,
    and whatever a flood brings. Matched on the payload marker rather than on our identifiers, the
    filter never changes (identifiers come and go with tunnels; re-attaching on each change would
    race the replies in flight), and what gets through is only hatun's own kind of reply; the
    identifier and the device are still checked in Python. An IPv4 raw socket's filter sees the IP
    header (its length from the IHL), an ICMPv6 one only the ICMPv6 message.
    """
    p = bpf.Program()
    if version == 4:
        p.op(bpf.LDX_B_MSH, 0)
        w, b, echo = bpf.LD_W_IND, bpf.LD_B_IND, ECHO_REPLY_V4
    else:
        w, b, echo = bpf.LD_W_ABS, bpf.LD_B_ABS, ECHO_REPLY_V6
    p.op(b, 0)
    p.jump(bpf.JEQ, echo, None, bpf.DROP)
    # The payload follows the 8-byte echo header. A load past the packet's end drops it.
    whole = len(PAYLOAD) - len(PAYLOAD) % 4
    for pos in range(0, len(PAYLOAD)):
        if pos < whole and pos % 4 == 0:
            p.op(w, 8 + pos)
            p.jump(bpf.JEQ, int.from_bytes(PAYLOAD[pos:pos + 4], "big"), None, bpf.DROP)
        elif pos >= whole:
            p.op(b, 8 + pos)
            p.jump(bpf.JEQ, PAYLOAD[pos], None, bpf.DROP)
    return p.assemble()


class _IcmpSocket:
    """The raw ICMP socket of one address family, shared by every tunnel.

    A BPF filter (`echo_reply_filter`) keeps everything but hatun's echo replies in the kernel, and
    one `receive` reads at most RECEIVE_BATCH of them.
    """

    def __init__(self, version: int) -> None:
        self.version = version
        family, proto = ((socket.AF_INET6, socket.IPPROTO_ICMPV6) if version == 6
                         else (socket.AF_INET, socket.IPPROTO_ICMP))
        sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
        try:
            # First the filter: what arrives before it is read (and dropped) in Python.
            try:
                bpf.attach(sock, echo_reply_filter(version))
            except OSError as e:
                log.warning("ICMP socket filter refused (%s): foreign echo replies are sorted out in Python", e)
            if version == 6:
                # struct icmp6_filter: 8 x u32, a set bit BLOCKS that type; let echo replies through.
                blocks = [0xFFFFFFFF] * 8
                blocks[ECHO_REPLY_V6 >> 5] &= ~(1 << (ECHO_REPLY_V6 & 31))
                sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *blocks))
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", ~(1 << ECHO_REPLY_V4) & 0xFFFFFFFF))
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            # The kernel's receive time of each reply: RTTs are exact however late we read them.
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            # Room for the replies of many tunnels between two reads (forced past rmem_max as root).
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, ICMP_RCVBUF)
            except OSError:
                pass
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def pktinfo(self, ifindex: int) -> list[tuple[int, int, bytes]]:
        """The ancillary data that sends a packet out of device IFINDEX (computed once per device)."""
        if self.version == 6:
            return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("16sI", b"\0" * 16, ifindex))]
        return [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("I4s4s", ifindex, b"\0" * 4, b"\0" * 4))]

    def send(self, pktinfo: list, address: tuple[str, int], ident: int, seq: int) -> str | None:
        if self.version == 6:
            message = _ECHO.pack(ECHO_REQUEST_V6, 0, 0, ident, seq) + PAYLOAD  # the kernel sums ICMPv6
        else:
            message = _ECHO.pack(ECHO_REQUEST_V4, 0, _echo_checksum(ident, seq, PAYLOAD_SUM, ECHO_REQUEST_V4),
                                 ident, seq) + PAYLOAD
        try:
            self.sock.sendmsg([message], pktinfo, 0, address)
        except BlockingIOError:
            return "send buffer full"
        except OSError as e:
            return _error_reason(e)
        return None

    def receive(self) -> list[tuple[int, int, int, float | None]]:
        """What waits on the socket (up to RECEIVE_BATCH datagrams): (ifindex, ident, seq, kernel
        receive time) of each echo reply."""
        out = []
        for _ in range(RECEIVE_BATCH):
            try:
                data, anc, _, _ = self.sock.recvmsg(512, 256)
            except BlockingIOError:
                return out
            except OSError as e:
                log.debug("probe receive: %s", e)
                return out
            if self.version == 4:
                data = data[(data[0] & 0x0F) * 4:] if data else b""
            if len(data) < 8 or data[0] != (ECHO_REPLY_V6 if self.version == 6 else ECHO_REPLY_V4):
                continue
            ifindex, stamp = 0, None
            for level, ctype, cdata in anc:
                if level == socket.SOL_SOCKET and ctype == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack_from("qq", cdata)
                    stamp = sec + nsec / 1e9
                elif ctype == (IPV6_PKTINFO if self.version == 6 else IP_PKTINFO):
                    ifindex = struct.unpack_from("I", cdata, 16 if self.version == 6 else 0)[0]
            _, _, _, ident, seq = _ECHO.unpack_from(data)
            out.append((ifindex, ident, seq, stamp))
        return out


class ProbeEngine:
    """Every tunnel's probes, with one timer task and one ICMP socket per family.

    `async with open_probe_engine() as engine:` then `engine.add_icmp(...)` / `engine.add_tcp(...)`
    per tunnel, `engine.remove(stream)` when done.
    """

    def __init__(self, nursery: trio.Nursery, rng: random.Random | None = None) -> None:
        self._nursery = nursery
        self.scheduler = Scheduler(rng)
        self.scheduler.poll = self._drain_all
        self._icmp: dict[int, _IcmpSocket] = {}
        self._by_ident: dict[tuple[int, int], ProbeStream] = {}
        self._rng = rng or random.Random()

    def _icmp_socket(self, version: int) -> _IcmpSocket:
        if version not in self._icmp:
            self._icmp[version] = _IcmpSocket(version)
        return self._icmp[version]

    def _drain(self, s: _IcmpSocket) -> None:
        by_ident, version, reply = self._by_ident, s.version, self.scheduler.reply
        for ifindex, ident, seq, stamp in s.receive():
            stream = by_ident.get((version, ident))
            # Only a reply through the probed tunnel counts: its device, its identifier.
            if stream is not None and stream.ifindex == ifindex:
                reply(stream, seq, received_wall=stamp)

    def _drain_all(self) -> None:
        for s in self._icmp.values():
            self._drain(s)

    def add_icmp(self, stream: ProbeStream, target: ipaddress.IPv4Address | ipaddress.IPv6Address,
                 ifindex: int | None) -> ProbeStream:
        """Probe TARGET with ICMP echo through device IFINDEX (None: missing, the probes fail; keep
        `stream.ifindex` current when the device changes). Raises OSError (no CAP_NET_RAW)."""
        s = self._icmp_socket(target.version)
        ident = self._rng.randrange(1, 0xFFFF)
        while (target.version, ident) in self._by_ident:
            ident = self._rng.randrange(1, 0xFFFF)
        self._by_ident[(target.version, ident)] = stream
        stream.ident = (target.version, ident)
        stream.ifindex = ifindex
        address = (str(target), 0)
        cached: list = [None, None]  # (ifindex, its ancillary data)

        def send(seq: int) -> str | None:
            index = stream.ifindex
            if index is None:
                return "tunnel device missing"
            if cached[0] != index:
                cached[:] = [index, s.pktinfo(index)]
            return s.send(cached[1], address, ident, seq)

        stream.sender = send
        self.scheduler.start(stream, trio.current_time() + self._rng.uniform(0, stream.interval))
        return stream

    def add_tcp(self, stream: ProbeStream, target: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int,
                ifname: str) -> ProbeStream:
        """Probe with a TCP connect to TARGET:PORT from a socket bound to device IFNAME."""
        family = socket.AF_INET6 if target.version == 6 else socket.AF_INET

        def send(seq: int) -> str | None:
            try:
                raw = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                raw.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
            except OSError as e:
                return _error_reason(e)
            self._nursery.start_soon(self._connect, stream, seq, raw, (str(target), port))
            return None

        stream.sender = send
        self.scheduler.start(stream, trio.current_time() + self._rng.uniform(0, stream.interval))
        return stream

    async def _connect(self, stream: ProbeStream, seq: int, raw: socket.socket, address: tuple[str, int]) -> None:
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            with trio.move_on_after(stream.timeout):
                try:
                    await sock.connect(address)
                    self.scheduler.reply(stream, seq, True)
                except ConnectionRefusedError:
                    self.scheduler.reply(stream, seq, False, "connection refused")
                except OSError as e:
                    self.scheduler.reply(stream, seq, False, _error_reason(e))
        finally:
            # Close with RST (linger 0): a probe leaves no TIME_WAIT behind.
            try:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            sock.close()

    def remove(self, stream: ProbeStream) -> None:
        self.scheduler.stop(stream)
        if stream.ident is not None and self._by_ident.get(stream.ident) is stream:
            del self._by_ident[stream.ident]

    def close(self) -> None:
        for s in self._icmp.values():
            s.sock.close()
        self._icmp.clear()


@asynccontextmanager
async def open_probe_engine(rng: random.Random | None = None) -> AsyncIterator[ProbeEngine]:
    """A ProbeEngine whose tasks (timers, receivers, TCP connects) end with the block."""
    async with trio.open_nursery() as nursery:
        engine = ProbeEngine(nursery, rng)
        await nursery.start(engine.scheduler.run)
        try:
            yield engine
        finally:
            nursery.cancel_scope.cancel()
            engine.close()
