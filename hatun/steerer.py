"""The steering loop: decide (steering.decide) -> plan (plan.render) -> apply (router.Router.set).

It runs on every poke (a tunnel's verdict, its device, a reload: coalesced), on netlink events that
show drift of hatun's objects, and every FULL_SYNC_INTERVAL anyway. A kernel change that was needed
although nothing hatun wanted changed is drift someone else caused: it is repaired, counted and
logged. No failure ends the loop: it retries soon.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import trio

from hatun.config import Config, default_peer_address
from hatun.layout import Layout
from hatun.netlink.core import NetlinkError, NetlinkTimeout
from hatun.netlink.rtnl import Resilient
from hatun.pinning import PinningError
from hatun.plan import RenderTunnel, Wanted, render
from hatun.router import Router
from hatun.serving import RateLimitedLog
from hatun.steering import Decision, Member, TunnelView, decide, effective_weights
from hatun.tunnel import TunnelRunner

log = logging.getLogger("hatun")

FULL_SYNC_INTERVAL = 30.0  # safety net: event sockets can overflow (an overflow itself triggers a re-read)
DEBOUNCE = 0.005  # coalesce a burst of pokes into one sync
RETRY_SYNC_AFTER = 0.3


class Steerer:
    """Keeps the kernel's route for the steered prefixes in line with the tunnels' verdicts.

    TUNNELS gives every tunnel with a device, each with the key the decision knows it by (unique:
    a draining tunnel may share its name with a new one)."""

    def __init__(self, config: Config, layout: Layout, router: Router, mode: str, lo_index: int,
                 tunnels: Callable[[], list[tuple[str, TunnelRunner]]], *, repairs: Counter,
                 errors: RateLimitedLog, previous: tuple[Member, ...] = ()) -> None:
        self.config = config  # replaced by a reload
        self.layout = layout
        self.router = router
        self.mode = mode  # "resilient" | "multipath"
        self.lo_index = lo_index
        self.tunnels = tunnels
        self.repairs = repairs
        self.errors = errors
        self.previous_members = previous  # kept on the route when all are down (`when_all_down = "keep"`)
        self.decision: Decision | None = None
        self.last_error: str | None = None
        self._last_wanted: Wanted | None = None
        self._poke = trio.Event()

    def poke(self) -> None:
        """Something changed: look again (soon, coalesced)."""
        self._poke.set()

    def wanted(self) -> Wanted:
        """Decide and plan (pure but for reading the tunnels' state)."""
        r = self.config.routing
        keyed = self.tunnels()
        weights = effective_weights({key: (t.cfg.weight, t.detector.weight_share) for key, t in keyed})
        views = [TunnelView(key, t.ifname, t.slot, weights[key], t.cfg.priority, t.health.health,
                            drained=t.drained or t.removing, present=t.present, presumed_up=t.presumed_up)
                 for key, t in keyed]
        decision = decide(views, r.when_all_down, self.previous_members)
        if decision.members and not decision.all_down:
            self.previous_members = decision.members
        self.decision = decision
        tunnels = [RenderTunnel(key, t.slot, t.ifindex if t.present else None, t.ifname,
                                tuple(a.network for a in t.cfg.address),
                                {a.version: default_peer_address(a) for a in t.cfg.address})
                   for key, t in keyed]
        return render(decision, tunnels, prefixes=r.prefixes, sources=r.source, layout=self.layout, mode=self.mode,
                      resilient=Resilient(r.buckets, r.idle_timer, r.unbalanced_timer), pin_flows=r.pin_flows,
                      lo_index=self.lo_index, fail_closed=r.when_all_down == "unreachable")

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Sync on every poke and every FULL_SYNC_INTERVAL; started once the first sync is done."""
        first = True
        while True:
            if not first:
                with trio.move_on_after(FULL_SYNC_INTERVAL):
                    await self._poke.wait()
                await trio.sleep(DEBOUNCE)
            self._poke = trio.Event()
            retry = False
            try:
                retry = not await self.sync_once()
            except Exception as e:  # noqa: BLE001 - e.g. ENOMEM: try again soon, never end the supervisor
                self.last_error = f"{type(e).__name__}: {e}"
                self.errors.log(logging.ERROR, "sync", "cannot update routes: %s", self.last_error,
                                exc_info=log.isEnabledFor(logging.DEBUG))
                retry = True
            if first:
                task_status.started()
                first = False
            if retry:
                # Instead of waiting for the next poke: a short pause, then again (the loop's own task).
                with trio.move_on_after(RETRY_SYNC_AFTER):
                    await self._poke.wait()
                self._poke.set()

    async def sync_once(self) -> bool:
        """Decide, plan, apply once. False when something failed (the caller retries soon)."""
        wanted = self.wanted()
        try:
            res = await self.router.set(wanted)
        except (NetlinkError, NetlinkTimeout, PinningError) as e:
            self.last_error = str(e)
            log.error("cannot update routes: %s", e)
            return False
        if res.changes and wanted == self._last_wanted:
            # Nothing we wanted changed, yet the kernel needed changes: someone else touched it.
            for kind, what in res.changes:
                self.repairs[kind] += 1
                log.warning("repaired drift: %s", what)
        elif res.changes:
            members = ", ".join(self.decision.member_names()) or "none (unreachable)"
            log.info("route updated: %s (%d changes)", f"tunnels in service: {members}", len(res.changes))
        self.last_error = "; ".join(res.errors) or None
        if res.errors:
            return False
        self._last_wanted = wanted
        return True
