"""Steering decisions. Pure: tunnel states + config in, the wanted route out.

`decide` picks which tunnels carry new flows (the best priority tier among healthy, undrained
tunnels, by weight) and which keep their pinned flows. `render` turns that decision into the exact
kernel objects: nexthops, the group, routes in hatun's tables, and policy rules. The reconciler in
`routes.py` makes the kernel match, so nothing here touches the system.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hatun.health import State

BYPASS_SLOT = 1  # mark of the tunnels' own encrypted UDP packets
FIRST_SLOT = 2
GROUP_ID_OFFSET = 1000  # group ids: nexthop_id + 1000 (IPv4), + 1001 (IPv6)
# Route priority (metric) of the fail-closed stubs: above any real route (IPv4 0, IPv6 1024 by
# default), so the kernel uses a stub only when the real route of its prefix is gone.
FAIL_CLOSED_METRIC = 0xFFFFFF00


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


# ---------------------------------------------------------------- marks and ids


@dataclass(frozen=True)
class Layout:
    """Where hatun's kernel objects live, from the `[routing]` config (see docs/design.md)."""

    table: int
    rule_priority: int
    protocol: int
    nexthop_id: int
    fwmark_mask: int

    @property
    def shift(self) -> int:
        return (self.fwmark_mask & -self.fwmark_mask).bit_length() - 1

    @property
    def max_slot(self) -> int:
        return self.fwmark_mask >> self.shift

    def mark(self, slot: int) -> int:
        return slot << self.shift

    @property
    def bypass_mark(self) -> int:
        return self.mark(BYPASS_SLOT)

    def pinned_table(self, slot: int) -> int:
        return self.table + slot

    def nexthop(self, slot: int, family: int) -> int:
        return self.nexthop_id + 2 * slot + (1 if family == 6 else 0)

    def group(self, family: int) -> int:
        return self.nexthop_id + GROUP_ID_OFFSET + (1 if family == 6 else 0)

    def slot_of_nexthop(self, nh_id: int) -> tuple[int, int] | None:
        """(slot, family) of one of hatun's device nexthop ids, or None."""
        off = nh_id - self.nexthop_id
        if 0 <= off < GROUP_ID_OFFSET and off // 2 >= FIRST_SLOT:
            return off // 2, (6 if off % 2 else 4)
        return None

    @classmethod
    def from_routing(cls, routing) -> Layout:
        return cls(routing.table, routing.rule_priority, routing.protocol, routing.nexthop_id, routing.fwmark_mask)


def allocate_slots(names: Iterable[str], taken: dict[str, int], max_slot: int,
                   reserved: Iterable[int] = ()) -> dict[str, int]:
    """Give every tunnel name a slot, keeping the slots in TAKEN (existing tunnels, or those read back
    from the kernel after a restart) and handing out the smallest free ones to the others, never one
    in RESERVED (held by tunnels still draining).

    Raises ValueError when the slots run out (the fwmark mask is too narrow).
    """
    names = list(names)
    result = {n: s for n, s in taken.items() if n in names and FIRST_SLOT <= s <= max_slot}
    used = set(result.values()) | set(reserved)
    free = (s for s in range(FIRST_SLOT, max_slot + 1) if s not in used)
    for n in names:
        if n not in result:
            try:
                result[n] = next(free)
            except StopIteration:
                raise ValueError(f"no free mark slot for tunnel {n!r}: widen routing.fwmark_mask") from None
    return result


def covers(prefixes: Sequence[ipaddress._BaseNetwork], net: ipaddress._BaseNetwork) -> bool:
    """True when one of PREFIXES contains or overlaps NET (e.g. a 0.0.0.0/0 over a tunnel subnet)."""
    return any(p.version == net.version and p.overlaps(net) for p in prefixes)


# ---------------------------------------------------------------- kernel objects


@dataclass(frozen=True)
class RenderTunnel:
    """A tunnel as the kernel sees it, for `render`."""

    name: str
    slot: int
    ifindex: int | None  # None: the device is missing or down (no nexthop possible)
    subnets: tuple[ipaddress._BaseNetwork, ...]  # its tunnel address networks
    gateways: dict[int, ipaddress._BaseAddress]  # the gateway's tunnel address per IP version


@dataclass(frozen=True)
class Wanted:
    """Every kernel object hatun wants, per kind. The reconciler adds, replaces and deletes to match."""

    addresses: tuple = ()  # rtnl.Address: the source address(es) on lo
    nexthops: tuple = ()  # rtnl.Nexthop: device nexthops, then groups
    routes: tuple = ()  # rtnl.Route: steering table, tunnel subnets, pinned tables
    rules: tuple = ()  # rtnl.Rule


def render(
    decision: Decision,
    tunnels: Sequence[RenderTunnel],
    *,
    prefixes: Sequence[ipaddress._BaseNetwork],
    sources: Sequence[ipaddress._BaseAddress],
    layout: Layout,
    mode: str,
    resilient,
    pin_flows: bool,
    lo_index: int,
    fail_closed: bool = False,
) -> Wanted:
    """The kernel objects for DECISION (pure).

    MODE is "resilient" (nexthop objects in a resilient group; RESILIENT holds its parameters) or
    "multipath" (a classic weighted multipath route). FAIL_CLOSED (`when_all_down = "unreachable"`)
    adds the fail-closed stubs (see `fail_closed_gate`); they alone make the prefixes unreachable
    when no tunnel carries them. See docs/design.md for the layout.
    """
    import socket

    from hatun.netlink.rtnl import Address, Hop, Nexthop, Route, Rule

    af = {4: socket.AF_INET, 6: socket.AF_INET6}
    by_name = {t.name: t for t in tunnels}
    families = sorted({p.version for p in prefixes})
    source = {s.version: s for s in sources}
    proto = layout.protocol
    addresses, nexthops, routes, rules = [], [], [], []

    for v in families:
        addresses += [Address(lo_index, ipaddress.ip_interface(f"{source[v]}/{32 if v == 4 else 128}"))] if v in source else []
    members = [m for m in decision.members if by_name.get(m.name) and by_name[m.name].ifindex]

    if mode == "resilient":
        for t in tunnels:
            if t.ifindex:
                nexthops += [Nexthop(layout.nexthop(t.slot, v), af[v], oif=t.ifindex, protocol=proto) for v in families]
        if members:
            nexthops += [
                Nexthop(layout.group(v), 0, protocol=proto, resilient=resilient,
                        group=tuple((layout.nexthop(m.slot, v), m.weight) for m in members))
                for v in families
            ]

    for v in families:
        for p in (p for p in prefixes if p.version == v):
            if fail_closed:
                # Behind the real route, or alone when there is none: never a fall-back to the main table.
                routes.append(_stub(af[v], layout, p))
            if not members:
                if not fail_closed:
                    routes.append(Route(af[v], layout.table, p, type="unreachable", protocol=proto))
            elif mode == "resilient":
                routes.append(Route(af[v], layout.table, p, protocol=proto, nh_id=layout.group(v), prefsrc=source.get(v)))
            elif len(members) == 1:
                routes.append(Route(af[v], layout.table, p, protocol=proto, oif=by_name[members[0].name].ifindex,
                                    prefsrc=source.get(v)))
            else:
                # IPv6 multipath routes need a gateway on every hop: the gateway's tunnel address.
                hops = tuple(Hop(by_name[m.name].ifindex, m.weight, by_name[m.name].gateways.get(6) if v == 6 else None)
                             for m in members)
                routes.append(Route(af[v], layout.table, p, protocol=proto, multipath=hops, prefsrc=source.get(v)))
            if pin_flows:
                for name in decision.pinned:
                    t = by_name.get(name)
                    if t is not None and t.ifindex:
                        routes.append(Route(af[v], layout.pinned_table(t.slot), p, protocol=proto, oif=t.ifindex,
                                            prefsrc=source.get(v)))
        # A steered prefix that covers a tunnel's own subnet (e.g. 0.0.0.0/0) would send traffic for
        # the gateway's tunnel address over any tunnel: route each subnet over its own device.
        for t in tunnels:
            for net in t.subnets:
                if net.version == v and t.ifindex and covers(prefixes, net):
                    routes.append(Route(af[v], layout.table, net, protocol=proto, oif=t.ifindex))

        if pin_flows:
            rules += [Rule(af[v], layout.rule_priority, layout.pinned_table(t.slot), fwmark=layout.mark(t.slot),
                           fwmask=layout.fwmark_mask, protocol=proto) for t in sorted(tunnels, key=lambda t: t.slot)]
        rules += _steering_rules(v, prefixes, layout)
    return Wanted(tuple(addresses), tuple(nexthops), tuple(routes), tuple(rules))


def _stub(family: int, layout: Layout, prefix: ipaddress._BaseNetwork):
    from hatun.netlink.rtnl import Route

    return Route(family, layout.table, prefix, type="unreachable", protocol=layout.protocol, priority=FAIL_CLOSED_METRIC)


def _steering_rules(v: int, prefixes: Sequence[ipaddress._BaseNetwork], layout: Layout) -> list:
    """Rules rule_priority+1 and +2 of IP version V: everything but the tunnels' encrypted packets
    looks up the steering table."""
    import socket

    from hatun.netlink.rtnl import Rule

    family = socket.AF_INET if v == 4 else socket.AF_INET6
    rules = []
    if any(p.prefixlen == 0 for p in prefixes if p.version == v):
        # Like wg-quick for a default route: more specific routes of the main table still win.
        rules.append(Rule(family, layout.rule_priority + 1, 254, suppress_prefixlength=0, protocol=layout.protocol))
    rules.append(Rule(family, layout.rule_priority + 2, layout.table, fwmark=layout.bypass_mark,
                      fwmask=layout.fwmark_mask, invert=True, protocol=layout.protocol))
    return rules


def fail_closed_gate(prefixes: Sequence[ipaddress._BaseNetwork], layout: Layout) -> Wanted:
    """What stays in the kernel after hatun stops with `when_all_down = "unreachable"` (pure): per
    steered prefix an `unreachable` stub in the steering table at FAIL_CLOSED_METRIC, and the rules
    that lead there. Traffic for the prefixes then gets "no route to host" instead of leaving in
    clear text through the main table, until hatun runs again (and adopts the stubs) or `hatun down`
    removes them. Tunnels' encrypted packets carry the bypass mark and never see the stubs."""
    import socket

    af = {4: socket.AF_INET, 6: socket.AF_INET6}
    families = sorted({p.version for p in prefixes})
    routes = tuple(_stub(af[p.version], layout, p) for v in families for p in prefixes if p.version == v)
    rules = tuple(r for v in families for r in _steering_rules(v, prefixes, layout))
    return Wanted(routes=routes, rules=rules)
