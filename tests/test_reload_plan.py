"""plan_reload: what a reload means, table-tested without I/O (the lab tests apply real ones)."""

from __future__ import annotations

import pytest

from hatun.reload import ReloadPlan, Revive, RunningTunnel, plan_reload
from hatun.layout import FIRST_SLOT
from tests.fakes import make_config

KEYS = {n: f"key-{n}" for n in ("gw1", "gw2", "gw3", "gw9")}


def running(*names: str, draining: tuple[tuple[str, str, int], ...] = ()) -> list[RunningTunnel]:
    """The config's tunnels NAMES in slots 2.. (the first), plus DRAINING (name, ifname, slot)."""
    out = [RunningTunnel(n, f"hat-{n}", i, KEYS[n]) for i, n in enumerate(names, start=FIRST_SLOT)]
    return out + [RunningTunnel(n, ifname, slot, "old", draining=True) for n, ifname, slot in draining]


OLD = make_config(["gw1", "gw2"])

CASES = {
    "nothing changed": (
        OLD, make_config(["gw1", "gw2"]), running("gw1", "gw2"),
        ReloadPlan(keep=("gw1", "gw2"), slots={"gw1": 2, "gw2": 3})),
    "one added, in a free slot": (
        OLD, make_config(["gw1", "gw2", "gw3"]), running("gw1", "gw2"),
        ReloadPlan(add=("gw3",), keep=("gw1", "gw2"), slots={"gw1": 2, "gw2": 3, "gw3": 4})),
    "one removed: drained, its slot stays reserved": (
        OLD, make_config(["gw1"]), running("gw1", "gw2"),
        ReloadPlan(remove=("gw2",), keep=("gw1",), slots={"gw1": 2})),
    "weight changed": (
        OLD, make_config({"gw1": {"weight": "3"}, "gw2": {}}), running("gw1", "gw2"),
        ReloadPlan(update=("gw1",), keep=("gw2",), slots={"gw1": 2, "gw2": 3})),
    "health of one tunnel changed": (
        OLD, make_config({"gw1": {}, "gw2": {"health": "{ fall = 5 }"}}), running("gw1", "gw2"),
        ReloadPlan(update=("gw2",), keep=("gw1",), slots={"gw1": 2, "gw2": 3})),
    "global health changed: every tunnel": (
        OLD, make_config(["gw1", "gw2"], health="rise = 5"), running("gw1", "gw2"),
        ReloadPlan(update=("gw1", "gw2"), slots={"gw1": 2, "gw2": 3})),
    "prefixes changed: every device's allowed IPs": (
        OLD, make_config(["gw1", "gw2"], routing='prefixes = ["198.19.77.0/24", "198.19.78.0/24"]'),
        running("gw1", "gw2"), ReloadPlan(update=("gw1", "gw2"), slots={"gw1": 2, "gw2": 3})),
    "interface moved: the old device drains, a new one starts": (
        OLD, make_config({"gw1": {"interface": '"wg-new"'}, "gw2": {}}), running("gw1", "gw2"),
        ReloadPlan(remove=("gw1",), add=("gw1",), keep=("gw2",), slots={"gw1": 4, "gw2": 3})),
    "removed tunnel back before its drain ended: revived": (
        make_config(["gw1"]), make_config(["gw1", "gw2"]), running("gw1", draining=(("gw2", "hat-gw2", 3),)),
        ReloadPlan(revive=(Revive("gw2", "hat-gw2"),), keep=("gw1",), slots={"gw1": 2, "gw2": 3})),
    "renamed, same interface: the device stays, under its new name": (
        OLD, make_config({"gw1": {}, "gw9": {"interface": '"hat-gw2"'}}), running("gw1", "gw2"),
        ReloadPlan(remove=("gw2",), revive=(Revive("gw9", "hat-gw2"),), keep=("gw1",), slots={"gw1": 2, "gw9": 3})),
}


@pytest.mark.parametrize("case", CASES)
def test_plan(case):
    old, new, run, expected = CASES[case]
    assert plan_reload(old, new, KEYS, run, max_slot=16) == expected


def test_changed_key_is_an_update():
    keys = dict(KEYS, gw2="another key")
    plan = plan_reload(OLD, make_config(["gw1", "gw2"]), keys, running("gw1", "gw2"), max_slot=16)
    assert plan.update == ("gw2",) and plan.keep == ("gw1",)


@pytest.mark.parametrize("routing, key", [
    ("table = 7001", "routing.table"), ("mode = \"multipath\"", "routing.mode"),
    ("nft_table = \"hatun2\"", "routing.nft_table"), ("pin_flows = false", "routing.pin_flows"),
])
def test_keys_that_need_a_restart_refuse_the_reload(routing, key):
    plan = plan_reload(OLD, make_config(["gw1", "gw2", "gw3"], routing=routing), KEYS, running("gw1", "gw2"), 16)
    assert plan.refused and plan.refused.startswith(key) and "restart" in plan.refused
    assert plan == ReloadPlan(refused=plan.refused)  # nothing else: a refused plan changes nothing


def test_no_free_slot_refuses():
    run = running("gw1", draining=(("old", "hat-old", 3),))
    plan = plan_reload(make_config(["gw1"]), make_config(["gw1", "gw2"]), KEYS, run, max_slot=3)
    assert plan.refused and "torn down" in plan.refused


def test_summary_lists_what_happens_in_order():
    plan = ReloadPlan(remove=("gw2",), revive=(Revive("gw9", "hat-gw2"),), add=("gw3",), update=("gw1",))
    assert plan.summary == "reloaded: -gw2 +gw9 +gw3 ~gw1"
    assert ReloadPlan(keep=("gw1",)).summary == "reloaded: nothing changed"
