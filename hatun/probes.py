"""Probes pinned to one tunnel: ICMP echo or TCP connect, sent through that tunnel's device only.

Every probe socket is bound to the tunnel device (SO_BINDTODEVICE), so it leaves through that
tunnel whatever the routes say: also while the tunnel is out of the route (so recovery is seen),
never via another tunnel or the underlay.

`run_probes` is the scheduler: one probe every `interval` (with jitter), each failing after
`timeout`, results reported in the order they complete. When the oldest outstanding probe is
overdue (no reply after several round-trip times) one extra probe goes out at once, so that a dead
path reaches `fall` failures sooner than the next regular probe would allow; timeouts keep their
meaning (a probe fails only after `timeout`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import random
import socket
import struct
from collections.abc import Callable
from typing import Protocol

import trio

log = logging.getLogger("hatun.probes")

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SOL_RAW = 255
ICMP_FILTER = 1  # linux/icmp.h: a bitmask of ICMP types to DROP on a raw socket
ICMP6_FILTER = 1
ECHO_REPLY_V4, ECHO_REQUEST_V4 = 0, 8
ECHO_REQUEST_V6, ECHO_REPLY_V6 = 128, 129
RECHECK_RTTS = 4  # an outstanding probe is overdue after this many average round trips
RECHECK_FLOOR = 0.02  # ... but never sooner than this (seconds)

OnResult = Callable[[bool, "float | None", "str | None"], None]


class Transport(Protocol):
    """Sends probe SEQ and reports replies as (seq, ok, reason) on `replies`."""

    replies: trio.MemoryReceiveChannel

    async def open(self, nursery: trio.Nursery) -> None: ...

    def send(self, seq: int) -> str | None:
        """Send probe SEQ now; return a failure reason when it could not even be sent."""

    def close(self) -> None: ...


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _bound_socket(family: int, type_: int, proto: int, ifname: str) -> socket.socket:
    sock = socket.socket(family, type_ | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
    except OSError:
        sock.close()
        raise
    return sock


def _send_error_reason(e: OSError) -> str:
    if e.errno in (errno.ENODEV, errno.ENXIO):
        return "tunnel device missing"
    if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "no route through the tunnel"
    if e.errno == errno.ENOKEY:
        return "no WireGuard session (handshake missing)"
    return os.strerror(e.errno or 0) or str(e)


class IcmpTransport:
    """ICMP echo through one device: a raw socket bound to it, replies matched by identifier."""

    def __init__(self, ifname: str, target: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        self.ifname = ifname
        self.target = target
        self.ident = random.randrange(1, 0xFFFF)
        self._send, self.replies = trio.open_memory_channel(64)
        self._sock: socket.socket | None = None

    async def open(self, nursery: trio.Nursery) -> None:
        v6 = self.target.version == 6
        if v6:
            sock = _bound_socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6, self.ifname)
            # Let only echo replies through: struct icmp6_filter is 8 x u32, a set bit BLOCKS that type.
            blocks = [0xFFFFFFFF] * 8
            blocks[ECHO_REPLY_V6 >> 5] &= ~(1 << (ECHO_REPLY_V6 & 31))
            sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *blocks))
        else:
            sock = _bound_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP, self.ifname)
            sock.setsockopt(SOL_RAW, ICMP_FILTER,
                            struct.pack("I", ~(1 << ECHO_REPLY_V4) & 0xFFFFFFFF))
        self._sock = sock
        nursery.start_soon(self._receive_loop)

    def send(self, seq: int) -> str | None:
        assert self._sock is not None
        v6 = self.target.version == 6
        payload = b"hatun-probe" + struct.pack("!I", seq)
        icmp_type = ECHO_REQUEST_V6 if v6 else ECHO_REQUEST_V4
        header = struct.pack("!BBHHH", icmp_type, 0, 0, self.ident, seq & 0xFFFF)
        # The kernel fills the ICMPv6 checksum (it needs the pseudo header); ICMPv4 is ours to do.
        if not v6:
            header = struct.pack("!BBHHH", icmp_type, 0, _checksum(header + payload), self.ident, seq & 0xFFFF)
        try:
            self._sock.sendto(header + payload, (str(self.target), 0))
        except BlockingIOError:
            return "send buffer full"
        except OSError as e:
            return _send_error_reason(e)
        return None

    async def _receive_loop(self) -> None:
        assert self._sock is not None
        sock, v6 = self._sock, self.target.version == 6
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data, addr = sock.recvfrom(2048)
                except BlockingIOError:
                    break
                except OSError as e:  # e.g. the device went away; the scheduler sees timeouts
                    log.debug("%s: probe receive: %s", self.ifname, e)
                    await trio.sleep(0.05)
                    break
                if not v6:
                    data = data[(data[0] & 0x0F) * 4:] if data else b""
                if len(data) < 8 or addr[0].split("%")[0] != str(self.target):
                    continue
                icmp_type, _, _, ident, seq = struct.unpack("!BBHHH", data[:8])
                if icmp_type == (ECHO_REPLY_V6 if v6 else ECHO_REPLY_V4) and ident == self.ident:
                    try:
                        self._send.send_nowait((seq, True, None))
                    except trio.WouldBlock:
                        pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class TcpTransport:
    """TCP connect through one device: a probe succeeds when the SYN is answered by a SYN-ACK."""

    def __init__(self, ifname: str, target: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, timeout: float) -> None:
        self.ifname = ifname
        self.target = target
        self.port = port
        self.timeout = timeout
        self._send, self.replies = trio.open_memory_channel(64)
        self._nursery: trio.Nursery | None = None

    async def open(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def send(self, seq: int) -> str | None:
        assert self._nursery is not None
        family = socket.AF_INET6 if self.target.version == 6 else socket.AF_INET
        try:
            sock = _bound_socket(family, socket.SOCK_STREAM, 0, self.ifname)
        except OSError as e:
            return _send_error_reason(e)
        self._nursery.start_soon(self._connect, seq, sock)
        return None

    async def _connect(self, seq: int, raw: socket.socket) -> None:
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            with trio.move_on_after(self.timeout):
                try:
                    await sock.connect((str(self.target), self.port))
                    result = (seq, True, None)
                except ConnectionRefusedError:
                    result = (seq, False, "connection refused")
                except OSError as e:
                    result = (seq, False, _send_error_reason(e))
                try:
                    self._send.send_nowait(result)
                except trio.WouldBlock:
                    pass
        finally:
            # Close with RST (linger 0): a probe leaves no TIME_WAIT behind.
            try:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        pass


async def run_probes(
    transport: Transport,
    *,
    interval: float,
    timeout: float,
    jitter: float,
    on_result: OnResult,
    rtt_hint: Callable[[], float | None] = lambda: None,
    rng: random.Random | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Probe forever through TRANSPORT, reporting each probe's result to ON_RESULT(ok, rtt, reason).

    RTT_HINT gives the current average round trip (for the overdue check). Never returns; cancel it
    to stop. Raises OSError only when the transport cannot be opened at all.
    """
    rng = rng or random.Random()
    pending: dict[int, float] = {}  # seq -> send time
    seq = 0
    rechecked_upto = 0  # an extra probe was already sent for every pending probe up to this seq

    async with trio.open_nursery() as nursery:
        await transport.open(nursery)
        task_status.started()

        async def replies() -> None:
            async for rseq, ok, reason in transport.replies:
                sent = pending.pop(rseq, None)
                if sent is not None:
                    on_result(ok, trio.current_time() - sent if ok else None, reason)

        nursery.start_soon(replies)

        def fire() -> None:
            nonlocal seq
            seq = seq + 1 if seq < 0xFFFF else 1
            now = trio.current_time()
            failure = transport.send(seq)
            if failure is None:
                pending[seq] = now
            else:
                on_result(False, None, failure)

        try:
            next_send = trio.current_time()
            while True:
                now = trio.current_time()
                for s, sent in list(pending.items()):
                    if now >= sent + timeout:
                        del pending[s]
                        on_result(False, None, "timeout")
                if now >= next_send:
                    fire()
                    next_send = now + interval * (1 + rng.uniform(-jitter, jitter))
                wake = next_send
                if pending:
                    oldest_seq = min(pending, key=pending.get)
                    wake = min(wake, pending[oldest_seq] + timeout)
                    rtt = rtt_hint()
                    if rtt is not None and _seq_after(oldest_seq, rechecked_upto):
                        overdue_at = pending[oldest_seq] + max(RECHECK_RTTS * rtt, RECHECK_FLOOR)
                        if overdue_at < pending[oldest_seq] + timeout and overdue_at < next_send:
                            if now >= overdue_at:
                                fire()
                                rechecked_upto = seq
                            else:
                                wake = min(wake, overdue_at)
                await trio.sleep_until(wake)
        finally:
            transport.close()


def _seq_after(a: int, b: int) -> bool:
    """Sequence numbers wrap at 16 bits: is A newer than B?"""
    return a != b and ((a - b) & 0xFFFF) < 0x8000


def make_transport(kind: str, ifname: str, host, port: int | None, timeout: float) -> Transport:
    """The transport for a configured probe ("icmp" or "tcp")."""
    if kind == "icmp":
        return IcmpTransport(ifname, host)
    assert port is not None
    return TcpTransport(ifname, host, port, timeout)
