"""The enrollment service's decisions: who may enroll, which address, until when; and its one owner
of state (registry, state file, the device's enrolled peers). HTTP is `server.py`'s.

Every decision is an audit line (logger `hatun.enroll.audit`): result, reason, repository, run id,
actor, client address, peer address; never the token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from hatun.enroll.device import PeerDevice
from hatun.enroll.models import EnrollServer
from hatun.enroll.registry import Peer, PoolFull, Registry
from hatun.enroll.tokens import LEEWAY, IssuerUnavailable, TokenRefused, TokenVerifier
from hatun.keys import InvalidKey, PublicKey
from hatun.logs import safe_text
from hatun.wireguard.model import WireGuardError

log = logging.getLogger("hatun.enroll")
audit = logging.getLogger("hatun.enroll.audit")

EXPIRY_CHECK = 1.0  # seconds between looks for expired peers
RECONCILE_EVERY = 3  # ... and every this many looks, for enrolled peers the device lost
RATE_WINDOW = 60.0
MAX_TRACKED = 10000  # rate-limit entries kept (oldest dropped first)


class Refused(Exception):
    """A request refused: STATUS (HTTP) and a reason safe to send back and log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class RateLimit:
    """At most LIMIT requests per key in any RATE_WINDOW (a sliding window of timestamps)."""

    limit: int
    clock: Callable[[], float] = time.monotonic
    seen: dict[str, list[float]] = field(default_factory=dict)

    def allow(self, key: str) -> bool:
        now = self.clock()
        times = [t for t in self.seen.pop(key, []) if now - t < RATE_WINDOW]
        ok = len(times) < self.limit
        if ok:
            times.append(now)
        self.seen[key] = times  # re-inserted last: the dict stays ordered by last use
        while len(self.seen) > MAX_TRACKED:
            del self.seen[next(iter(self.seen))]
        return ok


def owner_of(claims: dict[str, Any]) -> str:
    """Who may renew or withdraw a peer: the job that enrolled it (subject, run, attempt), as one string."""
    return "|".join(str(claims.get(k, "")) if isinstance(claims.get(k), (str, int)) else ""
                    for k in ("sub", "repository", "run_id", "run_attempt"))


def rule_matches(rule: dict[str, str], claims: dict[str, Any]) -> bool:
    """Every claim the rule names has exactly the rule's value (claims are strings in GitHub's tokens)."""
    return all(isinstance(claims.get(k), str) and claims[k] == v for k, v in rule.items())


class EnrollService:
    """Decides and applies enrollments for one gateway device."""

    def __init__(self, config: EnrollServer, verifier: TokenVerifier, device: PeerDevice,
                 gateway_key: PublicKey, *, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self.verifier = verifier
        self.device = device
        self.gateway_key = gateway_key
        self.now = now
        self.registry = Registry(config.pool_hosts())
        self.per_client = RateLimit(config.rate_per_client)
        self.per_repository = RateLimit(config.rate_per_repository)
        self._lock = trio.Lock()  # one change of state at a time

    # --- start ---

    async def restore(self) -> None:
        """Read the state file and make the device hold exactly its live peers (others untouched)."""
        for problem in self.registry.load(self.config.state_file, self.now(), self.config.max_ttl):
            log.warning("state file: %s", safe_text(problem))
        await self.reconcile()
        await self.expire()

    # --- requests ---

    async def enroll(self, token: str | None, body: Any, client: str) -> dict[str, Any]:
        """POST /v1/peers. Returns the answer (JSON object) or raises Refused."""
        ctx: dict[str, Any] = {"client": client}
        old = None
        try:
            self._limit_client(client)
            key = self._public_key(body)
            ttl = _ttl(body, self.config.max_ttl)
            claims = await self._claims(token, ctx)
            async with self._lock:
                self._check_jti(claims)
                owner = owner_of(claims)
                repository = str(claims.get("repository", ""))
                old = self.registry.peers.get(key.base64)
                if old is not None and old.owner != owner:
                    raise Refused(409, "this public key is enrolled by another job")
                on_device = await self._device_peers()
                if key == self.gateway_key or (old is None and key in on_device):
                    raise Refused(409, "this public key is already a peer of the gateway (not one it enrolled)")
                if old is None:
                    self._check_quotas(owner, repository)
                foreign = tuple(net for k, nets in on_device.items() if k.base64 not in self.registry.peers
                                for net in nets)
                try:
                    address = self.registry.address_for(key.base64, foreign)
                except PoolFull:
                    raise Refused(503, "the address pool is full") from None
                peer = Peer(key.base64, address, self.now() + ttl, repository, str(claims.get("run_id", "")),
                            str(claims.get("actor", "")), owner)
                try:
                    await self.device.add(key, address)
                except WireGuardError as e:
                    log.error("cannot add peer %s to %s: %s", key.base64, self.device.ifname, e)
                    raise Refused(503, "the gateway's WireGuard device refused the peer") from None
                self.registry.peers[key.base64] = peer
                self._save()
        except Refused as e:
            self._audit("enroll", "refused", e.reason, ctx)
            raise
        ctx["address"] = address
        self._audit("enroll", "accepted", "renewed" if old else "new", ctx)
        return {
            "address": f"{address}/{self.config.pool.prefixlen}",
            "gateway_public_key": self.gateway_key.base64,
            "endpoint": str(self.config.endpoint),
            "expires": int(peer.expires),
            "expires_at": _when(peer.expires),
        }

    async def unenroll(self, token: str | None, key_text: str, client: str) -> dict[str, Any]:
        """DELETE /v1/peers/KEY: a fresh token of the same repository and run. Raises Refused."""
        ctx: dict[str, Any] = {"client": client}
        try:
            self._limit_client(client)
            key = self._public_key({"public_key": key_text})
            claims = await self._claims(token, ctx)
            async with self._lock:
                self._check_jti(claims)
                peer = self.registry.peers.get(key.base64)
                if peer is None:
                    raise Refused(404, "no such enrolled peer")
                if peer.owner != owner_of(claims):
                    raise Refused(403, "the peer was enrolled by another job")
                await self._remove(peer)
        except Refused as e:
            self._audit("unenroll", "refused", e.reason, ctx)
            raise
        ctx["address"] = peer.address
        self._audit("unenroll", "accepted", "removed", ctx)
        return {"removed": key.base64}

    # --- expiry ---

    async def serve_expiry(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Remove expired peers within about EXPIRY_CHECK seconds of their expiry, and put back
        enrolled peers the device lost (its WireGuard restarted), forever."""
        task_status.started()
        n = 0
        while True:
            await trio.sleep(EXPIRY_CHECK)
            n += 1
            try:
                await self.expire()
                if n % RECONCILE_EVERY == 0:
                    await self.reconcile()
            except (WireGuardError, OSError) as e:  # the device or disk: try again next time
                log.error("expiry: %s", e)

    async def reconcile(self) -> None:
        """Enrolled, unexpired peers missing on the device are added again (others are left alone)."""
        async with self._lock:
            on_device = await self.device.peers()
            for peer in list(self.registry.peers.values()):
                key = PublicKey.from_base64(peer.public_key)
                if peer.expires > self.now() and key not in on_device:
                    await self.device.add(key, peer.address)
                    log.info("peer %s (%s) was missing on %s: added again", peer.public_key, peer.address,
                             self.device.ifname)

    async def expire(self) -> list[Peer]:
        async with self._lock:
            gone = self.registry.expired(self.now())
            for peer in gone:
                await self._remove(peer)
                self._audit("expire", "removed", "expired", {"address": peer.address, "repository": peer.repository,
                                                             "run_id": peer.run_id, "actor": peer.actor})
        return gone

    # --- helpers ---

    async def _device_peers(self) -> dict:
        try:
            return await self.device.peers()
        except WireGuardError as e:
            log.error("cannot read the peers of %s: %s", self.device.ifname, e)
            raise Refused(503, "the gateway's WireGuard device cannot be read") from None

    def _check_quotas(self, owner: str, repository: str) -> None:
        if len(self.registry.peers) >= self.config.max_peers:
            raise Refused(503, "too many enrolled peers")
        live = list(self.registry.peers.values())
        if sum(p.owner == owner for p in live) >= self.config.max_peers_per_job:
            raise Refused(429, f"this job has {self.config.max_peers_per_job} peers enrolled already")
        if sum(p.repository == repository for p in live) >= self.config.max_peers_per_repository:
            raise Refused(429, f"this repository has {self.config.max_peers_per_repository} peers enrolled already")

    async def _remove(self, peer: Peer) -> None:
        try:
            await self.device.remove(PublicKey.from_base64(peer.public_key))
        except WireGuardError as e:
            log.error("cannot remove peer %s from %s: %s", peer.public_key, self.device.ifname, e)
            raise Refused(503, "the gateway's WireGuard device refused the change") from None
        del self.registry.peers[peer.public_key]
        self._save()

    def _save(self) -> None:
        try:
            self.registry.save(self.config.state_file)
        except OSError as e:
            log.error("cannot write the state file %s: %s", self.config.state_file, e.strerror)

    def _limit_client(self, client: str) -> None:
        if not self.per_client.allow(client):
            raise Refused(429, f"too many requests from {client} (at most {self.config.rate_per_client} a minute)")

    @staticmethod
    def _public_key(body: Any) -> PublicKey:
        value = body.get("public_key") if isinstance(body, dict) else None
        if not isinstance(value, str):
            raise Refused(400, "the body must be a JSON object with \"public_key\"")
        try:
            return PublicKey.from_base64(value)
        except InvalidKey as e:
            raise Refused(400, f"malformed public key: {e}") from None

    async def _claims(self, token: str | None, ctx: dict[str, Any]) -> dict[str, Any]:
        if not token:
            raise Refused(401, "no token (Authorization: Bearer TOKEN)")
        try:
            claims = await self.verifier.verify(token)
        except IssuerUnavailable as e:
            raise Refused(503, str(e)) from None
        except TokenRefused as e:
            raise Refused(401, str(e)) from None
        ctx.update({k: claims.get(k) for k in ("repository", "run_id", "actor")})
        repository = str(claims.get("repository", ""))
        if not self.per_repository.allow(repository):
            raise Refused(429, "too many requests for this repository")
        if not any(rule_matches(rule, claims) for rule in self.config.allow):
            raise Refused(403, "the token matches no allow rule of this gateway")
        ctx["jti"] = claims["jti"]
        return claims

    def _check_jti(self, claims: dict[str, Any]) -> None:
        until = float(claims["exp"]) + LEEWAY
        if not self.registry.use_jti(str(claims["jti"]), until, self.now()):
            raise Refused(401, "token already used (jti seen before): fetch a fresh one")

    @staticmethod
    def _audit(action: str, result: str, reason: str, ctx: dict[str, Any]) -> None:
        fields = " ".join(f"{k}={safe_text(str(ctx.get(k) or '-'))[:200]}"
                          for k in ("repository", "run_id", "actor", "client", "address"))
        audit.info("%s %s: %s; %s", action, result, safe_text(reason), fields)


def _ttl(body: Any, max_ttl: float) -> float:
    ttl = body.get("ttl") if isinstance(body, dict) else None
    if ttl is None:
        return max_ttl
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 60 <= ttl:
        raise Refused(400, "ttl must be a number of seconds, at least 60")
    return min(float(ttl), max_ttl)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
