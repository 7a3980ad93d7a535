"""hatun's status: one typed model for every reader.

The supervisor produces it (`Supervisor.status()`, the one place that decides what a tunnel's
figures are and which tunnels count: every tunnel hatun has a device for, draining ones included,
each under a name unique in the status). It is rendered for people (`render.status_text`), for
machines (`to_json`: the control socket, `hatun status --json`), for Prometheus (`metrics`) and for
runner diagnoses (`runner.diagnose`). Clients read it back with `Status.from_json`, which checks
every field: a reply that does not fit gives StatusError, never a KeyError deep in a renderer.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import pydantic
import trio

from hatun import __version__
from hatun.keys import redact

# Fields marked so are for in-process readers only (metrics): not in the JSON.
_INTERNAL = {"json": False}


class StatusError(Exception):
    """A status (from the control socket) that does not have the expected shape."""


@dataclass(frozen=True)
class TunnelStatus:
    name: str  # unique in the status (a draining tunnel that shares its name with a new one: "name@interface")
    interface: str
    state: str  # up | down | init | draining
    health: str  # the verdict of the probes, drain aside
    drained: bool  # by the operator
    removing: bool  # removed by a reload, draining until torn down
    since: float  # wall clock of the last change of `health`
    for_seconds: float
    rtt_seconds: float | None
    rtt_last_seconds: float | None
    loss: float  # share of the last probes that failed
    weight: int  # effective: 0 while out of the route
    configured_weight: int
    priority: int
    in_route: bool
    pinned: bool  # out of the route, but flows pinned to it still use it
    rx_bytes: int | None
    tx_bytes: int | None
    rx_rate: float  # bytes per second
    tx_rate: float
    last_handshake: float | None  # wall clock, as WireGuard reports it
    handshake_age_seconds: float | None
    endpoint: str | None  # resolved, host:port
    endpoint_configured: str
    endpoint_error: str | None
    probe: str
    last_failure: str | None
    probes_ok: int
    probes_failed: int
    present: bool  # the device exists and is up
    last_error: str | None  # redacted
    restarts: int
    congested: int
    late_replies: int
    transitions: dict[str, int]
    rtt_counts: tuple[int, ...] = field(default=(), metadata=_INTERNAL)  # RTT histogram (health.RTT_BUCKETS, +Inf)
    rtt_sum: float = field(default=0.0, metadata=_INTERNAL)


@dataclass(frozen=True)
class RouteStatus:
    prefixes: list[str]
    members: list[str]  # tunnels taking new flows
    tier: int | None
    unreachable: bool
    all_down: bool
    last_error: str | None


@dataclass(frozen=True)
class ReloadStatus:
    ok: bool  # the last reload worked (or none was tried)
    message: str | None
    counts: dict[str, int]  # success / failure


@dataclass(frozen=True)
class Status:
    version: str
    pid: int
    config: str | None
    backend: str | None
    mode: str | None
    started: float
    ready: bool
    route: RouteStatus
    reload: ReloadStatus
    tunnels: list[TunnelStatus]
    repairs: dict[str, int] = field(default_factory=dict)

    @property
    def healthy(self) -> int:
        return sum(t.state == "up" for t in self.tunnels)

    @property
    def in_service(self) -> bool:
        """New flows have a tunnel: the route has members and is not the all-down fallback."""
        return bool(self.route.members) and not self.route.all_down

    def tunnel(self, name: str) -> TunnelStatus | None:
        return next((t for t in self.tunnels if t.name == name), None)

    def to_json(self) -> dict:
        """The status for machines (JSON-ready, no secrets, no internal fields)."""
        return _to_json(self)

    @classmethod
    def from_json(cls, doc: object) -> Status:
        """Read a status back (a client's side of the control socket). Raises StatusError."""
        try:
            return _ADAPTER.validate_python(doc)
        except pydantic.ValidationError as e:
            first = e.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise StatusError(f"hatun sent a status that does not fit ({e.error_count()} problems; first: "
                              f"{where}: {first['msg']})") from None


def _to_json(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("json", True)}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    return obj


_ADAPTER = pydantic.TypeAdapter(Status)


# --- produced here, from the running parts ---------------------------------------------------------


def build_status(sup) -> Status:
    """The state of hatun and of every tunnel it has a device for (SUP: the supervisor.Supervisor)."""
    decision = sup.steerer.decision if sup.steerer else None
    members = decision.member_names() if decision else ()
    pinned = decision.pinned if decision else ()
    tunnels = []
    for key, t in sup.keyed_tunnels():
        # Shown under its own name, unless a tunnel of the config has it too (a draining one that a
        # reload replaced by one of the same name on another interface).
        shown = t.name if sup.tunnels.get(t.name) in (t, None) else key
        tunnels.append(tunnel_status(t, shown, in_route=key in members, pinned=key in pinned))
    rl = sup.reloader
    return Status(
        version=__version__, pid=os.getpid(), config=sup.config_path, backend=sup.backend_name,
        mode=sup.mode, started=sup.started_at, ready=sup.ready.is_set(),
        route=RouteStatus(
            prefixes=[str(p) for p in sup.config.routing.prefixes], members=list(members),
            tier=decision.tier if decision else None, unreachable=bool(decision and decision.unreachable),
            all_down=bool(decision and decision.all_down),
            last_error=sup.steerer.last_error if sup.steerer else None),
        reload=ReloadStatus(ok=rl.last_ok, message=rl.last_message, counts=dict(rl.counts)),
        tunnels=tunnels, repairs=dict(sup.repairs),
    )


def tunnel_status(t, name: str, *, in_route: bool, pinned: bool) -> TunnelStatus:
    """Tunnel T (a tunnel.TunnelRunner) in the status, under NAME; no secrets."""
    now, wall = trio.current_time(), time.time()
    c = t.counters
    peer = c.status.peer if c.status else None
    h = t.health
    return TunnelStatus(
        name=name, interface=t.ifname, state=str(t.state), health=str(h.health), drained=t.drained,
        removing=t.removing, since=wall - (now - h.since), for_seconds=now - h.since,
        rtt_seconds=h.rtt_avg, rtt_last_seconds=h.rtt_last, loss=h.loss,
        weight=t.cfg.weight if in_route else 0, configured_weight=t.cfg.weight, priority=t.cfg.priority,
        in_route=in_route, pinned=pinned,
        rx_bytes=peer.rx_bytes if peer else None, tx_bytes=peer.tx_bytes if peer else None,
        rx_rate=c.rx_rate, tx_rate=c.tx_rate,
        last_handshake=peer.last_handshake if peer else None, handshake_age_seconds=t.handshake_age(),
        endpoint=f"{t.endpoint[0]}:{t.endpoint[1]}" if t.endpoint else None,
        endpoint_configured=str(t.cfg.endpoint), endpoint_error=t.endpoint_error,
        probe=str(t.cfg.probe_target), last_failure=h.last_failure,
        probes_ok=h.probes_ok, probes_failed=h.probes_failed, present=t.present,
        last_error=redact(t.last_error) if t.last_error else None, restarts=t.restarts,
        congested=t.detector.congested, late_replies=t.detector.late_replies,
        transitions=dict(t.transitions),
        rtt_counts=tuple(h.rtt_counts), rtt_sum=h.rtt_sum,
    )
