"""Keyless tunnels, the runner's side: enroll at each gateway with the CI job's OIDC token.

For every tunnel with `enroll = URL`, `hatun run` makes a private key in memory (never written to
disk or to any environment), fetches a job token for the tunnel's audience from GitHub's token
service (ACTIONS_ID_TOKEN_REQUEST_URL / _TOKEN: the job needs `permissions: id-token: write`),
enrolls at the gateway (`POST /v1/peers`), and runs the tunnel with the answer: address, the
gateway's public key and endpoint. All gateways are asked concurrently, each bounded; a gateway that
fails to answer leaves its tunnel out (logged), as long as one enrolled. At a clean stop every
enrollment is withdrawn (`DELETE /v1/peers/KEY`, a fresh token each); otherwise the gateway removes
the peer at its expiry.

The return path needs no state shared between gateways: traffic leaving through an enrolled tunnel
is masqueraded to that tunnel's own address (the one its gateway handed out), in hatun's nftables
table, so each gateway sees only the address it knows.

The token travels only to a gateway whose certificate checked out: the system's CAs, or the
certificate pinned by `enroll_pin` (its SHA-256), verified before a byte of the request is sent.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import h11
import trio

from hatun.config import Config, Secrets, Tunnel, default_peer_address
from hatun.config.values import parse_endpoint, parse_probe
from hatun.keys import InvalidKey, PrivateKey, PublicKey, TunnelKeys
from hatun.logs import safe_text

log = logging.getLogger("hatun.enrollment")

ENROLL_TIMEOUT = 20.0  # one gateway: token, TLS, answer
RELEASE_TIMEOUT = 10.0  # all of them, at stop
MAX_ANSWER = 64 * 1024


class EnrollError(Exception):
    """Enrollment failed; the message says where and why (never a token or key)."""


@dataclass(frozen=True)
class Enrolled:
    """One tunnel's enrollment: what the gateway answered and the key made for it."""

    url: str
    audience: str
    pin: str | None
    key: PrivateKey
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    peer: PublicKey
    endpoint: str
    expires: int

    def same_request(self, t: Tunnel) -> bool:
        return (self.url, self.audience, self.pin) == (t.enroll, t.enroll_audience, t.enroll_pin)


async def fetch_job_token(audience: str, environ: Mapping[str, str]) -> str:
    """A job token for AUDIENCE from GitHub's token service. Raises EnrollError."""
    import httpx

    url, bearer = environ.get("ACTIONS_ID_TOKEN_REQUEST_URL"), environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    if not url or not bearer:
        raise EnrollError("no OIDC token to enroll with: run in a GitHub Actions job with `permissions: id-token:"
                          " write` (ACTIONS_ID_TOKEN_REQUEST_URL and _TOKEN are not set)")
    url = f"{url}{'&' if '?' in url else '?'}audience={quote(audience, safe='')}"
    try:
        async with httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client:
            r = await client.get(url, headers={"Authorization": f"bearer {bearer}", "Accept": "application/json"})
        if r.status_code != 200:
            raise EnrollError(f"the job's token service answered HTTP {r.status_code}")
        value = r.json().get("value")
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        raise EnrollError(f"cannot get a job token: {type(e).__name__}") from None
    if not isinstance(value, str) or not value:
        raise EnrollError("the job's token service gave no token")
    return value


async def request(url: str, method: str, path: str, token: str, body: dict | None, pin: str | None,
                  cafile: str | None = None) -> tuple[int, dict]:
    """One HTTP request to an enrollment service: (status, JSON answer). The certificate is checked
    (CAs, or PIN before anything is sent). Raises EnrollError."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        stream: trio.abc.Stream
        if parts.scheme == "https":
            if pin:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the pin replaces the CAs
            else:
                ctx = ssl.create_default_context(cafile=cafile)
            tcp = await trio.open_tcp_stream(host, port)
            stream = trio.SSLStream(tcp, ctx, server_hostname=host, https_compatible=True)
            await stream.do_handshake()
            if pin:
                der = stream.getpeercert(binary_form=True) or b""
                if hashlib.sha256(der).hexdigest() != pin:
                    await trio.aclose_forcefully(stream)
                    raise EnrollError(f"{url}: the certificate does not match enroll_pin (nothing sent)")
        else:
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, ssl.SSLError, trio.BrokenResourceError) as e:
        raise EnrollError(f"{url}: cannot connect: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    data = json.dumps(body).encode() if body is not None else b""
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", parts.netloc), ("Authorization", f"Bearer {token}"), ("Accept", "application/json"),
               ("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Connection", "close")]
    try:
        async with stream:
            await stream.send_all(conn.send(h11.Request(method=method, target=path, headers=headers)) +
                                  conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
            status, answer = 0, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    chunk = await stream.receive_some(16384)
                    conn.receive_data(chunk)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    answer += event.data
                    if len(answer) > MAX_ANSWER:
                        raise EnrollError(f"{url}: answer too long")
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
    except (OSError, trio.BrokenResourceError, h11.ProtocolError, ssl.SSLError) as e:
        raise EnrollError(f"{url}: {type(e).__name__}") from None
    try:
        doc = json.loads(answer) if answer.strip() else {}
    except ValueError:
        raise EnrollError(f"{url}: HTTP {status}, not JSON") from None
    return status, doc if isinstance(doc, dict) else {}


def _bracket(ip) -> str:
    return f"[{ip}]" if ip.version == 6 else str(ip)


def host_routes() -> list:
    """The destinations of this host's main-table routes (what /proc/net/route and ipv6_route list)."""
    out: list = []
    try:
        with open("/proc/net/route") as f:
            for line in list(f)[1:]:
                parts = line.split()
                if len(parts) >= 8:
                    dst = ipaddress.IPv4Address(int(parts[1], 16).to_bytes(4, "little"))
                    mask = bin(int(parts[7], 16)).count("1")
                    out.append(ipaddress.ip_network(f"{dst}/{mask}", strict=False))
        with open("/proc/net/ipv6_route") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    out.append(ipaddress.ip_network(f"{ipaddress.IPv6Address(bytes.fromhex(parts[0]))}/"
                                                    f"{int(parts[1], 16)}", strict=False))
    except (OSError, ValueError):
        pass
    return out


def answer_problem(e: Enrolled, prefixes: list, routes: list = ()) -> str | None:
    """What is wrong with a gateway's answer (it is input from the network), or None."""
    a = e.address
    if a.ip.is_loopback or a.ip.is_multicast or a.ip.is_unspecified or a.ip.is_link_local or (
            a.version == 6 and (a.ip.ipv4_mapped is not None or a.ip.sixtofour is not None)):
        return f"an address hatun will not use ({a.ip})"
    # Its subnet becomes a connected route on the tunnel: small, and shadowing nothing this host routes.
    if a.network.prefixlen < (24 if a.version == 4 else 112) or a.ip in (a.network.network_address,
                                                                        a.network.broadcast_address):
        return f"an address that is not one host of a small tunnel subnet (/24 or /112 at most) ({a})"
    if any(a.network.overlaps(p) for p in prefixes if p.version == a.version):
        return f"an address inside the steered prefixes ({a})"
    for route in routes:
        if route.version == a.version and route.prefixlen > 0 and a.network.overlaps(route):
            return f"a subnet that overlaps this host's route to {route} ({a})"
    if e.expires <= 0:
        return "no expiry"
    return None


class Enrollments:
    """The enrollments of one hatun: made at start (and for tunnels a reload adds), withdrawn at stop."""

    def __init__(self, environ: Mapping[str, str] | None = None, cafile: str | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.cafile = cafile or os.environ.get("HATUN_ENROLL_CAFILE") or None
        self.done: dict[str, Enrolled] = {}
        self.prefixes: list = []  # the steered prefixes: no gateway may hand out an address in them
        self.enrolling: bool | None = None  # the config has enrolled tunnels (known after the first resolve)

    async def resolve(self, config: Config, secrets: Secrets) -> tuple[Config, Secrets]:
        """CONFIG with every enrolled tunnel filled in from its enrollment (made now where missing),
        and SECRETS with their keys. Tunnels whose gateway did not answer are left out; raises
        EnrollError when every enrolled tunnel failed and nothing else remains."""
        wanted = [t for t in config.tunnels if t.enrolled]
        if self.enrolling is None:
            self.enrolling = bool(wanted)
        elif self.enrolling != bool(wanted):
            raise EnrollError("a reload cannot switch between enrolled and keyed tunnels only (the masquerading"
                              " of enrolled tunnels is set up at start): restart hatun")
        if not wanted:
            return config, secrets
        self.prefixes = list(config.routing.prefixes)
        changed = [t.name for t in wanted if t.name in self.done and not self.done[t.name].same_request(t)]
        if changed:
            # Re-enrolling would withdraw the running peer before the reload is known to succeed.
            raise EnrollError(f"the enroll settings of running tunnel(s) {', '.join(changed)} changed: restart"
                              " hatun to enroll them anew")
        todo = [t for t in wanted if t.name not in self.done]
        failures: dict[str, str] = {}
        if todo:
            async with trio.open_nursery() as nursery:
                for t in todo:
                    nursery.start_soon(self._enroll_one, t, failures)
        tunnels, keys = [], dict(secrets.keys)
        for t in config.tunnels:
            if not t.enrolled:
                tunnels.append(t)
            elif t.name in self.done and t.name not in failures:
                e = self.done[t.name]
                update = {"address": [e.address], "peer_public_key": e.peer.base64,
                          "endpoint": parse_endpoint(e.endpoint)}
                if t.probe is None:
                    update["probe"] = parse_probe(f"icmp://{_bracket(default_peer_address(e.address))}")
                tunnels.append(t.model_copy(update=update))
                keys[t.name] = TunnelKeys(e.key)
        if not tunnels:
            raise EnrollError("no tunnel enrolled: " + "; ".join(f"{n}: {w}" for n, w in failures.items()))
        return config.model_copy(update={"tunnels": tunnels}), Secrets(keys)

    async def _enroll_one(self, t: Tunnel, failures: dict[str, str]) -> None:
        assert t.enroll is not None and t.enroll_audience is not None
        key = PrivateKey.generate()
        try:
            with trio.fail_after(ENROLL_TIMEOUT):
                token = await fetch_job_token(t.enroll_audience, self.environ)
                status, doc = await request(t.enroll, "POST", "/v1/peers", token,
                                            {"public_key": key.public_key.base64}, t.enroll_pin, self.cafile)
            if status != 200:
                raise EnrollError(f"{t.enroll} refused: HTTP {status}: {safe_text(str(doc.get('error', '')))[:200]}")
            enrolled = Enrolled(t.enroll, t.enroll_audience, t.enroll_pin, key,
                                ipaddress.ip_interface(str(doc["address"])),
                                PublicKey.from_base64(str(doc["gateway_public_key"])),
                                str(parse_endpoint(str(doc["endpoint"]))), int(doc["expires"]))
            problem = answer_problem(enrolled, self.prefixes, [r for r in host_routes()
                                                                if not any(r == a.network for a in t.address)])
            if problem:
                raise EnrollError(f"{t.enroll} answered {problem}: not used")
        except trio.TooSlowError:
            failures[t.name] = f"{t.enroll} did not answer within {ENROLL_TIMEOUT:.0f} s"
        except EnrollError as e:
            failures[t.name] = str(e)
        except (KeyError, ValueError, TypeError, InvalidKey) as e:
            failures[t.name] = f"{t.enroll}: an answer hatun cannot use ({type(e).__name__})"
        else:
            old = self.done.get(t.name)
            self.done[t.name] = enrolled
            log.info("%s: enrolled at %s as %s until %d", t.name, t.enroll, enrolled.address, enrolled.expires)
            if old is not None:
                await self._release_one(t.name, old)
            return
        log.error("%s: enrollment failed: %s", t.name, safe_text(failures[t.name]))

    async def release(self, names: list[str] | None = None) -> None:
        """Withdraw the enrollments of NAMES (default: all), concurrently, bounded; failures are
        logged (the gateways remove the peers at their expiry anyway)."""
        targets = {n: e for n, e in self.done.items() if names is None or n in names}
        with trio.move_on_after(RELEASE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for name, e in targets.items():
                    nursery.start_soon(self._release_one, name, e)
        for name in targets:
            self.done.pop(name, None)

    async def _release_one(self, name: str, e: Enrolled) -> None:
        try:
            token = await fetch_job_token(e.audience, self.environ)
            status, doc = await request(e.url, "DELETE", f"/v1/peers/{quote(e.key.public_key.base64, safe='')}",
                                        token, None, e.pin, self.cafile)
            if status not in (200, 404):
                raise EnrollError(f"HTTP {status}: {safe_text(str(doc.get('error', '')))[:200]}")
            log.info("%s: enrollment at %s withdrawn", name, e.url)
        except EnrollError as err:
            log.warning("%s: could not withdraw the enrollment at %s (%s); the gateway removes it at its expiry",
                        name, e.url, err)
