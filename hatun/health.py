"""Tunnel health: rise/fall hysteresis over probe results, RTT and loss averages. Pure (no I/O).

Probe results are fed in the order they complete, each with the time it completed; the clock is
whatever the caller uses (Trio's clock in the supervisor, plain numbers in tests).
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass


class State(str, enum.Enum):
    INIT = "init"  # no verdict yet
    UP = "up"  # in service
    DOWN = "down"  # out of service
    DRAINING = "draining"  # healthy, but taking no new flows (maintenance or removal)

    def __str__(self) -> str:
        return self.value


LOSS_WINDOW = 20  # probes over which the loss ratio is computed
RTT_ALPHA = 0.2  # weight of a new sample in the RTT moving average (like TCP's SRTT: 1/8..1/4)
# Upper bounds (seconds) of the RTT histogram's buckets; the metrics export it as it is.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class Suspect:
    """An up tunnel reached `fall` failed probes, and the caller asked to confirm such verdicts
    (`TunnelHealth.confirm_failures`): it must call `confirm_down` or `clear_suspect`."""

    tunnel: str
    reason: str
    at: float


@dataclass(frozen=True)
class Transition:
    tunnel: str
    old: State
    new: State
    reason: str
    at: float


class TunnelHealth:
    """Hysteresis for one tunnel: `rise` consecutive successes to enter service, `fall` consecutive
    failures to leave it. A path that flaps faster than that never changes the verdict."""

    def __init__(self, name: str, rise: int, fall: int, now: float) -> None:
        self.name = name
        self.rise = rise
        self.fall = fall
        self.health = State.INIT
        self.since = now
        self.successes = 0  # consecutive
        self.failures = 0  # consecutive
        self.rtt_last: float | None = None
        self.rtt_avg: float | None = None
        self._window: deque[bool] = deque(maxlen=LOSS_WINDOW)
        self.last_failure: str | None = None
        # With confirm_failures, an up tunnel that reaches `fall` failures becomes `suspect` instead
        # of down, until the caller confirms (confirm_down) or clears it (clear_suspect).
        self.confirm_failures = False
        self.suspect = False
        self.probes_ok = 0
        self.probes_failed = 0
        # RTT histogram: counts per bucket of RTT_BUCKETS (and one for +Inf), and the sum. Plain
        # integers: a probe result costs a bisect, not a metrics library call.
        self.rtt_counts = [0] * (len(RTT_BUCKETS) + 1)
        self.rtt_sum = 0.0

    @property
    def loss(self) -> float:
        """Share of the last LOSS_WINDOW probes that failed (0.0 before any probe)."""
        if not self._window:
            return 0.0
        return self._window.count(False) / len(self._window)

    def configure(self, rise: int, fall: int) -> None:
        """New thresholds (a reload); the current verdict and counters stay."""
        self.rise, self.fall = rise, fall

    def record(self, ok: bool, now: float, rtt: float | None = None,
               reason: str | None = None) -> Transition | Suspect | None:
        """Feed one probe result. Returns the transition it caused, if any (or a Suspect to confirm).

        `reason` says why a probe failed ("timeout", "connection refused", "handshake stale"...).
        """
        self._window.append(ok)
        if ok:
            self.probes_ok += 1
            self.successes += 1
            self.failures = 0
            self.suspect = False
            if rtt is not None:
                self.rtt_counts[bisect_left(RTT_BUCKETS, rtt)] += 1
                self.rtt_sum += rtt
                self.rtt_last = rtt
                self.rtt_avg = rtt if self.rtt_avg is None else (1 - RTT_ALPHA) * self.rtt_avg + RTT_ALPHA * rtt
            if self.health is not State.UP and self.successes >= self.rise:
                return self._move(State.UP, now, f"{self.successes} probes answered, rtt {_ms(self.rtt_last)}")
        else:
            self.probes_failed += 1
            self.failures += 1
            self.successes = 0
            self.last_failure = reason or "no reply"
            if self.health is not State.DOWN and self.failures >= self.fall:
                why = f"{self.failures} probes failed ({self.last_failure}), last rtt {_ms(self.rtt_last)}"
                if self.health is State.UP and self.confirm_failures:
                    if self.suspect:
                        return None  # already being confirmed
                    self.suspect = True
                    return Suspect(self.name, why, now)
                return self._move(State.DOWN, now, why)
        return None

    def confirm_down(self, now: float, note: str = "") -> Transition | None:
        """The suspect tunnel is down after all."""
        if not self.suspect:
            return None
        self.suspect = False
        why = f"{self.failures} probes failed ({self.last_failure}), last rtt {_ms(self.rtt_last)}{note}"
        return self._move(State.DOWN, now, why) if self.health is not State.DOWN else None

    def clear_suspect(self) -> None:
        """The suspect tunnel is not down (e.g. it still carries traffic): start counting afresh."""
        self.suspect = False
        self.failures = 0

    def fail_now(self, now: float, reason: str) -> Transition | None:
        """A verdict without probes: the tunnel cannot work at all (e.g. its device cannot be made)."""
        self.last_failure = reason
        self.successes = 0
        if self.health is State.DOWN:
            return None
        return self._move(State.DOWN, now, reason)

    def _move(self, new: State, now: float, reason: str) -> Transition:
        old, self.health, self.since = self.health, new, now
        return Transition(self.name, old, new, reason, now)


def display_state(health: State, drained: bool) -> State:
    """The state shown to people and metrics: a drained healthy tunnel is `draining`."""
    if drained and health is State.UP:
        return State.DRAINING
    return health


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"
