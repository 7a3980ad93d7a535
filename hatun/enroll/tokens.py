"""Verifying an OIDC token (GitHub Actions' job token) with PyJWT: never by hand.

The issuer's signing keys come from its JWKS, found through its discovery document
(ISSUER/.well-known/openid-configuration), cached, and fetched again when a token names a key id
the cache does not hold (at most once per REFRESH_MIN_INTERVAL, so unknown ids cannot make us hammer
the issuer). The algorithm is fixed to what the key says (RS256 for GitHub) and must be asymmetric:
`none` and HMAC (which would take the issuer's *public* key for a shared secret) are refused before
any signature work. `iss`, `aud`, `exp`, `nbf`, `iat` and `jti` are required; time claims get a
small leeway. Replay (`jti`) and the allow rules are the caller's (they need state and config).

Every refusal is a `TokenRefused` whose message is safe to send back and to log: it never contains
the token.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import trio

log = logging.getLogger("hatun.enroll")

# Asymmetric algorithms only: a token's header can name any algorithm, and an HMAC one would verify
# a signature made with the public key (CVE-2015-9235 and its many repeats).
ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
LEEWAY = 30.0  # seconds of clock difference tolerated on exp / nbf / iat
REFRESH_MIN_INTERVAL = 60.0  # an unknown kid fetches the JWKS again at most this often
MAX_AGE = 3600.0  # the JWKS is fetched again after this long (a withdrawn key stops working)
MAX_TOKEN = 16 * 1024  # a GitHub token is about 1.2 KB
REQUIRED = ("iss", "aud", "exp", "iat", "nbf", "jti")

# GET url -> parsed JSON; raises OSError/ValueError/trio.TooSlowError on failure.
Fetch = Callable[[str], Awaitable[Any]]


class TokenRefused(Exception):
    """A token that is not accepted; the message says why (never the token)."""


class IssuerUnavailable(TokenRefused):
    """The issuer's discovery document or keys cannot be had now: not the token's fault."""


@dataclass
class JwksCache:
    """The issuer's signing keys by key id, fetched through discovery on demand."""

    issuer: str
    fetch: Fetch
    clock: Callable[[], float] = time.monotonic
    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    fetched_at: float | None = None
    failed: bool = False  # the last fetch failed (the keys held, if any, are older)
    _lock: trio.Lock = field(default_factory=trio.Lock)

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key KID. Fetches the JWKS when it is not known (rate-limited) or older than MAX_AGE
        (a key the issuer withdrew stops working). Raises TokenRefused (IssuerUnavailable)."""
        stale = self.fetched_at is None or self.clock() - self.fetched_at >= MAX_AGE
        if kid in self.keys and not stale:
            return self.keys[kid]
        async with self._lock:
            stale = self.fetched_at is None or self.clock() - self.fetched_at >= MAX_AGE
            if stale or (kid not in self.keys and self.clock() - self.fetched_at >= REFRESH_MIN_INTERVAL):
                await self._refresh()
        if kid not in self.keys:
            if self.failed:
                raise IssuerUnavailable("the issuer's keys cannot be read now")
            raise TokenRefused("unknown signing key (kid not in the issuer's JWKS)")
        return self.keys[kid]

    async def _refresh(self) -> None:
        discovery_url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            with trio.fail_after(10):
                discovery = await self.fetch(discovery_url)
                if not isinstance(discovery, dict) or discovery.get("issuer") != self.issuer:
                    raise ValueError("its discovery document names another issuer")
                jwks_uri = discovery.get("jwks_uri")
                # Keys over https, unless the issuer itself is a plain-http loopback one (labs).
                schemes = ("https://", "http://") if self.issuer.startswith("http://") else ("https://",)
                if not isinstance(jwks_uri, str) or not jwks_uri.startswith(schemes):
                    raise ValueError("its discovery document has no https jwks_uri")
                doc = await self.fetch(jwks_uri)
        except (OSError, ValueError, trio.TooSlowError) as e:
            self.fetched_at, self.failed = self.clock(), True  # also rate-limits retries against a broken issuer
            if self.keys:  # keep the keys we have until the issuer answers again
                log.warning("issuer %s: cannot refresh its keys: %s", self.issuer, e)
                return
            raise IssuerUnavailable(f"cannot read the issuer's keys: {e}") from None
        keys: dict[str, jwt.PyJWK] = {}
        for entry in (doc.get("keys") if isinstance(doc, dict) else None) or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a key we cannot use (unknown type): skip it, keep the others
            if key.algorithm_name in ALGORITHMS:
                keys[entry["kid"]] = key
        self.keys, self.fetched_at, self.failed = keys, self.clock(), False
        log.info("issuer %s: %d signing keys", self.issuer, len(keys))


@dataclass
class TokenVerifier:
    """Checks a token's signature, issuer, audience and times; returns its claims."""

    issuer: str
    audience: str
    jwks: JwksCache
    now: Callable[[], float] = time.time

    async def verify(self, token: str) -> dict[str, Any]:
        """The claims of TOKEN, or TokenRefused saying why."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            raise TokenRefused("no token, or a token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused("malformed token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise TokenRefused(f"algorithm {str(alg)[:20]!r} is not accepted (asymmetric signatures only)")
        if not isinstance(kid, str) or not kid or len(kid) > 200:
            raise TokenRefused("the token names no signing key (kid)")
        key = await self.jwks.key(kid)
        if key.algorithm_name != alg:
            raise TokenRefused(f"algorithm {alg} does not match the issuer's key ({key.algorithm_name})")
        try:
            claims = jwt.decode(
                token, key=key, algorithms=[key.algorithm_name], audience=self.audience, issuer=self.issuer,
                leeway=LEEWAY, options={"require": list(REQUIRED), "verify_signature": True})
        except jwt.ExpiredSignatureError:
            raise TokenRefused("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefused("token not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused(f"wrong audience (this gateway accepts aud {self.audience!r})") from None
        except jwt.InvalidIssuerError:
            raise TokenRefused("wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused("bad signature") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenRefused(f"the token has no {e.claim!r} claim") from None
        except jwt.PyJWTError as e:
            raise TokenRefused(f"invalid token: {type(e).__name__}") from None
        if not isinstance(claims.get("jti"), str) or not claims["jti"]:
            raise TokenRefused("the token has no usable 'jti' claim")
        return claims


def claims_text(claims: dict[str, Any], names: tuple[str, ...] = ("repository", "run_id", "actor", "ref")) -> str:
    """A few claims for an audit line (never the token): `repository=acme/app run_id=42 ...`."""
    return " ".join(f"{n}={json.dumps(str(claims.get(n, '-')))[1:-1][:100]}" for n in names)
