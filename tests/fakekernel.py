"""An in-memory kernel for unit tests of planning, applying, adoption and drift repair, behind the
interface the reconciler uses (the rtnetlink part of `netlink.rtnl.Rtnl`), and a fake nftables
pinning table behind `pinning.Pinning`'s. It keeps the kernel's rules that hatun's design relies on
(verified in namespaces by the netns tests):

- a device nexthop needs a device that exists, is up and has carrier;
- deleting a nexthop removes it from every group; deleting a group deletes the routes that use it;
- deleting a device deletes its nexthops (and so their group memberships) and its routes;
- routes are keyed by (family, table, dst, metric) and `replace` overwrites in place;
- adding what exists fails with EEXIST, deleting what is missing with ENOENT.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field, replace

from hatun.netlink.core import NetlinkError
from hatun.netlink.rtnl import Address, Link, Nexthop, Route, Rule

IP6_DEFAULT_METRIC = 1024


def _key(r: Route) -> tuple:
    metric = r.priority if r.priority is not None else (IP6_DEFAULT_METRIC if r.family == socket.AF_INET6 else 0)
    return (r.family, r.table, r.dst, metric)


@dataclass
class KernelObjects:
    links: dict[int, Link] = field(default_factory=lambda: {1: Link(1, "lo", None, True, True, 65536)})
    addresses: list[Address] = field(default_factory=list)
    routes: dict[tuple, Route] = field(default_factory=dict)  # by (family, table, dst, metric)
    rules: list[Rule] = field(default_factory=list)
    nexthops: dict[int, Nexthop] = field(default_factory=dict)


class FakeKernel:
    """Links, addresses, routes, rules and nexthops of one network namespace; counts every change."""

    def __init__(self) -> None:
        self.db = KernelObjects()
        self.calls: list[str] = []  # every change, in order ("replace_route ...")
        self.fail_next: dict[str, NetlinkError] = {}  # method name -> error raised once

    # --- setting the scene (not part of the interface)

    def add_device(self, name: str, *, kind: str = "tun", up: bool = True) -> Link:
        index = max(self.db.links) + 1
        self.db.links[index] = Link(index, name, kind, up, up, 1420)
        return self.db.links[index]

    def remove_device(self, name: str) -> None:
        """As the kernel does when a device goes (deleted, its wireguard-go died)."""
        index = next(i for i, l in self.db.links.items() if l.name == name)
        del self.db.links[index]
        for nh in [nh for nh in self.db.nexthops.values() if nh.oif == index]:
            self._drop_nexthop(nh.id)
        for k in [k for k, r in self.db.routes.items() if r.oif == index or any(h.oif == index for h in r.multipath)]:
            del self.db.routes[k]
        self.db.addresses = [a for a in self.db.addresses if a.index != index]

    def _check(self, method: str) -> None:
        if method in self.fail_next:
            raise self.fail_next.pop(method)

    def _did(self, what: str) -> None:
        self.calls.append(what)

    # --- links and addresses

    async def links(self) -> list[Link]:
        return list(self.db.links.values())

    async def link(self, name_or_index):
        for link in self.db.links.values():
            if name_or_index in (link.name, link.index):
                return link
        return None

    async def addresses(self, index: int | None = None) -> list[Address]:
        return [a for a in self.db.addresses if index is None or a.index == index]

    async def add_address(self, index: int, interface) -> None:
        self._check("add_address")
        if Address(index, interface) in self.db.addresses:
            raise NetlinkError(errno.EEXIST, "File exists")
        self.db.addresses.append(Address(index, interface))
        self._did(f"add_address {interface}")

    async def delete_address(self, index: int, interface) -> bool:
        self._check("delete_address")
        if Address(index, interface) not in self.db.addresses:
            return False
        self.db.addresses.remove(Address(index, interface))
        self._did(f"delete_address {interface}")
        return True

    # --- routes

    async def routes(self, family: int, *, table: int | None = None, protocol: int | None = None) -> list[Route]:
        return [r for r in self.db.routes.values() if r.family == family and (table is None or r.table == table)
                and (protocol is None or r.protocol == protocol)]

    async def replace_route(self, route: Route) -> None:
        self._check("replace_route")
        if route.nh_id is not None and route.nh_id not in self.db.nexthops:
            raise NetlinkError(errno.EINVAL, "Nexthop id does not exist")
        for oif in [route.oif, *(h.oif for h in route.multipath)]:
            if oif is not None and oif not in self.db.links:
                raise NetlinkError(errno.ENODEV, "No such device")
        self.db.routes[_key(route)] = route
        self._did(f"replace_route {route.dst} table {route.table}")

    async def delete_route(self, route: Route) -> bool:
        self._check("delete_route")
        if self.db.routes.pop(_key(route), None) is None:
            raise NetlinkError(errno.ESRCH, "No such process")
        self._did(f"delete_route {route.dst} table {route.table}")
        return True

    # --- rules

    async def rules(self, family: int) -> list[Rule]:
        return [r for r in self.db.rules if r.family == family]

    async def add_rule(self, rule: Rule) -> None:
        self._check("add_rule")
        if rule in self.db.rules:
            raise NetlinkError(errno.EEXIST, "File exists")
        self.db.rules.append(rule)
        self._did(f"add_rule {rule.priority}")

    async def delete_rule(self, rule: Rule) -> bool:
        self._check("delete_rule")
        if rule not in self.db.rules:
            raise NetlinkError(errno.ENOENT, "No such file or directory")
        self.db.rules.remove(rule)
        self._did(f"delete_rule {rule.priority}")
        return True

    # --- nexthops

    async def nexthops(self) -> list[Nexthop]:
        return list(self.db.nexthops.values())

    async def replace_nexthop(self, nh: Nexthop) -> None:
        self._check("replace_nexthop")
        if nh.group:
            missing = [m for m, _ in nh.group if m not in self.db.nexthops]
            if missing:
                raise NetlinkError(errno.EINVAL, f"Invalid nexthop id {missing[0]}")
            have = self.db.nexthops.get(nh.id)
            if have is not None and have.resilient is not None and nh.resilient is not None \
                    and have.resilient.buckets != nh.resilient.buckets:
                raise NetlinkError(errno.EINVAL, "Cannot change resilient group's bucket count")
        elif not nh.blackhole:
            link = self.db.links.get(nh.oif)
            if link is None or not (link.up and link.carrier):
                raise NetlinkError(errno.ENETDOWN, "Nexthop device is not up")
        self.db.nexthops[nh.id] = nh
        self._did(f"replace_nexthop {nh.id}")

    async def delete_nexthop(self, nh_id: int) -> bool:
        self._check("delete_nexthop")
        if nh_id not in self.db.nexthops:
            raise NetlinkError(errno.ENOENT, "No such file or directory")
        self._drop_nexthop(nh_id)
        self._did(f"delete_nexthop {nh_id}")
        return True

    def _drop_nexthop(self, nh_id: int) -> None:
        del self.db.nexthops[nh_id]
        for k in [k for k, r in self.db.routes.items() if r.nh_id == nh_id]:
            del self.db.routes[k]
        for gid, g in list(self.db.nexthops.items()):
            if g.group and any(m == nh_id for m, _ in g.group):
                rest = tuple((m, w) for m, w in g.group if m != nh_id)
                if rest:
                    self.db.nexthops[gid] = replace(g, group=rest)
                else:
                    self._drop_nexthop(gid)


class FakePinning:
    """The nftables pinning table as a dict (interface -> mark); `foreign` makes it someone else's."""

    def __init__(self, table: str = "hatun") -> None:
        self.table = table
        self.marks: dict[str, int] | None = None
        self.applied = 0
        self.foreign = False

    async def read(self):
        return None if self.marks is None else (dict(self.marks), "tag")

    async def apply(self, marks: dict[str, int]) -> None:
        from hatun.pinning import PinningError

        if self.foreign:
            raise PinningError(f"nftables table inet {self.table} exists but was not made by hatun")
        self.marks = dict(marks)
        self.applied += 1

    async def remove(self) -> bool:
        from hatun.pinning import PinningError

        if self.foreign:
            raise PinningError(f"nftables table inet {self.table} exists but was not made by hatun")
        had, self.marks = self.marks is not None, None
        return had
