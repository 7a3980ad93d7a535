"""The gateway's enrollment config (`[enroll]` in the file `hatun enroll serve` reads).

A gateway's file holds `[enroll]` and its `[[enroll.allow]]` rules and nothing of a host's config
(no tunnels, no routing). Cross-field rules: plain HTTP only on a loopback address, an `http://`
issuer only on a loopback host, a pool that has room.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from hatun.config.values import (
    AbsolutePath,
    Duration,
    EndpointField,
    InterfaceName,
    Listen,
    Network,
    Path,
    parse_endpoint,
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _issuer(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("expected an https:// URL, e.g. \"https://token.actions.githubusercontent.com\"")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError("an http:// issuer is accepted only on a loopback address (labs, tests): use https://")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("an issuer URL has no query, fragment or user")
    return value


IssuerUrl = Annotated[str, AfterValidator(_issuer)]
ClaimValue = Annotated[str, Field(min_length=1, max_length=512)]


class EnrollServer(_Model):
    listen: Listen = Field("127.0.0.1:8443", description="address:port of the enrollment service")
    tls_cert: Path | None = Field(None, description="certificate (PEM, chain first) for HTTPS")
    tls_key: Path | None = Field(None, description="its private key (PEM, mode 0600)")
    issuer: IssuerUrl = Field("https://token.actions.githubusercontent.com",
                              description="the OIDC issuer whose tokens are accepted (its `iss`)")
    audience: str = Field(..., min_length=1, max_length=200, description="the `aud` a runner must request")
    interface: InterfaceName = Field(..., description="this gateway's WireGuard device (kernel or wireguard-go)")
    endpoint: EndpointField = Field(..., description="what runners dial: host:port of this gateway's WireGuard")
    pool: Network = Field(..., description="tunnel addresses handed out, one per enrolled runner")
    max_ttl: Duration = Field(21600.0, description="an enrolled peer is removed at its expiry: this long after"
                              " enrolling (or the shorter ttl the runner asks for)")
    state_file: AbsolutePath = Field("/var/lib/hatun/enroll.json", description="enrolled peers, kept across restarts")
    rate_per_client: int = Field(30, ge=1, le=100000, description="requests per minute from one client address")
    rate_per_repository: int = Field(60, ge=1, le=100000, description="requests per minute for one repository")
    max_peers: int = Field(1024, ge=1, le=65536, description="enrolled peers at most")
    max_peers_per_job: int = Field(4, ge=1, le=65536, description="enrolled peers of one job (sub, run, attempt) at most")
    max_peers_per_repository: int = Field(64, ge=1, le=65536, description="enrolled peers of one repository at most")
    allow: list[dict[str, ClaimValue]] = Field(
        ..., min_length=1, description="rules: a token must match every claim of at least one rule")

    @model_validator(mode="after")
    def _cross(self) -> EnrollServer:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        host = parse_endpoint(self.listen).host
        if self.tls_cert is None and not is_loopback_host(host):
            raise ValueError(f"listen = {self.listen!r} is not a loopback address: HTTPS needed (tls_cert, tls_key)")
        for i, rule in enumerate(self.allow):
            if not rule:
                raise ValueError(f"allow[{i}] is empty: it would accept every token of the issuer")
        if self.pool.num_addresses < 4:
            raise ValueError("pool is too small (a /30 or larger: the gateway keeps the first address)")
        return self

    def pool_hosts(self) -> list[Any]:
        """Addresses handed out: the pool's hosts but the first (the gateway's own)."""
        hosts = self.pool.hosts() if self.pool.version == 4 else (self.pool.network_address + i
                                                                   for i in range(1, min(self.pool.num_addresses, 65537)))
        return [h for i, h in zip(range(self.max_peers + 1), hosts)][1:]


class GatewayConfig(_Model):
    """A gateway's file: `[enroll]` and its rules."""

    enroll: EnrollServer
