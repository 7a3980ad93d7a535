"""A netlink socket driven by Trio, optionally living in another network namespace.

pyroute2 only encodes and decodes the messages here: its own sockets block the Trio scheduler and
its async API is asyncio-only. The socket is a plain non-blocking AF_NETLINK socket.

One `NetlinkSocket` may be shared by many tasks. Replies are matched to requests by sequence
number; whichever task holds the read lock reads the next datagram and files each message under
its request (or in the event queue), so no reply is lost to the wrong reader and no task starves.
Multicast notifications are told apart from replies by the sender address (a non-zero group).

Two kernel limits shape the rest:
- A netlink socket runs at most one dump at a time (a second one gets EBUSY), and a dump that was
  abandoned halfway (cancelled, timed out) keeps that slot until its remaining parts are read. Dumps
  are therefore serialised, and the next dump first reads the abandoned one to its end.
- Replies that do not fit the receive buffer are dropped by the kernel (ENOBUFS), so the number of
  requests in flight on one socket is bounded.

Notifications come from the whole namespace, including floods that are none of the caller's business
(a routing daemon or Docker changing 100k routes). They must not starve the Trio scheduler:
- `event_filter` looks at each notification's fixed fields before it is decoded (decoding costs
  ~100 us, the look ~1 us); what it rejects is never decoded.
- One wakeup reads at most `_BATCH` datagrams (or `_BATCH_SECONDS` of work), then lets other tasks run.
- After an overflow the queue is emptied without decoding (the caller re-reads the state anyway).
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from pyroute2.netlink import (
    GENL_ID_CTRL,
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_EXT_ACK,
    NETLINK_GENERIC,
    NETLINK_GET_STRICT_CHK,
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
    NLMSG_OVERRUN,
    SOL_NETLINK,
    ctrlmsg,
    nlmsg,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from hatun import bpf
from hatun.netlink import messages
from hatun.netns import NetnsNotFound, run_in_netns

log = logging.getLogger("hatun.netlink")

NETLINK_CAP_ACK = 10
SO_RCVBUFFORCE = 33

_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr {u32 len; u16 type; u16 flags; u32 seq; u32 pid}
_RECV_SIZE = 1 << 16  # the kernel caps dump datagrams at 32 KiB; single messages are far smaller
_DUMP_QUEUE_WAIT = 60.0  # seconds a dump may wait for this socket's other dumps
_DUMP_ATTEMPTS = 3
# Replies to this many requests fit the default receive buffer (~208 KiB) even as 8 KiB link dumps.
_MAX_IN_FLIGHT = 16
_DRAIN_LIMIT = 1_000_000  # datagrams discarded after an overflow before it is reported (a bound, not a goal)
_BATCH = 256  # datagrams read per wakeup, at most, before other tasks get their turn
_BATCH_SECONDS = 0.002  # ... or this much work, whichever comes first
_RECEIVE_ERROR_PAUSE = 0.5  # seconds before an unexpected receive error is reported as lost events
_EMPTY, _OVERFLOW = object(), object()

# (data, offset, length, type) of one notification -> keep it? Called before anything is decoded.
NotificationFilter = Callable[[bytes, int, int, int], bool]


class NetlinkError(OSError):
    """The kernel refused a request.

    Attributes: `errno`, `strerror` (as for OSError), `message`: the kernel's extended-ack text or
    None, `what`: the operation, as the caller named it. `str()` reads
    "add nexthop 518200004: Network is down (Nexthop device is not up)".
    """

    def __init__(self, errno: int, message: str | None = None, what: str = "") -> None:
        super().__init__(errno, os.strerror(errno))
        self.message = message or None
        self.what = what

    def __str__(self) -> str:
        text = self.strerror + (f" ({self.message})" if self.message else "")
        return f"{self.what}: {text}" if self.what else text


class NetlinkTimeout(TimeoutError):
    """The kernel did not answer (completely) within the timeout."""


class EventsOverflow(Exception):
    """Notifications were lost (the socket's receive buffer overflowed): re-read the state you track."""


def _default_classes(protocol: int) -> dict[int, type]:
    if protocol == NETLINK_ROUTE:
        classes = dict(MarshalRtnl.msg_map)
        for t in (24, 25, 26):  # RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE: with RTA_NH_ID
            classes[t] = messages.rtmsg
        for t in (messages.RTM_NEWNEXTHOP, messages.RTM_DELNEXTHOP, messages.RTM_GETNEXTHOP):
            classes[t] = messages.nhmsg
        return classes
    if protocol == NETLINK_GENERIC:
        return {GENL_ID_CTRL: ctrlmsg}
    return {}


def _new_socket(protocol: int, netns: str | None) -> socket.socket:
    """Create the netlink socket, inside NETNS if given (it belongs to that namespace for life)."""
    kind = socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    try:
        return run_in_netns(netns, lambda: socket.socket(socket.AF_NETLINK, kind, protocol))
    except TimeoutError as e:
        raise NetlinkTimeout(str(e)) from None
    except OSError as e:
        if isinstance(e, NetnsNotFound):
            raise
        # EMFILE, ENFILE, ENOBUFS, ENOMEM: an error the callers handle (they catch NetlinkError).
        raise NetlinkError(e.errno or errno_mod.EIO, None, "open netlink socket") from None


@dataclass
class _Pending:
    seq: int
    flags: int
    dump: bool
    replies: list = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    interrupted: bool = False  # NLM_F_DUMP_INTR: the dump raced a change
    abandoned: bool = False  # its waiter gave up; read to the end only to free the kernel's dump slot


class NetlinkSocket:
    """A netlink socket for Trio. Create it with `open_netlink`.

    `message_classes` maps message types to pyroute2 classes used to decode replies and events; it
    may be extended (e.g. with a generic netlink family id once resolved). Unknown types decode as a
    bare `nlmsg`. `event_filter` (None: keep all) sees every notification before it is decoded and
    drops those it returns False for; `events_filtered` and `events_discarded` (undecoded after
    an overflow) count what went unseen.
    """

    def __init__(self, sock: socket.socket, protocol: int, netns: str | None, groups: tuple[int, ...]) -> None:
        self._sock = sock
        self.protocol = protocol
        self.netns = netns
        self.groups = groups
        self.portid: int = sock.getsockname()[0]
        self.message_classes: dict[int, type] = _default_classes(protocol)
        self._seq = 0
        self._pending: dict[int, _Pending] = {}
        self._events: deque = deque()
        self._overflowed = False
        self._read_lock = trio.Lock()
        self._dump_lock = trio.Lock()
        self._in_flight = trio.Semaphore(_MAX_IN_FLIGHT)
        self._abandoned_dump: _Pending | None = None
        self._closed = False
        self.event_filter: NotificationFilter | None = None
        self.events_filtered = 0
        self.events_discarded = 0

    # -- public API -------------------------------------------------------------------------------

    async def request(self, msg: nlmsg, msg_type: int, flags: int = NLM_F_REQUEST | NLM_F_ACK, *,
                      timeout: float = 5.0, what: str | None = None) -> list:
        """Send MSG (a pyroute2 message, consumed) as MSG_TYPE and return the decoded replies.

        With NLM_F_ACK (the default) the call returns once the kernel acknowledged; without it, a
        get returns with its one reply. Dumps go through `dump`.

        Raises NetlinkError (kernel error, with its ext-ack text), NetlinkTimeout (no complete
        answer within TIMEOUT seconds), trio.ClosedResourceError (socket closed).
        """
        what = what or f"netlink request type {msg_type}"
        data = self._encode(msg, msg_type, flags)
        with trio.move_on_after(timeout) as scope:
            try:
                pending = await self._exchange(data, flags, dump=False)
            except NetlinkError as e:  # the socket itself failed (send ENOBUFS / ENOMEM, ...)
                raise _with_what(e, what) from None
        if scope.cancelled_caught:
            raise NetlinkTimeout(f"{what}: no answer from the kernel within {timeout:g} s")
        if pending.error is not None:
            raise _with_what(pending.error, what)
        return pending.replies

    async def dump(self, msg: nlmsg, msg_type: int, *, timeout: float = 5.0, what: str | None = None) -> list:
        """Dump (NLM_F_DUMP) and return all decoded messages.

        A dump that raced a change (NLM_F_DUMP_INTR) is repeated, up to 3 times in all. Raises as
        `request`.
        """
        what = what or f"netlink dump type {msg_type}"
        flags = NLM_F_REQUEST | NLM_F_DUMP
        data = self._encode(msg, msg_type, flags)
        # One dump at a time per socket: waiting for the others (many tunnels starting at once) is
        # bounded separately, so TIMEOUT measures the kernel's answer only.
        with trio.move_on_after(max(_DUMP_QUEUE_WAIT, 10 * timeout)) as queued:
            await self._dump_lock.acquire()
        if queued.cancelled_caught:
            raise NetlinkTimeout(f"{what}: other dumps on this socket took too long")
        try:
            with trio.move_on_after(timeout) as scope:
                if self._abandoned_dump is not None:
                    await self._wait_for(self._abandoned_dump)
                    self._abandoned_dump = None
                for attempt in range(1, _DUMP_ATTEMPTS + 1):
                    pending = await self._exchange(data, flags, dump=True)
                    if pending.error is not None or not pending.interrupted:
                        break
                    log.debug("%s: dump interrupted by a concurrent change (attempt %d)", what, attempt)
        except NetlinkError as e:
            raise _with_what(e, what) from None
        finally:
            self._dump_lock.release()
        if scope.cancelled_caught:
            raise NetlinkTimeout(f"{what}: no complete answer from the kernel within {timeout:g} s")
        if pending.error is not None:
            raise _with_what(pending.error, what)
        if pending.interrupted:
            log.warning("%s: still inconsistent after %d attempts, using the last one", what, _DUMP_ATTEMPTS)
        return pending.replies

    def join_group(self, group: int) -> None:
        """Subscribe to multicast GROUP (a number such as RTNLGRP_LINK, not a bit mask).
        Raises NetlinkError (e.g. ENOMEM, or EINVAL for a group the kernel lacks)."""
        _setsockopt(self._sock, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group, f"join netlink group {group}")
        self.groups = tuple(sorted({*self.groups, group}))

    async def receive_events(self, *, timeout: float | None = None) -> list:
        """Wait for notifications of the joined groups and return the decoded batch (at least one).

        Raises EventsOverflow when notifications were lost since the last call (the socket stays
        usable: re-read the state, then go on receiving), also after an unexpected receive error
        (reported after a pause, so that a persistent one cannot spin); NetlinkTimeout after
        TIMEOUT seconds without an event (None: wait until cancelled); trio.ClosedResourceError
        once closed.
        """
        with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            while not self._events and not self._overflowed:
                failed = None
                async with self._read_lock:
                    if not self._events and not self._overflowed:
                        try:
                            await self._read_once()
                        except NetlinkError as e:
                            failed = e
                if failed is not None:
                    log.warning("netlink socket %d: %s; treating it as lost events", self.portid, failed)
                    self._overflowed = True
                    await trio.sleep(_RECEIVE_ERROR_PAUSE)
        if scope.cancelled_caught:
            raise NetlinkTimeout(f"no netlink event within {timeout:g} s")
        if self._overflowed:
            self._overflowed = False
            self._events.clear()  # the caller re-reads everything; older events are moot
            raise EventsOverflow(f"netlink receive buffer overflowed (groups {list(self.groups)}): events lost")
        batch = list(self._events)
        self._events.clear()
        return batch

    def events(self) -> AsyncIterator[list]:
        """`async for batch in sock.events()`: batches as from `receive_events` (which see)."""
        return _EventBatches(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the socket; tasks waiting on it get trio.ClosedResourceError. Idempotent."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    # -- internals --------------------------------------------------------------------------------

    def _encode(self, msg: nlmsg, msg_type: int, flags: int) -> bytearray:
        header = msg["header"]
        header["type"] = msg_type
        header["flags"] = flags
        header["sequence_number"] = 0  # set per send
        header["pid"] = 0
        msg.encode()
        return bytearray(msg.data)

    def _next_seq(self) -> int:
        # Wrap around, skipping 0 (notifications not caused by a request carry 0) and live numbers.
        while True:
            self._seq = self._seq % 0xFFFFFFFF + 1
            if self._seq not in self._pending:
                return self._seq

    async def _exchange(self, data: bytearray, flags: int, *, dump: bool) -> _Pending:
        if self._closed:
            raise trio.ClosedResourceError("netlink socket is closed")
        async with self._in_flight:
            seq = self._next_seq()
            struct.pack_into("=I", data, 8, seq)
            pending = self._pending[seq] = _Pending(seq, flags, dump)
            sent = False
            try:
                await self._send(data)
                sent = True
                await self._wait_for(pending)
                return pending
            finally:
                if dump and sent and not pending.done:
                    # Keep it filed so that its DONE is recognised; the next dump drains it.
                    pending.abandoned, pending.replies = True, []
                    self._abandoned_dump = pending
                else:
                    # Late replies to this seq are then dropped, never misfiled.
                    del self._pending[seq]

    async def _wait_for(self, pending: _Pending) -> None:
        try:
            while not pending.done:
                async with self._read_lock:
                    if not pending.done:
                        await self._read_once()
        finally:
            if pending.done and pending.abandoned:
                del self._pending[pending.seq]

    async def _send(self, data: bytearray) -> None:
        while True:
            try:
                self._sock.send(data)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
            except OSError as e:
                # ENOBUFS / ENOMEM (the kernel is short of memory), ECONNREFUSED, ...: an error of
                # this request that the callers handle, never a bare OSError past their handlers.
                raise NetlinkError(e.errno or errno_mod.EIO, "sending the request failed") from None

    async def _read_once(self) -> None:
        """Wait for datagrams, read a bounded batch and file their messages. Call with the read lock held.

        Raises NetlinkError for a receive error other than an overflow (which is noted for
        `receive_events`), trio.ClosedResourceError once closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("netlink socket is closed")
        await trio.lowlevel.wait_readable(self._sock)
        # The rest waits for the next wakeup: between two, every other task gets its turn.
        deadline = time.perf_counter() + _BATCH_SECONDS
        for _ in range(_BATCH):
            got = self._receive_one()
            if got is _OVERFLOW:
                await self._drain()
                return
            if got is _EMPTY or time.perf_counter() >= deadline:
                return

    async def _drain(self) -> None:
        """Empty the queue after an overflow, decoding nothing of what is discarded.

        The kernel reports an overflow once, then drops silently while the queue stays non-empty:
        emptying it makes the next loss visible again. Notifications read here predate the state
        the caller re-reads, so they are discarded unseen; replies to requests (unicast) are still
        filed. Yields between batches: a queue of 100k notifications must not freeze the rest.
        """
        log.debug("netlink socket %d overflowed; draining it", self.portid)
        buf = bytearray(_RECV_SIZE)
        view = memoryview(buf)
        for n in range(1, _DRAIN_LIMIT + 1):
            try:
                size, _, msg_flags, (sender, group_mask) = self._sock.recvmsg_into([buf])
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno_mod.ENOBUFS:
                    continue  # lost more while draining: already reported
                raise NetlinkError(exc.errno or errno_mod.EIO, "receive failed") from None
            if group_mask != 0:
                self.events_discarded += 1
            elif sender == 0 and not msg_flags & socket.MSG_TRUNC:
                self._dispatch(bytes(view[:size]), is_event=False)
            if n % _BATCH == 0:
                await trio.lowlevel.checkpoint()
                if self._closed:
                    raise trio.ClosedResourceError("netlink socket is closed")
        log.warning("netlink socket %d: still overflowing after discarding %d datagrams", self.portid, _DRAIN_LIMIT)

    def _receive_one(self):
        try:
            data, _, msg_flags, (sender, group_mask) = self._sock.recvmsg(_RECV_SIZE)
        except BlockingIOError:
            return _EMPTY
        except OSError as exc:
            if exc.errno != errno_mod.ENOBUFS:
                self._overflowed |= bool(self.groups)  # a notification may have gone with it
                raise NetlinkError(exc.errno or errno_mod.EIO, "receive failed") from None
            # Notifications were dropped (on a shared socket maybe replies too: those requests
            # then time out).
            self._overflowed = True
            return _OVERFLOW
        if sender != 0:
            log.debug("dropping a netlink datagram from portid %d (not the kernel)", sender)
        elif msg_flags & socket.MSG_TRUNC:
            log.error("netlink datagram larger than %d bytes truncated: treating as lost events", _RECV_SIZE)
            self._overflowed = True
        else:
            self._dispatch(data, is_event=group_mask != 0)
        return None

    def _dispatch(self, data: bytes, *, is_event: bool) -> None:
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, msg_type, flags, seq, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size or offset + length > len(data):
                log.warning("malformed netlink message (length %d) dropped", length)
                return
            if is_event:
                keep = self.event_filter
                if keep is not None and not keep(data, offset, length, msg_type):
                    self.events_filtered += 1
                elif self.groups:
                    msg = self._decode(data, offset, msg_type)
                    if msg is not None:
                        self._events.append(msg)
            else:
                self._file_reply(data, offset, length, msg_type, flags, seq)
            offset += (length + 3) & ~3

    def _file_reply(self, data: bytes, offset: int, length: int, msg_type: int, flags: int, seq: int) -> None:
        pending = self._pending.get(seq)
        if pending is None or pending.done:
            log.debug("dropping a netlink reply for seq %d (type %d): nobody waits for it", seq, msg_type)
            return
        if msg_type == NLMSG_ERROR:
            err = messages.nlmsgerr(data, offset=offset)
            err.decode()
            if err["error"]:
                pending.error = NetlinkError(-err["error"], err.get_attr("NLMSGERR_ATTR_MSG"))
            pending.done = True
        elif msg_type == NLMSG_DONE:
            if length >= _HEADER.size + 4:
                done = messages.nlmsgdone(data, offset=offset)
                done.decode()
                if done["error"] < 0:
                    pending.error = NetlinkError(-done["error"], done.get_attr("NLMSGERR_ATTR_MSG"))
            pending.done = True
        elif msg_type == NLMSG_OVERRUN:
            pending.error, pending.done = NetlinkError(errno_mod.EOVERFLOW, "netlink overrun"), True
        elif msg_type != NLMSG_NOOP:
            msg = None if pending.abandoned else self._decode(data, offset, msg_type)
            if msg is not None:
                pending.replies.append(msg)
            if flags & NLM_F_DUMP_INTR:
                pending.interrupted = True
            # A plain get (no ACK asked, not a dump) ends with its single, non-multipart reply.
            if not flags & NLM_F_MULTI and not pending.dump and not pending.flags & NLM_F_ACK:
                pending.done = True

    def _decode(self, data: bytes, offset: int, msg_type: int):
        cls = self.message_classes.get(msg_type, nlmsg)
        msg = cls(data, offset=offset)
        try:
            msg.decode()
        except Exception:  # pyroute2 raises assorted types on odd attributes
            log.warning("cannot decode netlink message type %d; dropped", msg_type, exc_info=True)
            return None
        return msg


def _setsockopt(sock: socket.socket, level: int, option: int, value, what: str) -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as e:
        raise NetlinkError(e.errno or errno_mod.EIO, None, what) from None


def _with_what(error: BaseException, what: str) -> BaseException:
    if isinstance(error, NetlinkError):
        return NetlinkError(error.errno, error.message, what)
    return error


class _EventBatches:
    """Async iterator over `receive_events` batches; ends when the socket is closed."""

    def __init__(self, sock: NetlinkSocket) -> None:
        self._sock = sock

    def __aiter__(self) -> _EventBatches:
        return self

    async def __anext__(self) -> list:
        if self._sock.closed:
            raise StopAsyncIteration
        try:
            return await self._sock.receive_events()
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None


@asynccontextmanager
async def open_netlink(protocol: int = NETLINK_ROUTE, *, netns: str | None = None, groups: Iterable[int] = (),
                       rcvbuf: int | None = None, event_filter: NotificationFilter | None = None,
                       kernel_filter: Callable[[int], bytes] | None = None) -> AsyncIterator[NetlinkSocket]:
    """Open a netlink socket for Trio and close it on exit.

    Args:
        protocol: NETLINK_ROUTE, NETLINK_GENERIC, ...
        netns: a name under /run/netns (or a path such as /proc/PID/ns/net): the socket lives in
            that namespace. The namespace must exist; this never creates one.
        groups: multicast group NUMBERS to join (e.g. RTNLGRP_IPV4_ROUTE), for `receive_events`.
        rcvbuf: receive buffer size in bytes (forced past rmem_max when privileged). Event sockets
            want a large one; small ones overflow under bursts.
        event_filter: called as (data, offset, length, type) for each notification before it is
            decoded; those it returns False for are dropped undecoded (see `NetlinkSocket`).
        kernel_filter: called with the socket's portid, returns a classic BPF program (see
            `hatun.bpf`) that the kernel runs on every datagram, dropping early what the caller
            would drop anyway. If the kernel refuses it, `event_filter` alone does the work.

    Raises NetnsNotFound, NetlinkError (the socket cannot be made: EMFILE, ENOBUFS, ...).
    """
    sock = _new_socket(protocol, netns)
    try:
        _setsockopt(sock, SOL_NETLINK, NETLINK_EXT_ACK, 1, "enable extended acks")  # errors with the kernel's reason
        _setsockopt(sock, SOL_NETLINK, NETLINK_CAP_ACK, 1, "cap acks")  # ...without echoing the whole request
        if protocol == NETLINK_ROUTE:
            # Dump requests are validated and their filters (table, protocol, ifindex) honoured.
            _setsockopt(sock, SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1, "enable strict checking")
        if rcvbuf is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                _setsockopt(sock, socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf, "set the receive buffer")
            except OSError as e:
                raise NetlinkError(e.errno or errno_mod.EIO, None, "set the receive buffer") from None
        try:
            sock.bind((0, 0))
            # Only the kernel (portid 0) may then unicast to this socket; other processes cannot inject.
            sock.connect((0, 0))
        except OSError as e:
            raise NetlinkError(e.errno or errno_mod.EIO, None, "bind netlink socket") from None
        nl = NetlinkSocket(sock, protocol, netns, ())
        nl.event_filter = event_filter
        if kernel_filter is not None:
            try:
                bpf.attach(sock, kernel_filter(nl.portid))
            except OSError as e:
                log.warning("netlink socket filter refused (%s): filtering notifications in Python only", e)
        for group in groups:
            nl.join_group(group)
    except BaseException:
        sock.close()
        raise
    try:
        yield nl
    finally:
        nl.close()
