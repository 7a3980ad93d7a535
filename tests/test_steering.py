"""Pure decisions: hysteresis and steering, table-tested."""

from __future__ import annotations

import pytest

from hatun.health import State, TunnelHealth, display_state
from hatun.layout import Layout, allocate_slots
from hatun.steering import Member, TunnelView, decide

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
    h.record(True, 0.35, rtt=0.031)
    h.record(False, 0.4, reason="timeout")
    h.record_lost(0.41, 0.4)  # the loss ratio counts fates of probes sent while alive
    tr = h.record(False, 0.5, reason="timeout")
    assert (tr.old, tr.new) == (U, D)
    assert tr.reason == "2 probes failed (timeout), last rtt 31 ms"
    assert h.loss == pytest.approx(1 / 2)
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


# ---------------------------------------------------------------- fail closed (issue 12, item 11)

def _render_case(fail_closed: bool, mode: str, members: tuple[str, ...]):
    import ipaddress

    from hatun.netlink.rtnl import Resilient
    from hatun.plan import RenderTunnel, render
    from hatun.steering import Decision

    lay = Layout(table=51820, rule_priority=5200, protocol=147, nexthop_id=518200000, fwmark_mask=0x00FF0000)
    net = ipaddress.ip_network
    tunnels = [RenderTunnel(n, slot, 10 + slot, f"hat-{n}", (net(f"198.18.{100 + slot}.0/30"),),
                            {4: ipaddress.ip_address(f"198.18.{100 + slot}.1"), 6: ipaddress.ip_address(f"2001:2:0:{100 + slot}::1")})
               for n, slot in (("a", 2), ("b", 3))]
    decision = Decision(tuple(Member(n, f"hat-{n}", {"a": 2, "b": 3}[n], 1) for n in members), members,
                        0 if members else None, not members)
    prefixes = [net("198.19.77.0/24"), net("2001:2:0:77::/64")]
    wanted = render(decision, tunnels, prefixes=prefixes, sources=[ipaddress.ip_address("198.18.99.1")],
                    layout=lay, mode=mode, resilient=Resilient(8, 1, 0), pin_flows=True, lo_index=1,
                    fail_closed=fail_closed)
    return lay, prefixes, wanted


@pytest.mark.parametrize("mode", ["resilient", "multipath"])
@pytest.mark.parametrize("members", [("a", "b"), ("a",), ()])
@pytest.mark.parametrize("fail_closed", [False, True])
def test_render_fail_closed_stub_beside_the_real_route(mode, members, fail_closed):
    """With when_all_down = "unreachable" every steered prefix (both families) has an unreachable stub
    in the steering table at a metric above any real route (IPv4 0, IPv6 1024), whatever the members:
    when the kernel deletes the real route (its devices vanished), the stub ends the lookup. With
    "keep" there is none, and only an empty member set gives an unreachable route."""
    import socket

    from hatun.layout import FAIL_CLOSED_METRIC

    lay, prefixes, wanted = _render_case(fail_closed, mode, members)
    assert FAIL_CLOSED_METRIC > 1024
    for p in prefixes:
        here = [r for r in wanted.routes if r.table == lay.table and r.dst == p]
        stubs = [r for r in here if r.priority == FAIL_CLOSED_METRIC]
        real = [r for r in here if r.priority is None]
        assert len(here) == len(stubs) + len(real)
        if fail_closed:
            assert [(s.type, s.protocol, s.family) for s in stubs] == [
                ("unreachable", 147, socket.AF_INET if p.version == 4 else socket.AF_INET6)]
        else:
            assert stubs == []
        if members:
            assert len(real) == 1 and real[0].type == "unicast"
            assert (real[0].nh_id is not None) == (mode == "resilient")
        elif fail_closed:
            assert real == []  # the stub alone makes the prefix unreachable
        else:
            assert [r.type for r in real] == ["unreachable"]
        # Pinned tables hold real routes only: when theirs is gone, rule 5202 leads to the stub.
        assert all(r.type == "unicast" for r in wanted.routes if r.table != lay.table and r.dst == p)
    # The rule to the steering table exists in both families, in both modes.
    for family in (socket.AF_INET, socket.AF_INET6):
        assert any(r.priority == 5202 and r.table == lay.table and r.invert for r in wanted.rules if r.family == family)


def test_fail_closed_gate_is_what_render_keeps():
    """The gate kept after a stop: exactly the stubs and the steering rules of render's output, so a
    restarted hatun adopts it unchanged (the reconciler sees wanted objects) and nothing else stays."""
    from hatun.layout import FAIL_CLOSED_METRIC
    from hatun.plan import fail_closed_gate

    lay, prefixes, wanted = _render_case(True, "resilient", ("a", "b"))
    gate = fail_closed_gate(prefixes, lay)
    assert set(gate.routes) == {r for r in wanted.routes if r.priority == FAIL_CLOSED_METRIC}
    assert len(gate.routes) == 2
    assert set(gate.rules) == {r for r in wanted.rules if r.priority in (5201, 5202)}
    assert {r.priority for r in gate.rules} == {5202}
    assert gate.nexthops == () and gate.addresses == ()
    # A default route keeps the suppress rule too: the host's more specific main routes stay usable.
    import ipaddress

    gate = fail_closed_gate([ipaddress.ip_network("0.0.0.0/0")], lay)
    assert sorted(r.priority for r in gate.rules) == [5201, 5202]
    assert [str(r.dst) for r in gate.routes] == ["0.0.0.0/0"]


def test_effective_weights_scale_only_when_a_tunnel_is_reduced():
    from hatun.steering import effective_weights

    assert effective_weights({"a": (1, 1.0), "b": (3, 1.0)}) == {"a": 1, "b": 3}
    assert effective_weights({"a": (1, 1.0), "b": (1, 0.5)}) == {"a": 256, "b": 128}
    assert effective_weights({"a": (2, 1.0), "b": (4, 0.1)}) == {"a": 128, "b": 26}
    assert effective_weights({"a": (256, 1.0), "b": (1, 0.05)}) == {"a": 256, "b": 1}
