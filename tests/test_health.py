"""The verdict of one tunnel (hatun.health): adaptive timeouts, liveness, gray failures. Pure: the
clock is plain numbers."""

from __future__ import annotations

import random

import pytest

from hatun.health import Quality, RttLimit, State, TunnelHealth

U, D = State.UP, State.DOWN
GRAY = Quality(max_loss=0.2, recover_loss=0.05, recover_time=5.0)


class Driver:
    """Feeds a TunnelHealth probe fates on a 10 ms clock and records its transitions."""

    def __init__(self, rise=10, fall=3, quality=GRAY, rtt=0.001):
        self.h = TunnelHealth("gw", rise, fall, 0.0, quality)
        self.t = 0.0
        self.rtt = rtt
        self.transitions = []

    def _note(self, tr):
        if tr is not None:
            self.transitions.append(tr)

    def answered(self, n=1):
        for _ in range(n):
            self.t += 0.01
            self._note(self.h.record(True, self.t, rtt=self.rtt))

    def lost(self, n=1):
        """Missed, and its reply never came."""
        for _ in range(n):
            self.t += 0.01
            self._note(self.h.record(False, self.t, reason="no reply"))
            self._note(self.h.record_lost(self.t, self.t - 0.005))

    def late(self, n=1, rtt=0.08):
        """Missed, then answered late."""
        for _ in range(n):
            self.t += 0.01
            self._note(self.h.record(False, self.t, reason="no reply"))
            self._note(self.h.record_late(self.t, rtt))

    def moves(self):
        return [tr.new.value for tr in self.transitions]


def test_rto_follows_the_rtt_within_floor_and_ceiling():
    h = TunnelHealth("gw", 3, 3, 0.0)
    assert h.rto(0.01, 0.5) == 0.5  # nothing known yet: the ceiling
    for i in range(50):
        h.record(True, i * 0.1, rtt=0.002)
    assert h.rto(0.01, 0.5) == 0.01  # a steady 2 ms path: the floor
    assert h.rto(0.001, 0.5) == pytest.approx(0.002, abs=0.0005)
    rng = random.Random(1)
    for i in range(200):
        h.record(True, 5 + i * 0.1, rtt=0.05 + rng.uniform(-0.02, 0.02))
    assert 0.06 < h.rto(0.01, 0.5) < 0.2  # jitter buys patience
    assert h.rto(0.01, 0.05) == 0.05


def test_a_clean_outage_fails_back_after_rise_answers():
    """A dead path answers nothing: once it answers `rise` probes in a row it is back, not degraded."""
    d = Driver()
    d.answered(10)
    d.lost(40)
    d.answered(10)
    assert d.moves() == ["up", "down", "up"]
    assert d.h.degraded is None


def test_a_delay_step_is_not_a_gray_failure():
    """A path that suddenly takes 80 ms answers every probe late: liveness may drop it, but it comes
    back after `rise` answers, not after the recovery time."""
    d = Driver()
    d.answered(10)
    d.late(5)
    d.answered(10)
    assert d.h.degraded is None and d.h.health is U


def test_random_loss_leaves_once_and_comes_back_once():
    """Half the probes lost for a long while: out once, back once after it stayed good."""
    rng = random.Random(7)
    for seed in range(20):
        rng.seed(seed)
        d = Driver()
        d.answered(30)
        for _ in range(3000):  # 30 s of 51 % loss
            if rng.random() < 0.51:
                d.lost()
            else:
                d.answered()
        assert d.moves() == ["up", "down"], seed
        d.answered(1000)
        assert d.moves() == ["up", "down", "up"], seed


@pytest.mark.parametrize("loss", [0.3, 0.5, 0.8])
def test_loss_past_max_loss_degrades_with_hysteresis(loss):
    rng = random.Random(3)
    d = Driver(fall=1000)  # liveness never fires: only the loss ratio judges
    d.answered(60)
    for _ in range(400):
        d.lost() if rng.random() < loss else d.answered()
    assert d.moves() == ["up", "down"]
    assert "max_loss 20%" in d.transitions[-1].reason
    # Loss down to 10 %: still above recover_loss, stays out.
    for i in range(600):
        d.lost() if i % 10 == 0 else d.answered()
    assert d.moves() == ["up", "down"]
    d.answered(600)
    assert d.moves() == ["up", "down", "up"]
    assert "good for 5 s" in d.transitions[-1].reason


def test_late_replies_are_answers_not_losses():
    d = Driver(fall=1000)
    d.answered(30)
    d.late(100)
    assert d.h.loss == 0 and d.moves() == ["up"]


def test_rtt_limits_absolute_and_relative():
    for limit, recover in ((RttLimit(0.05), RttLimit(0.02)), (RttLimit(10.0, relative=True), None)):
        d = Driver(quality=Quality(max_rtt=limit, recover_rtt=recover, recover_time=1.0), fall=1000)
        d.answered(50)  # baseline 1 ms
        d.rtt = 0.08
        d.answered(100)
        assert d.moves() == ["up", "down"] and "max_rtt" in d.transitions[-1].reason
        d.rtt = 0.001
        d.answered(300)
        assert d.moves() == ["up", "down", "up"]


def test_reduce_keeps_the_tunnel_with_a_smaller_weight():
    rng = random.Random(5)
    d = Driver(quality=Quality(max_loss=0.2, action="reduce"), fall=1000)
    d.answered(60)
    for _ in range(300):
        d.lost() if rng.random() < 0.4 else d.answered()
    assert d.moves() == ["up"] and d.h.degraded is not None
    assert 0.4 < d.h.weight_factor < 0.8
    d.answered(2000)
    assert d.h.degraded is None and d.h.weight_factor == 1.0


def test_without_limits_nothing_is_degraded():
    rng = random.Random(5)
    d = Driver(quality=Quality(), fall=1000)
    d.answered(60)
    for _ in range(300):
        d.lost() if rng.random() < 0.6 else d.answered()
    assert d.moves() == ["up"] and d.h.weight_factor == 1.0


def test_the_first_verdict_needs_few_answers():
    d = Driver(rise=10)
    d.answered(3)
    assert d.moves() == ["up"]


def test_a_tunnel_that_comes_back_too_slow_stays_out():
    """Liveness brings it back, but its RTT is past max_rtt: it stays out, no flap."""
    d = Driver(quality=Quality(max_rtt=RttLimit(0.02), recover_time=1.0))
    d.answered(30)
    d.lost(3)
    d.rtt = 0.08
    d.answered(50)
    assert d.moves() == ["up", "down"]


@pytest.mark.parametrize("loss", [0.05, 0.08, 0.1])
def test_loss_below_max_loss_keeps_the_tunnel_in_service_nearly_always(loss):
    """A death now and then by chance (3 misses in a row) is not a gray failure: the tunnel comes back
    after `rise` answers, and spends nearly all its time in service."""
    rng = random.Random(11)
    d = Driver()
    d.answered(30)
    out_since, out_time = None, 0.0
    for _ in range(60000):  # 10 minutes at 10 ms
        d.lost() if rng.random() < loss else d.answered()
        if d.h.health is D and out_since is None:
            out_since = d.t
        elif d.h.health is U and out_since is not None:
            out_time, out_since = out_time + d.t - out_since, None
    assert out_time < 0.05 * d.t, (loss, out_time, d.moves().count("down"))


def test_a_stray_loss_as_a_clean_outage_ends_is_not_gray():
    d = Driver()
    d.answered(30)
    d.lost(50)  # dead
    d.answered(4)
    d.lost(1)  # one loss while it comes back
    d.answered(20)
    assert d.moves() == ["up", "down", "up"] and d.h.degraded is None


def test_a_relative_rtt_limit_is_not_fooled_by_jitter():
    """The baseline is the smallest smoothed RTT, not the luckiest sample: a jittery but steady path
    stays in service under "5x"."""
    import math

    rng = random.Random(2)
    d = Driver(quality=Quality(max_rtt=RttLimit(5.0, relative=True), recover_time=1.0), fall=1000)
    for _ in range(30000):
        d.rtt = 0.001 * math.exp(rng.gauss(0, 0.5))
        d.answered()
    assert d.moves() == ["up"]


def test_new_limits_are_judged_at_once():
    d = Driver(quality=Quality(), fall=1000)
    d.answered(30)
    for i in range(100):
        d.lost() if i % 2 else d.answered()
    assert d.moves() == ["up"]
    tr = d.h.configure(10, 1000, GRAY, d.t)
    assert tr is not None and tr.new is D
    tr = d.h.configure(10, 1000, Quality(), d.t)
    assert tr is not None and tr.new is U
