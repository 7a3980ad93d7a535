"""The supervisor: the composition root. One Trio nursery holding every tunnel, the steering and the servers.

    run ─┬─ events      rtnetlink notifications: tunnel devices coming and going, drift
         ├─ reconciler  steering.decide + render -> routes.Reconciler.sync (+ nftables pinning)
         ├─ stats       WireGuard counters and handshakes (passive health signal)
         ├─ tunnel gw1  a TunnelRunner (hatun/tunnel.py): device, probes, resolver, kicks, in a nursery of its own
         ├─ tunnel gw2 ...
         ├─ reload      one at a time: reload.plan_reload, then `_apply_plan`
         ├─ metrics / control servers, signals (started by hatun/daemon.py beside `run`)

A failure inside one tunnel's tasks is logged and that tunnel alone is restarted with backoff.
State changes poke the reconciler, which computes the wanted kernel objects from the current state
and makes the kernel match; it also runs on netlink events (drift) and every 30 s (a safety net).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import trio

from hatun import __version__, sysctl
from hatun.config import Config, ConfigError, ConfigUnreadable, Secrets, Tunnel, default_peer_address, load_config
from hatun.health import State
from hatun.keys import redact
from hatun.netlink.core import EventsOverflow, NetlinkError, NetlinkTimeout
from hatun.netlink.rtnl import EventFilter, Link, Nexthop, Resilient, Route, Rtnl, Rule, open_rtnl, open_rtnl_events
from hatun.pinning import Pinning, PinningError
from hatun.probes import ProbeEngine, open_probe_engine
from hatun.reload import ReloadPlan, RunningTunnel, plan_reload
from hatun.routes import Reconciler, adopted_members
from hatun.rundir import RunDir, RunDirError, State as RunState
from hatun.serving import RateLimitedLog
from hatun.status import ReloadStatus, RouteStatus, Status, TunnelStatus
from hatun.steering import Layout, Member, RenderTunnel, TunnelView, allocate_slots, decide, fail_closed_gate, render
from hatun.teardown import cleanup, remove_owned
from hatun.tunnel import TunnelEnv, TunnelRunner, device_settings, refresh_statuses
from hatun.wireguard.model import WireGuardError

__all__ = ["Supervisor", "SupervisorError", "cleanup", "device_settings"]

log = logging.getLogger("hatun")

FULL_SYNC_INTERVAL = 30.0  # safety net: event sockets can overflow (an overflow itself triggers a re-read)
STATS_INTERVAL = 30.0  # counters and handshake ages in the background; status and scrapes read fresh ones
DEBOUNCE = 0.005  # coalesce a burst of pokes into one sync
TEARDOWN_GRACE = 10.0
RETRY_SYNC_AFTER = 0.3
RELOAD_TIMEOUT = 120.0  # one reload, at most (DNS endpoints, slow backends); it is never cut short by a client
STATUS_DEADLINE = 2.0  # refreshing every tunnel's counters for a status or a scrape, at most
TASK_BACKOFF_MAX = 10.0  # a failing supervisor task is restarted at least this often


class SupervisorError(Exception):
    """hatun cannot start or run; the message says why and what to do."""


@dataclass
class _ReloadResult:
    """The outcome of one reload, once `done` is set."""

    done: trio.Event = field(default_factory=trio.Event)
    ok: bool = False
    message: str = ""

    def finish(self, ok: bool, message: str) -> None:
        self.ok, self.message = ok, message
        self.done.set()


class Supervisor:
    """Runs hatun for one config until stopped. See the module docstring for the task tree."""

    def __init__(self, config: Config, secrets: Secrets, config_path: str | None = None) -> None:
        self.config = config
        self.secrets = secrets
        self.config_path = config_path
        self.layout = Layout.from_routing(config.routing)
        self.rundir = RunDir(config.run_dir)
        self.tunnels: dict[str, TunnelRunner] = {}  # the config's tunnels, by name
        self.draining: list[TunnelRunner] = []  # removed by a reload, keeping their flows until torn down
        self._reload_lock = trio.Lock()
        self._reload_running: _ReloadResult | None = None
        self._errors = RateLimitedLog(log)
        self._last_nft_check = 0.0
        self.backend = None
        self.backend_name: str | None = None
        self.mode: str | None = None  # "resilient" | "multipath"
        self.rtnl: Rtnl | None = None
        self.probes: ProbeEngine | None = None
        self.env: TunnelEnv | None = None  # what the tunnels use of ours, once the backend is open
        self.reconciler: Reconciler | None = None
        self.pinning: Pinning | None = None
        self.decision = None
        self.previous_members: tuple[Member, ...] = ()
        self.ready = trio.Event()
        self.started_at = time.time()
        self.stop_requested = trio.Event()
        self.cleanup_on_stop = not config.keep_on_exit
        self.reloads = Counter()
        self.last_reload_ok = True
        self.last_reload_message: str | None = None
        self.repairs = Counter()
        self._poke = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._tunnel_nursery: trio.Nursery | None = None
        self._last_wanted = None
        self._lo_index = 1
        self._sysctl_saved: dict[str, str] = {}
        self._state = RunState()
        self._marks_applied: dict[str, int] | None = None
        self.last_sync_error: str | None = None

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bring everything up and keep it up until `stop()`; then clean up (unless keep_on_exit)."""
        from hatun.wireguard import select_backend

        cfg = self.config
        try:
            self.rundir.prepare()
            lock = self.rundir.lock()
        except RunDirError as e:
            raise SupervisorError(str(e)) from None
        self._state = self.rundir.load_state()
        async with AsyncExitStack() as stack:
            stack.callback(os.close, lock)
            # Events first, then the initial dump: nothing falls between the two.
            lay = self.layout  # the filter keeps at least what _serve_events looks at
            events = await stack.enter_async_context(open_rtnl_events(filter=EventFilter(
                tables=range(lay.table, lay.table + lay.max_slot + 1), protocol=lay.protocol,
                nexthop_ids=range(lay.nexthop_id, lay.nexthop_id + GROUP_ID_PROBE + 2))))
            self.rtnl = await stack.enter_async_context(open_rtnl())
            self.backend_name = await select_backend(cfg.backend)
            self.backend = await stack.enter_async_context(self._open_backend())
            self.probes = await stack.enter_async_context(open_probe_engine())
            self.env = TunnelEnv(self.backend, self.backend_name, self.rtnl, self.probes, self.layout.bypass_mark,
                                 self.poke, self.repairs, self._errors)
            if self.backend_name == "userspace":
                self._check_inotify()
            links = await self.rtnl.links()
            self._lo_index = next((l.index for l in links if l.name == "lo"), 1)
            await self._check_ownership(links)
            self.reconciler = Reconciler(self.rtnl, self.layout, self._lo_index)
            self.pinning = Pinning(cfg.routing.nft_table, cfg.routing.fwmark_mask) if cfg.routing.pin_flows else None
            self.mode = await self._choose_mode()
            await self._adopt(links)
            self._setup_sysctls()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._keep_running, "events", self._serve_events, events)
                await nursery.start(self._serve_reconciler)
                nursery.start_soon(self._keep_running, "stats", self._serve_stats)
                nursery.start_soon(self._keep_running, "readiness", self._serve_ready)
                self._tunnel_nursery = nursery
                for t in self.tunnels.values():
                    self._start_tunnel(t)
                task_status.started(self)
                await self.stop_requested.wait()
                log.info("stopping%s", "" if self.cleanup_on_stop else " (keep_on_exit: tunnels and routes stay)")
                nursery.cancel_scope.cancel()
            # Closed: from now on nothing may start tasks in it (a SIGHUP during the teardown).
            self._nursery = self._tunnel_nursery = None
            if self.cleanup_on_stop:
                with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_GRACE) as grace:
                    await self._teardown()
                if grace.cancelled_caught:
                    log.error("clean-up did not finish within %.0f s; run `hatun down` to finish it", TEARDOWN_GRACE)

    def _check_inotify(self) -> None:
        # Each wireguard-go holds an inotify instance (watching its UAPI socket); at the per-user limit
        # (128 by default) the next one fails to start with "too many open files".
        try:
            with open("/proc/sys/fs/inotify/max_user_instances") as f:
                limit = int(f.read())
        except (OSError, ValueError):
            return
        if len(self.config.tunnels) + 8 > limit:
            log.warning("%d userspace tunnels need as many inotify instances, the limit is %d:"
                        " raise fs.inotify.max_user_instances (e.g. to %d)", len(self.config.tunnels), limit,
                        max(1024, 2 * len(self.config.tunnels)))

    def stop(self, cleanup: bool | None = None) -> None:
        """Ask `run` to stop; CLEANUP overrides keep_on_exit (True: remove everything)."""
        if cleanup is not None:
            self.cleanup_on_stop = cleanup
        self.stop_requested.set()

    async def _keep_running(self, name: str, fn, *args) -> None:
        """Run one of the supervisor's own tasks; when it fails (an OSError from a full system, a bug),
        log it and start it again with backoff: nothing a task meets may end the supervisor."""
        backoff = 0.1
        while True:
            started = trio.current_time()
            try:
                await fn(*args)
                return
            except Exception as e:  # noqa: BLE001 - isolate the failure; the task starts again
                if trio.current_time() - started > 30:
                    backoff = 0.1
                self._errors.log(logging.ERROR, name, "%s failed: %s: %s; starting it again in %.1f s", name,
                                 type(e).__name__, e, backoff, exc_info=log.isEnabledFor(logging.DEBUG))
            await trio.sleep(backoff)
            backoff = min(backoff * 2, TASK_BACKOFF_MAX)

    def _spawn(self, name: str, fn, *args) -> None:
        """Start a short task in the supervisor's nursery; a failure of it is logged, not propagated."""
        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception as e:  # noqa: BLE001 - a one-off task must not end the supervisor
                self._errors.log(logging.ERROR, name, "%s failed: %s: %s", name, type(e).__name__, e,
                                 exc_info=log.isEnabledFor(logging.DEBUG))

        if self._nursery is not None and not self.stop_requested.is_set():
            self._nursery.start_soon(guarded, name=name)

    async def _check_ownership(self, links: list[Link]) -> None:
        """Refuse to start where the config names what belongs to someone else. Raises SupervisorError."""
        problems = await self._ownership_problems(self.config, links, set(), set(self._state.sources))
        if problems:
            raise SupervisorError("; ".join(problems))

    async def _ownership_problems(self, config: Config, links: list[Link], our_ifnames: set[str],
                                  our_sources: set[str]) -> list[str]:
        """What CONFIG names that belongs to someone else: a device of another kind under a tunnel's
        interface name (hatun would configure it, and delete it at stop), or a source address the host
        already has (hatun would remove it at stop). OUR_IFNAMES, OUR_SOURCES: already hatun's."""
        problems = []
        want = "wireguard" if self.backend_name == "kernel" else "tun"
        by_name = {l.name: l for l in links}
        for t in config.tunnels:
            link = by_name.get(t.ifname)
            if link is not None and link.kind != want and t.ifname not in our_ifnames:
                problems.append(
                    f"tunnel {t.name}: interface {t.ifname} already exists as a {link.kind or 'network'} device,"
                    f" not a {'kernel WireGuard' if want == 'wireguard' else 'wireguard-go (tun)'} device of"
                    f" hatun's: set `interface` to a free name, or remove that device")
        names = {l.index: l.name for l in links}
        for addr in await self.rtnl.addresses():
            ip = addr.interface.ip
            if ip not in config.routing.source:
                continue
            if addr.index != self._lo_index:
                problems.append(f"routing.source {ip} is already an address of {names.get(addr.index, addr.index)}:"
                                " give hatun an address of its own (it adds it to lo and removes it at stop)")
            elif str(ip) not in our_sources:
                problems.append(f"routing.source {ip} is already on lo, and hatun did not put it there (no record"
                                f" in {self.rundir.state_path}): give hatun an address of its own, or remove it"
                                f" (`ip address del {addr.interface} dev lo`) if a crashed hatun left it")
        return problems

    def _open_backend(self):
        if self.backend_name == "kernel":
            from hatun.wireguard.kernel import open_kernel_backend

            return open_kernel_backend(rtnl=self.rtnl)
        from hatun.wireguard.userspace import open_userspace_backend

        return open_userspace_backend(run_dir=self.config.run_dir, rtnl=self.rtnl, on_recreated=self._on_recreated)

    async def _choose_mode(self) -> str:
        mode = self.config.routing.mode
        if mode != "auto":
            return mode
        # Resilient groups need kernel 5.13+; probe with a blackhole nexthop and a one-member group.
        probe_nh, probe_group = self.layout.nexthop_id + GROUP_ID_PROBE, self.layout.nexthop_id + GROUP_ID_PROBE + 1
        try:
            await self.rtnl.replace_nexthop(Nexthop(probe_nh, socket.AF_INET, blackhole=True, protocol=self.layout.protocol))
            await self.rtnl.replace_nexthop(Nexthop(probe_group, 0, group=((probe_nh, 1),), protocol=self.layout.protocol,
                                                    resilient=Resilient(buckets=8, idle_timer=1, unbalanced_timer=0)))
            return "resilient"
        except (NetlinkError, NetlinkTimeout) as e:
            log.info("no resilient nexthop groups on this kernel (%s): using a classic multipath route", e)
            return "multipath"
        finally:
            for nh in (probe_group, probe_nh):
                try:
                    await self.rtnl.delete_nexthop(nh)
                except (NetlinkError, NetlinkTimeout):
                    pass
    async def _adopt(self, links: list[Link]) -> None:
        """Take over what a previous hatun left (after a crash or keep_on_exit): slots from the
        nftables map, the current route members (kept until they have a first verdict)."""
        by_name = {l.name: l for l in links}
        names = {l.index: l.name for l in links}
        taken: dict[str, int] = {}
        if self.pinning is not None:
            current = await self.pinning.read()
            if current is not None:
                by_ifname = {t.ifname: t.name for t in self.config.tunnels}
                taken = {by_ifname[i]: m >> self.layout.shift for i, m in current[0].items() if i in by_ifname}
        actual = await self.reconciler.read()
        for nh in actual.nexthops.values():
            slot = self.layout.slot_of_nexthop(nh.id)
            name = names.get(nh.oif or -1)
            tunnel = next((t for t in self.config.tunnels if t.ifname == name), None)
            if slot and tunnel is not None and tunnel.name not in taken:
                taken[tunnel.name] = slot[0]
        slots = allocate_slots([t.name for t in self.config.tunnels], taken, self.layout.max_slot)
        members = adopted_members(actual, self.layout, names, set(self.config.routing.prefixes))
        now = trio.current_time()
        for t in self.config.tunnels:
            runner = self._new_runner(t, slots[t.name], now)
            link = by_name.get(t.ifname)
            if link is not None:
                runner.ifindex, runner.link_up = link.index, link.up and link.carrier
            runner.presumed_up = t.ifname in members
            self.tunnels[t.name] = runner
        self.reconciler.owned_addresses |= {a for a in await self.rtnl.addresses(self._lo_index)
                                            if a.interface.ip in self.config.routing.source}
        if members or actual.routes:
            log.info("adopting the kernel state of a previous run: %d routes, %d nexthops; in the route: %s",
                     len(actual.routes), len(actual.nexthops), ", ".join(sorted(members)) or "none")
        self.previous_members = tuple(
            Member(t.name, t.ifname, t.slot, t.cfg.weight) for t in self.tunnels.values() if t.presumed_up
        )

    def _new_runner(self, t: Tunnel, slot: int, now: float) -> TunnelRunner:
        assert self.env is not None
        return TunnelRunner(self.env, self.config, t, self.secrets.keys[t.name], slot, now)

    # ------------------------------------------------------------ host settings

    def _setup_sysctls(self) -> None:
        r = self.config.routing
        wanted = []
        if r.hash_policy != "keep":
            value = "1" if r.hash_policy == "l4" else "0"
            wanted += [(value, "net", "ipv4", "fib_multipath_hash_policy"), (value, "net", "ipv6", "fib_multipath_hash_policy")]
        if r.pin_flows:
            # Reverse-path checks must see the mark that pins a flow to its tunnel.
            wanted.append(("1", "net", "ipv4", "conf", "all", "src_valid_mark"))
        saved = dict(self._state.sysctls)
        for value, *parts in wanted:
            key = ".".join(parts)
            try:
                before = sysctl.read(*parts)
                if before is None:
                    continue
                if sysctl.write(value, *parts):
                    saved.setdefault(key, before)
                    log.info("set %s = %s (was %s)", key, value, before)
            except sysctl.SysctlError as e:
                log.warning("%s", e)
        self._sysctl_saved = saved
        self._save_state()


    def _save_state(self) -> None:
        self._state.pid = os.getpid()
        self._state.config = os.path.abspath(self.config_path) if self.config_path else None
        self._state.socket = self.config.control.socket
        self._state.sysctls = self._sysctl_saved
        self._state.sources = sorted(str(a) for a in self.config.routing.source)
        try:
            self.rundir.save_state(self._state)
        except RunDirError as e:
            log.warning("%s (a restart will not know which sysctls to restore)", e)


    # ------------------------------------------------------------ tunnels

    def _start_tunnel(self, t: TunnelRunner) -> None:
        assert self._tunnel_nursery is not None
        self._tunnel_nursery.start_soon(t.serve, name=f"tunnel {t.name}")

    def _on_recreated(self, ifname: str) -> None:
        """The userspace backend replaced a dead or hung wireguard-go: a new device, new ifindex."""
        for t in self.runtimes():
            if t.ifname == ifname:
                t.on_recreated()

    # ------------------------------------------------------------ observing

    async def refresh_statuses(self, max_age: float = 0.0, deadline: float = STATUS_DEADLINE) -> None:
        """Read every tunnel's counters concurrently, for at most DEADLINE seconds (see tunnel.refresh_statuses)."""
        await refresh_statuses(self.runtimes(), max_age, deadline)

    async def _serve_stats(self) -> None:
        """Counters and handshakes every few seconds; a stale handshake counts as a failed probe."""
        while True:
            await trio.sleep(STATS_INTERVAL)
            await self.refresh_statuses(deadline=STATS_INTERVAL / 2)
            for t in list(self.tunnels.values()):
                t.check_handshake()

    async def _serve_ready(self) -> None:
        """Readiness: every tunnel has a first verdict (or a bounded wait has passed)."""
        with trio.move_on_after(max(30.0, max((rt.interval * (rt.health.rise + rt.health.fall) + rt.timeout)
                                               for rt in self.tunnels.values()) * 3)):
            while any(rt.health.health is State.INIT for rt in self.tunnels.values()):
                await trio.sleep(0.05)
        self.ready.set()
        from hatun.notify import sd_notify

        up = sum(rt.health.health is State.UP for rt in self.tunnels.values())
        sd_notify(f"READY=1\nSTATUS={up}/{len(self.tunnels)} tunnels in service")
        log.info("ready: %d of %d tunnels in service", up, len(self.tunnels))

    async def _serve_events(self, events) -> None:
        """Netlink notifications: our devices coming and going; drift of our objects."""
        proto = self.layout.protocol
        while True:
            try:
                async for ev in events:
                    obj = ev.obj
                    if isinstance(obj, Link):
                        self._on_link_event(ev.action, obj)
                    elif isinstance(obj, (Route, Rule)) and obj.protocol == proto:
                        self.poke()  # ours, changed: by us, or behind our back (drift)
                    elif isinstance(obj, Nexthop) and self.reconciler._our_nexthop(obj.id):
                        self.poke()
            except EventsOverflow:
                log.info("netlink events overflowed: re-reading the state")
                try:
                    links = await self.rtnl.links()
                    for t in self.runtimes():
                        t.set_link(next((l for l in links if l.name == t.ifname), None))
                except (NetlinkError, NetlinkTimeout) as e:
                    log.warning("re-reading the links after an overflow: %s", e)
                self.poke()

    def _on_link_event(self, action: str, link: Link) -> None:
        for t in self.runtimes():
            if t.ifname == link.name or (action == "del" and t.ifindex == link.index):
                t.set_link(None if action == "del" else link)

    # ------------------------------------------------------------ steering

    def runtimes(self) -> list[TunnelRunner]:
        """Every tunnel hatun has devices for: the config's, and those draining after a reload."""
        return [*self.tunnels.values(), *self.draining]

    def _key(self, rt: TunnelRunner) -> str:
        # A draining tunnel may share its name with a new one (its interface was renamed).
        return rt.name if self.tunnels.get(rt.name) is rt else f"{rt.name}@{rt.ifname}"

    def poke(self) -> None:
        """Something changed: the reconciler should look again (soon, coalesced)."""
        self._poke.set()

    def views(self) -> list[TunnelView]:
        return [
            TunnelView(self._key(rt), rt.ifname, rt.slot, rt.cfg.weight, rt.cfg.priority, rt.health.health,
                       drained=rt.drained or rt.removing, present=rt.present, presumed_up=rt.presumed_up)
            for rt in self.runtimes()
        ]

    def _wanted(self):
        r = self.config.routing
        decision = decide(self.views(), r.when_all_down, self.previous_members)
        if decision.members and not decision.all_down:
            self.previous_members = decision.members
        self.decision = decision
        tunnels = [
            RenderTunnel(self._key(rt), rt.slot, rt.ifindex if rt.present else None,
                         tuple(a.network for a in rt.cfg.address),
                         {a.version: default_peer_address(a) for a in rt.cfg.address})
            for rt in self.runtimes()
        ]
        return render(decision, tunnels, prefixes=r.prefixes, sources=r.source, layout=self.layout, mode=self.mode,
                      resilient=Resilient(r.buckets, r.idle_timer, r.unbalanced_timer), pin_flows=r.pin_flows,
                      lo_index=self._lo_index, fail_closed=r.when_all_down == "unreachable")

    async def _serve_reconciler(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Make the kernel match the wanted state on every poke, and every FULL_SYNC_INTERVAL anyway."""
        first = True
        while True:
            if not first:
                with trio.move_on_after(FULL_SYNC_INTERVAL):
                    await self._poke.wait()
                await trio.sleep(DEBOUNCE)
            self._poke = trio.Event()
            try:
                await self.sync_once()
            except Exception as e:  # noqa: BLE001 - e.g. ENOMEM: try again soon, never end the supervisor
                self.last_sync_error = f"{type(e).__name__}: {e}"
                self._errors.log(logging.ERROR, "sync", "cannot update routes: %s", self.last_sync_error,
                                 exc_info=log.isEnabledFor(logging.DEBUG))
                self._retry_soon()
            if first:
                task_status.started()
                first = False

    async def sync_once(self) -> None:
        wanted = self._wanted()
        try:
            res = await self.reconciler.sync(wanted)
            await self._sync_pinning()
        except (NetlinkError, NetlinkTimeout, PinningError) as e:
            self.last_sync_error = str(e)
            log.error("cannot update routes: %s", e)
            self._retry_soon()
            return
        if res.changes and wanted == self._last_wanted:
            # Nothing we wanted changed, yet the kernel needed changes: someone else touched it.
            for kind, what in res.changes:
                self.repairs[kind] += 1
                log.warning("repaired drift: %s", what)
        elif res.changes:
            members = ", ".join(self.decision.member_names()) or "none (unreachable)"
            log.info("route updated: %s (%d changes)", f"tunnels in service: {members}", len(res.changes))
        self.last_sync_error = "; ".join(res.errors) or None
        if res.errors:
            self._retry_soon()
        else:
            self._last_wanted = wanted

    async def _sync_pinning(self) -> None:
        if self.pinning is None:
            return
        marks = {rt.ifname: self.layout.mark(rt.slot) for rt in self.runtimes()}
        if marks != self._marks_applied or self._poke_full():
            await self.pinning.apply(marks)
            self._marks_applied = marks

    def _poke_full(self) -> bool:
        # The nftables table is checked on the periodic full sync too (drift), not on every poke.
        now = trio.current_time()
        if now - self._last_nft_check >= FULL_SYNC_INTERVAL:
            self._last_nft_check = now
            return True
        return False

    def _retry_soon(self) -> None:
        async def later():
            await trio.sleep(RETRY_SYNC_AFTER)
            self.poke()

        if self._nursery is not None:
            self._spawn("route retry", later)

    # ------------------------------------------------------------ teardown

    async def _teardown(self) -> None:
        """Remove routes, rules, nexthops, the nftables table, the devices; restore sysctls.

        With `when_all_down = "unreachable"` the fail-closed gate stays (the prefixes' unreachable
        stubs and the steering rules): the prefixes stay unreachable, never in clear text through
        the main table, until hatun runs again or `hatun down` (`teardown.cleanup`) opens the gate."""
        r = self.config.routing
        fail_closed = r.when_all_down == "unreachable"

        async def delete_device(ifname: str) -> bool:
            await self.backend.delete(ifname)
            return True

        devices = [t.ifname for t in self.runtimes()]
        await remove_owned(self.reconciler, self.pinning, gate=fail_closed_gate(r.prefixes, self.layout) if fail_closed
                           else None, devices=devices, delete_device=delete_device, sysctls=self._sysctl_saved,
                           rundir=self.rundir)
        self._sysctl_saved = {}
        log.info("removed hatun's routes, rules, nexthops and %d tunnel devices%s", len(devices),
                 "; the steered prefixes stay unreachable (fail closed) until hatun runs again or `hatun down`"
                 if fail_closed else "")

    # ------------------------------------------------------------ drain and reload

    def drain(self, name: str, drained: bool = True) -> TunnelRunner:
        """Take tunnel NAME out of the route for new flows (its flows stay) or put it back. Raises KeyError."""
        t = self.tunnels[name]
        t.set_drained(drained)
        return t

    def start_reload(self) -> _ReloadResult:
        """Start re-reading the config file, in a task of the supervisor's own: reloads run one at a
        time, and nobody who asked for one (a control client that gives up, a signal) can cancel it
        halfway. Wait on the result's `done` for (ok, message)."""
        if self._reload_running is not None:
            return self._reload_running  # one not yet started: it will read the file as it is now
        result = _ReloadResult()
        if self.config_path is None:
            result.finish(False, "no config file to reload")
        elif self.stop_requested.is_set():
            result.finish(False, "hatun is stopping: no reload")
        elif self._nursery is None:
            result.finish(False, "hatun is still starting: reload again in a moment")
        else:
            self._reload_running = result
            self._nursery.start_soon(self._run_reload, result, name="reload")
        return result

    async def reload(self) -> tuple[bool, str]:
        """Reload (see `start_reload`) and wait for its result. Cancelling the wait does not cancel the reload."""
        result = self.start_reload()
        await result.done.wait()
        return result.ok, result.message

    async def _run_reload(self, result: _ReloadResult) -> None:
        ok, message = False, "hatun stopped before the reload finished"
        try:
            with trio.move_on_after(RELOAD_TIMEOUT) as scope:
                ok, message = await self._reload(result)
            if scope.cancelled_caught:
                ok, message = self._reload_done(False, f"reload did not finish within {RELOAD_TIMEOUT:.0f} s;"
                                                       " `hatun status` shows what runs now")
        except Exception as e:  # noqa: BLE001 - a failed reload must not end the supervisor
            log.debug("reload failed", exc_info=True)
            ok, message = self._reload_done(False, f"reload failed: {type(e).__name__}: {e}")
        finally:
            if self._reload_running is result:
                self._reload_running = None
            result.finish(ok, message)

    async def _reload(self, result: _ReloadResult) -> tuple[bool, str]:
        """Re-read the config file; apply only what changed. An invalid file changes nothing."""
        async with self._reload_lock:
            if self._reload_running is result:
                self._reload_running = None  # from now on, a new request needs a new reload
            try:
                # In a thread: a large or slow file must not stall the probes.
                new, secrets = await trio.to_thread.run_sync(load_config, self.config_path)
            except ConfigUnreadable as e:
                return self._reload_done(False, f"reload refused, still running the previous config: {e}")
            except ConfigError as e:
                problems = "; ".join(str(p) for p in e.problems[:5]) + (
                    f" (+{len(e.problems) - 5} more)" if len(e.problems) > 5 else "")
                return self._reload_done(False, f"reload refused, still running the previous config: {problems}")
            running = [RunningTunnel(t.name, t.ifname, t.slot, t.key) for t in self.tunnels.values()]
            running += [RunningTunnel(t.name, t.ifname, t.slot, t.key, draining=True) for t in self.draining]
            plan = plan_reload(self.config, new, secrets.keys, running, self.layout.max_slot)
            if plan.refused:
                return self._reload_done(False, f"reload refused: {plan.refused}")
            # What the new config names must not be someone else's (as at start).
            try:
                problems = await self._ownership_problems(
                    new, await self.rtnl.links(), {t.ifname for t in self.runtimes()},
                    set(self._state.sources) | {str(a) for a in self.config.routing.source})
            except (NetlinkError, NetlinkTimeout) as e:
                return self._reload_done(False, f"reload refused: cannot read the host's devices: {e}")
            if problems:
                return self._reload_done(False, "reload refused, still running the previous config: "
                                                + "; ".join(problems))
            # Once it changes anything, a reload runs to its end (each step is bounded): never half applied.
            with trio.CancelScope(shield=True):
                await self._apply_plan(plan, new, secrets)
                return self._reload_done(True, plan.summary)

    async def _apply_plan(self, plan: ReloadPlan, new: Config, secrets: Secrets) -> None:
        """Move to NEW as PLAN says: drain removed tunnels, revive, start and update the others."""
        self.config, self.secrets = new, secrets
        self.cleanup_on_stop = not new.keep_on_exit
        wanted = {t.name: t for t in new.tunnels}
        for name in plan.remove:
            t = self.tunnels.pop(name)
            self.draining.append(t)
            self._spawn(f"{t.name}: removal", self._remove_tunnel, t)
        updates = list(plan.update)
        for revive in plan.revive:
            t = next(d for d in self.draining if d.ifname == revive.ifname)
            self.draining.remove(t)
            t.revive()
            self.tunnels[revive.name] = t
            updates.append(revive.name)
        now = trio.current_time()
        for name in plan.add:
            t = self.tunnels[name] = self._new_runner(wanted[name], plan.slots[name], now)
            self._start_tunnel(t)
        for name in plan.keep:
            self.tunnels[name].config = new

        async with trio.open_nursery() as nursery:  # concurrently: each may resolve a DNS name or wait for a device
            for name in updates:
                nursery.start_soon(self._update_tunnel, self.tunnels[name], new, wanted[name], secrets.keys[name])
        self._save_state()
        self.poke()

    @staticmethod
    async def _update_tunnel(t: TunnelRunner, config: Config, cfg: Tunnel, key) -> None:
        try:
            await t.update(config, cfg, key)
        except Exception as e:  # noqa: BLE001 - one tunnel's trouble must not cut the others' updates short
            t.last_error = f"{type(e).__name__}: {e}"
            log.error("%s: the new settings could not be applied: %s", t.name, t.last_error)

    def _reload_done(self, ok: bool, message: str) -> tuple[bool, str]:
        message = redact(message)  # it goes to clients and status: no key-shaped text, whatever failed
        self.reloads["success" if ok else "failure"] += 1
        self.last_reload_ok = ok
        self.last_reload_message = message
        (log.info if ok else log.error)("%s", message)
        return ok, message

    async def _remove_tunnel(self, t: TunnelRunner) -> None:
        """Drain a removed tunnel (no new flows, existing flows keep it) then tear it down. A reload that
        brings it back before that (`TunnelRunner.revive`) keeps it."""
        log.info("%s: removed from the config: draining for up to %s", t.name, self.config.routing.drain_timeout)
        if not await t.drain_for_removal(self.config.routing.drain_timeout):
            return  # back in the config
        if t in self.draining:
            self.draining.remove(t)
        t.stop()
        with trio.move_on_after(TEARDOWN_GRACE):
            await t.done.wait()
        self.poke()
        try:
            await self.backend.delete(t.ifname)
        except WireGuardError as e:
            log.error("%s: %s", t.name, e)
        self.poke()
        log.info("%s: torn down", t.name)

    # ------------------------------------------------------------ views for status and metrics

    def status(self) -> Status:
        """The state of hatun and of every tunnel it has a device for (no secrets): see hatun/status.py."""
        members = self.decision.member_names() if self.decision else ()
        pinned = self.decision.pinned if self.decision else ()
        now = trio.current_time()
        wall = time.time()
        tunnels = []
        for t in self.runtimes():
            key = self._key(t)  # as the decision knows it
            # Shown under its own name, unless a tunnel of the config has it too (a draining one that a
            # reload replaced by one of the same name on another interface).
            shown = t.name if self.tunnels.get(t.name) in (t, None) else key
            peer = t.status.peer if t.status else None
            h = t.health
            tunnels.append(TunnelStatus(
                name=shown, interface=t.ifname, state=str(t.state), health=str(h.health), drained=t.drained,
                removing=t.removing, since=wall - (now - h.since), for_seconds=now - h.since,
                rtt_seconds=h.rtt_avg, rtt_last_seconds=h.rtt_last, loss=h.loss,
                weight=t.cfg.weight if key in members else 0, configured_weight=t.cfg.weight, priority=t.cfg.priority,
                in_route=key in members, pinned=key in pinned,
                rx_bytes=peer.rx_bytes if peer else None, tx_bytes=peer.tx_bytes if peer else None,
                rx_rate=t.rx_rate, tx_rate=t.tx_rate,
                last_handshake=peer.last_handshake if peer else None, handshake_age_seconds=t.handshake_age(),
                endpoint=f"{t.endpoint[0]}:{t.endpoint[1]}" if t.endpoint else None,
                endpoint_configured=str(t.cfg.endpoint), endpoint_error=t.endpoint_error,
                probe=str(t.cfg.probe_target), last_failure=h.last_failure,
                probes_ok=h.probes_ok, probes_failed=h.probes_failed, present=t.present,
                last_error=redact(t.last_error) if t.last_error else None, restarts=t.restarts,
                congested=t.congested, late_replies=t.late_replies, transitions=dict(t.transitions),
                rtt_counts=tuple(h.rtt_counts), rtt_sum=h.rtt_sum,
            ))
        decision = self.decision
        return Status(
            version=__version__, pid=os.getpid(), config=self.config_path, backend=self.backend_name,
            mode=self.mode, started=self.started_at, ready=self.ready.is_set(),
            route=RouteStatus(
                prefixes=[str(p) for p in self.config.routing.prefixes], members=list(members),
                tier=decision.tier if decision else None, unreachable=bool(decision and decision.unreachable),
                all_down=bool(decision and decision.all_down), last_error=self.last_sync_error),
            reload=ReloadStatus(ok=self.last_reload_ok, message=self.last_reload_message, counts=dict(self.reloads)),
            tunnels=tunnels, repairs=dict(self.repairs),
        )


GROUP_ID_PROBE = 1002  # nexthop ids base+1002/1003: a short-lived probe for resilient group support
