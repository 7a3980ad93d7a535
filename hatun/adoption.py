"""What hatun finds in the kernel when it starts or reloads. Pure: kernel state in, verdicts out.

- `ownership_problems`: what a config names that belongs to someone else (hatun refuses to start,
  or to reload, rather than configure or later delete it);
- `adopt`: what a previous hatun left (after a crash, keep_on_exit or a fail-closed stop): the
  slots of its tunnels and the tunnels that carry the prefixes now, which stay in the route until
  their first verdict, so a restart loses no packet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hatun.config import Config
from hatun.layout import Layout, allocate_slots
from hatun.netlink.rtnl import Address, Link
from hatun.routes import Actual


def ownership_problems(config: Config, links: Sequence[Link], addresses: Iterable[Address], *, backend: str,
                       lo_index: int, our_ifnames: set[str], our_sources: set[str], state_path: str) -> list[str]:
    """What CONFIG names that belongs to someone else: a device of another kind under a tunnel's
    interface name (hatun would configure it, and delete it at stop), or a source address the host
    already has (hatun would remove it at stop). OUR_IFNAMES, OUR_SOURCES: already hatun's; BACKEND:
    "kernel" or "userspace"."""
    problems = []
    want = "wireguard" if backend == "kernel" else "tun"
    by_name = {l.name: l for l in links}
    for t in config.tunnels:
        link = by_name.get(t.ifname)
        if link is not None and link.kind != want and t.ifname not in our_ifnames:
            problems.append(
                f"tunnel {t.name}: interface {t.ifname} already exists as a {link.kind or 'network'} device,"
                f" not a {'kernel WireGuard' if want == 'wireguard' else 'wireguard-go (tun)'} device of"
                f" hatun's: set `interface` to a free name, or remove that device")
    names = {l.index: l.name for l in links}
    for addr in addresses:
        ip = addr.interface.ip
        if ip not in config.routing.source:
            continue
        if addr.index != lo_index:
            problems.append(f"routing.source {ip} is already an address of {names.get(addr.index, addr.index)}:"
                            " give hatun an address of its own (it adds it to lo and removes it at stop)")
        elif str(ip) not in our_sources:
            problems.append(f"routing.source {ip} is already on lo, and hatun did not put it there (no record"
                            f" in {state_path}): give hatun an address of its own, or remove it"
                            f" (`ip address del {addr.interface} dev lo`) if a crashed hatun left it")
    return problems


@dataclass(frozen=True)
class Adopted:
    slots: dict[str, int]  # tunnel name -> slot: kept from the previous run where it had one
    members: frozenset[str]  # interface names in the route now

    def describe(self, actual: Actual) -> str | None:
        if not (self.members or actual.routes):
            return None
        return (f"adopting the kernel state of a previous run: {len(actual.routes)} routes, {len(actual.nexthops)}"
                f" nexthops; in the route: {', '.join(sorted(self.members)) or 'none'}")


def adopt(config: Config, layout: Layout, actual: Actual, links: Sequence[Link],
          marks: Mapping[str, int] | None) -> Adopted:
    """The slots and route members a previous hatun left: slots from the pinning table's map (MARKS:
    interface -> mark) or else from the ids of the nexthops on a tunnel's device; members from the
    groups (or the multipath routes). Tunnels without a trace get free slots."""
    names = {l.index: l.name for l in links}
    by_ifname = {t.ifname: t.name for t in config.tunnels}
    taken = {by_ifname[i]: m >> layout.shift for i, m in (marks or {}).items() if i in by_ifname}
    for nh in actual.nexthops.values():
        slot = layout.slot_of_nexthop(nh.id)
        name = by_ifname.get(names.get(nh.oif or -1, ""))
        if slot and name is not None and name not in taken:
            taken[name] = slot[0]
    slots = allocate_slots([t.name for t in config.tunnels], taken, layout.max_slot)
    members = adopted_members(actual, layout, names, set(config.routing.prefixes))
    return Adopted(slots, frozenset(members))


def adopted_members(actual: Actual, layout: Layout, ifnames: Mapping[int, str], prefixes) -> set[str]:
    """Names of the devices that carry the steered PREFIXES now (after a restart): the members of
    hatun's nexthop groups, or the paths of its multipath routes. IFNAMES maps ifindex -> name."""
    members: set[str] = set()
    for gid in (layout.group(4), layout.group(6)):
        group = actual.nexthops.get(gid)
        for nh_id, _ in (group.group if group else ()):
            nh = actual.nexthops.get(nh_id)
            if nh is not None and nh.oif in ifnames:
                members.add(ifnames[nh.oif])
    for r in actual.routes:
        if r.table == layout.table and r.type == "unicast" and r.nh_id is None and r.dst in prefixes:
            for oif in [hop.oif for hop in r.multipath] + [r.oif]:
                if oif in ifnames:
                    members.add(ifnames[oif])
    return members
