"""The lab's own OIDC issuer, shaped like GitHub Actions' token service: a signing key (RSA, RS256),
a discovery document and a JWKS, and the job-token endpoint a runner calls with
ACTIONS_ID_TOKEN_REQUEST_URL / _TOKEN (`GET URL&audience=AUD` with `Authorization: bearer TOKEN`,
answer `{"value": JWT}`). Served over plain HTTP on loopback addresses only, inside the lab.

Tests also use `IssuerKey.mint` directly to make every kind of bad token.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# What GitHub puts in a job's token (the lab's values; see README "Keyless runners").
DEFAULT_CLAIMS = {
    "repository": "acme/app",
    "repository_owner": "acme",
    "ref": "refs/heads/main",
    "sha": "0" * 40,
    "workflow": "build",
    "event_name": "push",
    "run_id": "4242",
    "run_attempt": "1",
    "actor": "octocat",
    "job_workflow_ref": "acme/app/.github/workflows/build.yml@refs/heads/main",
    "runner_environment": "github-hosted",
}
TOKEN_LIFETIME = 300


@dataclass
class IssuerKey:
    """An issuer URL and its RSA signing key."""

    issuer: str
    private_pem: bytes
    kid: str

    @classmethod
    def generate(cls, issuer: str) -> IssuerKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return cls(issuer, pem, uuid.uuid4().hex[:16])

    @classmethod
    def load(cls, path: str) -> IssuerKey:
        with open(path) as f:
            doc = json.load(f)
        return cls(doc["issuer"], doc["private_pem"].encode(), doc["kid"])

    def save(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"issuer": self.issuer, "private_pem": self.private_pem.decode(), "kid": self.kid}, f)

    def public_jwk(self) -> dict[str, Any]:
        private = serialization.load_pem_private_key(self.private_pem, None)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
        return {**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.public_jwk()]}

    def discovery(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "jwks_uri": self.issuer.rstrip("/") + "/.well-known/jwks",
                "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"], "claims_supported": sorted(DEFAULT_CLAIMS)}

    def mint(self, audience: str, *, lifetime: float = TOKEN_LIFETIME, now: float | None = None,
             headers: dict[str, Any] | None = None, **claims: Any) -> str:
        """A job token for AUDIENCE signed with this key; CLAIMS override GitHub's usual ones."""
        now = time.time() if now is None else now
        body = {**DEFAULT_CLAIMS, "iss": self.issuer, "aud": audience, "iat": int(now), "nbf": int(now) - 5,
                "exp": int(now + lifetime), "jti": str(uuid.uuid4())}
        body["sub"] = f"repo:{body['repository']}:ref:{body['ref']}"
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private_pem, algorithm="RS256", headers={"kid": self.kid, **(headers or {})})


class IssuerApp:
    """ASGI: discovery, JWKS, and the job-token endpoint (guarded by a request token)."""

    def __init__(self, key: IssuerKey, request_token: str | None = None, claims: dict[str, Any] | None = None) -> None:
        self.key = key
        self.request_token = request_token or secrets.token_urlsafe(24)
        self.claims = claims or {}

    async def __call__(self, scope: dict, receive, send) -> None:
        from hatun.enroll.server import lifespan, send_json

        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http":
            await send_json(send, *self._answer(scope))

    def _answer(self, scope: dict) -> tuple[int, dict]:
        path = scope.get("path", "")
        if path == "/.well-known/openid-configuration":
            return 200, self.key.discovery()
        if path == "/.well-known/jwks":
            return 200, self.key.jwks()
        if path == "/token":
            auth = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), self.request_token):
                return 401, {"message": "bad request token"}
            audience = parse_qs(scope.get("query_string", b"").decode()).get("audience", [""])[0]
            if not audience:
                return 400, {"message": "audience missing"}
            return 200, {"value": self.key.mint(audience, **self.claims)}
        return 404, {"message": "not found"}


async def serve_issuer(app: IssuerApp, listen: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve APP over plain HTTP on LISTEN (a loopback host:port) until cancelled."""
    from hypercorn.config import Config as HConfig
    from hypercorn.trio import serve

    h = HConfig()
    h.bind = [listen]
    h.accesslog = None
    h.graceful_timeout = 1
    await serve(app, h, task_status=task_status)


def main(argv: list[str] | None = None) -> None:
    """`python -m hatun.lab.issuer KEY_FILE LISTEN`: serve the issuer until killed (the lab starts it
    inside a namespace). The job-token endpoint's request token comes from $HATUN_LAB_REQUEST_TOKEN."""
    import sys

    key_path, listen = (argv if argv is not None else sys.argv[1:])[:2]
    app = IssuerApp(IssuerKey.load(key_path), request_token=os.environ.get("HATUN_LAB_REQUEST_TOKEN"))
    trio.run(serve_issuer, app, listen)


if __name__ == "__main__":
    main()
