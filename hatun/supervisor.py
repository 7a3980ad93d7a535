"""The supervisor: the composition root. It opens what hatun runs on, adopts what a previous run
left, and holds one Trio nursery with every long-running part:

    run ─┬─ events      rtnetlink notifications: tunnel devices coming and going, drift
         ├─ steering    steerer.Steerer: steering.decide -> plan.render -> router.Router.set
         ├─ stats       WireGuard counters and handshakes (passive health signal)
         ├─ readiness   sd_notify once every tunnel has a first verdict
         ├─ tunnel gw1  a tunnel.TunnelRunner: device, probes, resolver, kicks, in a nursery of its own
         ├─ tunnel gw2 ...
         └─ reload      reloader.Reloader, one at a time (plan: reload.plan_reload)
    (metrics and control servers and signals: daemon.py, beside `run`)

A failure inside one tunnel's tasks restarts that tunnel alone; a failure of one of the
supervisor's own tasks restarts that task. Nothing a task meets ends the supervisor.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from contextlib import AsyncExitStack

import trio

from hatun import sysctl
from hatun.adoption import adopt, ownership_problems
from hatun.config import Config, Secrets, Tunnel
from hatun.health import State
from hatun.layout import Layout
from hatun.netlink.core import EventsOverflow, NetlinkError, NetlinkTimeout
from hatun.netlink.rtnl import EventFilter, Link, Nexthop, Route, Rtnl, Rule, open_rtnl, open_rtnl_events
from hatun.pinning import Pinning
from hatun.plan import fail_closed_gate
from hatun.probes import open_probe_engine
from hatun.reloader import Reloader, ReloadResult
from hatun.router import Router, choose_mode
from hatun.rundir import RunDir, RunDirError, State as RunState
from hatun.serving import RateLimitedLog
from hatun.status import Status, build_status
from hatun.steerer import Steerer
from hatun.steering import Member
from hatun.teardown import remove_owned
from hatun.tunnel import TunnelEnv, TunnelRunner, refresh_statuses

log = logging.getLogger("hatun")

STATS_INTERVAL = 30.0  # counters and handshake ages in the background; status and scrapes read fresh ones
TEARDOWN_GRACE = 10.0
STATUS_NOTIFY_INTERVAL = 1.0  # systemd's STATUS= follows the tunnels in service this closely
STATUS_DEADLINE = 2.0  # refreshing every tunnel's counters for a status or a scrape, at most
TASK_BACKOFF_MAX = 10.0  # a failing supervisor task is restarted at least this often


async def _as_read(config: Config, secrets: Secrets) -> tuple[Config, Secrets]:
    return config, secrets


async def _nothing() -> None:
    return None


class SupervisorError(Exception):
    """hatun cannot start or run; the message says why and what to do."""


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
        self.reloader = Reloader(self)
        # A config read for a reload goes through this (enrolled tunnels filled in: hatun.enrollment).
        self.resolve = _as_read
        self.after_teardown = _nothing  # a clean stop's last step (enrollments withdrawn), bounded by its owner
        self.repairs: Counter = Counter()  # kernel objects repaired after a change behind hatun's back
        self.backend = None
        self.backend_name: str | None = None
        self.rtnl: Rtnl | None = None
        self.steerer: Steerer | None = None
        self.env: TunnelEnv | None = None  # what the tunnels use of ours, once the backend is open
        self.lo_index = 1
        self.state = RunState()  # the state file: what a restart or `hatun down` must know
        self.nursery: trio.Nursery | None = None  # open while running (and not stopping)
        self.ready = trio.Event()
        self.started_at = time.time()
        self.stop_requested = trio.Event()
        self.cleanup_on_stop = not config.keep_on_exit
        self._errors = RateLimitedLog(log)

    @property
    def mode(self) -> str | None:
        """"resilient" | "multipath", once running."""
        return self.steerer.mode if self.steerer else None

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bring everything up and keep it up until `stop()`; then clean up (unless keep_on_exit)."""
        from hatun.wireguard import select_backend

        cfg, lay = self.config, self.layout
        try:
            self.rundir.prepare()
            lock = self.rundir.lock()
        except RunDirError as e:
            raise SupervisorError(str(e)) from None
        self.state = self.rundir.load_state()
        async with AsyncExitStack() as stack:
            stack.callback(os.close, lock)
            # Events first, then the initial dump: nothing falls between the two.
            events = await stack.enter_async_context(open_rtnl_events(filter=EventFilter(
                tables=lay.tables, protocol=lay.protocol, nexthop_ids=lay.nexthop_ids)))
            self.rtnl = await stack.enter_async_context(open_rtnl())
            self.backend_name = await select_backend(cfg.backend)
            self.backend = await stack.enter_async_context(self._open_backend())
            probes = await stack.enter_async_context(open_probe_engine())
            self.env = TunnelEnv(self.backend, self.backend_name, self.rtnl, probes, lay.bypass_mark,
                                 self.poke, self.repairs, self._errors)
            if self.backend_name == "userspace":
                self._check_inotify()
            links = await self.rtnl.links()
            self.lo_index = next((l.index for l in links if l.name == "lo"), 1)
            problems = ownership_problems(cfg, links, await self.rtnl.addresses(), backend=self.backend_name,
                                          lo_index=self.lo_index, our_ifnames=set(),
                                          our_sources=set(self.state.sources), state_path=self.rundir.state_path)
            if problems:
                raise SupervisorError("; ".join(problems))
            # Enrolled tunnels (no shared source): new flows are masqueraded to their tunnel's address.
            pinning = (Pinning(cfg.routing.nft_table, cfg.routing.fwmark_mask, snat=any(t.enrolled for t in cfg.tunnels))
                       if cfg.routing.pin_flows else None)
            router = Router(self.rtnl, lay, self.lo_index, pinning)
            mode = await choose_mode(self.rtnl, lay, cfg.routing.mode)
            previous = await self._adopt(router, links)
            self.steerer = Steerer(cfg, lay, router, mode, self.lo_index, self.keyed_tunnels,
                                   repairs=self.repairs, errors=self._errors, previous=previous)
            self.state.sysctls = sysctl.apply(sysctl.wanted_for(cfg.routing), self.state.sysctls)
            self.save_state()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._keep_running, "events", self._serve_events, events)
                await nursery.start(self.steerer.serve)
                nursery.start_soon(self._keep_running, "stats", self._serve_stats)
                nursery.start_soon(self._keep_running, "readiness", self._serve_ready)
                for t in self.tunnels.values():
                    self.start_tunnel(t)
                task_status.started(self)
                await self.stop_requested.wait()
                log.info("stopping%s", "" if self.cleanup_on_stop else " (keep_on_exit: tunnels and routes stay)")
                nursery.cancel_scope.cancel()
            # Closed: from now on nothing may start tasks in it (a SIGHUP during the teardown).
            self.nursery = None
            if self.cleanup_on_stop:
                with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_GRACE) as grace:
                    await self._teardown(router)
                if grace.cancelled_caught:
                    log.error("clean-up did not finish within %.0f s; run `hatun down` to finish it", TEARDOWN_GRACE)
                # Still under the run_dir lock, which `hatun down` waits for: what the stop must
                # also undo outside this host (enrollments at the gateways) is done when it returns.
                with trio.CancelScope(shield=True):
                    await self.after_teardown()

    def stop(self, cleanup: bool | None = None) -> None:
        """Ask `run` to stop; CLEANUP overrides keep_on_exit (True: remove everything)."""
        if cleanup is not None:
            self.cleanup_on_stop = cleanup
        self.stop_requested.set()

    def use_config(self, config: Config, secrets: Secrets) -> None:
        """A reload's new config (the reloader updates the tunnels)."""
        self.config, self.secrets = config, secrets
        self.cleanup_on_stop = not config.keep_on_exit
        if self.steerer is not None:
            self.steerer.config = config

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

    def spawn(self, name: str, fn, *args) -> None:
        """Start a short task in the supervisor's nursery; a failure of it is logged, not propagated."""
        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception as e:  # noqa: BLE001 - a one-off task must not end the supervisor
                self._errors.log(logging.ERROR, name, "%s failed: %s: %s", name, type(e).__name__, e,
                                 exc_info=log.isEnabledFor(logging.DEBUG))

        if self.nursery is not None and not self.stop_requested.is_set():
            self.nursery.start_soon(guarded, name=name)

    def _open_backend(self):
        if self.backend_name == "kernel":
            from hatun.wireguard.kernel import open_kernel_backend

            return open_kernel_backend(rtnl=self.rtnl)
        from hatun.wireguard.userspace import open_userspace_backend

        return open_userspace_backend(run_dir=self.config.run_dir, rtnl=self.rtnl, on_recreated=self._on_recreated)

    async def _adopt(self, router: Router, links: list[Link]) -> tuple[Member, ...]:
        """Take over what a previous hatun left (after a crash or keep_on_exit): slots, the tunnels in
        the route (kept there until their first verdict), its source addresses. Returns those members."""
        actual = await router.read()
        adopted = adopt(self.config, self.layout, actual, links, await router.read_marks())
        by_name = {l.name: l for l in links}
        for t in self.config.tunnels:
            runner = self.new_runner(t, adopted.slots[t.name])
            link = by_name.get(t.ifname)
            if link is not None:
                runner.ifindex, runner.link_up = link.index, link.up and link.carrier
            runner.presumed_up = t.ifname in adopted.members
        router.owned_addresses.update(a for a in await self.rtnl.addresses(self.lo_index)
                                      if a.interface.ip in self.config.routing.source)
        if (message := adopted.describe(actual)) is not None:
            log.info("%s", message)
        return tuple(Member(t.name, t.ifname, t.slot, t.cfg.weight) for t in self.tunnels.values() if t.presumed_up)

    def save_state(self) -> None:
        self.state.pid = os.getpid()
        self.state.config = os.path.abspath(self.config_path) if self.config_path else None
        self.state.socket = self.config.control.socket
        self.state.sources = sorted(str(a) for a in self.config.routing.source)
        try:
            self.rundir.save_state(self.state)
        except RunDirError as e:
            log.warning("%s (a restart will not know which sysctls to restore)", e)

    async def _teardown(self, router: Router) -> None:
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
        await remove_owned(router, gate=fail_closed_gate(r.prefixes, self.layout) if fail_closed else None,
                           devices=devices, delete_device=delete_device, sysctls=self.state.sysctls,
                           rundir=self.rundir)
        log.info("removed hatun's routes, rules, nexthops and %d tunnel devices%s", len(devices),
                 "; the steered prefixes stay unreachable (fail closed) until hatun runs again or `hatun down`"
                 if fail_closed else "")

    # ------------------------------------------------------------ tunnels

    def new_runner(self, t: Tunnel, slot: int) -> TunnelRunner:
        """A runner for tunnel T of the current config, registered under its name (not started)."""
        assert self.env is not None
        runner = self.tunnels[t.name] = TunnelRunner(self.env, self.config, t, self.secrets.keys[t.name], slot,
                                                     trio.current_time())
        return runner

    def start_tunnel(self, t: TunnelRunner) -> None:
        assert self.nursery is not None
        self.nursery.start_soon(t.serve, name=f"tunnel {t.name}")

    def runtimes(self) -> list[TunnelRunner]:
        """Every tunnel hatun has devices for: the config's, and those draining after a reload."""
        return [*self.tunnels.values(), *self.draining]

    def keyed_tunnels(self) -> list[tuple[str, TunnelRunner]]:
        # A draining tunnel may share its name with a new one (its interface was renamed): the
        # decision knows it as name@interface.
        return [(t.name if self.tunnels.get(t.name) is t else f"{t.name}@{t.ifname}", t) for t in self.runtimes()]

    def poke(self) -> None:
        """Something changed: the route should be looked at again (soon, coalesced)."""
        if self.steerer is not None:
            self.steerer.poke()

    def drain(self, name: str, drained: bool = True) -> TunnelRunner:
        """Take tunnel NAME out of the route for new flows (its flows stay) or put it back. Raises KeyError."""
        t = self.tunnels[name]
        t.set_drained(drained)
        return t

    def start_reload(self) -> ReloadResult:
        """Start re-reading the config file (see reloader.Reloader.start)."""
        return self.reloader.start()

    async def reload(self) -> tuple[bool, str]:
        """Reload and wait for its result. Cancelling the wait does not cancel the reload."""
        result = self.start_reload()
        await result.done.wait()
        return result.ok, result.message

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
        with trio.move_on_after(max(30.0, max((t.interval * (t.health.rise + t.health.fall) + t.timeout)
                                               for t in self.tunnels.values()) * 3)):
            while any(t.health.health is State.INIT for t in self.tunnels.values()):
                await trio.sleep(0.05)
        self.ready.set()
        from hatun.notify import sd_notify

        def in_service() -> tuple[int, int]:
            return sum(t.health.health is State.UP for t in self.tunnels.values()), len(self.tunnels)

        shown = in_service()
        sd_notify(f"READY=1\nSTATUS={shown[0]}/{shown[1]} tunnels in service")
        log.info("ready: %d of %d tunnels in service", *shown)
        # `systemctl status` shows the last STATUS=: keep it current (looked at every second, sent on change).
        while True:
            await trio.sleep(STATUS_NOTIFY_INTERVAL)
            now = in_service()
            if now != shown:
                sd_notify(f"STATUS={now[0]}/{now[1]} tunnels in service")
                shown = now

    async def _serve_events(self, events) -> None:
        """Netlink notifications: our devices coming and going; drift of our objects."""
        proto = self.layout.protocol
        while True:
            try:
                async for ev in events:
                    obj = ev.obj
                    if isinstance(obj, Link):
                        for t in self.runtimes():
                            if t.ifname == obj.name or (ev.action == "del" and t.ifindex == obj.index):
                                t.set_link(None if ev.action == "del" else obj)
                    elif isinstance(obj, (Route, Rule)) and obj.protocol == proto:
                        self.poke()  # ours, changed: by us, or behind our back (drift)
                    elif isinstance(obj, Nexthop) and obj.id in self.layout.nexthop_ids:
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

    def status(self) -> Status:
        """The state of hatun and of every tunnel it has a device for (no secrets): see hatun/status.py."""
        return build_status(self)
