"""Where hatun's kernel objects live: ids, marks, slots, tables, rule priorities (see docs/design.md).

One `Layout` per config (`[routing]`); every other module asks it, never computes an id itself.
It also says which objects are hatun's (`owns_*`): the reconciler reads and removes only those.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BYPASS_SLOT = 1  # mark of the tunnels' own encrypted UDP packets
FIRST_SLOT = 2
GROUP_ID_OFFSET = 1000  # group ids: nexthop_id + 1000 (IPv4), + 1001 (IPv6)
GROUP_ID_PROBE = 1002  # nexthop ids base+1002/1003: a short-lived probe for resilient group support
# Route priority (metric) of the fail-closed stubs: above any real route (IPv4 0, IPv6 1024 by
# default), so the kernel uses a stub only when the real route of its prefix is gone.
FAIL_CLOSED_METRIC = 0xFFFFFF00


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

    @property
    def probe_nexthops(self) -> tuple[int, int]:
        """(blackhole nexthop, one-member group) of the start-up's probe for resilient groups."""
        return self.nexthop_id + GROUP_ID_PROBE, self.nexthop_id + GROUP_ID_PROBE + 1

    # --- what is hatun's (the reconciler reads, changes and deletes nothing else)

    @property
    def tables(self) -> range:
        """The steering table and one pinned table per slot."""
        return range(self.table, self.table + self.max_slot + 1)

    @property
    def nexthop_ids(self) -> range:
        """Device nexthops, the two groups, and the pair of the resilient-group probe."""
        return range(self.nexthop_id, self.nexthop_id + GROUP_ID_PROBE + 2)

    def owns_rule(self, protocol: int, priority: int) -> bool:
        # Protocol and priority: a second instance may use the same protocol with other priorities.
        return protocol == self.protocol and self.rule_priority <= priority <= self.rule_priority + 2


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
