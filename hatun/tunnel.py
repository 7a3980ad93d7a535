"""One tunnel at run time: its device, endpoint, probes, session kicks; its verdicts come from a
`detector.FailureDetector`, its counters from a `counters.DeviceCounters`.

A `TunnelRunner` owns everything that belongs to one tunnel, in one nursery of its own:

    serve ── (restarted with backoff when it fails) ─┬─ device   re-apply when it vanishes or goes down
                                                     ├─ probes   pinned to the device
                                                     ├─ resolver DNS endpoints
                                                     ├─ kicks    a fresh handshake while down and silent
                                                     └─ congestion checks (the detector's short tasks)

It reports upward only through the `TunnelEnv.poke` callback ("look again"): the supervisor reads
its verdict (`health`, `drained`, `present`...) when it decides the route. Cancelling the runner
(`stop`) ends every task of this tunnel and nothing else.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trio

from hatun import sysctl
from hatun.config import Config, Tunnel
from hatun.counters import DeviceCounters
from hatun.detector import FailureDetector
from hatun.health import State, Transition, TunnelHealth, display_state
from hatun.keys import TunnelKeys
from hatun.netlink.core import NetlinkError, NetlinkTimeout
from hatun.netlink.rtnl import Link, Rtnl
from hatun.probes import ProbeEngine, ProbeStream
from hatun.serving import RateLimitedLog
from hatun.wireguard.goprocess import runnable
from hatun.wireguard.model import DeviceSettings, DeviceStatus, PeerSettings, WireGuardError

log = logging.getLogger("hatun")

MAX_BACKOFF = 10.0  # a failing tunnel is retried at least this often
RESOLVE_RETRY = 10.0  # a DNS endpoint of a down tunnel is resolved again this often
KICK_INTERVAL = 3.0  # a down tunnel with a silent peer gets a fresh handshake this often


@dataclass
class TunnelEnv:
    """What a tunnel runner uses of the supervisor that owns it."""

    backend: object  # a WireGuard backend (wireguard.kernel / wireguard.userspace)
    backend_name: str
    rtnl: Rtnl
    probes: ProbeEngine
    bypass_mark: int  # the fwmark of the device's own (encrypted) packets
    poke: Callable[[], None]  # something changed: the reconciler should look again
    repairs: Counter  # by kind of object repaired ("link")
    errors: RateLimitedLog


async def resolve_endpoint(host: str, port: int, is_dns: bool) -> tuple[tuple[str, int] | None, str | None]:
    """(address, port) of an endpoint, resolving a DNS name (bounded); (None, why) when it cannot."""
    if not is_dns:
        return (host, port), None
    try:
        with trio.fail_after(5):
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        return (infos[0][4][0], port), None
    except (OSError, trio.TooSlowError) as e:
        return None, f"cannot resolve {host}: {getattr(e, 'strerror', None) or 'timeout'}"


def device_settings(config: Config, t: Tunnel, keys: TunnelKeys, endpoint: tuple[str, int] | None,
                    fwmark: int) -> DeviceSettings:
    """The WireGuard device of tunnel T (pure). Allowed IPs: the steered prefixes, the tunnel subnet,
    the probe target and the tunnel's extra networks (each covering network only once)."""
    allowed = set(config.routing.prefixes) | set(t.allowed_ips) | {a.network for a in t.address}
    probe = t.probe_target
    allowed.add(ipaddress.ip_network(f"{probe.host}/{probe.host.max_prefixlen}"))
    allowed = {n for n in allowed if not any(o != n and o.version == n.version and n.subnet_of(o) for o in allowed)}
    peer = PeerSettings(t.peer_key, endpoint, t.keepalive or 0,
                        tuple(sorted(allowed, key=lambda n: (n.version, n.network_address, n.prefixlen))),
                        preshared_key=keys.preshared)
    return DeviceSettings(t.ifname, keys.private, peer, fwmark=fwmark, listen_port=t.listen_port,
                          addresses=tuple(t.address), mtu=t.mtu)


class TunnelRunner:
    """One tunnel of the running config (or one draining after a reload removed it)."""

    def __init__(self, env: TunnelEnv, config: Config, cfg: Tunnel, key, slot: int, now: float) -> None:
        self.env = env
        self.config = config
        self.cfg = cfg
        self.key = key  # TunnelKeys
        self.slot = slot
        h = config.health_for(cfg)
        self.detector = FailureDetector(cfg.name, h.rise, h.fall, now, link_bytes=self._link_bytes, spawn=self._spawn,
                                        on_transition=self._on_transition, quality=h.quality(),
                                        on_weight=self._on_weight, starved=self._starved)
        self.counters = DeviceCounters(env.backend, cfg.ifname, cfg.name)
        self.interval, self.timeout, self.min_timeout, self.jitter = h.interval, h.timeout, h.min_timeout, h.jitter
        self.handshake_timeout = h.handshake_timeout
        self.started_at = now
        self.drained = False  # by the operator
        self.removing = False  # removed by a reload, draining until torn down
        self.presumed_up = False  # in the route when hatun started (adopted), until a first verdict
        self.ifindex: int | None = None
        self.link_up = False
        self.endpoint: tuple[str, int] | None = None
        self.endpoint_error: str | None = None
        self.last_error: str | None = None
        self.restarts = 0
        self.transitions: Counter = Counter()
        self.done = trio.Event()  # set once `serve` has ended
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._probe_scope: trio.CancelScope | None = None
        self._probe_stream: ProbeStream | None = None
        self._device_event = trio.Event()
        self._went_down = trio.Event()
        self._removal_scope: trio.CancelScope | None = None

    @property
    def health(self) -> TunnelHealth:
        return self.detector.health

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

    def device_settings(self) -> DeviceSettings:
        """What this tunnel's WireGuard device should look like."""
        return device_settings(self.config, self.cfg, self.key, self.endpoint, self.env.bypass_mark)

    # ------------------------------------------------------------ lifecycle

    async def serve(self) -> None:
        """Run this tunnel's tasks until `stop`; a failure restarts this tunnel alone, with backoff."""
        if self.done.is_set():
            return  # stopped before it started
        try:
            async with trio.open_nursery() as nursery:
                self._nursery, self._scope = nursery, nursery.cancel_scope
                await self._serve_with_restarts()
        finally:
            self._nursery = None
            self.done.set()

    def stop(self) -> None:
        """End every task of this tunnel (its device stays: deleting it is the caller's decision)."""
        if self._scope is not None:
            self._scope.cancel()
        else:  # not started (yet): it never will
            self.done.set()

    async def _serve_with_restarts(self) -> None:
        backoff = 0.5
        while True:
            started = trio.current_time()
            try:
                await self._serve_once()
            except Exception as e:  # noqa: BLE001 - isolate one tunnel's failures
                self.last_error = f"{type(e).__name__}: {e}"
                self.restarts += 1
                if trio.current_time() - started > 30:
                    backoff = 0.5
                log.error("%s: %s; restarting this tunnel in %.1f s", self.name, self.last_error, backoff,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                self.detector.fail_now(self.last_error)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _serve_once(self) -> None:
        await self.resolve()
        changes = await self.env.backend.apply(self.device_settings())
        if changes:
            log.info("%s: device %s %s", self.name, self.ifname, "created" if changes.created else
                     "updated: " + ", ".join(sorted(changes.changed)))
        await self.refresh_link()
        self._set_sysctls()
        self.env.poke()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_probes)
            nursery.start_soon(self._serve_device)
            nursery.start_soon(self._serve_resolver)  # idles while the endpoint is an IP address
            nursery.start_soon(self._serve_kicks)  # idles while the tunnel is not down

    def _spawn(self, what: str, fn, *args) -> None:
        """A short task of this tunnel's; a failure of it is logged, not propagated."""
        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception as e:  # noqa: BLE001 - a one-off task must not end the tunnel
                self.env.errors.log(logging.ERROR, f"{self.name}: {what}", "%s: %s failed: %s: %s", self.name,
                                    what, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))

        if self._nursery is not None:
            self._nursery.start_soon(guarded, name=f"{self.name}: {what}")

    async def update(self, config: Config, cfg: Tunnel, key) -> None:
        """Take CONFIG's settings for this tunnel (CFG, KEY): device (only what differs), probes, health."""
        old = self.cfg
        h = config.health_for(cfg)
        probe_changed = (cfg.probe_target != old.probe_target or h.interval != self.interval
                         or h.timeout != self.timeout or h.min_timeout != self.min_timeout or h.jitter != self.jitter
                         or h.fall != self.health.fall)
        self.config, self.cfg, self.key = config, cfg, key
        self.detector.configure(h.rise, h.fall, h.quality())
        self.interval, self.timeout, self.min_timeout, self.jitter = h.interval, h.timeout, h.min_timeout, h.jitter
        self.handshake_timeout = h.handshake_timeout
        if cfg.endpoint != old.endpoint:
            await self.resolve()
        try:
            changes = await self.env.backend.apply(self.device_settings())
        except WireGuardError as e:
            # The tunnel's own task retries with backoff; the reload itself went through.
            self.last_error = str(e)
            log.error("%s: the new settings could not be applied: %s", self.name, e)
        else:
            if changes:
                log.info("%s: device updated: %s", self.name, ", ".join(sorted(changes.changed)) or "created")
        if probe_changed and self._probe_scope is not None:
            self._probe_scope.cancel()

    # ------------------------------------------------------------ the device

    def _set_sysctls(self) -> None:
        # Replies of probes and pinned flows arrive on a tunnel the main table may not point at.
        try:
            sysctl.write("2", "net", "ipv4", "conf", self.ifname, "rp_filter")
        except sysctl.SysctlError as e:
            log.debug("%s", e)

    async def refresh_link(self) -> None:
        self.set_link(await self.env.rtnl.link(self.ifname))

    def set_link(self, link: Link | None) -> None:
        """The device's link as netlink reports it (None: gone)."""
        old = (self.ifindex, self.link_up)
        if link is None:
            self.ifindex, self.link_up = None, False
        else:
            self.ifindex, self.link_up = link.index, link.up and link.carrier
        if (self.ifindex, self.link_up) != old:
            if self._probe_stream is not None:
                self._probe_stream.ifindex = self.ifindex if self.present else None
            self._device_event.set()
            self._device_event = trio.Event()
            self.env.poke()

    async def _serve_device(self) -> None:
        """Keep the device there: when it vanishes (deleted, its wireguard-go died) make it again."""
        while True:
            await self._device_event.wait()
            if self.ifindex is None and self.env.backend_name == "kernel":
                await trio.sleep(0.05)
                log.warning("%s: device %s vanished; re-creating it", self.name, self.ifname)
                self.env.repairs["link"] += 1
                await self.env.backend.apply(self.device_settings())
                await self.refresh_link()
                self._set_sysctls()
            elif self.ifindex is not None and not self.link_up:
                # Someone set it down: bring it back (apply restores the link state too).
                await trio.sleep(0.05)
                await self.env.backend.apply(self.device_settings())
                await self.refresh_link()

    def on_recreated(self) -> None:
        """The userspace backend replaced a dead or hung wireguard-go: a new device, new ifindex."""
        self.env.repairs["link"] += 1
        log.warning("%s: wireguard-go for %s was restarted and reconfigured", self.name, self.ifname)
        self._set_sysctls()
        self._spawn("reading its device", self._refresh_link_safely)

    async def _refresh_link_safely(self) -> None:
        try:
            await self.refresh_link()
        except (NetlinkError, NetlinkTimeout) as e:
            log.warning("%s: reading device %s: %s", self.name, self.ifname, e)
            self.env.poke()

    async def _serve_kicks(self) -> None:
        """While the tunnel is down and its peer silent, start a fresh handshake every few seconds.

        WireGuard itself re-handshakes only after 15 s of sending without replies, and a gateway that
        restarted has forgotten the session: without this, recovery would take that long. The task
        sleeps on an event while the tunnel is not down: no wakeups for healthy tunnels. (It also
        starts kicking at once when it (re)starts on a tunnel that is down already: a restart of the
        tunnel's tasks must not end the kicks.) A failed kick is logged; it never restarts the tunnel.
        """
        while True:
            if self.health.health is not State.DOWN:
                await self._went_down.wait()
            self._went_down = trio.Event()
            while self.health.health is State.DOWN:
                await trio.sleep(KICK_INTERVAL)
                if self.health.health is not State.DOWN or not self.present:
                    continue
                if trio.current_time() - self.health.since < KICK_INTERVAL:
                    continue
                try:
                    await self._kick_if_silent()
                except Exception as e:  # noqa: BLE001 - the next kick comes anyway
                    self.env.errors.log(logging.WARNING, f"{self.name}: kick", "%s: session kick failed: %s: %s",
                                        self.name, type(e).__name__, e)

    async def _kick_if_silent(self) -> None:
        await self.read_status()
        # Silent: no handshake since it went down. A down tunnel with fresh handshakes (its probe
        # target is down, not its path) keeps its session.
        hs_at = self.counters.hs_at
        if hs_at is None or hs_at < self.health.since:
            log.debug("%s: no reply and no fresh handshake: starting a new session", self.name)
            try:
                await self.env.backend.reset_peer(self.device_settings())
            except WireGuardError as e:
                log.debug("%s: %s", self.name, e)

    # ------------------------------------------------------------ the endpoint

    async def resolve(self) -> bool:
        """Resolve the endpoint (DNS names); True when the address changed."""
        ep = self.cfg.endpoint
        new, self.endpoint_error = await resolve_endpoint(ep.host, ep.port, ep.is_dns)
        if new is None:
            log.warning("%s: %s", self.name, self.endpoint_error)
            return False
        changed = new != self.endpoint
        if changed and self.endpoint is not None:
            log.info("%s: endpoint %s now resolves to %s", self.name, ep.host, new[0])
        self.endpoint = new
        return changed

    async def _serve_resolver(self) -> None:
        """Re-resolve a DNS endpoint every resolve_interval, and every few seconds while the tunnel
        is down or its handshakes are stale (a gateway behind dynamic DNS that moved)."""
        last = trio.current_time()
        while True:
            await trio.sleep(RESOLVE_RETRY / 2)
            if not self.cfg.endpoint.is_dns:
                continue
            age = self.handshake_age()
            troubled = self.endpoint is None or self.health.health is State.DOWN or age is None or age > 135
            since = trio.current_time() - last
            if since >= self.config.resolve_interval or (troubled and since >= RESOLVE_RETRY):
                last = trio.current_time()
                if await self.resolve():
                    await self.env.backend.apply(self.device_settings())

    # ------------------------------------------------------------ probes and the congestion guard

    async def _serve_probes(self) -> None:
        """Probe through the tunnel while its tasks run; registered anew when the probe settings change."""
        probes = self.env.probes
        while True:
            probe = self.cfg.probe_target
            stream = ProbeStream(self.name, interval=self.interval, timeout=self.timeout, jitter=self.jitter,
                                 on_result=self.detector.on_probe, on_late=self.detector.on_late_reply,
                                 on_lost=self.detector.on_lost, fall=self.health.fall,
                                 rto=functools.partial(self.health.rto, self.min_timeout, self.timeout))
            with trio.CancelScope() as scope:
                self._probe_scope = scope
                try:
                    if probe.kind == "icmp":
                        probes.add_icmp(stream, probe.host, self.ifindex if self.present else None)
                        self._probe_stream = stream
                    else:
                        probes.add_tcp(stream, probe.host, probe.port, self.ifname)
                    await trio.sleep_forever()
                except OSError as e:
                    self.detector.on_probe(False, None, f"cannot probe: {e.strerror or e}")
                    await trio.sleep(max(self.interval, 1.0))
                finally:
                    probes.remove(stream)
                    self._probe_stream = None
            self._probe_scope = None

    def check_handshake(self) -> None:
        """A handshake that is stale (or never came) counts as a failed probe."""
        if not self.present:
            return
        self.detector.check_handshake(self.handshake_age(), trio.current_time() - self.started_at,
                                      self.handshake_timeout)

    async def _link_bytes(self) -> tuple[int, int] | None:
        """Bytes the tunnel received (decrypted) and sent, from the kernel's counters of its device: a
        netlink read that never waits on a wireguard-go (a frozen one must not delay a verdict). None:
        unknown."""
        index = self.ifindex
        if index is None:
            return None
        try:
            link = await self.env.rtnl.link(index)
        except (NetlinkError, NetlinkTimeout) as e:
            log.debug("%s: reading counters: %s", self.name, e)
            return None
        if link is None or link.name != self.ifname or link.rx_bytes is None or link.tx_bytes is None:
            return None
        return link.rx_bytes, link.tx_bytes

    def _starved(self) -> bool:
        """Its wireguard-go (if any) has a thread running or waiting for a CPU."""
        pid = self.env.backend.pid(self.ifname)
        return pid is not None and runnable(pid)

    def _on_transition(self, tr: Transition) -> None:
        self.presumed_up = False
        if tr.new is State.DOWN:
            self._went_down.set()
        state = display_state(tr.new, self.drained or self.removing)
        self.transitions[str(state)] += 1
        level = logging.WARNING if tr.new is State.DOWN else logging.INFO
        log.log(level, "%s %s: %s", self.name, state, tr.reason, extra={"tunnel": self.name, "state": str(state)})
        self.env.poke()

    def _on_weight(self, share: float) -> None:
        """Degraded with on_degraded = "reduce": its weight is SHARE of the configured one (1.0: whole again)."""
        if share < 1.0:
            log.info("%s: weight %.0f%% of its own (%s)", self.name, share * 100, self.health.degraded,
                     extra={"tunnel": self.name})
        else:
            log.info("%s: full weight again", self.name, extra={"tunnel": self.name})
        self.env.poke()

    def set_drained(self, drained: bool) -> bool:
        """The operator's drain (True) or its end; True when that changed anything."""
        if self.drained == drained:
            return False
        self.drained = drained
        state = self.state
        self.transitions[str(state)] += 1
        log.info("%s %s: %s", self.name, state, "drained by operator" if drained else "drain ended by operator")
        self.env.poke()
        return True

    def begin_removal(self) -> None:
        """Removed by a reload: from now on it takes no new flows (`drain_for_removal` waits for the
        old ones to end). Synchronous, so that a `revive` right after it always wins."""
        self.removing = True
        self._removal_scope = trio.CancelScope()
        self.env.poke()

    async def drain_for_removal(self, limit: float) -> bool:
        """Wait until the flows it carries are gone (at most LIMIT seconds). False when `revive`
        came first or meanwhile (it stays)."""
        scope = self._removal_scope
        if scope is None or not self.removing:
            return False
        with scope:
            await self.counters.wait_idle(limit, self.interval)
        if self._removal_scope is scope:
            self._removal_scope = None
        return self.removing and not scope.cancelled_caught

    def revive(self) -> None:
        """A reload brought this tunnel back before its removal ended: it stays."""
        self.removing = False
        if self._removal_scope is not None:
            self._removal_scope.cancel()
            self._removal_scope = None

    # ------------------------------------------------------------ counters and status

    def handshake_age(self) -> float | None:
        """Seconds since the last handshake (monotonic clock); None: none seen."""
        return self.counters.handshake_age()

    async def read_status(self, max_age: float = 0.0) -> DeviceStatus | None:
        """Fresh counters of the device (see counters.DeviceCounters.read). Never raises."""
        return await self.counters.read(max_age)


async def refresh_statuses(tunnels: list[TunnelRunner], max_age: float, deadline: float) -> None:
    """Read every tunnel's counters concurrently, for at most DEADLINE seconds: one slow or hung
    device delays a status or a scrape by that much at most, and the others are fresh."""
    with trio.move_on_after(deadline):
        async with trio.open_nursery() as nursery:
            for t in tunnels:
                nursery.start_soon(t.read_status, max_age)
