"""Tunnel health: one tunnel's verdict from its probes. Pure (no I/O).

Two judges give one verdict (in service: alive and not degraded):

- **Liveness**, fast, like BFD: `fall` probes in a row without a timely reply take an up tunnel out,
  `rise` timely replies in a row bring it back. "Timely" follows the tunnel's own round trips: the
  probe timeout is `rto()`, RFC 6298's estimator (smoothed RTT plus four times its variation) kept
  between a floor and a ceiling, so a fast path is judged in milliseconds and a slow or jittery one
  gets the patience it needs. Every reply feeds the estimator, late ones too.
- **Quality** (gray failures), slow, with hysteresis: the share of probes whose reply never came
  (a late reply is an answer; see `record_lost`) over the last QUALITY_WINDOW probes, and the smoothed
  RTT, against `Quality` limits. Past `max_loss` or `max_rtt` the tunnel is degraded; it recovers only
  after staying at or below `recover_loss` and `recover_rtt` for `recover_time`. Probes sent while the
  tunnel is dead do not count: a dead path is not a gray one.

A dead tunnel tells which it was while it is down: a dead path answers nothing, a delayed one answers
every probe late, a lossy one answers some and loses others. So from its first answer on, a dead
tunnel's probes are counted, and liveness brings it back only when it answered `rise` in a row and,
if any of those counted was missed, over at least MIN_QUALITY_PROBES of them: lost more than
`max_loss`, it comes back degraded (a path that loses half its packets dies and revives by chance,
and must not flap); less, and it is back (a clean outage with a stray loss as the path came back).
One that dies again within `recover_time` of coming back is flapping: degraded too.

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


QUALITY_WINDOW = 100  # probes over which the loss ratio is computed (fewer: 8 % loss reads as 20 % by chance)
MIN_QUALITY_PROBES = 20  # no loss verdict on fewer
FIRST_RISE = 3  # the first verdict after start needs this many answers (or `rise`, if fewer)
RTT_ALPHA, RTT_BETA, RTT_K = 1 / 8, 1 / 4, 4  # RFC 6298
RECOVER_RTT_SHARE = 0.8  # recover_rtt when not given: a band below max_rtt, so that the RTT cannot flap on it
BASELINE_BUCKET = 30.0  # the baseline RTT is the smallest of the last BASELINE_BUCKETS x 30 s
BASELINE_BUCKETS = 10
# Upper bounds (seconds) of the RTT histogram's buckets; the metrics export it as it is.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class RttLimit:
    """An RTT limit: VALUE seconds, or VALUE times the tunnel's baseline RTT when RELATIVE."""

    value: float
    relative: bool = False

    def bound(self, baseline: float | None) -> float | None:
        if not self.relative:
            return self.value
        return None if baseline is None else self.value * baseline

    def __str__(self) -> str:
        return f"{self.value:g}x" if self.relative else _ms(self.value)


@dataclass(frozen=True)
class Quality:
    """Gray-failure limits of one tunnel (None: that limit is off)."""

    max_loss: float | None = None
    recover_loss: float = 0.05
    max_rtt: RttLimit | None = None
    recover_rtt: RttLimit | None = None  # None: RECOVER_RTT_SHARE of max_rtt
    recover_time: float = 10.0
    action: str = "leave"  # "leave": degraded tunnels leave service; "reduce": their weight shrinks

    @property
    def enabled(self) -> bool:
        return self.max_loss is not None or self.max_rtt is not None

    @property
    def recover_rtt_limit(self) -> RttLimit | None:
        if self.recover_rtt is not None or self.max_rtt is None:
            return self.recover_rtt
        return RttLimit(self.max_rtt.value * RECOVER_RTT_SHARE, self.max_rtt.relative)


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
    """The verdict of one tunnel: liveness and quality (see the module docstring)."""

    def __init__(self, name: str, rise: int, fall: int, now: float, quality: Quality | None = None) -> None:
        self.name = name
        self.rise = rise
        self.fall = fall
        self.quality = quality or Quality()
        self.health = State.INIT
        self.since = now
        self.alive: bool | None = None  # liveness: None before its first verdict
        self.degraded: str | None = None  # why the quality is bad, or None
        self.successes = 0  # consecutive timely replies
        self.failures = 0  # consecutive probes without a timely reply
        self.rtt_last: float | None = None
        self.srtt: float | None = None
        self.rttvar: float | None = None
        self._baseline: deque[tuple[int, float]] = deque(maxlen=BASELINE_BUCKETS)  # (bucket, smallest RTT)
        self._fates: deque[bool] = deque(maxlen=QUALITY_WINDOW)  # answered (in time or late), or lost
        self._lost = 0  # False in _fates (counted as they come and go: a probe result costs no scan)
        self._good_since: float | None = None
        self._alive_since = now  # fates of probes sent before count only if it never died since
        self._revived = False  # alive again after a death (not the first verdict)
        self._down_answered = 0  # while dead, since its first answer: probes answered in time or late...
        self._down_missed = 0  # ... and probes missed, less the late replies since
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

    # ------------------------------------------------------------ what others read

    @property
    def rtt_avg(self) -> float | None:
        """The smoothed RTT."""
        return self.srtt

    @property
    def loss(self) -> float:
        """Share of the last QUALITY_WINDOW judged probes whose reply never came (0.0 before any)."""
        if not self._fates:
            return 0.0
        return self._lost / len(self._fates)

    @property
    def baseline(self) -> float | None:
        """The smallest smoothed RTT of the last few minutes: what this path takes when nothing queues."""
        return min((m for _, m in self._baseline), default=None)

    def rto(self, floor: float, ceiling: float) -> float:
        """How long to wait for a probe's reply: SRTT + 4 RTTVAR within [FLOOR, CEILING] (the ceiling
        before any RTT is known)."""
        if self.srtt is None or self.rttvar is None:
            return ceiling
        return min(ceiling, max(floor, self.srtt + RTT_K * self.rttvar))

    @property
    def weight_factor(self) -> float:
        """The share of its weight a tunnel keeps: 1.0, or less while degraded with action "reduce"
        (in proportion to its loss, or to how far its RTT is past the limit)."""
        if self.degraded is None or self.quality.action != "reduce":
            return 1.0
        factor = 1.0 - self.loss
        bound = self.quality.max_rtt.bound(self.baseline) if self.quality.max_rtt else None
        if bound and self.srtt and self.srtt > bound:
            factor = min(factor, bound / self.srtt)
        return max(0.05, factor)

    # ------------------------------------------------------------ settings

    def configure(self, rise: int, fall: int, quality: Quality | None, now: float) -> Transition | None:
        """New thresholds (a reload); the counters stay, the verdict is judged again under them."""
        self.rise, self.fall = rise, fall
        if quality is None or quality == self.quality:
            return None
        self.quality = quality
        if self.alive and quality.enabled:
            problem = self._quality_problem()
            if self.degraded is None:
                self.degraded = problem
            elif problem is None and self._quality_good():
                self.degraded = None
        elif not quality.enabled:
            self.degraded = None
        self._good_since = None
        return self._settle(now, "the health settings changed")

    # ------------------------------------------------------------ probe results

    def record(self, ok: bool, now: float, rtt: float | None = None,
               reason: str | None = None) -> Transition | Suspect | None:
        """Feed one probe's timely outcome: answered in time (with its RTT), or not (REASON: "no
        reply within 25 ms", "connection refused"...). Whether a missed probe is answered late or
        lost comes later (`record_late`, `record_lost`). Returns the transition it caused, if any
        (or a Suspect to confirm)."""
        if ok:
            self.probes_ok += 1
            self.successes += 1
            self.failures = 0
            self.suspect = False
            if rtt is not None:
                self._sample(rtt, now)
            self._judge_quality(True, now, now - (rtt or 0.0))
            if self.alive is False:
                self._down_answered += 1
            needed = min(self.rise, FIRST_RISE) if self.alive is None else self.rise
            if not self.alive and self.successes >= needed and self._evidence_enough():
                self._revive(now)
                return self._settle(now, f"{self.successes} probes answered, rtt {_ms(self.rtt_last)}")
            return self._settle(now, "")
        self.probes_failed += 1
        self.failures += 1
        if self.alive is False and self._down_answered:
            self._down_missed += 1
        self.successes = 0
        self.last_failure = reason or "no reply"
        if self.alive is not False and self.failures >= self.fall:
            why = f"{self.failures} probes failed ({self.last_failure}), last rtt {_ms(self.rtt_last)}"
            if self.health is State.UP and self.confirm_failures:
                if self.suspect:
                    return None  # already being confirmed
                self.suspect = True
                return Suspect(self.name, why, now)
            return self._die(now, why)
        return None

    def record_late(self, now: float, rtt: float) -> Transition | None:
        """A reply to a probe that had been missed: the path works, only slowly. It ends a silence
        (the run of failures starts afresh) and feeds the RTT estimator; it counts as answered."""
        self._sample(rtt, now)
        self.failures = 0
        if self.alive is False:
            self._down_answered += 1
            self._down_missed = max(0, self._down_missed - 1)  # counted as missed when it was
        self._judge_quality(True, now, now - rtt)
        return self._settle(now, "")

    def record_lost(self, now: float, sent: float) -> Transition | None:
        """The reply of a probe SENT then never came (nor can it any more)."""
        self._judge_quality(False, now, sent)
        return self._settle(now, "")

    def confirm_down(self, now: float, note: str = "") -> Transition | None:
        """The suspect tunnel is down after all."""
        if not self.suspect:
            return None
        self.suspect = False
        why = f"{self.failures} probes failed ({self.last_failure}), last rtt {_ms(self.rtt_last)}{note}"
        return self._die(now, why)

    def clear_suspect(self) -> None:
        """The suspect tunnel is not down (e.g. it still carries traffic): start counting afresh."""
        self.suspect = False
        self.failures = 0

    def fail_now(self, now: float, reason: str) -> Transition | None:
        """A verdict without probes: the tunnel cannot work at all (e.g. its device cannot be made)."""
        self.last_failure = reason
        self.successes = 0
        self.suspect = False
        return self._die(now, reason)

    # ------------------------------------------------------------ inside

    def _sample(self, rtt: float, now: float) -> None:
        self.rtt_counts[bisect_left(RTT_BUCKETS, rtt)] += 1
        self.rtt_sum += rtt
        self.rtt_last = rtt
        if self.srtt is None or self.rttvar is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = (1 - RTT_BETA) * self.rttvar + RTT_BETA * abs(self.srtt - rtt)
            self.srtt = (1 - RTT_ALPHA) * self.srtt + RTT_ALPHA * rtt
        # The baseline follows the smoothed RTT, not single samples: one lucky fast reply on a jittery
        # path would make any "5x" limit unreachable.
        bucket, srtt = int(now // BASELINE_BUCKET), self.srtt
        if self._baseline and self._baseline[-1][0] == bucket:
            if srtt < self._baseline[-1][1]:
                self._baseline[-1] = (bucket, srtt)
        else:
            self._baseline.append((bucket, srtt))

    def _die(self, now: float, why: str) -> Transition | None:
        if self.alive and self.quality.enabled and self.degraded is None and self._revived \
                and now - self._alive_since < self.quality.recover_time:
            # Back and dead again within the recovery time: a flapping path is a gray one.
            self.degraded = f"died again {now - self._alive_since:.1f} s after it came back: flapping"
        self.alive = False
        self._good_since = None  # a degraded tunnel must stay good while alive
        self._down_answered = self._down_missed = 0
        return self._settle(now, why)

    def _evidence_enough(self) -> bool:
        """May a dead tunnel that answered `rise` in a row come back now? Yes when nothing was missed
        since its first answer, or when MIN_QUALITY_PROBES were counted (then `_revive` judges them)."""
        if self.alive is None or self.quality.max_loss is None or not self._down_missed:
            return True
        return self._down_answered + self._down_missed >= MIN_QUALITY_PROBES

    def _revive(self, now: float) -> None:
        q = self.quality
        seen, missed = self._down_answered + self._down_missed, self._down_missed
        if q.max_loss is not None and self.alive is False and missed > q.max_loss * seen:
            if self.degraded is None:
                self.degraded = (f"lost {missed} of {seen} probes while down (max_loss {q.max_loss:.0%}):"
                                 " a lossy path, not a dead one")
            self._good_since = None
            # Its recovery needs fresh evidence: the window holds what it showed while down.
            self._fates.clear()
            keep = min(seen, QUALITY_WINDOW)
            lost = round(keep * missed / seen)
            self._fates.extend([True] * (keep - lost) + [False] * lost)
            self._lost = lost
        elif q.enabled and self.degraded is None:
            self.degraded = self._quality_problem()  # e.g. back, but slower than max_rtt allows
        self._revived = self.alive is False
        self.alive = True
        self._alive_since = now
        self._down_answered = self._down_missed = 0

    def _judge_quality(self, answered: bool, now: float, sent: float) -> None:
        """Count the fate of a probe SENT while alive, and move the degraded flag with hysteresis."""
        if self.alive is not True or sent < self._alive_since:
            return
        fates = self._fates
        if len(fates) == fates.maxlen and not fates[0]:
            self._lost -= 1
        fates.append(answered)
        if not answered:
            self._lost += 1
        q = self.quality
        if not q.enabled:
            return
        bad = self._quality_problem()
        if self.degraded is None:
            if bad:
                self.degraded, self._good_since = bad, None
            return
        if self._quality_good():
            if self._good_since is None:
                self._good_since = now
        else:
            self._good_since = None

    def _quality_problem(self) -> str | None:
        q, n = self.quality, len(self._fates)
        if q.max_loss is not None and n >= MIN_QUALITY_PROBES and self.loss > q.max_loss:
            return f"lost {self.loss:.0%} of the last {n} probes (max_loss {q.max_loss:.0%})"
        bound = q.max_rtt.bound(self.baseline) if q.max_rtt else None
        if bound is not None and self.srtt is not None and self.srtt > bound:
            limit = f"{q.max_rtt} of the baseline, {_ms(bound)}" if q.max_rtt.relative else str(q.max_rtt)
            return f"rtt {_ms(self.srtt)} (max_rtt {limit})"
        return None

    def _quality_good(self) -> bool:
        q = self.quality
        if len(self._fates) < MIN_QUALITY_PROBES:
            return False
        if q.max_loss is not None and self.loss > q.recover_loss:
            return False
        limit = q.recover_rtt_limit
        bound = limit.bound(self.baseline) if limit else None
        return bound is None or self.srtt is None or self.srtt <= bound

    def _settle(self, now: float, why: str) -> Transition | None:
        """The verdict from liveness and quality; the transition if it changed."""
        if self.degraded is not None and self._good_since is not None \
                and now - self._good_since >= self.quality.recover_time:
            self.degraded, self._good_since = None, None
            if self.alive:
                why = (f"loss {self.loss:.0%}, rtt {_ms(self.srtt)}: good for"
                       f" {self.quality.recover_time:g} s")
        if self.alive is None:
            return None
        leaves = self.degraded is not None and self.quality.action == "leave"
        new = State.UP if self.alive and not leaves else State.DOWN
        if new is self.health:
            return None
        if new is State.DOWN and self.alive:
            why = self.degraded or why
        old, self.health, self.since = self.health, new, now
        return Transition(self.name, old, new, why, now)


def display_state(health: State, drained: bool) -> State:
    """The state shown to people and metrics: a drained healthy tunnel is `draining`."""
    if drained and health is State.UP:
        return State.DRAINING
    return health


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"
