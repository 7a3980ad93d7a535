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
from dataclasses import dataclass, field

import pydantic

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
