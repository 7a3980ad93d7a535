"""Steering decisions. Pure: tunnel states in, which tunnels carry the prefixes out.

`decide` picks which tunnels carry new flows (the best priority tier among healthy, undrained
tunnels, by weight) and which keep their pinned flows. `plan.render` turns that decision into kernel
objects, `router.Router` applies them; nothing here knows of either.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from hatun.health import State

@dataclass(frozen=True)
class TunnelView:
    """What steering needs to know of one tunnel."""

    name: str
    ifname: str
    slot: int  # FIRST_SLOT.. : selects its mark, its pinned table and its nexthop ids
    weight: int
    priority: int
    health: State  # INIT, UP or DOWN (drain is the separate flag)
    drained: bool = False
    present: bool = True  # the device exists and is up (nexthops need it)
    presumed_up: bool = False  # adopted as a group member and no verdict yet: keep it in place


MAX_WEIGHT = 256  # a nexthop's weight in the kernel: 1..256


def effective_weights(weights: dict[str, tuple[int, float]]) -> dict[str, int]:
    """Each tunnel's weight in the route from its configured weight and the share of it that it keeps
    (below 1.0 while degraded with on_degraded = "reduce"). With every share 1.0 the configured
    weights as they are; else all are scaled up alike (the kernel's weights are integers up to 256),
    so that a reduced share is visible even with weight 1, and the others keep their proportions."""
    if all(share >= 1.0 for _, share in weights.values()):
        return {name: w for name, (w, _) in weights.items()}
    scale = MAX_WEIGHT // max((w for w, _ in weights.values()), default=1)
    return {name: max(1, round(w * scale * min(share, 1.0))) for name, (w, share) in weights.items()}


@dataclass(frozen=True)
class Member:
    name: str
    ifname: str
    slot: int
    weight: int


@dataclass(frozen=True)
class Decision:
    members: tuple[Member, ...]  # carry new flows; empty: the prefixes are unreachable
    pinned: tuple[str, ...]  # tunnels whose established flows keep using them
    tier: int | None  # priority tier in use (None: all down)
    all_down: bool  # no tunnel is healthy: members are the last ones kept, or none

    @property
    def unreachable(self) -> bool:
        return not self.members

    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)


def decide(tunnels: Sequence[TunnelView], when_all_down: str, previous: Sequence[Member] = ()) -> Decision:
    """Choose the tunnels for new flows and for pinned flows.

    - candidates: healthy (or presumed healthy after an adoption), not drained, device present;
    - members: the candidates of the best (lowest) priority tier, with their weights;
    - pinned: every healthy tunnel whose device is present, drained or not (a drain keeps the flows
      a tunnel already has);
    - no candidate: with `when_all_down = "keep"` the previous members whose devices still exist stay
      (packets may yet get through; never a fall-back to the default route), else none (unreachable).
    """
    def healthy(t: TunnelView) -> bool:
        return t.present and (t.health is State.UP or (t.health is State.INIT and t.presumed_up))

    candidates = [t for t in tunnels if healthy(t) and not t.drained]
    pinned = tuple(t.name for t in tunnels if healthy(t))
    if candidates:
        tier = min(t.priority for t in candidates)
        members = tuple(Member(t.name, t.ifname, t.slot, t.weight) for t in candidates if t.priority == tier)
        return Decision(tuple(sorted(members, key=lambda m: m.slot)), pinned, tier, False)
    if when_all_down == "keep":
        present = {t.name: t for t in tunnels if t.present}
        kept = tuple(
            Member(m.name, present[m.name].ifname, present[m.name].slot, present[m.name].weight)
            for m in previous if m.name in present
        )
        return Decision(kept, pinned, None, True)
    return Decision((), pinned, None, True)


def covers(prefixes: Sequence[ipaddress._BaseNetwork], net: ipaddress._BaseNetwork) -> bool:
    """True when one of PREFIXES contains or overlaps NET (e.g. a 0.0.0.0/0 over a tunnel subnet)."""
    return any(p.version == net.version and p.overlaps(net) for p in prefixes)
