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
COUNTER_TIMEOUT = 0.5  # reading the receive counter; a device that does not answer by then gives no evidence


class FailureDetector:
    """The verdicts of one tunnel. LINK_RX reads its receive counter (None: unknown); SPAWN starts a
    short task in the tunnel's nursery; ON_TRANSITION is told every change of verdict."""

    def __init__(self, name: str, rise: int, fall: int, now: float, *,
                 link_rx: Callable[[], Awaitable[int | None]], spawn: Callable[..., None],
                 on_transition: Callable[[Transition], None], quality: Quality | None = None,
                 on_weight: Callable[[float], None] = lambda share: None) -> None:
        self.name = name
        self.weight_share = 1.0  # of its configured weight (on_degraded = "reduce"), in steps of 0.1
        self._on_weight = on_weight
        self.health = TunnelHealth(name, rise, fall, now, quality)
        self.health.confirm_failures = True
        self.congested = 0  # probe failures that traffic showed to be congestion
        self.late_replies = 0  # replies to probes that had already timed out
        self._link_rx = link_rx
        self._spawn = spawn
        self._on_transition = on_transition
        self._rx_baseline: int | None = None  # rx bytes at the first failure of the current series
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
        if not self._congestion_logged:
            self._congestion_logged = True
            log.info("%s: %d probes lost, but %s: congested, not down (logged once until it recovers)",
                     self.name, self.health.fall, why)

    async def _read_rx(self) -> int | None:
        with trio.move_on_after(COUNTER_TIMEOUT):
            return await self._link_rx()
        return None

    async def _note_rx_baseline(self, ready: trio.Event) -> None:
        try:
            value = await self._read_rx()
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
        baseline, now_rx = self._rx_baseline, await self._read_rx()
        received = now_rx - baseline if now_rx is not None and baseline is not None and now_rx >= baseline else 0
        if not self.health.suspect:
            return  # a reply came meanwhile
        note = ""
        if received > CONGESTION_RX_BYTES:
            self._awaiting_evidence = True
            try:
                with trio.move_on_after(CONGESTION_GRACE):
                    while self.health.suspect:
                        await self._evidence.wait()
            finally:
                self._awaiting_evidence = False
            if not self.health.suspect:
                return  # a reply came: congested (logged by whoever cleared it)
            note = (f"; {received} bytes arrived meanwhile but no probe came back within"
                    f" {CONGESTION_GRACE:g} s more: the way to the gateway is broken")
        self._transition(self.health.confirm_down(trio.current_time(), note))
