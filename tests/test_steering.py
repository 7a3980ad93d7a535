"""Pure decisions: hysteresis and steering, table-tested."""

from __future__ import annotations

import pytest

from hatun.health import State, TunnelHealth, display_state
from hatun.steering import Layout, Member, TunnelView, allocate_slots, decide

U, D, I = State.UP, State.DOWN, State.INIT


def run_results(results: str, rise=3, fall=2):
    """Feed 'ssfs...' (s success, f failure) one per 100 ms; return the health states after each."""
    h = TunnelHealth("gw", rise, fall, 0.0)
    states = []
    for i, c in enumerate(results):
        h.record(c == "s", now=(i + 1) * 0.1, rtt=0.002 if c == "s" else None)
        states.append(h.health.value[0])
    return "".join(states)


@pytest.mark.parametrize(
    "results, expected",
    [
        ("sss", "iiu"),  # rise 3 from init
        ("ff", "id"),  # fall 2 from init
        ("ssfss", "iiiii"),  # a failure resets the success count
        ("sssf", "iiuu"),  # one loss does not take it down
        ("sssff", "iiuud"),
        ("sssffsfsfs", "iiuuddddd" "d"),  # flapping stays down
        ("sssffsss", "iiuuddduu"[:8]),
        ("sfsfsfsfsf", "iiiiiiiiii"),  # never a verdict while alternating
    ],
)
def test_hysteresis(results, expected):
    assert run_results(results) == expected


def test_transition_reasons_and_stats():
    h = TunnelHealth("gw2", 3, 2, 0.0)
    for t in (0.1, 0.2):
        assert h.record(True, t, rtt=0.031) is None
    tr = h.record(True, 0.3, rtt=0.031)
    assert (tr.old, tr.new, tr.reason) == (I, U, "3 probes answered, rtt 31 ms")
    h.record(False, 0.4, reason="timeout")
    tr = h.record(False, 0.5, reason="timeout")
    assert (tr.old, tr.new) == (U, D)
    assert tr.reason == "2 probes failed (timeout), last rtt 31 ms"
    assert h.loss == pytest.approx(2 / 5)
    assert h.rtt_avg == pytest.approx(0.031)
    assert h.since == 0.5


def test_display_state():
    assert display_state(U, drained=True) is State.DRAINING
    assert display_state(D, drained=True) is D
    assert display_state(U, drained=False) is U


def view(name, slot, health=U, weight=1, priority=0, drained=False, present=True, presumed=False):
    return TunnelView(name, f"hat-{name}", slot, weight, priority, health, drained, present, presumed)


def names(decision):
    return decision.member_names()


@pytest.mark.parametrize(
    "tunnels, mode, previous, members, pinned, unreachable",
    [
        # all healthy, same tier: all carry flows
        ([view("a", 2), view("b", 3), view("c", 4)], "keep", (), ("a", "b", "c"), ("a", "b", "c"), False),
        # one down: out of the group and unpinned
        ([view("a", 2), view("b", 3, D), view("c", 4)], "keep", (), ("a", "c"), ("a", "c"), False),
        # init without presumption: not yet in service
        ([view("a", 2, I), view("b", 3)], "keep", (), ("b",), ("b",), False),
        # adopted member, no verdict yet: stays where it is
        ([view("a", 2, I, presumed=True), view("b", 3)], "keep", (), ("a", "b"), ("a", "b"), False),
        # priority tiers: tier 1 only while every tier-0 tunnel is down
        ([view("a", 2, priority=0), view("b", 3, priority=1)], "keep", (), ("a",), ("a", "b"), False),
        ([view("a", 2, D, priority=0), view("b", 3, priority=1), view("c", 4, priority=2)], "keep", (), ("b",), ("b", "c"), False),
        # drained: no new flows, but keeps its pinned flows
        ([view("a", 2, drained=True), view("b", 3)], "keep", (), ("b",), ("a", "b"), False),
        # a device that vanished cannot be a member
        ([view("a", 2, present=False), view("b", 3)], "keep", (), ("b",), ("b",), False),
        # all down, keep: the previous members stay
        ([view("a", 2, D), view("b", 3, D)], "keep", ("a", "b"), ("a", "b"), (), False),
        # all down, keep, but a previous member's device is gone
        ([view("a", 2, D, present=False), view("b", 3, D)], "keep", ("a", "b"), ("b",), (), False),
        # all down, keep, never had members: unreachable, never the default route
        ([view("a", 2, D), view("b", 3, I)], "keep", (), (), (), True),
        # all down, unreachable
        ([view("a", 2, D), view("b", 3, D)], "unreachable", ("a", "b"), (), (), True),
        # all drained: nothing for new flows
        ([view("a", 2, drained=True)], "unreachable", (), (), ("a",), True),
    ],
)
def test_decide(tunnels, mode, previous, members, pinned, unreachable):
    by_name = {t.name: t for t in tunnels}
    prev = [Member(n, by_name[n].ifname, by_name[n].slot, by_name[n].weight) for n in previous]
    d = decide(tunnels, mode, prev)
    assert names(d) == members
    assert d.pinned == pinned
    assert d.unreachable == unreachable


def test_decide_carries_weights_and_is_ordered_by_slot():
    d = decide([view("b", 5, weight=3), view("a", 2, weight=1)], "keep")
    assert [(m.name, m.weight) for m in d.members] == [("a", 1), ("b", 3)]


def test_layout_marks_tables_ids():
    lay = Layout(table=51820, rule_priority=5200, protocol=147, nexthop_id=518200000, fwmark_mask=0x00FF0000)
    assert lay.shift == 16 and lay.max_slot == 255
    assert lay.bypass_mark == 0x10000 and lay.mark(2) == 0x20000
    assert lay.pinned_table(2) == 51822
    assert (lay.nexthop(2, 4), lay.nexthop(2, 6)) == (518200004, 518200005)
    assert lay.slot_of_nexthop(518200005) == (2, 6)
    assert lay.slot_of_nexthop(518201000) is None  # the group
    assert lay.group(4) == 518201000


def test_allocate_slots_keeps_existing_and_fills_gaps():
    assert allocate_slots(["a", "b", "c"], {}, 255) == {"a": 2, "b": 3, "c": 4}
    assert allocate_slots(["a", "c", "d"], {"a": 2, "c": 4, "gone": 3}, 255) == {"a": 2, "c": 4, "d": 3}
    with pytest.raises(ValueError, match="widen"):
        allocate_slots(["a", "b", "c"], {}, 3)


def test_confirmed_failures_make_a_suspect_first():
    from hatun.health import Suspect

    h = TunnelHealth("gw", 3, 2, 0.0)
    h.confirm_failures = True
    for t in (0.1, 0.2, 0.3):
        h.record(True, t, rtt=0.001)
    assert h.health is U
    assert h.record(False, 0.4) is None
    s = h.record(False, 0.5)
    assert isinstance(s, Suspect) and h.health is U and h.suspect
    assert h.record(False, 0.6) is None  # already being confirmed
    tr = h.confirm_down(0.62)
    assert (tr.old, tr.new) == (U, D) and not h.suspect
    # Cleared: counting starts again, the tunnel stays up.
    h2 = TunnelHealth("gw", 1, 2, 0.0)
    h2.confirm_failures = True
    h2.record(True, 0.1)
    h2.record(False, 0.2)
    assert isinstance(h2.record(False, 0.3), Suspect)
    h2.clear_suspect()
    assert h2.health is U and h2.failures == 0
    assert h2.record(False, 0.4) is None
    # From init, no confirmation: the first verdict is immediate.
    h3 = TunnelHealth("gw", 3, 2, 0.0)
    h3.confirm_failures = True
    h3.record(False, 0.1)
    assert h3.record(False, 0.2).new is D
