"""The pydantic models of a config file: what each section and key holds.

Every check of a single value sits in the value's type (hatun.config.values), so that the same type
validates a field both in the model and alone, in the cross-field checks (hatun.config.checks).
Validation is strict: TOML has real types, and `weight = true` or `rise = "3"` is a mistake.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator

from hatun.config.values import (
    DEFAULT_INTERFACE_PREFIX,
    CertPin,
    EnrollUrl,
    AbsolutePath,
    Duration,
    EndpointField,
    EnvName,
    Interface,
    InterfaceName,
    Listen,
    Mark,
    Network,
    NftTable,
    NonNegativeDuration,
    Path,
    PeerKey,
    Probe,
    ProbeField,
    RouteProtocol,
    RttLimitField,
    RulePriority,
    SocketPath,
    SourceAddress,
    TunnelName,
    _one_or_many,
    parse_endpoint,
)
from hatun.health import Quality
from hatun.keys import PublicKey


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# What each profile sets; a key given in the config overrides it. See docs/design.md "Failure
# detection" for how these numbers come out as detection times and probe costs.
HEALTH_PROFILES: dict[str, dict[str, Any]] = {
    # Loss window about 60 ms on a LAN-like path; 33 probes/s per tunnel.
    "fast": {"interval": 0.03, "timeout": 0.2, "min_timeout": 0.007, "rise": 10, "fall": 3, "recover_time": 5.0},
    # About 150 ms; 10 probes/s per tunnel.
    "default": {"interval": 0.1, "timeout": 0.5, "min_timeout": 0.025, "rise": 10, "fall": 3, "recover_time": 10.0},
    # Paths across the internet: slower, jittery, sometimes lossy. About 1.5 s; 2 probes/s.
    "wan": {"interval": 0.5, "timeout": 2.0, "min_timeout": 0.15, "rise": 5, "fall": 4, "recover_time": 60.0},
}
_HEALTH_COMMON: dict[str, Any] = {"handshake_timeout": 180.0, "jitter": 0.1, "max_loss": 0.2, "recover_loss": 0.05,
                                  "on_degraded": "leave"}
Profile = Literal["fast", "default", "wan"]
Share = Annotated[float, Field(ge=0, le=1)]


class HealthOverrides(_Model):
    """Health settings a tunnel may override (unset: the [health] value). A tunnel's own `profile`
    replaces the [health] profile (the keys [health] gives still apply); its other keys override both."""

    profile: Profile | None = Field(None, description="named settings: fast, default or wan")
    interval: Duration | None = Field(None, description="time between probes")
    timeout: Duration | None = Field(
        None, description="the longest a probe waits for its reply (the adaptive timeout's ceiling)")
    min_timeout: Duration | None = Field(None, description="the shortest a probe waits (the adaptive timeout's floor)")
    rise: int | None = Field(None, ge=1, le=1000, description="consecutive answered probes to (re)enter service")
    fall: int | None = Field(None, ge=1, le=1000, description="consecutive unanswered probes to leave service")
    handshake_timeout: Duration | None = Field(
        None, description="a tunnel whose last WireGuard handshake is older than this counts as failing"
    )
    jitter: float | None = Field(None, ge=0, le=0.5, description="random spread of probe times, as a share of the interval")
    max_loss: Share | None = Field(None, description="a tunnel losing more than this share of its probes is degraded")
    recover_loss: Share | None = Field(None, description="... and recovers at this share or less")
    max_rtt: RttLimitField | None = Field(None, description="a tunnel whose smoothed RTT exceeds this is degraded")
    recover_rtt: RttLimitField | None = Field(None, description="... and recovers at or below this (default: max_rtt)")
    recover_time: Duration | None = Field(None, description="how long a degraded tunnel must stay good to recover")
    on_degraded: Literal["leave", "reduce"] | None = Field(
        None, description="a degraded tunnel leaves service, or keeps it with its weight reduced in proportion")


class Health(_Model):
    """Defaults for every tunnel's health checks: a profile, and any of its keys overridden."""

    profile: Profile = Field("default", description="named settings: fast, default or wan")
    interval: Duration = Field(0.1, description="time between probes")
    timeout: Duration = Field(
        0.5, description="the longest a probe waits for its reply (the adaptive timeout's ceiling)")
    min_timeout: Duration = Field(0.025, description="the shortest a probe waits (the adaptive timeout's floor)")
    rise: int = Field(10, ge=1, le=1000, description="consecutive answered probes to (re)enter service")
    fall: int = Field(3, ge=1, le=1000, description="consecutive unanswered probes to leave service")
    handshake_timeout: Duration = Field(
        180.0,
        description="a tunnel whose last WireGuard handshake is older than this counts as failing"
        " (WireGuard drops session keys after 180 s without a new handshake)",
    )
    jitter: float = Field(0.1, ge=0, le=0.5, description="random spread of probe times, as a fraction of the interval")
    max_loss: Share | None = Field(
        0.2, description="a tunnel losing more than this share of its probes is degraded (1: never)")
    recover_loss: Share = Field(0.05, description="... and recovers at this share or less")
    max_rtt: RttLimitField | None = Field(None, description="a tunnel whose smoothed RTT exceeds this is degraded")
    recover_rtt: RttLimitField | None = Field(None, description="... and recovers at or below this (default: max_rtt)")
    recover_time: Duration = Field(10.0, description="how long a degraded tunnel must stay good to recover")
    on_degraded: Literal["leave", "reduce"] = Field(
        "leave", description="a degraded tunnel leaves service, or keeps it with its weight reduced in proportion")

    _given: frozenset[str] = PrivateAttr(frozenset())  # the keys the config gave (not from the profile)

    @model_validator(mode="wrap")
    @classmethod
    def _from_profile(cls, data: Any, handler: Any) -> Health:
        """Keys not given come from the profile."""
        given: frozenset[str] = frozenset()
        if isinstance(data, dict):
            given = frozenset(data)
            profile = data.get("profile", "default")
            if isinstance(profile, str) and profile in HEALTH_PROFILES:
                data = {**_HEALTH_COMMON, **HEALTH_PROFILES[profile], **data}
        health = handler(data)
        health._given = given
        return health

    def merged(self, override: HealthOverrides | None) -> Health:
        """A tunnel's settings: OVERRIDE's keys over these; a profile of its own replaces this one's,
        under the keys this one was given and OVERRIDE's own."""
        if override is None:
            return self
        # The typed values (a dump would give durations and RTT limits in their written form).
        keys = {k: getattr(override, k) for k in HealthOverrides.model_fields if getattr(override, k) is not None}
        if "profile" in keys:
            return Health.model_validate({**{k: getattr(self, k) for k in self._given}, **keys})
        return self.model_copy(update=keys)

    def quality(self) -> Quality:
        """The gray-failure limits, as `health.TunnelHealth` takes them."""
        max_loss = self.max_loss if self.max_loss is not None and self.max_loss < 1 else None  # 1: off
        return Quality(max_loss=max_loss, recover_loss=self.recover_loss, max_rtt=self.max_rtt,
                       recover_rtt=self.recover_rtt, recover_time=self.recover_time, action=self.on_degraded)


class Routing(_Model):
    prefixes: list[Network] = Field(..., min_length=1, description="private networks reached through the tunnels")
    source: Annotated[list[SourceAddress], BeforeValidator(_one_or_many)] = Field(
        default_factory=list,
        description="stable source address(es) for traffic into the tunnels, at most one IPv4 and one IPv6;"
        " hatun puts it on the loopback device",
    )
    when_all_down: Literal["keep", "unreachable"] = Field(
        "keep",
        description="when every tunnel is down: keep the route on the last tunnels, or make the prefixes"
        " unreachable (never a fall-back to the default route)",
    )
    mode: Literal["auto", "resilient", "multipath"] = Field(
        "auto", description="resilient nexthop group where the kernel has one (auto), or classic multipath route"
    )
    buckets: int = Field(512, ge=8, le=32768, description="hash buckets of the resilient nexthop group")
    idle_timer: NonNegativeDuration = Field(
        1.0, description="a bucket idle this long may move to another tunnel (resilient groups)"
    )
    unbalanced_timer: NonNegativeDuration = Field(
        0.0,
        description="force a rebalance when the group stays unbalanced this long, moving busy flows"
        " (0: never; see README)",
    )
    hash_policy: Literal["l3", "l4", "keep"] = Field(
        "l4", description="fib_multipath_hash_policy: l4 spreads flows by ports too; keep leaves the sysctl alone"
    )
    pin_flows: bool = Field(
        True, description="pin established flows to their tunnel with conntrack marks (nftables), so failback moves none"
    )
    table: int = Field(
        51820, ge=1, le=0xFFFFFFFF,
        description="first routing table of hatun (it uses table .. table + the largest mark slot); the range"
        " must avoid the kernel's tables 0 and 252-255",
    )
    rule_priority: RulePriority = Field(
        5200, ge=0, le=0xFFFFFFFF,
        description="priority of hatun's first policy routing rule (it uses 3): 1..32763, before the main table's rule",
    )
    protocol: RouteProtocol = Field(
        147, ge=0, le=255,
        description="route protocol id that marks hatun's routes, rules and nexthops; not one of the kernel's or a"
        " routing daemon's (iproute2 rt_protos)",
    )
    nexthop_id: int = Field(518200000, ge=1, le=0xFFFF0000, description="first nexthop object id hatun uses")
    fwmark_mask: Mark = Field(0x00FF0000, description="bits of the packet and conntrack mark that hatun uses")
    nft_table: NftTable = Field(
        "hatun", json_schema_extra={"pattern": "^hatun[a-z0-9_]{0,26}$"},
        description="nftables table (family inet); its name starts with 'hatun'",
    )
    drain_timeout: Duration = Field(10.0, description="how long a removed tunnel keeps its existing flows before teardown")


class Metrics(_Model):
    listen: Listen | None = Field(
        "127.0.0.1:9469",
        description="address:port for /metrics, /healthz, /readyz; empty: off; not loopback: `check` warns",
    )

    @property
    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        ep = parse_endpoint(self.listen)
        return (ep.host, ep.port)


class Control(_Model):
    socket: SocketPath = Field("/run/hatun/hatun.sock", description="control socket path (absolute; mode 0600)")


class Tunnel(_Model):
    name: TunnelName = Field(..., description="used in interface names, metric labels and the CLI")
    private_key_file: Path | None = Field(None, description="file holding this host's private key (mode 0600)")
    private_key_env: EnvName | None = Field(None, description="environment variable holding this host's private key")
    preshared_key_file: Path | None = Field(
        None, description="file holding the preshared key shared with this gateway (mode 0600; optional)")
    preshared_key_env: EnvName | None = Field(
        None, description="environment variable holding the preshared key shared with this gateway (optional)")
    # Required unless the tunnel enrolls (then the enrollment answers them): see checks.semantic_problems.
    address: Annotated[list[Interface], BeforeValidator(_one_or_many)] = Field(
        default_factory=list, description="this host's address(es) inside the tunnel, with prefix length"
    )
    peer_public_key: PeerKey | None = Field(None, description="the gateway's public key (base64)")
    endpoint: EndpointField | None = Field(None, description="the gateway: IPv4:port, [IPv6]:port or dns-name:port")
    enroll: EnrollUrl | None = Field(
        None, description="keyless: the gateway's enrollment service (https://HOST:PORT); the private key (made in"
        " memory), address, peer key and endpoint come from enrolling there with the CI job's OIDC token")
    enroll_audience: str | None = Field(None, min_length=1, max_length=200,
                                        description="the `aud` the gateway's enrollment service accepts")
    enroll_pin: CertPin | None = Field(
        None, description="SHA-256 of the enrollment service's certificate (hex, ':' allowed): trusted instead of"
        " the system's CAs")
    weight: int = Field(1, ge=1, le=256, description="share of flows")
    priority: int = Field(0, ge=0, le=1000, description="tier: a worse (higher) tier is used only while every better tier is down")
    keepalive: int | None = Field(None, ge=0, le=65535, description="persistent keepalive seconds (0 or unset: off)")
    probe: ProbeField | None = Field(None, description="icmp://ADDRESS or tcp://ADDRESS:PORT; default ICMP to the gateway's tunnel address")
    interface: InterfaceName | None = Field(
        None, description="interface name (default hat-NAME), at most 15 bytes; not lo, all or default"
    )
    mtu: int = Field(1420, ge=1280, le=9000, description="tunnel MTU")
    listen_port: int | None = Field(None, ge=1, le=65535, description="local UDP port (default: random)")
    allowed_ips: Annotated[list[Network], BeforeValidator(_one_or_many)] = Field(
        default_factory=list, description="extra networks accepted from the gateway besides the steered prefixes"
    )
    health: HealthOverrides | None = Field(None, description="this tunnel's own health settings")

    @property
    def ifname(self) -> str:
        return self.interface or DEFAULT_INTERFACE_PREFIX + self.name

    @property
    def peer_key(self) -> PublicKey:
        assert self.peer_public_key is not None, "an enrolled tunnel's peer key is known once it enrolled"
        return PublicKey.from_base64(self.peer_public_key)

    @property
    def enrolled(self) -> bool:
        """Keyless: its key, address, peer and endpoint come from an enrollment service."""
        return self.enroll is not None

    @property
    def probe_target(self) -> Probe:
        """The configured probe, or ICMP to the gateway's tunnel address (the first other host of the subnet)."""
        if self.probe is not None:
            return self.probe
        return Probe("icmp", default_peer_address(self.address[0]))


class Config(_Model):
    backend: Literal["auto", "kernel", "userspace"] = Field(
        "auto", description="WireGuard implementation: kernel where available (auto), else wireguard-go"
    )
    keep_on_exit: bool = Field(False, description="leave tunnels and routes in place when hatun stops")
    run_dir: AbsolutePath = Field("/run/hatun", description="runtime files: wireguard-go logs, state (absolute path)")
    resolve_interval: Duration = Field(300.0, description="how often DNS endpoints are resolved again")
    routing: Routing
    health: Health = Field(default_factory=Health)
    metrics: Metrics = Field(default_factory=Metrics)
    control: Control = Field(default_factory=Control)
    tunnels: list[Tunnel] = Field(..., min_length=1)

    def tunnel(self, name: str) -> Tunnel:
        for t in self.tunnels:
            if t.name == name:
                return t
        raise KeyError(name)

    def health_for(self, tunnel: Tunnel) -> Health:
        return self.health.merged(tunnel.health)


def default_peer_address(address: ipaddress.IPv4Interface | ipaddress.IPv6Interface):
    """The gateway's address in a point-to-point tunnel subnet: the other usable host.

    For 198.18.101.2/30 that is 198.18.101.1; for a /31 the other address; for wider subnets the
    first host that is not ours.
    """
    net = address.network
    if net.prefixlen >= net.max_prefixlen - 1:
        others = [a for a in (net.network_address, net.broadcast_address) if a != address.ip]
        return others[0] if others else address.ip
    for host in net.hosts():
        if host != address.ip:
            return host
    return address.ip
