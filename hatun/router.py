"""The one declarative apply: `Router.set(wanted)` makes the kernel hold exactly a `plan.Wanted`.

In the manner of Tailscale's `router.Set`: it may be called again with the same value and changes
nothing; additions come before deletions. The rtnetlink objects (addresses, nexthops, routes,
rules) go through `routes.Reconciler`, the flow-pinning marks through `pinning.Pinning` (nftables).
`remove_all` takes everything of hatun's away but a fail-closed gate.
"""

from __future__ import annotations

import logging
import math
import socket

import trio

from hatun.layout import Layout
from hatun.netlink.core import NetlinkError, NetlinkTimeout
from hatun.netlink.rtnl import Nexthop, Resilient, Rtnl
from hatun.pinning import Pinning, PinningError
from hatun.plan import Wanted
from hatun.routes import Actual, Reconciler, SyncResult

log = logging.getLogger("hatun")

NFT_CHECK_INTERVAL = 30.0  # the nftables table is read back (drift) this often, not on every set


class Router:
    """hatun's kernel objects in one network namespace."""

    def __init__(self, rtnl: Rtnl, layout: Layout, lo_index: int, pinning: Pinning | None) -> None:
        self.routes = Reconciler(rtnl, layout, lo_index)
        self.pinning = pinning
        self._marks_applied: dict[str, int] | None = None
        self._nft_checked = -math.inf

    @property
    def owned_addresses(self) -> set:
        """Source addresses hatun put on lo (others there are not ours to remove)."""
        return self.routes.owned_addresses

    async def read(self) -> Actual:
        """hatun's rtnetlink objects as they are now."""
        return await self.routes.read()

    async def read_marks(self) -> dict[str, int] | None:
        """The pinning table's interface -> mark map as it is now (None: no table, or no pinning).
        Raises PinningError."""
        if self.pinning is None:
            return None
        current = await self.pinning.read()
        return None if current is None else current[0]

    async def set(self, wanted: Wanted) -> SyncResult:
        """Make the kernel match WANTED. Netlink errors are collected in the result (the rest goes
        on); raises PinningError when the nftables table cannot be written."""
        res = await self.routes.sync(wanted)
        marks = wanted.marks_dict()
        if self.pinning is not None and marks is not None:
            now = trio.current_time()
            if marks != self._marks_applied or now - self._nft_checked >= NFT_CHECK_INTERVAL:
                self._nft_checked = now
                await self.pinning.apply(marks)
                self._marks_applied = marks
        return res

    async def remove_all(self, gate: Wanted | None = None) -> SyncResult:
        """Delete every object of hatun's but GATE (the fail-closed gate of `plan.fail_closed_gate`),
        and the pinning table. Never raises: what failed is in the result's errors (a pinning table
        that holds what hatun did not make is left alone, and said so)."""
        try:
            res = await self.routes.remove_all(gate)
        except (NetlinkError, NetlinkTimeout) as e:
            res = SyncResult(errors=[f"routes: {e}"])
        if self.pinning is not None:
            try:
                if await self.pinning.remove():
                    res.changes.append(("nftables", f"nftables table inet {self.pinning.table}"))
            except PinningError as e:
                res.errors.append(f"nftables: {e}")
            self._marks_applied = None
        return res


async def choose_mode(rtnl: Rtnl, layout: Layout, configured: str) -> str:
    """"resilient" or "multipath": CONFIGURED unless "auto", which probes whether the kernel has
    resilient nexthop groups (5.13+) with a blackhole nexthop and a one-member group, removed again."""
    if configured != "auto":
        return configured
    probe_nh, probe_group = layout.probe_nexthops
    try:
        await rtnl.replace_nexthop(Nexthop(probe_nh, socket.AF_INET, blackhole=True, protocol=layout.protocol))
        await rtnl.replace_nexthop(Nexthop(probe_group, 0, group=((probe_nh, 1),), protocol=layout.protocol,
                                           resilient=Resilient(buckets=8, idle_timer=1, unbalanced_timer=0)))
        return "resilient"
    except (NetlinkError, NetlinkTimeout) as e:
        log.info("no resilient nexthop groups on this kernel (%s): using a classic multipath route", e)
        return "multipath"
    finally:
        for nh in (probe_group, probe_nh):
            try:
                await rtnl.delete_nexthop(nh)
            except (NetlinkError, NetlinkTimeout):
                pass
