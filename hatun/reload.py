"""Reload as a plan: what moving from the running config to a new one means, decided without I/O.

`plan_reload` compares the two configs and the tunnels that run now; the supervisor's executor
applies the plan (start, update, drain, revive) and checks what needs the host (ownership of names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hatun.config import Config
from hatun.layout import allocate_slots

# Keys that decide where hatun's kernel objects live; changing them needs a restart.
RESTART_ONLY = (
    ("backend",), ("run_dir",), ("control", "socket"), ("metrics", "listen"), ("routing", "table"),
    ("routing", "rule_priority"), ("routing", "protocol"), ("routing", "nexthop_id"),
    ("routing", "fwmark_mask"), ("routing", "nft_table"), ("routing", "mode"), ("routing", "pin_flows"),
    ("routing", "hash_policy"),
)


@dataclass(frozen=True)
class RunningTunnel:
    """A tunnel that runs now: one of the config's, or one draining after an earlier reload removed it."""

    name: str
    ifname: str
    slot: int
    key: object  # its private key (compared, never shown)
    draining: bool = False


@dataclass(frozen=True)
class Revive:
    """A draining tunnel that the new config names again (same interface): it stays, as NAME."""

    name: str
    ifname: str  # identifies the draining tunnel (its name may differ: a rename that kept the interface)


@dataclass(frozen=True)
class ReloadPlan:
    refused: str | None = None  # why the new config cannot be applied while running; nothing else is set
    remove: tuple[str, ...] = ()  # running tunnels to drain, then tear down (removed, or moved to another interface)
    revive: tuple[Revive, ...] = ()
    add: tuple[str, ...] = ()  # new tunnels, each with its slot in `slots`
    # Running tunnels whose settings, key or health settings changed, or whose device must change
    # because the steered prefixes did (they are in every peer's allowed IPs).
    update: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()  # running tunnels left as they are
    slots: Mapping[str, int] = field(default_factory=dict)  # of every tunnel of the new config

    @property
    def summary(self) -> str:
        """`reloaded: -gw1 +gw9 ~gw2`, in the order things happen."""
        parts = [f"-{n}" for n in self.remove] + [f"+{r.name}" for r in self.revive] + [f"+{n}" for n in self.add]
        parts += [f"~{n}" for n in self.update]
        return "reloaded" + (f": {' '.join(parts)}" if parts else ": nothing changed")


def _get(obj, path: tuple[str, ...]):
    for p in path:
        obj = getattr(obj, p)
    return obj


def plan_reload(old: Config, new: Config, new_keys: Mapping[str, object], running: Sequence[RunningTunnel],
                max_slot: int) -> ReloadPlan:
    """What moving from OLD to NEW (whose private keys are NEW_KEYS, by tunnel name) means for the
    tunnels RUNNING now. Pure. A plan with `refused` set changes nothing."""
    for path in RESTART_ONLY:
        if _get(new, path) != _get(old, path):
            return ReloadPlan(refused=f"{'.'.join(path)} cannot change while hatun runs; restart hatun to apply it")
    active = {r.name: r for r in running if not r.draining}
    wanted = {t.name: t for t in new.tunnels}
    old_cfgs = {t.name: t for t in old.tunnels}
    remove = [n for n, r in active.items() if n not in wanted or wanted[n].ifname != r.ifname]
    # Every slot in use stays reserved: a tunnel about to drain keeps its own until torn down, and a
    # tunnel that moved to another interface gets a new one (the old device drains in the old slot).
    try:
        slots = allocate_slots([t.name for t in new.tunnels],
                               {n: r.slot for n, r in active.items() if n not in remove}, max_slot,
                               {r.slot for r in running})
    except ValueError as e:
        return ReloadPlan(refused=f"{e} (or wait until removed tunnels are torn down)")
    draining = [r for r in running if r.draining] + [active[n] for n in remove]
    prefixes_changed = new.routing.prefixes != old.routing.prefixes
    revive, add, update, keep = [], [], [], []
    for t in new.tunnels:
        r = active.get(t.name)
        if r is None or t.name in remove:
            # Back before its drain ended (same interface, whatever its name): it simply stays.
            back = next((d for d in draining if d.ifname == t.ifname), None)
            if back is not None:
                draining.remove(back)
                revive.append(Revive(t.name, t.ifname))
                slots[t.name] = back.slot  # it keeps its own
            else:
                add.append(t.name)
            continue
        before = old_cfgs.get(t.name)
        if (before is None or t != before or new_keys.get(t.name) != r.key or prefixes_changed
                or new.health_for(t) != old.health_for(before)):
            update.append(t.name)
        else:
            keep.append(t.name)
    return ReloadPlan(remove=tuple(remove), revive=tuple(revive), add=tuple(add), update=tuple(update),
                      keep=tuple(keep), slots=slots)
