"""A tunnel device's counters as WireGuard reports them: bytes, rates, and the last handshake.

Reads are bounded (a hung device costs DEVICE_READ_TIMEOUT), shared (a read under way is joined,
not repeated) and reusable (`max_age`: a client polling status in a tight loop does not turn each
poll into a device read). Handshake ages run on Trio's monotonic clock from when a handshake was
seen, so a step of the wall clock does not age every handshake at once.
"""

from __future__ import annotations

import logging
import time

import trio

from hatun.wireguard.model import DeviceStatus, WireGuardError

log = logging.getLogger("hatun")

DEVICE_READ_TIMEOUT = 1.0  # one device's counters for status and metrics (a hung wireguard-go costs this)
RATE_SPAN = 0.5  # rates are measured over at least this many seconds
IDLE_FOR = 2.0  # a tunnel counts as idle after this long without user traffic


class DeviceCounters:
    """The counters of one device (IFNAME, read through BACKEND), as last read."""

    def __init__(self, backend, ifname: str, label: str) -> None:
        self.backend = backend
        self.ifname = ifname
        self.label = label  # for log lines: the tunnel's name
        self.status: DeviceStatus | None = None
        self.status_at: float | None = None  # when `status` was read (trio clock)
        self.rate_sample: tuple[float, int, int] | None = None  # (time, rx, tx) the rates are measured from
        self.rx_rate = self.tx_rate = 0.0  # bytes per second
        # The last handshake as WireGuard reports it (wall clock), and when it happened on Trio's clock.
        self.hs_wall: float | None = None
        self.hs_at: float | None = None
        self._reading: trio.Event | None = None  # set when the read in progress ends

    @property
    def reading(self) -> bool:
        return self._reading is not None

    def handshake_age(self) -> float | None:
        """Seconds since the last handshake, on Trio's (monotonic) clock; None: none seen."""
        return None if self.hs_at is None else max(0.0, trio.current_time() - self.hs_at)

    async def read(self, max_age: float = 0.0) -> DeviceStatus | None:
        """Fresh counters (kept as `status`); updates rates and handshake time. Never raises.
        MAX_AGE > 0: counters read that recently are fresh enough."""
        if max_age > 0 and self.status_at is not None and trio.current_time() - self.status_at < max_age:
            return self.status
        if self._reading is not None:
            await self._reading.wait()
            return self.status
        self._reading = reading = trio.Event()
        try:
            try:
                status = await self.backend.get(self.ifname, with_link=False, timeout=DEVICE_READ_TIMEOUT)
            except (WireGuardError, OSError) as e:
                # A read that failed (a busy or hung device, EMFILE) says nothing about the
                # handshake: what was last read stays, and its age keeps counting.
                log.debug("%s: %s", self.label, e)
            else:
                self.note(status)
        finally:
            self._reading = None
            reading.set()
        return self.status

    def note(self, status: DeviceStatus | None) -> None:
        """Take STATUS, just read, as the device's counters."""
        now = trio.current_time()
        previous_read = self.status_at
        self.status, self.status_at = status, now
        peer = status.peer if status is not None else None
        if peer is None or peer.last_handshake is None:
            self.hs_wall = self.hs_at = None
        elif peer.last_handshake != self.hs_wall:
            # A new handshake. Its age comes from the wall clock (that is what WireGuard reports),
            # but it happened after our previous read, so it is never older than that.
            age = max(0.0, time.time() - peer.last_handshake)
            if previous_read is not None and self.hs_wall is not None:
                age = min(age, now - previous_read)
            self.hs_wall, self.hs_at = peer.last_handshake, now - age
        if peer is None:
            self.rate_sample = None
            self.rx_rate = self.tx_rate = 0.0
        elif self.rate_sample is None or peer.rx_bytes < self.rate_sample[1] or peer.tx_bytes < self.rate_sample[2]:
            self.rate_sample = (now, peer.rx_bytes, peer.tx_bytes)  # first sample, or a new device
        elif now - self.rate_sample[0] >= RATE_SPAN:
            dt = now - self.rate_sample[0]
            self.rx_rate = (peer.rx_bytes - self.rate_sample[1]) / dt
            self.tx_rate = (peer.tx_bytes - self.rate_sample[2]) / dt
            self.rate_sample = (now, peer.rx_bytes, peer.tx_bytes)

    async def wait_idle(self, limit: float, probe_interval: float) -> None:
        """Wait until the device carries nothing but probes (sent every PROBE_INTERVAL) for IDLE_FOR
        seconds, at most LIMIT."""
        with trio.move_on_after(limit):
            quiet_since = trio.current_time()
            last = None
            while trio.current_time() - quiet_since < IDLE_FOR:
                status = await self.read()
                tx = status.peer.tx_bytes if status and status.peer else 0
                # Probes are ~ 100 bytes per interval; more than that is user traffic.
                if last is not None and tx - last > 400 * max(1.0, 0.25 / probe_interval):
                    quiet_since = trio.current_time()
                last = tx
                await trio.sleep(0.25)
