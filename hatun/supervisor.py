"""The supervisor: one Trio nursery holding every tunnel, the probes, the steering and the servers.

    run ─┬─ events      rtnetlink notifications: tunnel devices coming and going, drift
         ├─ reconciler  steering.decide + render -> routes.Reconciler.sync (+ nftables pinning)
         ├─ stats       WireGuard counters and handshakes (passive health signal)
         ├─ tunnel gw1 ─┬─ device (backend apply, re-apply when it vanishes)
         │              ├─ probes (pinned to the device, restarted when the device is re-created)
         │              └─ resolver (DNS endpoints)
         ├─ tunnel gw2 ...
         ├─ metrics / control servers, signals

A failure inside one tunnel's tasks is logged and that tunnel alone is restarted with backoff.
State changes poke the reconciler, which computes the wanted kernel objects from the current state
and makes the kernel match; it also runs on netlink events (drift) and every 30 s (a safety net).
"""

from __future__ import annotations

import ipaddress
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
from hatun.health import State, Suspect, Transition, TunnelHealth, display_state
from hatun.keys import redact
from hatun.netlink.core import EventsOverflow, NetlinkError, NetlinkTimeout
from hatun.netlink.rtnl import EventFilter, Link, Nexthop, Resilient, Route, Rtnl, Rule, open_rtnl, open_rtnl_events
from hatun.pinning import Pinning, PinningError
from hatun.probes import ProbeEngine, ProbeStream, open_probe_engine
from hatun.routes import Reconciler, adopted_members
from hatun.rundir import RunDir, RunDirError, State as RunState
from hatun.serving import RateLimitedLog
from hatun.steering import Layout, Member, RenderTunnel, TunnelView, allocate_slots, decide, render
from hatun.wireguard.model import DeviceSettings, DeviceStatus, PeerSettings, WireGuardError

log = logging.getLogger("hatun")

FULL_SYNC_INTERVAL = 30.0  # safety net: event sockets can overflow (an overflow itself triggers a re-read)
STATS_INTERVAL = 30.0  # counters and handshake ages in the background; status and scrapes read fresh ones
DEBOUNCE = 0.005  # coalesce a burst of pokes into one sync
TEARDOWN_GRACE = 10.0
RETRY_SYNC_AFTER = 0.3
MAX_BACKOFF = 10.0  # a failing tunnel is retried at least this often
RESOLVE_RETRY = 10.0  # a DNS endpoint of a down tunnel is resolved again this often
# The congestion guard (see `_confirm_down`): a tunnel whose probes fail while more than this
# arrives through it may be congested rather than dead; it stays in service for CONGESTION_GRACE
# seconds waiting for any probe reply (on time or late) that proves the way out works too.
# The counter is the device's own (decrypted packets delivered to the host: WireGuard keepalives are
# not counted), and the window between the first failure and the verdict may be only tens of ms,
# so a few hundred bytes already mean traffic.
CONGESTION_RX_BYTES = 256
CONGESTION_GRACE = 2.0
COUNTER_TIMEOUT = 0.5  # reading a device's counters; one that does not answer by then gives no evidence
RELOAD_TIMEOUT = 120.0  # one reload, at most (DNS endpoints, slow backends); it is never cut short by a client
DEVICE_READ_TIMEOUT = 1.0  # one device's counters for status and metrics (a hung wireguard-go costs this)
STATUS_DEADLINE = 2.0  # refreshing every tunnel's counters for a status or a scrape, at most
TASK_BACKOFF_MAX = 10.0  # a failing supervisor task is restarted at least this often
KICK_INTERVAL = 3.0  # a down tunnel with a silent peer gets a fresh handshake this often
# Keys that decide where hatun's kernel objects live; changing them needs a restart.
RESTART_ONLY = [
    ("backend",), ("run_dir",), ("control", "socket"), ("metrics", "listen"), ("routing", "table"),
    ("routing", "rule_priority"), ("routing", "protocol"), ("routing", "nexthop_id"),
    ("routing", "fwmark_mask"), ("routing", "nft_table"), ("routing", "mode"), ("routing", "pin_flows"),
    ("routing", "hash_policy"),
]


class SupervisorError(Exception):
    """hatun cannot start or run; the message says why and what to do."""


@dataclass
class TunnelRuntime:
    """Everything the supervisor knows about one tunnel."""

    cfg: Tunnel
    key: object  # PrivateKey
    slot: int
    health: TunnelHealth
    interval: float
    timeout: float
    jitter: float
    handshake_timeout: float
    drained: bool = False
    removing: bool = False
    presumed_up: bool = False
    ifindex: int | None = None
    link_up: bool = False
    endpoint: tuple[str, int] | None = None
    endpoint_error: str | None = None
    status: DeviceStatus | None = None
    rate_sample: tuple[float, int, int] | None = None  # (time, rx, tx) the rates are measured from
    status_at: float | None = None  # when `status` was read (trio clock)
    rx_rate: float = 0.0
    tx_rate: float = 0.0
    last_error: str | None = None
    restarts: int = 0
    started_at: float = 0.0
    transitions: Counter = field(default_factory=Counter)
    probe_scope: trio.CancelScope | None = None
    probe_stream: ProbeStream | None = None
    status_reading: trio.Event | None = None  # set when the device read in progress ends
    # The last handshake as WireGuard reports it (wall clock), and when it happened on Trio's clock:
    # ages come from the latter, so a step of the wall clock does not age every handshake at once.
    hs_wall: float | None = None
    hs_at: float | None = None
    rx_baseline: int | None = None  # rx bytes (link counter) at the first failure of the current series
    rx_baseline_ready: trio.Event | None = None
    evidence: trio.Event = field(default_factory=trio.Event)  # set on any probe reply (late ones too)
    congestion_logged: bool = False
    congested: int = 0  # probe failures that traffic showed to be congestion
    late_replies: int = 0  # replies to probes that had already timed out
    scope: trio.CancelScope | None = None
    device_event: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    drain_scope: trio.CancelScope | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def ifname(self) -> str:
        return self.cfg.ifname

    @property
    def present(self) -> bool:
        return self.ifindex is not None and self.link_up

    @property
    def state(self) -> State:
        return display_state(self.health.health, self.drained or self.removing)


@dataclass
class _ReloadResult:
    """The outcome of one reload, once `done` is set."""

    done: trio.Event = field(default_factory=trio.Event)
    ok: bool = False
    message: str = ""

    def finish(self, ok: bool, message: str) -> None:
        self.ok, self.message = ok, message
        self.done.set()


def _get(obj, path):
    for p in path:
        obj = getattr(obj, p)
    return obj


class Supervisor:
    """Runs hatun for one config until stopped. See the module docstring for the task tree."""

    def __init__(self, config: Config, secrets: Secrets, config_path: str | None = None) -> None:
        self.config = config
        self.secrets = secrets
        self.config_path = config_path
        self.layout = Layout.from_routing(config.routing)
        self.rundir = RunDir(config.run_dir)
        self.tunnels: dict[str, TunnelRuntime] = {}  # the config's tunnels, by name
        self.draining: list[TunnelRuntime] = []  # removed by a reload, keeping their flows until torn down
        self._reload_lock = trio.Lock()
        self._reload_running: _ReloadResult | None = None
        self._errors = RateLimitedLog(log)
        self._last_nft_check = 0.0
        self.backend = None
        self.backend_name: str | None = None
        self.mode: str | None = None  # "resilient" | "multipath"
        self.rtnl: Rtnl | None = None
        self.probes: ProbeEngine | None = None
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
        self._links_by_index: dict[int, str] = {}
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
                nursery.start_soon(self._keep_running, "session kicks", self._serve_session_kicks)
                nursery.start_soon(self._keep_running, "readiness", self._serve_ready)
                self._tunnel_nursery = nursery
                for rt in self.tunnels.values():
                    self._start_tunnel(rt)
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
        self._links_by_index = {l.index: l.name for l in links}
        taken: dict[str, int] = {}
        if self.pinning is not None:
            current = await self.pinning.read()
            if current is not None:
                by_ifname = {t.ifname: t.name for t in self.config.tunnels}
                taken = {by_ifname[i]: m >> self.layout.shift for i, m in current[0].items() if i in by_ifname}
        actual = await self.reconciler.read()
        for nh in actual.nexthops.values():
            slot = self.layout.slot_of_nexthop(nh.id)
            name = self._links_by_index.get(nh.oif or -1)
            tunnel = next((t for t in self.config.tunnels if t.ifname == name), None)
            if slot and tunnel is not None and tunnel.name not in taken:
                taken[tunnel.name] = slot[0]
        slots = allocate_slots([t.name for t in self.config.tunnels], taken, self.layout.max_slot)
        members = adopted_members(actual, self.layout, self._links_by_index, set(self.config.routing.prefixes))
        now = trio.current_time()
        for t in self.config.tunnels:
            rt = self._new_runtime(t, slots[t.name], now)
            link = by_name.get(t.ifname)
            if link is not None:
                rt.ifindex, rt.link_up = link.index, link.up and link.carrier
            rt.presumed_up = t.ifname in members
            self.tunnels[t.name] = rt
        self.reconciler.owned_addresses |= {a for a in await self.rtnl.addresses(self._lo_index)
                                            if a.interface.ip in self.config.routing.source}
        if members or actual.routes:
            log.info("adopting the kernel state of a previous run: %d routes, %d nexthops; in the route: %s",
                     len(actual.routes), len(actual.nexthops), ", ".join(sorted(members)) or "none")
        self.previous_members = tuple(
            Member(rt.name, rt.ifname, rt.slot, rt.cfg.weight) for rt in self.tunnels.values() if rt.presumed_up
        )

    def _new_runtime(self, t: Tunnel, slot: int, now: float) -> TunnelRuntime:
        h = self.config.health_for(t)
        health = TunnelHealth(t.name, h.rise, h.fall, now)
        health.confirm_failures = True
        return TunnelRuntime(
            cfg=t, key=self.secrets.keys[t.name], slot=slot, health=health,
            interval=h.interval, timeout=h.timeout, jitter=h.jitter, handshake_timeout=h.handshake_timeout,
            started_at=now,
        )

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

    def _tunnel_sysctls(self, rt: TunnelRuntime) -> None:
        # Replies of probes and pinned flows arrive on a tunnel the main table may not point at.
        try:
            sysctl.write("2", "net", "ipv4", "conf", rt.ifname, "rp_filter")
        except sysctl.SysctlError as e:
            log.debug("%s", e)

    def _restore_sysctls(self) -> None:
        for key, value in self._sysctl_saved.items():
            try:
                sysctl.write(value, *key.split("."))
            except sysctl.SysctlError as e:
                log.warning("%s", e)
        self._sysctl_saved = {}

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

    def _start_tunnel(self, rt: TunnelRuntime) -> None:
        assert self._tunnel_nursery is not None
        self._tunnel_nursery.start_soon(self._serve_tunnel_supervised, rt, name=f"tunnel {rt.name}")

    async def _serve_tunnel_supervised(self, rt: TunnelRuntime) -> None:
        """Run one tunnel's tasks; a failure restarts this tunnel alone, with backoff."""
        backoff = 0.5
        try:
            with trio.CancelScope() as scope:
                rt.scope = scope
                while True:
                    started = trio.current_time()
                    try:
                        await self._serve_tunnel(rt)
                    except Exception as e:  # noqa: BLE001 - isolate one tunnel's failures
                        rt.last_error = f"{type(e).__name__}: {e}"
                        rt.restarts += 1
                        if trio.current_time() - started > 30:
                            backoff = 0.5
                        log.error("%s: %s; restarting this tunnel in %.1f s", rt.name, rt.last_error, backoff,
                                  exc_info=log.isEnabledFor(logging.DEBUG))
                        transition = rt.health.fail_now(trio.current_time(), rt.last_error)
                        if transition is not None:
                            self._on_transition(rt, transition)
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            rt.done.set()

    def device_settings(self, rt: TunnelRuntime) -> DeviceSettings:
        """What the WireGuard device of RT should look like."""
        return device_settings(self.config, rt.cfg, rt.key, rt.endpoint, self.layout.bypass_mark)

    async def _serve_tunnel(self, rt: TunnelRuntime) -> None:
        await self._resolve(rt)
        changes = await self.backend.apply(self.device_settings(rt))
        if changes:
            log.info("%s: device %s %s", rt.name, rt.ifname, "created" if changes.created else
                     "updated: " + ", ".join(sorted(changes.changed)))
        await self._refresh_link(rt)
        self._tunnel_sysctls(rt)
        self.poke()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_probes, rt)
            nursery.start_soon(self._serve_device, rt)
            nursery.start_soon(self._serve_resolver, rt)  # idles while the endpoint is an IP address

    async def _refresh_link(self, rt: TunnelRuntime) -> None:
        link = await self.rtnl.link(rt.ifname)
        self._set_link(rt, link)

    def _set_link(self, rt: TunnelRuntime, link: Link | None) -> None:
        old = (rt.ifindex, rt.link_up)
        if link is None:
            rt.ifindex, rt.link_up = None, False
        else:
            rt.ifindex, rt.link_up = link.index, link.up and link.carrier
            self._links_by_index[link.index] = link.name
        if (rt.ifindex, rt.link_up) != old:
            if rt.probe_stream is not None:
                rt.probe_stream.ifindex = rt.ifindex if rt.present else None
            rt.device_event.set()
            rt.device_event = trio.Event()
            self.poke()

    async def _serve_device(self, rt: TunnelRuntime) -> None:
        """Keep the device there: when it vanishes (deleted, its wireguard-go died) make it again."""
        while True:
            await rt.device_event.wait()
            if rt.ifindex is None and self.backend_name == "kernel":
                await trio.sleep(0.05)
                log.warning("%s: device %s vanished; re-creating it", rt.name, rt.ifname)
                self.repairs["link"] += 1
                await self.backend.apply(self.device_settings(rt))
                await self._refresh_link(rt)
                self._tunnel_sysctls(rt)
            elif rt.ifindex is not None and not rt.link_up:
                # Someone set it down: bring it back (apply restores the link state too).
                await trio.sleep(0.05)
                await self.backend.apply(self.device_settings(rt))
                await self._refresh_link(rt)

    async def _serve_session_kicks(self) -> None:
        """While a tunnel is down and its peer silent, start a fresh handshake every few seconds.

        WireGuard itself re-handshakes only after 15 s of sending without replies, and a gateway that
        restarted has forgotten the session: without this, recovery would take that long. One task
        for all tunnels: a wakeup costs more than the check.
        """
        while True:
            await trio.sleep(KICK_INTERVAL)
            for rt in list(self.tunnels.values()):
                if rt.health.health is not State.DOWN or not rt.present or rt.scope is None:
                    continue
                down_for = trio.current_time() - rt.health.since
                if down_for < KICK_INTERVAL:
                    continue
                await self.read_status(rt)
                # Silent: no handshake since it went down. A down tunnel with fresh handshakes (its
                # probe target is down, not its path) keeps its session.
                if rt.hs_at is None or rt.hs_at < rt.health.since:
                    log.debug("%s: no reply and no fresh handshake: starting a new session", rt.name)
                    try:
                        await self.backend.reset_peer(self.device_settings(rt))
                    except WireGuardError as e:
                        log.debug("%s: %s", rt.name, e)

    def _on_recreated(self, ifname: str) -> None:
        """The userspace backend replaced a dead wireguard-go: a new device, new ifindex."""
        for rt in self.tunnels.values():
            if rt.ifname == ifname:
                self.repairs["link"] += 1
                log.warning("%s: wireguard-go for %s was restarted and reconfigured", rt.name, ifname)
                self._tunnel_sysctls(rt)
                if self._nursery is not None:
                    self._spawn(f"{rt.name}: reading its device", self._refresh_link_safely, rt)

    async def _refresh_link_safely(self, rt: TunnelRuntime) -> None:
        try:
            await self._refresh_link(rt)
        except (NetlinkError, NetlinkTimeout) as e:
            log.warning("%s: reading device %s: %s", rt.name, rt.ifname, e)
            self.poke()

    async def _serve_probes(self, rt: TunnelRuntime) -> None:
        """Probe through the tunnel while its tasks run; registered anew when the probe settings change."""
        while True:
            probe = rt.cfg.probe_target
            stream = ProbeStream(rt.name, interval=rt.interval, timeout=rt.timeout, jitter=rt.jitter,
                                 on_result=lambda ok, rtt, reason: self._on_probe(rt, ok, rtt, reason),
                                 on_late=lambda rtt: self._on_late_reply(rt, rtt),
                                 rtt_hint=lambda: rt.health.rtt_avg)
            with trio.CancelScope() as scope:
                rt.probe_scope = scope
                try:
                    if probe.kind == "icmp":
                        self.probes.add_icmp(stream, probe.host, rt.ifindex if rt.present else None)
                        rt.probe_stream = stream
                    else:
                        self.probes.add_tcp(stream, probe.host, probe.port, rt.ifname)
                    await trio.sleep_forever()
                except OSError as e:
                    self._on_probe(rt, False, None, f"cannot probe: {e.strerror or e}")
                    await trio.sleep(max(rt.interval, 1.0))
                finally:
                    self.probes.remove(stream)
                    rt.probe_stream = None
            rt.probe_scope = None

    def _on_probe(self, rt: TunnelRuntime, ok: bool, rtt: float | None, reason: str | None) -> None:
        health = rt.health
        was_suspect = health.suspect
        result = health.record(ok, trio.current_time(), rtt=rtt, reason=reason)
        if ok:
            self._evidence(rt)
            if was_suspect:
                self._congested(rt, "a probe was answered again")
            if health.successes >= health.rise:
                rt.congestion_logged = False
        if ok or (result is not None and not isinstance(result, Suspect)):
            rt.rx_baseline, rt.rx_baseline_ready = None, None
        if result is None:
            # The first failure of an up tunnel: note how much it has received, in case its probes
            # go on failing while traffic still flows in (congestion, not a dead path).
            if not ok and health.failures == 1 and health.health is State.UP:
                rt.rx_baseline_ready = trio.Event()
                self._spawn(f"{rt.name}: congestion check", self._rx_baseline, rt, rt.rx_baseline_ready)
        elif isinstance(result, Suspect):
            self._spawn(f"{rt.name}: congestion check", self._confirm_down, rt)
        else:
            self._on_transition(rt, result)

    def _on_late_reply(self, rt: TunnelRuntime, rtt: float) -> None:
        """A reply to a probe that had already timed out: the path works both ways, only slowly."""
        rt.late_replies += 1
        self._evidence(rt)
        if rt.health.suspect:
            rt.health.clear_suspect()
            self._congested(rt, f"a late reply came after {rtt * 1000:.0f} ms")

    def _evidence(self, rt: TunnelRuntime) -> None:
        rt.evidence.set()
        rt.evidence = trio.Event()

    def _congested(self, rt: TunnelRuntime, why: str) -> None:
        rt.congested += 1
        if not rt.congestion_logged:
            rt.congestion_logged = True
            log.info("%s: %d probes lost, but %s: congested, not down (logged once until it recovers)",
                     rt.name, rt.health.fall, why)

    async def _link_rx(self, rt: TunnelRuntime) -> int | None:
        """Bytes the tunnel received (decrypted), from the kernel's counters of its device: a netlink
        read that never waits on a wireguard-go (a frozen one must not delay a verdict). None: unknown."""
        index = rt.ifindex
        if index is None:
            return None
        with trio.move_on_after(COUNTER_TIMEOUT):
            try:
                link = await self.rtnl.link(index)
            except (NetlinkError, NetlinkTimeout) as e:
                log.debug("%s: reading counters: %s", rt.name, e)
                return None
            return link.rx_bytes if link is not None and link.name == rt.ifname else None
        return None

    async def _rx_baseline(self, rt: TunnelRuntime, ready: trio.Event) -> None:
        try:
            value = await self._link_rx(rt)
            if rt.rx_baseline_ready is ready:
                rt.rx_baseline = value
        finally:
            ready.set()

    async def _confirm_down(self, rt: TunnelRuntime) -> None:
        """`fall` probes failed on an up tunnel: is it dead, or only congested (a saturated tunnel or
        CPU, where moving its flows would break them at the gateways' NAT)?

        - Nothing arrived through it since the first failure (its receive counter, read from the
          kernel, did not grow by more than CONGESTION_RX_BYTES; or the device did not answer): dead
          (a blackholed path, a dead gateway, a frozen wireguard-go). Down now.
        - Traffic still arrives: the way in works, the way out is unproven. It stays in service for
          up to CONGESTION_GRACE seconds, and stays for good if any probe reply comes meanwhile (a
          new one, or a late reply to a probe that timed out). Without one, the way out is broken
          (a one-way failure): down.
        """
        ready = rt.rx_baseline_ready
        if ready is not None:
            with trio.move_on_after(COUNTER_TIMEOUT):
                await ready.wait()
        baseline, now_rx = rt.rx_baseline, await self._link_rx(rt)
        received = now_rx - baseline if now_rx is not None and baseline is not None and now_rx >= baseline else 0
        if not rt.health.suspect:
            return  # a reply came meanwhile
        note = ""
        if received > CONGESTION_RX_BYTES:
            with trio.move_on_after(CONGESTION_GRACE):
                while rt.health.suspect:
                    await rt.evidence.wait()
            if not rt.health.suspect:
                return  # a reply came: congested (logged by whoever cleared it)
            note = (f"; {received} bytes arrived meanwhile but no probe came back within"
                    f" {CONGESTION_GRACE:g} s more: the way to the gateway is broken")
        transition = rt.health.confirm_down(trio.current_time(), note)
        if transition is not None:
            self._on_transition(rt, transition)

    def _on_transition(self, rt: TunnelRuntime, tr: Transition) -> None:
        rt.presumed_up = False
        state = display_state(tr.new, rt.drained or rt.removing)
        rt.transitions[str(state)] += 1
        level = logging.WARNING if tr.new is State.DOWN else logging.INFO
        log.log(level, "%s %s: %s", rt.name, state, tr.reason, extra={"tunnel": rt.name, "state": str(state)})
        self.poke()

    async def _resolve(self, rt: TunnelRuntime) -> bool:
        """Resolve the endpoint (DNS names); True when the address changed."""
        ep = rt.cfg.endpoint
        if not ep.is_dns:
            new = (ep.host, ep.port)
        else:
            try:
                with trio.fail_after(5):
                    infos = await trio.socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_DGRAM)
                new = (infos[0][4][0], ep.port)
                rt.endpoint_error = None
            except (OSError, trio.TooSlowError) as e:
                rt.endpoint_error = f"cannot resolve {ep.host}: {getattr(e, 'strerror', None) or 'timeout'}"
                log.warning("%s: %s", rt.name, rt.endpoint_error)
                return False
        changed = new != rt.endpoint
        if changed and rt.endpoint is not None:
            log.info("%s: endpoint %s now resolves to %s", rt.name, ep.host, new[0])
        rt.endpoint = new
        return changed

    async def _serve_resolver(self, rt: TunnelRuntime) -> None:
        """Re-resolve a DNS endpoint every resolve_interval, and every few seconds while the tunnel
        is down or its handshakes are stale (a gateway behind dynamic DNS that moved)."""
        last = trio.current_time()
        while True:
            await trio.sleep(RESOLVE_RETRY / 2)
            if not rt.cfg.endpoint.is_dns:
                continue
            age = self._handshake_age(rt)
            troubled = rt.endpoint is None or rt.health.health is State.DOWN or age is None or age > 135
            since = trio.current_time() - last
            if since >= self.config.resolve_interval or (troubled and since >= RESOLVE_RETRY):
                last = trio.current_time()
                if await self._resolve(rt):
                    await self.backend.apply(self.device_settings(rt))

    def _handshake_age(self, rt: TunnelRuntime) -> float | None:
        """Seconds since the last handshake, on Trio's (monotonic) clock; None: none seen."""
        return None if rt.hs_at is None else max(0.0, trio.current_time() - rt.hs_at)

    # ------------------------------------------------------------ observing

    async def read_status(self, rt: TunnelRuntime, max_age: float = 0.0) -> DeviceStatus | None:
        """Fresh counters of RT's device (kept as rt.status); updates its rates and handshake time.
        Never raises. MAX_AGE > 0: counters read that recently are fresh enough (a client that polls
        status in a tight loop must not turn each poll into a device read per tunnel). A read already
        under way is joined rather than repeated."""
        if max_age > 0 and rt.status_at is not None and trio.current_time() - rt.status_at < max_age:
            return rt.status
        if rt.status_reading is not None:
            await rt.status_reading.wait()
            return rt.status
        rt.status_reading = reading = trio.Event()
        try:
            try:
                status = await self.backend.get(rt.ifname, with_link=False, timeout=DEVICE_READ_TIMEOUT)
            except (WireGuardError, OSError) as e:
                # A read that failed (a busy or hung device, EMFILE) says nothing about the
                # handshake: what was last read stays, and its age keeps counting.
                log.debug("%s: %s", rt.name, e)
            else:
                self._note_status(rt, status)
        finally:
            rt.status_reading = None
            reading.set()
        return rt.status

    def _note_status(self, rt: TunnelRuntime, status: DeviceStatus | None) -> None:
        now = trio.current_time()
        previous_read = rt.status_at
        rt.status, rt.status_at = status, now
        peer = status.peer if status is not None else None
        if peer is None or peer.last_handshake is None:
            rt.hs_wall = rt.hs_at = None
        elif peer.last_handshake != rt.hs_wall:
            # A new handshake. Its age comes from the wall clock (that is what WireGuard reports),
            # but it happened after our previous read, so it is never older than that.
            age = max(0.0, time.time() - peer.last_handshake)
            if previous_read is not None and rt.hs_wall is not None:
                age = min(age, now - previous_read)
            rt.hs_wall, rt.hs_at = peer.last_handshake, now - age
        if peer is None:
            rt.rate_sample = None
            rt.rx_rate = rt.tx_rate = 0.0
        elif rt.rate_sample is None or peer.rx_bytes < rt.rate_sample[1] or peer.tx_bytes < rt.rate_sample[2]:
            rt.rate_sample = (now, peer.rx_bytes, peer.tx_bytes)  # first sample, or a new device
        elif now - rt.rate_sample[0] >= 0.5:
            dt = now - rt.rate_sample[0]
            rt.rx_rate = (peer.rx_bytes - rt.rate_sample[1]) / dt
            rt.tx_rate = (peer.tx_bytes - rt.rate_sample[2]) / dt
            rt.rate_sample = (now, peer.rx_bytes, peer.tx_bytes)

    async def refresh_statuses(self, max_age: float = 0.0, deadline: float = STATUS_DEADLINE) -> None:
        """Read every tunnel's counters concurrently, for at most DEADLINE seconds: one slow or hung
        device delays a status or a scrape by that much at most, and the others are fresh."""
        with trio.move_on_after(deadline):
            async with trio.open_nursery() as nursery:
                for rt in self.runtimes():
                    nursery.start_soon(self.read_status, rt, max_age)

    async def _serve_stats(self) -> None:
        """Counters and handshakes every few seconds; a stale handshake counts as a failed probe."""
        while True:
            await trio.sleep(STATS_INTERVAL)
            await self.refresh_statuses(deadline=STATS_INTERVAL / 2)
            for rt in list(self.tunnels.values()):
                if not rt.present:
                    continue
                age = self._handshake_age(rt)
                alive_for = trio.current_time() - rt.started_at
                if age is None and alive_for > rt.handshake_timeout:
                    self._on_probe(rt, False, None, f"no handshake in {alive_for:.0f} s")
                elif age is not None and age > rt.handshake_timeout:
                    self._on_probe(rt, False, None, f"handshake stale ({age:.0f} s old)")

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
                    for rt in self.runtimes():
                        self._set_link(rt, next((l for l in links if l.name == rt.ifname), None))
                except (NetlinkError, NetlinkTimeout) as e:
                    log.warning("re-reading the links after an overflow: %s", e)
                self.poke()

    def _on_link_event(self, action: str, link: Link) -> None:
        for rt in self.runtimes():
            if rt.ifname == link.name or (action == "del" and rt.ifindex == link.index):
                self._set_link(rt, None if action == "del" else link)

    # ------------------------------------------------------------ steering

    def runtimes(self) -> list[TunnelRuntime]:
        """Every tunnel hatun has devices for: the config's, and those draining after a reload."""
        return [*self.tunnels.values(), *self.draining]

    def _key(self, rt: TunnelRuntime) -> str:
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
        the main table, until hatun runs again or `hatun down` (`cleanup`) opens the gate."""
        from hatun.steering import fail_closed_gate

        r = self.config.routing
        fail_closed = r.when_all_down == "unreachable"
        try:
            # Routes go before the devices, the stubs stay throughout: no packet finds a gap.
            res = await self.reconciler.remove_all(fail_closed_gate(r.prefixes, self.layout) if fail_closed else None)
            for err in res.errors:
                log.warning("clean-up: %s", err)
        except (NetlinkError, NetlinkTimeout) as e:
            log.error("clean-up of routes: %s", e)
        if self.pinning is not None:
            try:
                await self.pinning.remove()
            except PinningError as e:
                log.error("clean-up of nftables: %s", e)
        async def delete(rt: TunnelRuntime) -> None:
            try:
                await self.backend.delete(rt.ifname)
            except WireGuardError as e:
                log.error("clean-up of %s: %s", rt.ifname, e)

        async with trio.open_nursery() as nursery:  # in parallel: each may wait for a process to end
            for rt in self.runtimes():
                nursery.start_soon(delete, rt)
        self._restore_sysctls()
        self.rundir.remove_state()
        log.info("removed hatun's routes, rules, nexthops and %d tunnel devices%s", len(self.runtimes()),
                 "; the steered prefixes stay unreachable (fail closed) until hatun runs again or `hatun down`"
                 if fail_closed else "")

    # ------------------------------------------------------------ drain and reload

    def drain(self, name: str, drained: bool = True) -> TunnelRuntime:
        """Take tunnel NAME out of the route for new flows (its flows stay) or put it back. Raises KeyError."""
        rt = self.tunnels[name]
        if rt.drained != drained:
            rt.drained = drained
            state = rt.state
            rt.transitions[str(state)] += 1
            log.info("%s %s: %s", name, state, "drained by operator" if drained else "drain ended by operator")
            self.poke()
        return rt

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
            for path in RESTART_ONLY:
                if _get(new, path) != _get(self.config, path):
                    return self._reload_done(False, f"reload refused: {'.'.join(path)} cannot change while hatun"
                                                    " runs; restart hatun to apply it")
            # Every slot in use stays reserved: a tunnel about to drain keeps its own until torn down.
            reserved = {rt.slot for rt in self.runtimes()}
            try:
                slots = allocate_slots([t.name for t in new.tunnels],
                                       {n: rt.slot for n, rt in self.tunnels.items()}, self.layout.max_slot, reserved)
            except ValueError as e:
                return self._reload_done(False, f"reload refused: {e} (or wait until removed tunnels are torn down)")
            # What the new config names must not be someone else's (as at start).
            try:
                problems = await self._ownership_problems(
                    new, await self.rtnl.links(), {rt.ifname for rt in self.runtimes()},
                    set(self._state.sources) | {str(a) for a in self.config.routing.source})
            except (NetlinkError, NetlinkTimeout) as e:
                return self._reload_done(False, f"reload refused: cannot read the host's devices: {e}")
            if problems:
                return self._reload_done(False, "reload refused, still running the previous config: "
                                                + "; ".join(problems))
            # Once it changes anything, a reload runs to its end (each step is bounded): never half applied.
            with trio.CancelScope(shield=True):
                return self._reload_done(True, await self._apply_config(new, secrets, slots))

    async def _apply_config(self, new: Config, secrets: Secrets, slots: dict[str, int]) -> str:
        """Move to NEW: remove (drain), revive, update and add tunnels. Returns a summary."""
        old = self.config
        self.config, self.secrets = new, secrets
        self.cleanup_on_stop = not new.keep_on_exit
        wanted = {t.name: t for t in new.tunnels}
        summary = []
        # Removed, or moved to another interface: drained, then torn down (a new runtime takes the name).
        for name, rt in list(self.tunnels.items()):
            if name not in wanted or wanted[name].ifname != rt.ifname:
                del self.tunnels[name]
                self.draining.append(rt)
                summary.append(f"-{name}")
                self._spawn(f"{rt.name}: removal", self._remove_tunnel, rt)
        now = trio.current_time()
        updates: list[tuple[TunnelRuntime, Tunnel]] = []
        for t in new.tunnels:
            rt = self.tunnels.get(t.name)
            if rt is None:
                # Back before its drain ended (same interface): it simply stays.
                rt = next((d for d in self.draining if d.ifname == t.ifname), None)
                if rt is not None:
                    self.draining.remove(rt)
                    rt.removing = False
                    if rt.drain_scope is not None:
                        rt.drain_scope.cancel()
                    self.tunnels[t.name] = rt
                    summary.append(f"+{t.name}")
                    updates.append((rt, t))
                    continue
                rt = self.tunnels[t.name] = self._new_runtime(t, slots[t.name], now)
                summary.append(f"+{t.name}")
                self._start_tunnel(rt)
            elif t != rt.cfg or secrets.keys[t.name] != rt.key or new.health_for(t) != old.health_for(rt.cfg):
                summary.append(f"~{t.name}")
                updates.append((rt, t))
        # Concurrently: each may resolve a DNS name or wait for a slow device.
        async def update(rt: TunnelRuntime, t: Tunnel) -> None:
            try:
                await self._update_tunnel(rt, t)
            except Exception as e:  # noqa: BLE001 - one tunnel's trouble must not cut the others' updates short
                rt.last_error = f"{type(e).__name__}: {e}"
                log.error("%s: the new settings could not be applied: %s", rt.name, rt.last_error)

        async with trio.open_nursery() as nursery:
            for rt, t in updates:
                nursery.start_soon(update, rt, t)
        self._save_state()
        self.poke()
        return "reloaded" + (f": {' '.join(summary)}" if summary else ": nothing changed")

    def _reload_done(self, ok: bool, message: str) -> tuple[bool, str]:
        message = redact(message)  # it goes to clients and status: no key-shaped text, whatever failed
        self.reloads["success" if ok else "failure"] += 1
        self.last_reload_ok = ok
        self.last_reload_message = message
        (log.info if ok else log.error)("%s", message)
        return ok, message

    async def _update_tunnel(self, rt: TunnelRuntime, t: Tunnel) -> None:
        """Apply tunnel T's new settings to RT: device settings (only what differs), probes, health."""
        old = rt.cfg
        h = self.config.health_for(t)
        probe_changed = (t.probe_target != old.probe_target or h.interval != rt.interval or h.timeout != rt.timeout
                         or h.jitter != rt.jitter)
        rt.cfg, rt.key = t, self.secrets.keys[t.name]
        rt.health.configure(h.rise, h.fall)
        rt.interval, rt.timeout, rt.jitter, rt.handshake_timeout = h.interval, h.timeout, h.jitter, h.handshake_timeout
        if t.endpoint != old.endpoint:
            await self._resolve(rt)
        try:
            changes = await self.backend.apply(self.device_settings(rt))
        except WireGuardError as e:
            # The tunnel's own task retries with backoff; the reload itself went through.
            rt.last_error = str(e)
            log.error("%s: the new settings could not be applied: %s", rt.name, e)
        else:
            if changes:
                log.info("%s: device updated: %s", rt.name, ", ".join(sorted(changes.changed)) or "created")
        if probe_changed and rt.probe_scope is not None:
            rt.probe_scope.cancel()

    async def _remove_tunnel(self, rt: TunnelRuntime) -> None:
        """Drain a removed tunnel (no new flows, existing flows keep it) then tear it down. A reload that
        brings it back before that cancels the drain (rt.drain_scope) and keeps it."""
        rt.removing = True
        self.poke()
        log.info("%s: removed from the config: draining for up to %s", rt.name, self.config.routing.drain_timeout)
        with trio.CancelScope() as scope:
            rt.drain_scope = scope
            await self._wait_idle(rt, self.config.routing.drain_timeout)
        rt.drain_scope = None
        if scope.cancelled_caught:
            return  # back in the config
        if rt in self.draining:
            self.draining.remove(rt)
        if rt.scope is not None:
            rt.scope.cancel()
        with trio.move_on_after(TEARDOWN_GRACE):
            await rt.done.wait()
        self.poke()
        try:
            await self.backend.delete(rt.ifname)
        except WireGuardError as e:
            log.error("%s: %s", rt.name, e)
        self.poke()
        log.info("%s: torn down", rt.name)

    async def _wait_idle(self, rt: TunnelRuntime, limit: float) -> None:
        """Wait until the tunnel carries nothing but probes (no growth beyond them for 2 s), at most LIMIT."""
        with trio.move_on_after(limit):
            quiet_since = trio.current_time()
            last = None
            while trio.current_time() - quiet_since < 2.0:
                status = await self.read_status(rt)
                tx = status.peer.tx_bytes if status and status.peer else 0
                # Probes are ~ 100 bytes per interval; more than that is user traffic.
                if last is not None and tx - last > 400 * max(1.0, 0.25 / rt.interval):
                    quiet_since = trio.current_time()
                last = tx
                await trio.sleep(0.25)

    # ------------------------------------------------------------ views for status and metrics

    def snapshot(self) -> dict:
        """The state of every tunnel, for `hatun status` and metrics (JSON-ready, no secrets)."""
        members = self.decision.member_names() if self.decision else ()
        pinned = self.decision.pinned if self.decision else ()
        now = trio.current_time()
        wall = time.time()
        out = []
        for rt in self.runtimes():
            peer = rt.status.peer if rt.status else None
            age = self._handshake_age(rt)
            out.append({
                "name": rt.name, "interface": rt.ifname, "state": str(rt.state), "health": str(rt.health.health),
                "drained": rt.drained, "removing": rt.removing,
                "since": wall - (now - rt.health.since), "for_seconds": now - rt.health.since,
                "rtt_seconds": rt.health.rtt_avg, "rtt_last_seconds": rt.health.rtt_last, "loss": rt.health.loss,
                "weight": rt.cfg.weight if self._key(rt) in members else 0, "configured_weight": rt.cfg.weight,
                "priority": rt.cfg.priority, "in_route": self._key(rt) in members, "pinned": self._key(rt) in pinned,
                "rx_bytes": peer.rx_bytes if peer else None, "tx_bytes": peer.tx_bytes if peer else None,
                "rx_rate": rt.rx_rate, "tx_rate": rt.tx_rate,
                "last_handshake": peer.last_handshake if peer else None, "handshake_age_seconds": age,
                "endpoint": f"{rt.endpoint[0]}:{rt.endpoint[1]}" if rt.endpoint else None,
                "endpoint_configured": str(rt.cfg.endpoint), "endpoint_error": rt.endpoint_error,
                "probe": str(rt.cfg.probe_target), "last_failure": rt.health.last_failure,
                "probes_ok": rt.health.probes_ok, "probes_failed": rt.health.probes_failed,
                "present": rt.present, "last_error": redact(rt.last_error) if rt.last_error else None,
                "restarts": rt.restarts,
                "congested": rt.congested, "late_replies": rt.late_replies,
                "transitions": dict(rt.transitions),
            })
        decision = self.decision
        return {
            "version": __version__, "pid": os.getpid(), "config": self.config_path, "backend": self.backend_name,
            "mode": self.mode, "started": self.started_at, "ready": self.ready.is_set(),
            "route": {
                "prefixes": [str(p) for p in self.config.routing.prefixes],
                "members": list(members), "tier": decision.tier if decision else None,
                "unreachable": bool(decision and decision.unreachable),
                "all_down": bool(decision and decision.all_down), "last_error": self.last_sync_error,
            },
            "reload": {"ok": self.last_reload_ok, "message": self.last_reload_message, "counts": dict(self.reloads)},
            "tunnels": out,
        }


def device_settings(config: Config, t: Tunnel, key, endpoint: tuple[str, int] | None, fwmark: int) -> DeviceSettings:
    """The WireGuard device of tunnel T (pure). Allowed IPs: the steered prefixes, the tunnel subnet,
    the probe target and the tunnel's extra networks (each covering network only once)."""
    allowed = set(config.routing.prefixes) | set(t.allowed_ips) | {a.network for a in t.address}
    probe = t.probe_target
    allowed.add(ipaddress.ip_network(f"{probe.host}/{probe.host.max_prefixlen}"))
    allowed = {n for n in allowed if not any(o != n and o.version == n.version and n.subnet_of(o) for o in allowed)}
    peer = PeerSettings(t.peer_key, endpoint, t.keepalive or 0,
                        tuple(sorted(allowed, key=lambda n: (n.version, n.network_address, n.prefixlen))))
    return DeviceSettings(t.ifname, key, peer, fwmark=fwmark, listen_port=t.listen_port,
                          addresses=tuple(t.address), mtu=t.mtu)


GROUP_ID_PROBE = 1002  # nexthop ids base+1002/1003: a short-lived probe for resilient group support


async def cleanup(config: Config) -> list[str]:
    """Remove what a hatun with CONFIG left in the kernel (after a crash, keep_on_exit, or a stop with
    `when_all_down = "unreachable"`), whether or not it runs: routes (the fail-closed stubs too: this
    opens the gate, the prefixes follow the main table again), rules, nexthops, nftables table, source
    addresses, tunnel devices (their wireguard-go processes exit with them). Returns what was removed."""
    from hatun.steering import Wanted

    removed: list[str] = []
    layout = Layout.from_routing(config.routing)
    rundir = RunDir(config.run_dir)
    try:
        rundir.check()
        state = rundir.load_state()
    except RunDirError as e:
        log.warning("%s: not trusting its state file (no sysctl restored, no source address removed)", e)
        state = RunState()
    async with open_rtnl() as rtnl:
        links = await rtnl.links()
        lo = next((l.index for l in links if l.name == "lo"), 1)
        rec = Reconciler(rtnl, layout, lo)
        # Only the source addresses a hatun recorded as its own (an address the host had is not).
        rec.owned_addresses = {a for a in await rtnl.addresses(lo)
                               if a.interface.ip in config.routing.source and str(a.interface.ip) in state.sources}
        res = await rec.sync(Wanted())
        removed += [what for _, what in res.changes]
        pin = Pinning(config.routing.nft_table, config.routing.fwmark_mask)
        if Pinning.available():
            try:
                if await pin.remove():
                    removed.append(f"nftables table inet {config.routing.nft_table}")
            except PinningError as e:
                log.warning("%s", e)
        kinds = {l.name: l.kind for l in links}
        for t in config.tunnels:
            if t.ifname not in kinds:
                continue
            # Only devices that can be hatun's: a bridge or a NIC of the same name is left alone.
            if kinds[t.ifname] in ("wireguard", "tun"):
                await rtnl.delete_link(t.ifname)
                removed.append(f"device {t.ifname}")
            else:
                log.warning("not removing %s: it is a %s device, not a WireGuard device of hatun's", t.ifname,
                            kinds[t.ifname] or "network")
    # A wireguard-go left by a crash exits once its device is gone; its stale socket may remain.
    for t in config.tunnels:
        sock = f"/run/wireguard/{t.ifname}.sock"
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1.0)  # a hung wireguard-go with a full backlog must not block this
            try:
                s.connect(sock)
            finally:
                s.close()
        except ConnectionRefusedError:
            os.unlink(sock)
        except OSError:
            pass
    # Only the sysctls hatun sets, with integer values (load_state validates what the file says).
    for key, value in state.sysctls.items():
        try:
            sysctl.write(value, *key.split("."))
        except sysctl.SysctlError:
            pass
    rundir.remove_state()
    return removed

