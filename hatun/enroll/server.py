"""`hatun enroll serve`: the enrollment service over HTTPS (Hypercorn on Trio; plain HTTP only on a
loopback address), its JWKS fetching (httpx), and its life: state restored at start, expired peers
removed every second, clean stop on SIGTERM/SIGINT (enrolled peers stay: they have their expiry).

The ASGI application is small on purpose: two routes and a health check, bodies of at most
MAX_BODY bytes read within BODY_TIMEOUT, every answer JSON, every failure inside a request a 500
that is logged and never reaches the service's own tasks (Hypercorn runs each request in a task
of its own).
"""

from __future__ import annotations

import json
import logging
import signal
from typing import Any

import trio

from hatun.enroll.models import EnrollServer
from hatun.enroll.service import EnrollService, Refused
from hatun.logs import safe_text

log = logging.getLogger("hatun.enroll")

MAX_BODY = 4096
BODY_TIMEOUT = 10.0
MAX_FETCH = 1024 * 1024  # discovery document or JWKS


async def fetch_json(url: str) -> Any:
    """GET URL (no redirects, bounded size and time) and parse its JSON. Raises OSError or ValueError."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=5.0, follow_redirects=False) as client:
            async with client.stream("GET", url, headers={"Accept": "application/json"}) as response:
                if response.status_code != 200:
                    raise ValueError(f"{url}: HTTP {response.status_code}")
                data = b""
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_FETCH:
                        raise ValueError(f"{url}: larger than {MAX_FETCH} bytes")
    except httpx.HTTPError as e:
        raise OSError(f"{url}: {type(e).__name__}") from None
    return json.loads(data)


async def lifespan(receive, send) -> None:
    """ASGI lifespan: nothing to start or stop (the service is made before the server)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def send_json(send, status: int, doc: dict) -> None:
    """An ASGI response: DOC as JSON, never cached."""
    body = json.dumps(doc).encode() + b"\n"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


class App:
    """The ASGI application in front of an EnrollService."""

    def __init__(self, service: EnrollService) -> None:
        self.service = service

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            status, doc = await self._handle(scope, receive)
        except Exception:  # noqa: BLE001 - a bug in one request must not end the service
            log.exception("request %s %s failed", scope.get("method"), safe_text(scope.get("path", ""))[:100])
            status, doc = 500, {"error": "internal error"}
        await send_json(send, status, doc)

    async def _handle(self, scope: dict, receive) -> tuple[int, dict]:
        method, path = scope.get("method", ""), scope.get("path", "")
        client = (scope.get("client") or ("?", 0))[0]
        if path == "/healthz" and method == "GET":
            return 200, {"ok": True, "peers": len(self.service.registry.peers)}
        if path == "/v1/peers" or path.startswith("/v1/peers/"):
            token = _bearer(scope)
            try:
                if _declared_length(scope) > MAX_BODY:  # refused before waiting for a body that big
                    raise Refused(413, f"body larger than {MAX_BODY} bytes")
                if path == "/v1/peers" and method == "POST":
                    body = await _body(receive)
                    return 200, await self.service.enroll(token, body, client)
                if path.startswith("/v1/peers/") and method == "DELETE":
                    await _body(receive)
                    key = path[len("/v1/peers/"):]  # ASGI gives the path percent-decoded
                    return 200, await self.service.unenroll(token, key, client)
                return 405, {"error": "method not allowed"}
            except Refused as e:
                return e.status, {"error": e.reason}
        return 404, {"error": "not found"}


def _bearer(scope: dict) -> str | None:
    for name, value in scope.get("headers") or ():
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _declared_length(scope: dict) -> int:
    for name, value in scope.get("headers") or ():
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise Refused(400, "bad Content-Length") from None
    return 0


async def _body(receive) -> Any:
    """The request's JSON body (None when empty). Raises Refused for too much, too slow or not JSON."""
    data = b""
    with trio.move_on_after(BODY_TIMEOUT) as scope:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client went away")
            data += message.get("body", b"")
            if len(data) > MAX_BODY:
                raise Refused(413, f"body larger than {MAX_BODY} bytes")
            if not message.get("more_body"):
                break
    if scope.cancelled_caught:
        raise Refused(408, "body not received in time")
    if not data.strip():
        return None
    try:
        return json.loads(data)
    except ValueError:
        raise Refused(400, "the body is not JSON") from None


def hypercorn_config(config: EnrollServer):
    from hypercorn.config import Config as HConfig

    h = HConfig()
    h.bind = [config.listen]
    if config.tls_cert:
        h.certfile, h.keyfile = config.tls_cert, config.tls_key
    h.accesslog = None  # the audit log says what matters, without tokens or query strings
    h.errorlog = logging.getLogger("hatun.enroll.http")
    h.include_server_header = False
    h.keep_alive_timeout = 10
    h.read_timeout = BODY_TIMEOUT
    h.h11_max_incomplete_size = 16 * 1024
    h.graceful_timeout = 3
    h.ssl_handshake_timeout = 5  # a connection that never says hello holds a descriptor this long at most
    return h


async def serve(config: EnrollServer, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the service for CONFIG until SIGTERM/SIGINT. Raises OSError / WireGuardError at start
    when the device, the state file, the certificate or the address cannot be used."""
    from hypercorn.trio import serve as hypercorn_serve

    from hatun.enroll.device import open_peer_device
    from hatun.enroll.tokens import JwksCache, TokenVerifier

    async with open_peer_device(config.interface) as device:
        verifier = TokenVerifier(config.issuer, config.audience, JwksCache(config.issuer, fetch_json))
        service = EnrollService(config, verifier, device, await device.public_key())
        await service.restore()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signals, stop)
            await nursery.start(service.serve_expiry)
            await nursery.start(lambda task_status: hypercorn_serve(
                App(service), hypercorn_config(config), shutdown_trigger=stop.wait, task_status=task_status))
            log.info("serving enrollment for %s on %s (%s), %d peers enrolled", config.interface, config.listen,
                     "https" if config.tls_cert else "http, loopback", len(service.registry.peers))
            task_status.started(service)
            await stop.wait()
            nursery.cancel_scope.deadline = trio.current_time() + 5  # hypercorn's graceful stop, bounded
        log.info("stopped; %d peers stay enrolled until their expiry", len(service.registry.peers))


async def _signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stop.set()
            return
