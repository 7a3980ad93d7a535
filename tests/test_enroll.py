"""Enrollment (issue 16): token verification and the service's decisions, against the lab's issuer
key (in memory here), with a fake device; tests/test_enroll_lab.py runs the real service over HTTPS
with a real WireGuard device and traffic.

Every bad token is refused with a clear reason and changes nothing.
"""

from __future__ import annotations

import base64
import json
import os

import jwt
import pytest
import trio

from hatun.enroll.models import EnrollServer
from hatun.enroll.registry import Registry
from hatun.enroll.service import EnrollService, Refused, rule_matches
from hatun.enroll.tokens import JwksCache, TokenRefused, TokenVerifier
from hatun.keys import PrivateKey
from hatun.lab.issuer import IssuerKey

ISSUER = "http://127.0.0.1:8089"
AUD = "hatun-gw1"
KEY = IssuerKey.generate(ISSUER)
OTHER = IssuerKey.generate(ISSUER)  # another signing key (same issuer URL): signatures must not pass


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def fetcher(key: IssuerKey, calls: list | None = None):
    async def fetch(url: str):
        if calls is not None:
            calls.append(url)
        if url.endswith("/openid-configuration"):
            return key.discovery()
        if url.endswith("/jwks"):
            return key.jwks()
        raise OSError(f"{url}: 404")
    return fetch


def verifier(key: IssuerKey = KEY, calls: list | None = None) -> TokenVerifier:
    return TokenVerifier(ISSUER, AUD, JwksCache(ISSUER, fetcher(key, calls)))


def _b64(doc: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def alg_none_token() -> str:
    claims = jwt.decode(KEY.mint(AUD), options={"verify_signature": False})
    return f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': KEY.kid})}.{_b64(claims)}."


def hs256_with_public_key_token() -> str:
    """The classic confusion: HMAC "signed" with the issuer's public key as the shared secret."""
    from cryptography.hazmat.primitives import serialization

    public_pem = serialization.load_pem_private_key(KEY.private_pem, None).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = jwt.decode(KEY.mint(AUD), options={"verify_signature": False})
    header = _b64({"alg": "HS256", "typ": "JWT", "kid": KEY.kid})
    payload = _b64(claims)
    import hashlib
    import hmac

    sig = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


async def test_a_valid_token_gives_its_claims():
    claims = await verifier().verify(KEY.mint(AUD))
    assert claims["repository"] == "acme/app" and claims["aud"] == AUD and claims["iss"] == ISSUER


@pytest.mark.parametrize("make, reason", [
    (lambda: OTHER.mint(AUD, headers={"kid": KEY.kid}), "bad signature"),
    (alg_none_token, "algorithm 'none' is not accepted"),
    (hs256_with_public_key_token, "algorithm 'HS256' is not accepted"),
    (lambda: KEY.mint(AUD, headers={"kid": "nope"}), "unknown signing key"),
    (lambda: KEY.mint(AUD, iss="https://evil.example"), "wrong issuer"),
    (lambda: KEY.mint("hatun-gw2"), "wrong audience"),
    (lambda: KEY.mint(AUD, now=1_000_000_000), "token expired"),
    (lambda: KEY.mint(AUD, nbf=2_000_000_000 * 2), "not valid yet"),
    (lambda: KEY.mint(AUD, jti=None), "no 'jti' claim"),
    (lambda: "not.a.token", "malformed token"),
    (lambda: "", "no token"),
    (lambda: "x" * 20000, "too long"),
])
async def test_bad_tokens_are_refused_with_their_reason(make, reason):
    token = make()
    with pytest.raises(TokenRefused) as info:
        await verifier().verify(token)
    assert reason in str(info.value)
    assert token[:40] not in str(info.value) or not token


async def test_an_unknown_kid_refetches_the_keys_once_then_not_again():
    calls: list = []
    v = verifier(calls=calls)
    await v.verify(KEY.mint(AUD))
    assert len(calls) == 2  # discovery, JWKS
    for _ in range(5):
        with pytest.raises(TokenRefused, match="unknown signing key"):
            await v.verify(KEY.mint(AUD, headers={"kid": "rotated"}))
    assert len(calls) == 2, "unknown kids within a minute of a fetch do not make us hammer the issuer"


async def test_a_rotated_key_is_found_by_refetching():
    calls: list = []
    holder = {"key": KEY}

    async def fetch(url):
        calls.append(url)
        return await fetcher(holder["key"])(url)

    jwks = JwksCache(ISSUER, fetch, clock=Clock(0))
    v = TokenVerifier(ISSUER, AUD, jwks)
    await v.verify(KEY.mint(AUD))
    holder["key"] = OTHER
    jwks.clock = Clock(1000)  # later than the refetch interval
    assert (await v.verify(OTHER.mint(AUD)))["iss"] == ISSUER


# --- the service ---------------------------------------------------------------------------------


class FakeDevice:
    ifname = "wg0"

    def __init__(self) -> None:
        self.peers_now: dict = {}
        self.key = PrivateKey.generate().public_key

    async def add(self, key, address):
        self.peers_now[key] = address

    async def remove(self, key):
        self.peers_now.pop(key, None)

    async def peers(self):
        import ipaddress as ip

        return {k: (ip.ip_network(f"{a}/32"),) for k, a in self.peers_now.items()}

    async def public_key(self):
        return self.key


def server_config(tmp_path, **kw) -> EnrollServer:
    doc = {"listen": "127.0.0.1:8443", "issuer": ISSUER, "audience": AUD, "interface": "wg0",
           "endpoint": "198.18.1.2:51820", "pool": "198.18.200.0/24", "max_ttl": "6h",
           "state_file": str(tmp_path / "enroll.json"),
           "allow": [{"repository": "acme/app", "ref": "refs/heads/main"}], **kw}
    return EnrollServer.model_validate(doc)


def service(tmp_path, clock=None, device=None, **kw) -> tuple[EnrollService, FakeDevice, Clock]:
    clock = clock or Clock(__import__("time").time())
    device = device or FakeDevice()
    return EnrollService(server_config(tmp_path, **kw), verifier(), device, device.key, now=clock), device, clock


def body(key=None) -> dict:
    return {"public_key": (key or PrivateKey.generate().public_key).base64}


async def test_enroll_then_unenroll(tmp_path):
    svc, dev, _ = service(tmp_path)
    runner = PrivateKey.generate().public_key
    answer = await svc.enroll(KEY.mint(AUD), body(runner), "198.18.1.1")
    assert answer["address"] == "198.18.200.2/24" and answer["gateway_public_key"] == dev.key.base64
    assert answer["endpoint"] == "198.18.1.2:51820" and answer["expires"] > 0
    assert dev.peers_now == {runner: "198.18.200.2"}
    assert oct(os.stat(tmp_path / "enroll.json").st_mode & 0o777) == "0o600"
    assert await svc.unenroll(KEY.mint(AUD), runner.base64, "198.18.1.1") == {"removed": runner.base64}
    assert dev.peers_now == {} and svc.registry.peers == {}


@pytest.mark.parametrize("case, status, reason", [
    ("claim outside every rule", 403, "matches no allow rule"),
    ("replayed jti", 401, "token already used"),
    ("malformed key", 400, "malformed public key"),
    ("no body", 400, "JSON object with \"public_key\""),
    ("no token", 401, "no token"),
    ("bad ttl", 400, "ttl must be"),
])
async def test_refusals_change_nothing(tmp_path, case, status, reason):
    svc, dev, _ = service(tmp_path)
    token, b = KEY.mint(AUD), body()
    if case == "claim outside every rule":
        token = KEY.mint(AUD, ref="refs/heads/feature")
    elif case == "replayed jti":
        await svc.enroll(token, b, "c")
        b = body()
    elif case == "malformed key":
        b = {"public_key": "abc"}
    elif case == "no body":
        b = None
    elif case == "no token":
        token = None
    elif case == "bad ttl":
        b["ttl"] = "soon"
    before = dict(dev.peers_now)
    with pytest.raises(Refused) as info:
        await svc.enroll(token, b, "c")
    assert (info.value.status, reason in info.value.reason) == (status, True), info.value.reason
    assert dev.peers_now == before


async def test_pool_full_and_rate_limits(tmp_path):
    svc, dev, _ = service(tmp_path, pool="198.18.200.0/30")  # one address for runners (.1 is the gateway's)
    await svc.enroll(KEY.mint(AUD), body(), "c1")
    with pytest.raises(Refused) as info:
        await svc.enroll(KEY.mint(AUD), body(), "c1")
    assert (info.value.status, info.value.reason) == (503, "the address pool is full")
    assert len(dev.peers_now) == 1

    svc, dev, _ = service(tmp_path / "b", rate_per_client=2)
    for _ in range(2):
        await svc.enroll(KEY.mint(AUD), body(), "c2")
    with pytest.raises(Refused) as info:
        await svc.enroll(KEY.mint(AUD), body(), "c2")
    assert info.value.status == 429 and len(dev.peers_now) == 2
    await svc.enroll(KEY.mint(AUD), body(), "c3")  # another client is not limited

    svc, dev, _ = service(tmp_path / "c", rate_per_repository=1)
    await svc.enroll(KEY.mint(AUD), body(), "c4")
    with pytest.raises(Refused) as info:
        await svc.enroll(KEY.mint(AUD), body(), "c5")
    assert info.value.status == 429 and "repository" in info.value.reason


async def test_expiry_removes_the_peer_and_frees_its_address(tmp_path):
    svc, dev, clock = service(tmp_path, max_ttl="10m")
    first = PrivateKey.generate().public_key
    await svc.enroll(KEY.mint(AUD, now=clock.t), body(first), "c")
    clock.t += 599
    assert await svc.expire() == [] and first in dev.peers_now
    clock.t += 2
    assert [p.public_key for p in await svc.expire()] == [first.base64]
    assert dev.peers_now == {}
    answer = await svc.enroll(KEY.mint(AUD), body(), "c")  # tokens are checked against real time
    assert answer["address"] == "198.18.200.2/24", "the address went back to the pool"


async def test_a_restart_keeps_peers_and_expiries(tmp_path):
    svc, dev, clock = service(tmp_path)
    runner = PrivateKey.generate().public_key
    answer = await svc.enroll(KEY.mint(AUD, now=clock.t), body(runner), "c")
    # A new service (after a restart) on a device that lost its peers (a reboot of the gateway).
    fresh = FakeDevice()
    svc2, _, _ = service(tmp_path, clock=clock, device=fresh)
    await svc2.restore()
    assert fresh.peers_now == {runner: "198.18.200.2"}
    assert int(svc2.registry.peers[runner.base64].expires) == answer["expires"]
    # A replayed token stays refused across the restart.
    with pytest.raises(Refused, match="already used"):
        token = KEY.mint(AUD, now=clock.t)
        await svc2.enroll(token, body(), "c")
        await svc2.enroll(token, body(), "c")


async def test_unenroll_needs_the_same_repository_and_run(tmp_path):
    svc, dev, _ = service(tmp_path, allow=[{"repository": "acme/app"}])
    runner = PrivateKey.generate().public_key
    await svc.enroll(KEY.mint(AUD), body(runner), "c")
    with pytest.raises(Refused) as info:
        await svc.unenroll(KEY.mint(AUD, run_id="999"), runner.base64, "c")
    assert info.value.status == 403 and runner in dev.peers_now
    with pytest.raises(Refused) as info:
        await svc.unenroll(KEY.mint(AUD), PrivateKey.generate().public_key.base64, "c")
    assert info.value.status == 404


def test_hostile_state_file_is_skipped_not_trusted(tmp_path):
    import ipaddress as ip

    reg = Registry([ip.ip_address("198.18.200.2")])
    good = PrivateKey.generate().public_key.base64
    (tmp_path / "s.json").write_text(json.dumps({"version": 1, "peers": [
        {"public_key": "nope", "address": "198.18.200.2", "expires": 1000},
        {"public_key": good, "address": "10.0.0.1", "expires": 1000},
        {"public_key": good, "address": "198.18.200.2", "expires": "never"},
        "garbage",
        {"public_key": good, "address": "198.18.200.2", "expires": 1e12},  # beyond max_ttl: not believed
        {"public_key": good, "address": "198.18.200.2", "expires": 1000, "repository": "r"},
    ], "used_jtis": {"a": 500, "b": "x", "c": 1e12}}))
    skipped = reg.load(str(tmp_path / "s.json"), now=0, max_ttl=3600)
    assert len(skipped) == 5 and list(reg.peers) == [good] and reg.used_jtis == {"a": 500}
    for doc, why in ((b"\xff\x00not json", "not JSON"), (b'{"version": 1, "peers": 5}', "peers is not a list"),
                     (b'{"version": true, "peers": []}', "not a state file"),
                     (b'{"version": 1, "peers": [{"public_key": "' + good.encode() + b'", "address": "198.18.200.2",'
                      b' "expires": Infinity}]}', "")):
        (tmp_path / "s.json").write_bytes(doc)
        reg = Registry([ip.ip_address("198.18.200.2")])
        problems = reg.load(str(tmp_path / "s.json"), now=0)
        assert why in " ".join(problems) and not reg.peers, (doc, problems)


def test_keys_and_addresses_of_the_gateways_own_peers_are_never_taken(tmp_path):
    import ipaddress as ip

    svc, dev, _ = service(tmp_path)
    static = PrivateKey.generate().public_key
    dev.peers_now[static] = "198.18.200.2"  # a peer the gateway has of its own, inside the pool
    with pytest.raises(Refused) as info:
        await_(svc.enroll(KEY.mint(AUD), body(static), "c"))
    assert info.value.status == 409 and dev.peers_now[static] == "198.18.200.2"
    with pytest.raises(Refused) as info:
        await_(svc.enroll(KEY.mint(AUD), body(dev.key), "c"))
    assert info.value.status == 409
    answer = await_(svc.enroll(KEY.mint(AUD), body(), "c"))
    assert answer["address"] == "198.18.200.3/24", "the static peer's address is skipped"
    assert dev.peers_now[static] == "198.18.200.2" and ip.ip_address("198.18.200.2")


def test_one_job_cannot_take_the_whole_pool(tmp_path):
    svc, dev, _ = service(tmp_path, max_peers_per_job=2, max_peers_per_repository=3, rate_per_repository=100)
    for _ in range(2):
        await_(svc.enroll(KEY.mint(AUD), body(), "c"))
    with pytest.raises(Refused) as info:
        await_(svc.enroll(KEY.mint(AUD), body(), "c"))
    assert info.value.status == 429 and "this job" in info.value.reason
    await_(svc.enroll(KEY.mint(AUD, run_id="5"), body(), "c"))
    with pytest.raises(Refused) as info:
        await_(svc.enroll(KEY.mint(AUD, run_id="6"), body(), "c"))
    assert info.value.status == 429 and "this repository" in info.value.reason
    assert len(dev.peers_now) == 3


def await_(coro):
    return trio.run(lambda: coro)


def test_rules_and_config_checks(tmp_path):
    assert rule_matches({"repository": "acme/app"}, {"repository": "acme/app", "ref": "x"})
    assert not rule_matches({"repository": "acme/app"}, {"repository": "acme/app2"})
    assert not rule_matches({"run_id": "1"}, {"run_id": 1})  # claims are strings: no loose equality
    from pydantic import ValidationError

    for bad, message in [
        ({"listen": "0.0.0.0:8443"}, "HTTPS needed"),
        ({"issuer": "http://issuer.example"}, "only on a loopback address"),
        ({"allow": [{}]}, "would accept every token"),
        ({"allow": []}, "at least 1"),
        ({"pool": "198.18.200.0/31"}, "pool is too small"),
        ({"tls_cert": "/x.crt"}, "go together"),
    ]:
        with pytest.raises(ValidationError, match=message):
            server_config(tmp_path, **bad)


async def test_the_http_app_answers_json_and_survives_hostile_requests(tmp_path):
    """Routes, methods, bodies too large or not JSON, a header that is no bearer: JSON errors, no crash."""
    from hatun.enroll.server import App

    svc, dev, _ = service(tmp_path)
    app = App(svc)

    async def call(method, path, body=b"", headers=()):
        sent = []
        chunks = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        async def send(msg):
            sent.append(msg)

        await app({"type": "http", "method": method, "path": path, "headers": list(headers),
                   "client": ("198.18.1.1", 5000)}, receive, send)
        return sent[0]["status"], json.loads(sent[1]["body"])

    token = KEY.mint(AUD)
    auth = [(b"authorization", f"Bearer {token}".encode())]
    assert (await call("POST", "/v1/peers", json.dumps(body()).encode(), auth))[0] == 200
    assert (await call("GET", "/v1/peers"))[0] == 405
    assert (await call("GET", "/nope"))[0] == 404
    assert (await call("POST", "/v1/peers", b"x" * 10000, auth))[0] == 413
    assert (await call("POST", "/v1/peers", b"{not json", auth))[0] == 400
    assert (await call("POST", "/v1/peers", json.dumps(body()).encode(), [(b"authorization", b"Basic abc")]))[0] == 401
    status, doc = await call("GET", "/healthz")
    assert status == 200 and doc["peers"] == 1
    assert token not in json.dumps(doc)


def test_check_explains_a_gateways_file(tmp_path, capsys):
    from hatun.cli import main

    good = tmp_path / "gw.toml"
    good.write_text(f'[enroll]\nissuer = "{ISSUER}"\naudience = "{AUD}"\ninterface = "wg0"\n'
                    'endpoint = "gw1.example.net:51820"\npool = "198.18.200.0/24"\n'
                    '[[enroll.allow]]\nrepository = "acme/app"\n')
    assert main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "valid (a gateway's enrollment service)" in out and "allow: repository = acme/app" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[enroll]\nlisten = "0.0.0.0:8443"\nissuer = "http://issuer.example"\naudience = "a"\n'
                   'interface = "wg0"\nendpoint = "gw:1"\npool = "198.18.200.0/24"\nallow = []\nfrobnicate = 1\n')
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "enroll.issuer" in out and "enroll.frobnicate" in out and "enroll.allow" in out


async def test_peers_a_device_lost_are_added_again(tmp_path):
    svc, dev, _ = service(tmp_path)
    runner = PrivateKey.generate().public_key
    await svc.enroll(KEY.mint(AUD), body(runner), "c")
    stranger = PrivateKey.generate().public_key
    dev.peers_now = {stranger: "10.0.0.9"}  # the gateway's WireGuard restarted; someone else's peer is there
    await svc.reconcile()
    assert dev.peers_now == {stranger: "10.0.0.9", runner: "198.18.200.2"}


RUNNER = """
[routing]
prefixes = ["198.19.77.0/24"]
{routing}
[[tunnels]]
name = "gw1"
enroll = "{url}"
{extra}
"""


def runner_config(url="https://gw1.example.net:8443", extra='enroll_audience = "hatun-gw1"', routing=""):
    return RUNNER.format(url=url, extra=extra, routing=routing)


def test_an_enrolled_tunnel_needs_no_keys_and_check_says_so(tmp_path, capsys):
    from hatun.cli import main
    from hatun.config import parse_config

    config = parse_config(runner_config(extra='enroll_audience = "hatun-gw1"\nenroll_pin = "' + "AB:" * 31 + 'AB"'))
    t = config.tunnels[0]
    assert t.enrolled and t.enroll_pin == "ab" * 32 and t.address == [] and t.peer_public_key is None
    (tmp_path / "r.toml").write_text(runner_config())
    assert main(["check", str(tmp_path / "r.toml")]) == 0
    out = capsys.readouterr().out
    assert "enroll https://gw1.example.net:8443" in out and "(made at start, in memory)" in out


@pytest.mark.parametrize("text, where, message", [
    (runner_config(extra='enroll_audience = "a"\nprivate_key_file = "/k"'), "tunnels[0].private_key_file",
     "comes from the enrollment"),
    (runner_config(extra='enroll_audience = "a"\naddress = "198.18.1.2/30"'), "tunnels[0].address",
     "comes from the enrollment"),
    (runner_config(extra=""), "tunnels[0].enroll_audience", "required with enroll"),
    (runner_config(url="http://gw1.example.net:8443"), "tunnels[0].enroll", "only on a loopback address"),
    (runner_config(url="https://gw1.example.net:8443/v1"), "tunnels[0].enroll", "no path"),
    (runner_config(routing='source = "198.18.99.1"'), "routing.source", "not with enrolled tunnels"),
    (runner_config(routing="pin_flows = false"), "routing.pin_flows", "enrolled tunnels need it"),
    (runner_config(extra='enroll_audience = "a"\nenroll_pin = "xyz"'), "tunnels[0].enroll_pin", "64 hex digits"),
    ('[routing]\nprefixes = ["198.19.77.0/24"]\n[[tunnels]]\nname = "gw1"\nprivate_key_env = "K"\n'
     'enroll_audience = "a"\n', "tunnels[0].enroll_audience", "only with enroll"),
    ('[routing]\nprefixes = ["198.19.77.0/24"]\n[[tunnels]]\nname = "gw1"\nprivate_key_env = "K"\n',
     "tunnels[0].endpoint", "required key missing"),
])
def test_enrolled_tunnel_mistakes(text, where, message):
    from hatun.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert any(p.loc == where and message in p.message for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("address, bad", [
    ("198.18.200.2/24", False), ("127.0.0.2/8", True), ("0.0.0.0/0", True), ("198.18.200.0/24", True),
    ("198.19.77.5/24", True), ("10.0.0.2/8", True), ("168.63.129.1/16", True), ("fe80::2/64", True),
    ("2001:2:200::2/112", False), ("2001:2:200::2/64", True), ("::ffff:10.20.0.5/120", True),
    ("198.18.61.5/24", True),  # overlaps a route this host has
])
def test_a_gateways_answer_is_checked_before_use(address, bad):
    import ipaddress as ip

    from hatun.enrollment import Enrolled, answer_problem

    e = Enrolled("https://gw", "a", None, PrivateKey.generate(), ip.ip_interface(address),
                 PrivateKey.generate().public_key, "198.18.1.2:51820", 1_900_000_000)
    routes = [ip.ip_network("0.0.0.0/0"), ip.ip_network("198.18.61.0/30")]
    assert (answer_problem(e, [ip.ip_network("198.19.77.0/24")], routes) is not None) == bad
