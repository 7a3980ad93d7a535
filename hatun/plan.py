"""The plan step: a steering decision becomes the complete set of kernel objects hatun wants. Pure.

`render` turns a `steering.Decision` into a `Wanted`: nexthops, the group, routes in hatun's tables,
policy rules, the source addresses, and the marks of the nftables pinning table. `router.Router.set`
makes the kernel match it; nothing here touches the system.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from hatun.layout import FAIL_CLOSED_METRIC, Layout
from hatun.steering import Decision, covers

@dataclass(frozen=True)
class RenderTunnel:
    """A tunnel as the kernel sees it, for `render`."""

    name: str
    slot: int
    ifindex: int | None  # None: the device is missing or down (no nexthop possible)
    ifname: str  # (the pinning table maps interface names to marks)
    subnets: tuple[ipaddress._BaseNetwork, ...]  # its tunnel address networks
    gateways: dict[int, ipaddress._BaseAddress]  # the gateway's tunnel address per IP version


@dataclass(frozen=True)
class Wanted:
    """Every kernel object hatun wants, per kind. The reconciler adds, replaces and deletes to match."""

    addresses: tuple = ()  # rtnl.Address: the source address(es) on lo
    nexthops: tuple = ()  # rtnl.Nexthop: device nexthops, then groups
    routes: tuple = ()  # rtnl.Route: steering table, tunnel subnets, pinned tables
    rules: tuple = ()  # rtnl.Rule
    # The nftables pinning table's map: (interface name, mark) of every tunnel; None: no pinning
    # (pin_flows off, or a gate that leaves the table alone).
    marks: tuple[tuple[str, int], ...] | None = None

    def marks_dict(self) -> dict[str, int] | None:
        return None if self.marks is None else dict(self.marks)


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
    marks = tuple(sorted((t.ifname, layout.mark(t.slot)) for t in tunnels)) if pin_flows else None
    return Wanted(tuple(addresses), tuple(nexthops), tuple(routes), tuple(rules), marks)


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
