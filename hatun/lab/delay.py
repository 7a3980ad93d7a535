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
  every packet up to the last of them. It also accepts the packets whose notifications were lost
  (ENOBUFS) that came before it: a lost notification costs a packet's timing, never the packet.
- The queue is fail-open: when it is full the kernel accepts instead of dropping.
- One thread: poll until the oldest packet's deadline (rounded up to the next millisecond, so it
  never spins), read every waiting notification, send one verdict.

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
import select
import signal
import socket
import struct
import sys
import time
from collections import deque

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
CONFIG_SEQ, UNBIND_SEQ = 1, 2


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
    modulo 2^32)."""
    return _message(NFQNL_MSG_VERDICT_BATCH, queue, [_attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))])


def parse(data: bytes | memoryview) -> tuple[list[int], list[tuple[int, int]]]:
    """The packet ids and the (sequence, error) of the acknowledgements and errors in DATA, one
    datagram from the socket. Raises ValueError on a malformed message."""
    data = memoryview(data)
    ids, acks = [], []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _port = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            raise ValueError(f"netlink message of length {length} at offset {offset} in {len(data)} bytes")
        body = data[offset + NLMSGHDR.size:offset + length]
        if kind == NLMSG_ERROR:
            acks.append((seq, -struct.unpack_from("=i", body)[0]))
        elif kind == NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET:
            ids.append(_packet_id(body))
        offset += (length + 3) & ~3
    return ids, acks


def _packet_id(body: memoryview) -> int:
    offset = NFGENMSG.size
    while offset + NLATTR.size <= len(body):
        length, kind = NLATTR.unpack_from(body, offset)
        if length < NLATTR.size:
            break
        if kind & NLA_TYPE_MASK == NFQA_PACKET_HDR:
            return struct.unpack_from("!I", body, offset + NLATTR.size)[0]
        offset += (length + 3) & ~3
    raise ValueError("packet message without NFQA_PACKET_HDR")


class DelayLine:
    """Packet ids waiting for their deadline, oldest first, at most LIMIT of them."""

    def __init__(self, delay: float, limit: int = QUEUE_MAXLEN) -> None:
        self.delay = delay
        self.limit = limit
        self.waiting: deque[tuple[float, int]] = deque()
        self.newest: int | None = None  # the last id seen: what a final verdict accepts

    def arrived(self, packet_id: int, now: float) -> None:
        self.waiting.append((now + self.delay, packet_id))
        self.newest = packet_id

    def release(self, now: float) -> int | None:
        """Take the packets that are due (and any beyond LIMIT, early) off the line; the id of the
        last one, which a batch verdict accepts with all before it, or None."""
        last = None
        while self.waiting and (self.waiting[0][0] <= now or len(self.waiting) > self.limit):
            last = self.waiting.popleft()[1]
        return last

    def timeout(self, now: float) -> float | None:
        """Seconds until the oldest packet is due (None: nothing waits)."""
        return max(0.0, self.waiting[0][0] - now) if self.waiting else None


class Delayer:
    """Queue QUEUE bound on a netlink socket of this namespace, its packets on a DelayLine."""

    def __init__(self, queue: int, delay: float) -> None:
        self.queue = queue
        self.line = DelayLine(delay)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:  # without CAP_NET_ADMIN: as large as net.core.rmem_max allows
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock.bind((0, 0))
        self.buf = bytearray(RECV_SIZE)
        self.packets = self.lost = 0
        self._lost_logged = 0.0

    def bind(self, timeout: float = 5.0) -> None:
        """Bind the queue. Raises OSError (EBUSY: another process holds it) or TimeoutError."""
        self._request(bind_message(self.queue), CONFIG_SEQ, timeout)

    def unbind(self, timeout: float = 2.0) -> None:
        self._request(unbind_message(self.queue), UNBIND_SEQ, timeout)

    def _request(self, message: bytes, seq: int, timeout: float) -> None:
        self.sock.sendto(message, (0, 0))
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                ids, acks = parse(self.sock.recv(RECV_SIZE))
            finally:
                self.sock.setblocking(False)
            for packet_id in ids:
                self.line.arrived(packet_id, time.monotonic())
            for ack_seq, code in acks:
                if ack_seq == seq:
                    if code:
                        raise OSError(code, os.strerror(code))
                    return

    def serve(self, stop_fd: int) -> None:
        """Delay packets until STOP_FD becomes readable (a signal arrived)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        while True:
            timeout = self.line.timeout(time.monotonic())
            events = poller.poll(None if timeout is None else math.ceil(timeout * 1000))
            for fd, event in events:
                if fd == stop_fd:
                    return
                if event & (select.POLLHUP | select.POLLNVAL):
                    raise OSError("the netlink socket was closed")
            self._read()
            self._accept(self.line.release(time.monotonic()))

    def finish(self) -> None:
        """Accept every packet seen (also those still waiting), then unbind the queue."""
        self._read()
        self.line.waiting.clear()
        self._accept(self.line.newest)
        self.unbind()
        self.sock.close()

    def _read(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                n = self.sock.recv_into(self.buf, RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self._lost()
                continue
            ids, acks = parse(memoryview(self.buf)[:n])
            now = time.monotonic()
            for packet_id in ids:
                self.line.arrived(packet_id, now)
            self.packets += len(ids)
            for seq, code in acks:
                if code:  # a verdict the kernel refused: its packets are accepted by a later one
                    log.debug("verdict refused: %s (sequence %d)", os.strerror(code), seq)

    def _lost(self) -> None:
        """The socket overflowed and notifications were lost: their packets are still queued in the
        kernel and go out with the next batch verdict. Logged at most every 5 s."""
        self.lost += 1
        now = time.monotonic()
        if now - self._lost_logged >= 5.0:
            self._lost_logged = now
            log.warning("notifications lost (ENOBUFS, %d times so far): those packets leave with the next verdict",
                        self.lost)

    def _accept(self, packet_id: int | None) -> None:
        if packet_id is not None:
            self.sock.sendto(accept_up_to(self.queue, packet_id), (0, 0))


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
    except OSError as e:  # no nfnetlink_queue in this kernel, or the queue taken (EBUSY)
        log.error("cannot bind NFQUEUE %d: %s", args.queue, e.strerror or e)
        return 1
    log.info("queue %d bound: each packet waits %g ms", args.queue, 1000 * args.delay)
    delayer.serve(stop_r)
    delayer.finish()
    log.info("queue %d unbound after %d packets (notifications lost %d times)", args.queue, delayer.packets,
             delayer.lost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
