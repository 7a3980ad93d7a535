"""Failure detection for one tunnel: probe results and passive signals in, verdicts out.

The verdict itself is rise/fall hysteresis (`health.TunnelHealth`). Before an up tunnel is taken
down for lost probes, the congestion guard asks whether the tunnel is dead or only congested (a
saturated tunnel or CPU, where moving its flows would break them at the gateways' NAT):

- nothing arrived through it since the failure before the last (its receive counter, read from the
  kernel, did not grow by more than CONGESTION_RX_BYTES; or the device did not answer): dead (a blackholed
  path, a dead gateway, a frozen wireguard-go). Down now;
- traffic still arrives: the way in works, the way out is unproven. It stays in service for up to
  CONGESTION_GRACE seconds, and stays for good if any probe reply comes meanwhile (a new one, or a
  late reply to a probe that timed out). Without one, the way out is broken (a one-way failure): down.
- nothing arrived, but much was sent into it (more than CONGESTION_TX_BYTES), or nothing moved at all
  while its wireguard-go is runnable (a thread in state R, waiting for a CPU; a frozen one is T, one
  idle on a dead path S; one busy sending into a dead path moves bytes): its probes may wait in a
  queue behind that data, or it had no CPU to move them. Up to QUEUE_WAIT more for anything to
  arrive or any reply: then as above; else dead.
- the same grace when nothing arrived but the guard found the tunnel busy within the last
  CONGESTION_MEMORY seconds: a saturated tunnel's TCP flows back off for hundreds of milliseconds
  after losses, so nothing may arrive through it for longer than its probes wait. A dead path that
  was busy just before is found CONGESTION_GRACE later.

A stale WireGuard handshake (or none) counts as a failed probe. Gray failures (loss, latency) are
judged by `TunnelHealth` from every probe's fate; the congestion guard never keeps a degraded tunnel.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from hatun.health import Quality, State, Suspect, Transition, TunnelHealth

log = logging.getLogger("hatun")

# The counter is the device's own (decrypted packets delivered to the host: WireGuard keepalives are
# not counted), and the window between the first failure and the verdict may be only tens of ms,
# so a few hundred bytes already mean traffic.
CONGESTION_RX_BYTES = 256
CONGESTION_GRACE = 2.0
CONGESTION_MEMORY = 10.0  # found busy this recently: a silent tunnel is "busy" rather than "dead"
# Sent into the tunnel since the failure before the last, enough to fill a queue (a saturating flow:
# about 10 Mbit/s over that window of a few ms): nothing received yet may be a full queue, not a dead
# path, and QUEUE_WAIT tells which. Light traffic (the benchmark's 300 packets/s) never waits.
CONGESTION_TX_BYTES = 16384
QUEUE_WAIT = 0.25
COUNTER_TIMEOUT = 0.5  # reading the receive counter; a device that does not answer by then gives no evidence


class FailureDetector:
    """The verdicts of one tunnel. LINK_RX reads its receive counter (None: unknown); SPAWN starts a
    short task in the tunnel's nursery; ON_TRANSITION is told every change of verdict."""

    def __init__(self, name: str, rise: int, fall: int, now: float, *,
                 link_bytes: Callable[[], Awaitable[tuple[int, int] | None]], spawn: Callable[..., None],
                 on_transition: Callable[[Transition], None], quality: Quality | None = None,
                 on_weight: Callable[[float], None] = lambda share: None,
                 starved: Callable[[], bool] = lambda: False) -> None:
        self.name = name
        self.weight_share = 1.0  # of its configured weight (on_degraded = "reduce"), in steps of 0.1
        self._on_weight = on_weight
        self._starved = starved  # its user-space data plane is runnable (busy or waiting for a CPU)
        self.health = TunnelHealth(name, rise, fall, now, quality)
        self.health.confirm_failures = True
        self.congested = 0  # probe failures that traffic showed to be congestion
        self.late_replies = 0  # replies to probes that had already timed out
        self._busy_at = -CONGESTION_MEMORY  # when the guard last found it busy, not dead
        self._link_bytes = link_bytes
        self._spawn = spawn
        self._on_transition = on_transition
        self._rx_baseline: tuple[int, int] | None = None  # (rx, tx) bytes at the failure before the last
        self._rx_baseline_ready: trio.Event | None = None
        self._evidence = trio.Event()  # set on any probe reply (late ones too), while awaited
        self._awaiting_evidence = False
        self._congestion_logged = False

    def on_probe(self, ok: bool, rtt: float | None, reason: str | None) -> None:
        """A probe's result (RTT in seconds when answered, REASON when not)."""
        health = self.health
        was_suspect = health.suspect
        result = health.record(ok, trio.current_time(), rtt=rtt, reason=reason)
        if ok:
            self._note_evidence()
            if was_suspect:
                self._congested("a probe was answered again")
            if health.successes >= health.rise:
                self._congestion_logged = False
        if ok or (result is not None and not isinstance(result, Suspect)):
            self._rx_baseline, self._rx_baseline_ready = None, None
        if result is None:
            # The failure before the last that `fall` allows, of an up tunnel: note how much it has
            # received, in case its probes go on failing while traffic still flows in (congestion,
            # not a dead path). Not at every first miss: that is mostly noise, and a read costs.
            if not ok and health.failures == max(1, health.fall - 1) and health.health is State.UP:
                self._rx_baseline_ready = trio.Event()
                self._spawn("congestion check", self._note_rx_baseline, self._rx_baseline_ready)
        elif isinstance(result, Suspect):
            self._spawn("congestion check", self._confirm_down)
        if not isinstance(result, Suspect):
            self._transition(result)

    def on_late_reply(self, rtt: float) -> None:
        """A reply to a probe that had been missed: the path works both ways, only slowly."""
        self.late_replies += 1
        self._note_evidence()
        if self.health.suspect:
            self.health.clear_suspect()
            self._congested(f"a late reply came after {rtt * 1000:.0f} ms")
        self._transition(self.health.record_late(trio.current_time(), rtt))

    def on_lost(self, sent: float) -> None:
        """The reply of a probe SENT then never came."""
        self._transition(self.health.record_lost(trio.current_time(), sent))

    def check_handshake(self, age: float | None, alive_for: float, limit: float) -> None:
        """A handshake AGE seconds old (None: none in ALIVE_FOR seconds) beyond LIMIT is a failed probe."""
        if age is None and alive_for > limit:
            self.on_probe(False, None, f"no handshake in {alive_for:.0f} s")
        elif age is not None and age > limit:
            self.on_probe(False, None, f"handshake stale ({age:.0f} s old)")

    def fail_now(self, reason: str) -> None:
        """Down at once (the tunnel's device or tasks failed)."""
        self._transition(self.health.fail_now(trio.current_time(), reason))

    def configure(self, rise: int, fall: int, quality: Quality) -> None:
        """New settings (a reload): the verdict is judged again under them."""
        self._transition(self.health.configure(rise, fall, quality, trio.current_time()))

    def _transition(self, transition: Transition | None) -> None:
        if transition is not None:
            self._on_transition(transition)
        # The weight follows the loss in steps of a tenth, and moves only by two steps or more (or
        # back to whole): a lossy tunnel's estimate wanders, its route should not.
        share = round(self.health.weight_factor, 1)
        if share != self.weight_share and (share == 1.0 or abs(share - self.weight_share) >= 0.2 - 1e-9):
            self.weight_share = share
            self._on_weight(share)

    def _note_evidence(self) -> None:
        if self._awaiting_evidence:  # an Event per probe reply would cost more than the rest of it
            self._evidence.set()
            self._evidence = trio.Event()

    def _congested(self, why: str) -> None:
        self.congested += 1
        self._busy_at = trio.current_time()
        if not self._congestion_logged:
            self._congestion_logged = True
            log.info("%s: %d probes lost, but %s: congested, not down (logged once until it recovers)",
                     self.name, self.health.fall, why)

    async def _read_bytes(self) -> tuple[int, int] | None:
        """(received, sent) bytes of the tunnel's device, or None (unknown, or no answer in time)."""
        with trio.move_on_after(COUNTER_TIMEOUT):
            return await self._link_bytes()
        return None

    async def _note_rx_baseline(self, ready: trio.Event) -> None:
        try:
            value = await self._read_bytes()
            if self._rx_baseline_ready is ready:
                self._rx_baseline = value
        finally:
            ready.set()

    async def _confirm_down(self) -> None:
        """`fall` probes failed on an up tunnel: dead, or only congested? (See the module docstring.)"""
        ready = self._rx_baseline_ready
        if ready is not None:
            with trio.move_on_after(COUNTER_TIMEOUT):
                await ready.wait()
        started, baseline, now = trio.current_time(), self._rx_baseline, await self._read_bytes()
        received, sent = _grown(baseline, now)
        log.debug("%s: %d probes failed; since the failure before: %s received, %s sent (counters %s -> %s)",
                  self.name, self.health.fall, received, sent, baseline, now)
        if not self.health.suspect:
            return  # a reply came meanwhile
        if received <= CONGESTION_RX_BYTES and (sent > CONGESTION_TX_BYTES or not sent and self._starved()):
            # Much went in and nothing came out, or its wireguard-go waits for a CPU: its own data may
            # hold the probes and the replies in a queue, or it had no time to move them. Dead, or only
            # full? A little longer tells (or a reply comes).
            self._awaiting_evidence = True
            try:
                with trio.move_on_after(QUEUE_WAIT):
                    await self._evidence.wait()
            finally:
                self._awaiting_evidence = False
            if not self.health.suspect:
                return
            received = _grown(baseline, await self._read_bytes())[0]
        note = ""
        busy = started - self._busy_at < CONGESTION_MEMORY
        if received > CONGESTION_RX_BYTES or busy:
            self._awaiting_evidence = True
            try:
                with trio.move_on_after(CONGESTION_GRACE):
                    while self.health.suspect:
                        await self._evidence.wait()
            finally:
                self._awaiting_evidence = False
            if not self.health.suspect:
                return  # a reply came: congested (logged by whoever cleared it)
            why = (f"{received} bytes arrived meanwhile" if received > CONGESTION_RX_BYTES
                   else "it was busy just before")
            note = (f"; {why} but no probe came back within {CONGESTION_GRACE:g} s more: the tunnel is"
                    " down, not busy")
        self._transition(self.health.confirm_down(trio.current_time(), note))


def _grown(before: tuple[int, int] | None, after: tuple[int, int] | None) -> tuple[int, int]:
    """Bytes (received, sent) between two readings of a device's counters (0 when unknown, or when
    the counters went back: a new device)."""
    if before is None or after is None:
        return 0, 0
    return tuple(max(0, a - b) if a >= b else 0 for a, b in zip(after, before))  # type: ignore[return-value]
