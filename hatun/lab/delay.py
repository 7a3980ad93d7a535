"""A userspace delay line for the lab's `delay:D` fault.

The kernel here has no netem and its nftables no queue expression, so an iptables NFQUEUE rule hands
the packets crossing a gateway's underlay to this process, which accepts each one DELAY after it
arrived, in arrival order. Run as `python -m hatun.lab.delay --queue Q --delay SECONDS` inside the
gateway's namespace; the lab starts it detached and ends it by PID (SIGTERM: every waiting packet is
accepted, the queue unbound, exit 0).

Why it stays cheap and never drops a packet:
- Only metadata is copied to us (no payload): the kernel keeps the packets, we keep (deadline, id)
  pairs, as many as the kernel queue holds at most.
- A constant delay keeps the packets in order, so when the oldest are due one batch verdict accepts
  every packet up to the last of them (also any whose notification we had to skip as malformed).
- The queue is fail-open: when it is full, or our socket's buffer is (ENOBUFS), the kernel accepts
  the packet at once instead of dropping it. Such a packet loses its delay, never itself.
- One thread: poll until the oldest packet's deadline (rounded up to the next millisecond, so it
  never spins), read every waiting notification, send one verdict.

Why it keeps running: the rules use --queue-bypass, so once this process is gone the packets pass
undelayed while the lab still lists the fault. A malformed message is logged and skipped, a verdict
that could not be sent goes out with the next one, and after a loss the kernel's own count of the
queue (/proc/self/net/netfilter/nfnetlink_queue) shows whether packets wait that we never heard of.
Only a lost queue (the socket closed, the binding gone) ends the line: loudly, with exit status 2.

pyroute2 has no nfnetlink_queue messages; the few needed are packed here after
include/uapi/linux/netfilter/nfnetlink_queue.h: nlmsghdr in host order, then nfgenmsg (its res_id,
the queue number, big-endian), then attributes aligned to 4 bytes whose payloads are big-endian.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from typing import NamedTuple

log = logging.getLogger("hatun.lab.delay")

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NF_ACCEPT = 1
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLA_TYPE_MASK = 0x3FFF  # without the nested and byte-order flags

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NFGENMSG = struct.Struct("!BBH")  # family, version, res_id
NLATTR = struct.Struct("=HH")  # length, type

QUEUE_MAXLEN = 65536  # packets the kernel holds for us; beyond that, fail-open accepts at once
RCVBUF = 16 << 20  # a burst of notifications waits here while we send a verdict
READS_PER_WAKEUP = 4096  # then the due verdict goes out even while notifications keep coming
RECV_SIZE = 65536
VERDICT_SEQ, CONFIG_SEQ, UNBIND_SEQ = 0, 1, 2
RETRY_INTERVAL = 0.05  # the longest wait while a verdict is unsent or a loss is unchecked
LOG_INTERVAL = 5.0  # a recurring warning is logged at most this often
# The kernel refuses a verdict with these when the queue is no longer bound to our socket.
QUEUE_GONE = {errno.ENODEV: "the queue is not bound", errno.EPERM: "the queue is bound to another socket"}
SOCKET_GONE = {errno.EBADF, errno.ENOTSOCK}
PROC_QUEUES = "/proc/{pid}/net/netfilter/nfnetlink_queue"
ID_SPACE = 1 << 32


class QueueLost(Exception):
    """The netlink socket or the queue's binding is gone: nothing reaches this line any more."""


def _attr(kind: int, payload: bytes) -> bytes:
    raw = NLATTR.pack(NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg: int, queue: int, attrs: list[bytes], flags: int = 0, seq: int = 0) -> bytes:
    body = NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + b"".join(attrs)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), NFNL_SUBSYS_QUEUE << 8 | msg, NLM_F_REQUEST | flags, seq, 0) + body


def bind_message(queue: int, maxlen: int = QUEUE_MAXLEN) -> bytes:
    """Bind QUEUE to this socket: metadata only, MAXLEN packets, fail-open; acknowledged."""
    return _message(NFQNL_MSG_CONFIG, queue, [
        _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_UNSPEC)),
        _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
        _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)),
        _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)),
        _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)),
    ], NLM_F_ACK, CONFIG_SEQ)


def unbind_message(queue: int) -> bytes:
    return _message(NFQNL_MSG_CONFIG, queue, [_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0))],
                    NLM_F_ACK, UNBIND_SEQ)


def accept_up_to(queue: int, packet_id: int) -> bytes:
    """A batch verdict: accept every packet of QUEUE up to PACKET_ID (the kernel compares ids
    modulo 2^32). Not acknowledged, but a refusal comes back as an error with VERDICT_SEQ."""
    return _message(NFQNL_MSG_VERDICT_BATCH, queue, [_attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))],
                    seq=VERDICT_SEQ)


def later(a: int | None, b: int | None) -> int | None:
    """The later of two packet ids as the kernel orders them (modulo 2^32; None: no id)."""
    if a is None or b is None:
        return b if a is None else a
    return b if 0 < (b - a) % ID_SPACE < ID_SPACE // 2 else a


class Parsed(NamedTuple):
    """What one datagram from the socket holds."""

    ids: list[int]  # of the packet notifications
    acks: list[tuple[int, int]]  # (sequence, errno) of the acknowledgements and errors
    malformed: list[str]  # what was skipped, and why


def parse(data: bytes | memoryview) -> Parsed:
    """The messages in DATA, one datagram from the socket. Never raises: a malformed message is
    skipped and described, with the rest of the datagram when its length is wrong (nothing after
    it can be found then). A skipped notification's packet waits in the kernel until a later
    verdict; one arriving garbled must not end the line (see the module's docstring)."""
    data = memoryview(data)
    out = Parsed([], [], [])
    offset = 0
    while offset < len(data):
        if len(data) - offset < NLMSGHDR.size:
            out.malformed.append(f"{len(data) - offset} stray bytes at offset {offset}")
            break
        length, kind, _flags, seq, _port = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            out.malformed.append(f"netlink message of length {length} at offset {offset} in {len(data)} bytes")
            break
        try:
            _parse_message(out, kind, seq, data[offset + NLMSGHDR.size:offset + length])
        except ValueError as e:
            out.malformed.append(f"{e} (message at offset {offset})")
        offset += (length + 3) & ~3
    return out


def _parse_message(out: Parsed, kind: int, seq: int, body: memoryview) -> None:
    if kind == NLMSG_ERROR:
        if len(body) < 4:
            raise ValueError(f"error message with a body of {len(body)} bytes")
        out.acks.append((seq, -struct.unpack_from("=i", body)[0]))
    elif kind == NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET:
        out.ids.append(_packet_id(body))


def _packet_id(body: memoryview) -> int:
    offset = NFGENMSG.size
    while offset + NLATTR.size <= len(body):
        length, kind = NLATTR.unpack_from(body, offset)
        if length < NLATTR.size or offset + length > len(body):
            raise ValueError(f"attribute of length {length} at offset {offset} in a {len(body)}-byte packet message")
        if kind & NLA_TYPE_MASK == NFQA_PACKET_HDR:
            if length < NLATTR.size + 4:
                raise ValueError(f"NFQA_PACKET_HDR of length {length}")
            return struct.unpack_from("!I", body, offset + NLATTR.size)[0]
        offset += (length + 3) & ~3
    raise ValueError("packet message without NFQA_PACKET_HDR")


class KernelQueue(NamedTuple):
    """A queue as the kernel lists it in /proc/PID/net/netfilter/nfnetlink_queue."""

    portid: int  # the netlink port of the socket it is bound to
    total: int  # packets waiting for a verdict
    last_id: int  # the id it gave the newest packet (also to one accepted at once by fail-open)


def kernel_queue(text: str, queue: int) -> KernelQueue | None:
    """QUEUE in TEXT, the contents of that file (None: not bound). Its columns: queue, port id,
    waiting, copy mode, copy range, dropped, dropped by the user side, last id, 1."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[0] == str(queue):
            try:
                return KernelQueue(int(fields[1]), int(fields[2]), int(fields[7]))
            except ValueError:
                return None
    return None


def read_kernel_queue(queue: int, pid: int | str = "self") -> KernelQueue | None:
    """QUEUE as the kernel lists it in PID's network namespace (None: not bound there). Raises
    OSError when that list cannot be read (no such process, or no queue ever bound there)."""
    with open(PROC_QUEUES.format(pid=pid)) as f:
        return kernel_queue(f.read(), queue)


BOUND = re.compile(r"queue (\d+) bound by netlink port (\d+)")


def bound_port(log_text: str, queue: int) -> int | None:
    """The netlink port a delay line logged once it held QUEUE (see `main`), or None."""
    for m in BOUND.finditer(log_text):
        if int(m.group(1)) == queue:
            return int(m.group(2))
    return None


class DelayLine:
    """Packet ids waiting for their deadline, oldest first, at most LIMIT of them."""

    def __init__(self, delay: float, limit: int = QUEUE_MAXLEN) -> None:
        self.delay = delay
        self.limit = limit
        self.waiting: deque[tuple[float, int]] = deque()
        self.newest: int | None = None  # the latest id seen: what a final verdict accepts

    def arrived(self, packet_id: int, now: float) -> None:
        self.waiting.append((now + self.delay, packet_id))
        self.newest = later(self.newest, packet_id)

    def release(self, now: float) -> int | None:
        """Take the packets that are due (and any beyond LIMIT, early) off the line; the latest id
        among them, which a batch verdict accepts with all before it, or None."""
        last = None
        while self.waiting and (self.waiting[0][0] <= now or len(self.waiting) > self.limit):
            last = later(last, self.waiting.popleft()[1])
        return last

    def timeout(self, now: float) -> float | None:
        """Seconds until the oldest packet is due (None: nothing waits)."""
        return max(0.0, self.waiting[0][0] - now) if self.waiting else None


def _netlink_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except PermissionError:  # without CAP_NET_ADMIN: as large as net.core.rmem_max allows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind((0, 0))
    return sock


class Delayer:
    """Queue QUEUE bound on a netlink socket of this namespace, its packets on a DelayLine. SOCK
    replaces that socket in the tests (recv_into, sendto, fileno, getsockname)."""

    def __init__(self, queue: int, delay: float, sock: socket.socket | None = None) -> None:
        self.queue = queue
        self.line = DelayLine(delay)
        self.sock = _netlink_socket() if sock is None else sock
        self.portid = self.sock.getsockname()[0]  # how the kernel names us in its list of queues
        self.buf = bytearray(RECV_SIZE)
        self.unsent: int | None = None  # a verdict that failed to go out: it goes with the next
        self.unchecked = False  # notifications were lost or skipped since the kernel's count was read
        self.packets = self.lost = self.malformed = self.failed_sends = 0
        self._logged: dict[str, float] = {}

    def bind(self, timeout: float = 5.0) -> None:
        """Bind the queue. Raises OSError (EPERM, EBUSY: another process holds it) or TimeoutError."""
        self._request(bind_message(self.queue), CONFIG_SEQ, timeout)

    def unbind(self, timeout: float = 2.0) -> None:
        self._request(unbind_message(self.queue), UNBIND_SEQ, timeout)

    def _request(self, message: bytes, seq: int, timeout: float) -> None:
        self.sock.sendto(message, (0, 0))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer from the kernel within {timeout:g} s")
            self.sock.settimeout(remaining)
            try:
                n = self.sock.recv_into(self.buf, RECV_SIZE)
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self._lost()
                continue
            finally:
                self.sock.setblocking(False)
            for ack_seq, code in self._received(memoryview(self.buf)[:n], time.monotonic()):
                if ack_seq == seq:
                    if code:
                        raise OSError(code, os.strerror(code))
                    return

    def serve(self, stop_fd: int) -> None:
        """Delay packets until STOP_FD becomes readable (a signal arrived). Raises QueueLost."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        while True:
            for fd, event in poller.poll(self._poll_timeout(time.monotonic())):
                if fd == stop_fd:
                    return
                if event & (select.POLLHUP | select.POLLNVAL):
                    raise QueueLost("the netlink socket was closed")
            self.wakeup()

    def _poll_timeout(self, now: float) -> int | None:
        """Milliseconds until the next wakeup (None: until a notification or a signal): when the
        oldest packet is due, at most RETRY_INTERVAL while a verdict is unsent or a loss unchecked.
        Rounded up: a wakeup always finds something due, never spins."""
        timeout = self.line.timeout(now)
        if self.unsent is not None or self.unchecked:
            timeout = RETRY_INTERVAL if timeout is None else min(timeout, RETRY_INTERVAL)
        return None if timeout is None else math.ceil(timeout * 1000)

    def wakeup(self) -> None:
        """One turn of the loop: read the notifications, check a loss against the kernel's count
        once they are all read, accept what is due (with any verdict that failed before)."""
        if self._read() and self.unchecked:
            self._check_kernel(time.monotonic())
        self._accept(self.line.release(time.monotonic()))

    def finish(self) -> None:
        """Accept every packet the kernel holds for us (also those still waiting, and any whose
        notification we skipped: unbinding drops what is left), then unbind the queue."""
        self._read()
        self.line.waiting.clear()
        last = self.line.newest
        try:
            state = read_kernel_queue(self.queue)
        except OSError:
            state = None
        if state is not None and state.portid == self.portid and state.total:
            last = later(last, state.last_id)
        for _ in range(5):
            self._accept(last)
            if self.unsent is None:
                break
            time.sleep(0.01)
        self.unbind()
        self.sock.close()

    def _read(self) -> bool:
        """Read the waiting notifications, at most READS_PER_WAKEUP; True when none is left."""
        for _ in range(READS_PER_WAKEUP):
            try:
                n = self.sock.recv_into(self.buf, RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError as e:
                if e.errno != errno.ENOBUFS:  # nothing else comes from a netlink socket that works
                    raise QueueLost(f"reading the netlink socket failed: {e.strerror or e}") from e
                self._lost()
                continue
            self._received(memoryview(self.buf)[:n], time.monotonic())
        return False

    def _received(self, data: memoryview, now: float) -> list[tuple[int, int]]:
        """Put the packets notified in DATA on the line; the acknowledgements in it. Raises
        QueueLost when the kernel refused a verdict for want of our queue."""
        parsed = parse(data)
        for packet_id in parsed.ids:
            self.line.arrived(packet_id, now)
        self.packets += len(parsed.ids)
        if parsed.malformed:
            self.malformed += len(parsed.malformed)
            self.unchecked = True  # a skipped notification's packet may wait unseen in the kernel
            self._warn("malformed", "skipped a malformed message (%d so far): %s", self.malformed, parsed.malformed[0])
        for seq, code in parsed.acks:
            if seq == VERDICT_SEQ and code in QUEUE_GONE:
                raise QueueLost(f"the kernel refused a verdict: {QUEUE_GONE[code]} ({os.strerror(code)})")
            # ENOENT: nothing was left to accept (an earlier verdict, or fail-open, took them all)
            if code and code != errno.ENOENT and seq == VERDICT_SEQ:  # a later verdict accepts them
                self._warn("refused", "verdict refused: %s", os.strerror(code))
        return parsed.acks

    def _lost(self) -> None:
        """The socket overflowed and notifications were lost: fail-open let those packets pass at
        once, undelayed. Checked against the kernel's count anyway (`_check_kernel`): a packet
        left waiting there would otherwise wait for the next packet's verdict."""
        self.lost += 1
        self.unchecked = True
        self._warn("lost", "notifications lost (ENOBUFS, %d times so far): those packets passed undelayed", self.lost)

    def _check_kernel(self, now: float) -> None:
        """After a loss, with every notification read: if the kernel holds packets with ids past the
        newest we know, put its last id on the line, so that they leave one delay from now (late by
        what was lost, never early). Raises QueueLost when the queue is no longer ours."""
        try:
            state = read_kernel_queue(self.queue)
        except OSError as e:  # no list to read: the next loss tries again
            self.unchecked = False
            self._warn("proc", "cannot read the kernel's queue list: %s", e.strerror or e)
            return
        if state is None or state.portid != self.portid:
            whose = "nobody" if state is None else f"netlink port {state.portid}"
            raise QueueLost(f"the kernel lists queue {self.queue} as bound to {whose}, not to us ({self.portid})")
        self.unchecked = False
        newest = self.line.newest
        if state.total and (newest is None or later(newest, state.last_id) != newest):
            self.line.arrived(state.last_id, now)

    def _accept(self, packet_id: int | None) -> None:
        """One batch verdict up to PACKET_ID, or to the unsent one if that is later (None: only the
        unsent one). A failed send is kept for the next wakeup, within RETRY_INTERVAL."""
        packet_id = later(self.unsent, packet_id)
        if packet_id is None:
            return
        try:
            self.sock.sendto(accept_up_to(self.queue, packet_id), (0, 0))
        except OSError as e:
            if e.errno in SOCKET_GONE:
                raise QueueLost(f"sending a verdict failed: {e.strerror or e}") from e
            self.unsent = packet_id
            self.failed_sends += 1
            self._warn("send", "verdict not sent (%s, %d times so far): retried", e.strerror or e, self.failed_sends)
            return
        self.unsent = None

    def _warn(self, key: str, message: str, *args: object) -> None:
        """Log MESSAGE at most every LOG_INTERVAL per KEY: a fault repeating per packet must not
        flood the log (the counts say how often it happened)."""
        now = time.monotonic()
        if now - self._logged.get(key, -math.inf) >= LOG_INTERVAL:
            self._logged[key] = now
            log.warning(message, *args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hatun.lab.delay", description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", type=int, required=True, help="NFQUEUE number")
    p.add_argument("--delay", type=float, required=True, help="seconds each packet waits")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s delay[%(process)d] %(message)s", stream=sys.stderr)
    # A signal writes to this pipe, which wakes the poll: the loop ends between two verdicts.
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)
    signal.set_wakeup_fd(stop_w)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        delayer = Delayer(args.queue, args.delay)
        delayer.bind()
    except OSError as e:  # no nfnetlink_queue in this kernel, or the queue taken (EPERM, EBUSY)
        log.error("cannot bind NFQUEUE %d: %s", args.queue, e.strerror or e)
        return 1
    # The lab waits for this line: the port tells it that the queue is held by us, not by a leftover.
    log.info("queue %d bound by netlink port %d: each packet waits %g ms", args.queue, delayer.portid,
             1000 * args.delay)
    try:
        delayer.serve(stop_r)
        delayer.finish()
    except QueueLost as e:
        log.error("queue %d lost, the delay line ends: %s; its packets now pass undelayed", args.queue, e)
        return 2
    except OSError as e:
        log.error("cannot unbind NFQUEUE %d: %s", args.queue, e.strerror or e)
        return 1
    log.info("queue %d unbound after %d packets (notifications lost %d times, %d malformed messages skipped)",
             args.queue, delayer.packets, delayer.lost, delayer.malformed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
