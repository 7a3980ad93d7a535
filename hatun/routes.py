"""The route reconciler: make the kernel hold exactly the rtnetlink objects of a `plan.Wanted`.

It reads hatun's own objects back (recognised by route protocol, tables, rule protocol and nexthop
id range), diffs them against what is wanted, and applies the difference: additions and
replacements first, deletions last, so traffic always has a path (a group is replaced in one
message; a route is replaced, never deleted and re-added). Calling `sync` again with the same
`Wanted` changes nothing. Objects that belong to others are never touched.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

from hatun.netlink.core import NetlinkError, NetlinkTimeout
from hatun.netlink.rtnl import Address, Nexthop, Route, Rtnl, Rule
from hatun.layout import Layout
from hatun.plan import Wanted

log = logging.getLogger("hatun.routes")

IP6_RT_PRIO_USER = 1024  # the metric the kernel gives IPv6 routes added without one


@dataclass
class Actual:
    """hatun's objects as they are in the kernel."""

    addresses: list[Address] = field(default_factory=list)
    nexthops: dict[int, Nexthop] = field(default_factory=dict)
    routes: list[Route] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)


@dataclass
class SyncResult:
    """What one `sync` did: changes by object kind ("route", "nexthop", "rule", "address"), errors."""

    changes: list[tuple[str, str]] = field(default_factory=list)  # (kind, description)
    errors: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.changes)


def _route_key(r: Route) -> tuple:
    prio = r.priority if r.priority is not None else (IP6_RT_PRIO_USER if r.family == socket.AF_INET6 else 0)
    return (r.family, r.table, r.dst, prio)


def _route_body(r: Route) -> tuple:
    return (r.type, r.protocol, r.oif, r.gateway, r.prefsrc, r.nh_id, tuple(sorted(r.multipath)))


def _must_recreate(have: Nexthop | None, want: Nexthop) -> bool:
    """The kernel cannot change a group's type or a resilient group's bucket count in place."""
    if have is None or not want.group:
        return False
    if (have.resilient is None) != (want.resilient is None):
        return True
    return want.resilient is not None and have.resilient.buckets != want.resilient.buckets


def _describe_route(r: Route) -> str:
    via = (f"nexthop group {r.nh_id}" if r.nh_id else f"{len(r.multipath)} paths" if r.multipath
           else f"dev {r.oif}" if r.oif else r.type)
    return f"{r.dst} table {r.table} -> {via}"


class Reconciler:
    """Syncs hatun's kernel objects for one network namespace through RTNL."""

    def __init__(self, rtnl: Rtnl, layout: Layout, lo_index: int) -> None:
        self.rtnl = rtnl
        self.layout = layout
        self.lo_index = lo_index
        # Source addresses hatun put on lo; others on lo are not ours to remove.
        self.owned_addresses: set[Address] = set()

    async def read(self) -> Actual:
        """hatun's objects, read from the kernel."""
        proto = self.layout.protocol
        actual = Actual()
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in await self.rtnl.routes(family, protocol=proto):
                if r.table in self.layout.tables:
                    actual.routes.append(r)
            actual.rules += [r for r in await self.rtnl.rules(family) if self.layout.owns_rule(r.protocol, r.priority)]
        actual.nexthops = {nh.id: nh for nh in await self.rtnl.nexthops()
                           if nh.id in self.layout.nexthop_ids and nh.protocol == proto}
        actual.addresses = [a for a in await self.rtnl.addresses(self.lo_index) if a in self.owned_addresses]
        return actual

    async def sync(self, wanted: Wanted, actual: Actual | None = None) -> SyncResult:
        """Make the kernel match WANTED. Errors are collected (the rest still goes on) and returned."""
        if actual is None:
            actual = await self.read()
        res = SyncResult()

        async def do(kind: str, what: str, coro) -> bool:
            try:
                await coro
            except (NetlinkError, NetlinkTimeout) as e:
                res.errors.append(f"{what}: {e}")
                log.warning("%s: %s", what, e)
                return False
            res.changes.append((kind, what))
            log.debug("%s", what)
            return True

        # 1. source addresses (routes use them as prefsrc)
        self.owned_addresses |= set(wanted.addresses)
        have_addr = set(actual.addresses)
        for a in wanted.addresses:
            if a not in have_addr:
                await do("address", f"add {a.interface} to lo", self.rtnl.add_address(a.index, a.interface))

        # 2. device nexthops, 3. groups (a group whose type or buckets changed must be re-created)
        for nh in wanted.nexthops:
            have = actual.nexthops.get(nh.id)
            if have == nh:
                continue
            if _must_recreate(have, nh):
                await do("nexthop", f"delete nexthop group {nh.id} to re-create it", self.rtnl.delete_nexthop(nh.id))
                have = None
                # The kernel deleted the routes using the group with it: they must be added again below.
                actual.routes = [r for r in actual.routes if r.nh_id != nh.id]
            verb = "replace" if have is not None else "add"
            await do("nexthop", f"{verb} nexthop {nh.id}" + (f" group {[m for m, _ in nh.group]}" if nh.group else f" dev {nh.oif}"),
                     self.rtnl.replace_nexthop(nh))

        # 4. routes: replaced in place
        have_routes = {_route_key(r): r for r in actual.routes}
        wanted_keys = set()
        for r in wanted.routes:
            key = _route_key(r)
            wanted_keys.add(key)
            have = have_routes.get(key)
            if have is not None and _route_body(have) == _route_body(r):
                continue
            await do("route", f"{'replace' if have else 'add'} route {_describe_route(r)}", self.rtnl.replace_route(r))

        # 5. rules
        have_rules = set(actual.rules)
        wanted_rules = set(wanted.rules)
        for rule in wanted.rules:
            if rule not in have_rules:
                await do("rule", f"add rule {rule.priority} lookup {rule.table}", self.rtnl.add_rule(rule))

        # 6. deletions, last: rules, routes, groups, device nexthops, addresses
        for rule in actual.rules:
            if rule not in wanted_rules:
                await do("rule", f"delete rule {rule.priority} lookup {rule.table}", self.rtnl.delete_rule(rule))
        for key, r in have_routes.items():
            if key not in wanted_keys:
                await do("route", f"delete route {_describe_route(r)}", self.rtnl.delete_route(r))
        wanted_ids = {nh.id for nh in wanted.nexthops}
        for nh_id in sorted(actual.nexthops, key=lambda i: not actual.nexthops[i].group):
            if nh_id not in wanted_ids:
                await do("nexthop", f"delete nexthop {nh_id}", self.rtnl.delete_nexthop(nh_id))
        wanted_addr = set(wanted.addresses)
        for a in actual.addresses:
            if a not in wanted_addr:
                await do("address", f"delete {a.interface} from lo", self.rtnl.delete_address(a.index, a.interface))
                self.owned_addresses.discard(a)
        return res

    async def remove_all(self, keep: Wanted | None = None) -> SyncResult:
        """Delete every object of hatun's but those in KEEP (for a clean stop or `hatun down`; KEEP
        is the fail-closed gate of `plan.fail_closed_gate`, which is added if it is missing)."""
        return await self.sync(keep or Wanted())
