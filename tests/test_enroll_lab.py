"""`hatun enroll serve` for real: HTTPS (Hypercorn, a certificate made here), the lab's OIDC issuer
served inside the gateway's namespace, a real wireguard-go device on the gateway, and a runner in a
namespace of its own that enrolls over its underlay, brings a tunnel up from the answer and pings
the gateway through it; then replay, un-enrollment, a restart that keeps peers, and garbage on the
wire.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from hatun.keys import PrivateKey
from hatun.lab.issuer import IssuerKey
from tests.nsutil import RUN_ID, ns_exec

pytestmark = [pytest.mark.netns, pytest.mark.slow]

GW_UL, RUN_UL = "198.18.61.2", "198.18.61.1"
ISSUER = "http://127.0.0.1:18089"
AUD = "hatun-gw1"


def make_cert(tmp_path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw1.lab")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(GW_UL))]), critical=False)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "enroll.crt", tmp_path / "enroll.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(pem, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return str(crt), str(pem)


def start(ns: str, *args: str, log=None, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})


def wait_for(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def wg_dev(ns: str, ifname: str, key: PrivateKey, tmp_path, port: int | None = None) -> subprocess.Popen:
    proc = start(ns, "env", "WG_PROCESS_FOREGROUND=1", "wireguard-go", ifname)
    wait_for(lambda: ns_exec(ns, "wg", "show", ifname, check=False).returncode == 0, f"{ifname} up")
    keyfile = tmp_path / f"{ifname}.key"
    keyfile.write_text(key.base64 + "\n")
    keyfile.chmod(0o600)
    ns_exec(ns, "wg", "set", ifname, "private-key", str(keyfile), *(["listen-port", str(port)] if port else []))
    return proc


def curl(ns: str, method: str, url: str, cacert: str, token: str | None = None, body: dict | None = None):
    args = ["curl", "-sS", "--max-time", "10", "--cacert", cacert, "-X", method, "-w", "\n%{http_code}", url]
    if token:
        args += ["-H", f"Authorization: Bearer {token}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
    out = ns_exec(ns, *args).stdout
    text, _, code = out.rpartition("\n")
    return int(code), json.loads(text) if text.strip() else None


@pytest.fixture
def gateway(namespaces, tmp_path):
    """A gateway namespace with wireguard-go (198.18.200.1/24), the lab issuer on its loopback and
    the enrollment service on HTTPS; a runner namespace linked to it."""
    gw, run = namespaces.new("egw"), namespaces.new("erun")
    namespaces.veth(gw, "ul", run, "ul")
    ns_exec(gw, "ip", "addr", "add", f"{GW_UL}/30", "dev", "ul")
    ns_exec(run, "ip", "addr", "add", f"{RUN_UL}/30", "dev", "ul")
    ifname = f"eg{RUN_ID}"
    procs = [wg_dev(gw, ifname, PrivateKey.generate(), tmp_path, 51820)]
    ns_exec(gw, "ip", "addr", "add", "198.18.200.1/24", "dev", ifname)
    ns_exec(gw, "ip", "link", "set", ifname, "up")
    issuer = IssuerKey.generate(ISSUER)
    issuer.save(str(tmp_path / "issuer.json"))
    procs.append(start(gw, sys.executable, "-m", "hatun.lab.issuer", str(tmp_path / "issuer.json"), "127.0.0.1:18089"))
    crt, key = make_cert(tmp_path)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f"""
[enroll]
listen = "{GW_UL}:8443"
tls_cert = "{crt}"
tls_key = "{key}"
issuer = "{ISSUER}"
audience = "{AUD}"
interface = "{ifname}"
endpoint = "{GW_UL}:51820"
pool = "198.18.200.0/24"
max_ttl = "1h"
state_file = "{tmp_path}/state/enroll.json"
[[enroll.allow]]
repository = "acme/app"
ref = "refs/heads/main"
""")
    log = open(tmp_path / "enroll.log", "w")

    def serve() -> subprocess.Popen:
        p = start(gw, sys.executable, "-m", "hatun", "enroll", "serve", str(cfg), log=log)
        def up() -> bool:
            if p.poll() is not None:
                pytest.fail(f"hatun enroll serve exited: {(tmp_path / 'enroll.log').read_text()}")
            return ns_exec(run, "curl", "-s", "--cacert", crt, f"https://{GW_UL}:8443/healthz",
                           check=False).returncode == 0

        wait_for(up, "the enrollment service")
        return p

    env = {"gw": gw, "run": run, "ifname": ifname, "issuer": issuer, "crt": crt, "cfg": str(cfg), "serve": serve,
           "procs": procs, "log": tmp_path / "enroll.log", "url": f"https://{GW_UL}:8443/v1/peers"}
    try:
        wait_for(lambda: ns_exec(gw, "curl", "-s", f"{ISSUER}/.well-known/jwks", check=False).returncode == 0, "issuer")
        env["service"] = serve()
        yield env
    finally:
        for p in [env.get("service"), *procs]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        log.close()


def test_a_runner_enrolls_carries_traffic_and_unenrolls(gateway, tmp_path):
    g = gateway
    runner_key = PrivateKey.generate()
    token = g["issuer"].mint(AUD)
    code, answer = curl(g["run"], "POST", g["url"], g["crt"], token, {"public_key": runner_key.public_key.base64})
    assert code == 200, answer
    assert answer["address"] == "198.18.200.2/24" and answer["endpoint"] == f"{GW_UL}:51820"
    assert ns_exec(g["gw"], "wg", "show", g["ifname"], "allowed-ips").stdout.split() == [
        runner_key.public_key.base64, "198.18.200.2/32"]

    # The runner's side, from the answer alone: traffic flows through the tunnel.
    rif = f"er{RUN_ID}"
    g["procs"].append(wg_dev(g["run"], rif, runner_key, tmp_path))
    ns_exec(g["run"], "wg", "set", rif, "peer", answer["gateway_public_key"], "endpoint", answer["endpoint"],
            "allowed-ips", "198.18.200.1/32")
    ns_exec(g["run"], "ip", "addr", "add", answer["address"], "dev", rif)
    ns_exec(g["run"], "ip", "link", "set", rif, "up")
    assert ns_exec(g["run"], "ping", "-c", "3", "-W", "2", "198.18.200.1", check=False).returncode == 0

    # The same token again: a replay, refused, nothing changes.
    code, doc = curl(g["run"], "POST", g["url"], g["crt"], token, {"public_key": PrivateKey.generate().public_key.base64})
    assert code == 401 and "already used" in doc["error"]

    # A restart of the service keeps the peer and its expiry.
    g["service"].send_signal(signal.SIGTERM)
    assert g["service"].wait(timeout=15) == 0
    g["service"] = g["serve"]()
    assert runner_key.public_key.base64 in ns_exec(g["gw"], "wg", "show", g["ifname"], "peers").stdout

    code, doc = curl(g["run"], "DELETE", f"{g['url']}/{runner_key.public_key.base64.replace('/', '%2F')}", g["crt"],
                     g["issuer"].mint(AUD))
    assert code == 200, doc
    assert ns_exec(g["gw"], "wg", "show", g["ifname"], "peers").stdout.strip() == ""
    log = g["log"].read_text()
    assert "enroll accepted" in log and "unenroll accepted" in log and "repository=acme/app" in log
    assert token not in log


def test_the_service_shrugs_off_garbage_on_the_wire(gateway):
    g = gateway
    import socket as s

    script = f"""
import socket, ssl, time
def conn():
    c = socket.create_connection(("{GW_UL}", 8443), timeout=5)
    return c
for payload in (b"\\x16\\x03\\x01\\x00\\x05hello", b"GET / HTTP/1.1\\r\\n" * 1000, b"\\x00" * 70000):
    c = conn()
    try:
        c.sendall(payload)
        c.recv(100)
    except OSError:
        pass
    c.close()
ctx = ssl.create_default_context(cafile="{g['crt']}")
c = ctx.wrap_socket(conn(), server_hostname="{GW_UL}")
c.sendall(b"POST /v1/peers HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 100000000\\r\\n\\r\\n" + b"{{" * 3000)
print(c.recv(200)[:12])
"""
    res = ns_exec(g["run"], sys.executable, "-c", script, check=False, timeout=60)
    assert b"413" in res.stdout.encode() or "413" in res.stdout, res.stdout + res.stderr
    assert g["service"].poll() is None, "the service is still running"
    assert curl(g["run"], "GET", f"https://{GW_UL}:8443/healthz", g["crt"])[0] == 200
    del s


def test_hatun_up_enrolls_runs_the_tunnel_and_down_withdraws_it(gateway, tmp_path):
    """The runner's side: a tunnel with `enroll =` (no key, no peer, no address in the config) comes up
    from the enrollment, its traffic is masqueraded to the address the gateway handed out, and
    `hatun down` withdraws the peer from the gateway."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    g = gateway
    ns_exec(g["gw"], "ip", "addr", "add", "198.19.88.1/32", "dev", "lo")  # "the private network"
    cert = x509.load_pem_x509_certificate(open(g["crt"], "rb").read())
    pin = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    request_token = "lab-request-token"
    token_service = start(g["run"], sys.executable, "-m", "hatun.lab.issuer", str(tmp_path / "issuer.json"),
                          "127.0.0.1:18090", env={"HATUN_LAB_REQUEST_TOKEN": request_token})
    g["procs"].append(token_service)
    wait_for(lambda: ns_exec(g["run"], "curl", "-s", f"{ISSUER.replace('18089', '18090')}/.well-known/jwks",
                             check=False).returncode == 0, "the job-token service")
    cfg = tmp_path / "runner.toml"
    cfg.write_text(f"""
run_dir = "{tmp_path}/run"
[routing]
prefixes = ["198.19.88.0/24"]
[metrics]
listen = ""
[control]
socket = "{tmp_path}/hatun.sock"
[[tunnels]]
name = "gw1"
interface = "en{RUN_ID}"
enroll = "https://{GW_UL}:8443"
enroll_audience = "{AUD}"
enroll_pin = "{pin}"
""")
    env = {"ACTIONS_ID_TOKEN_REQUEST_URL": "http://127.0.0.1:18090/token?api-version=2.0",
           "ACTIONS_ID_TOKEN_REQUEST_TOKEN": request_token}
    res = subprocess.run(["ip", "netns", "exec", g["run"], sys.executable, "-m", "hatun", "up", str(cfg), "--wait", "30"],
                         capture_output=True, text=True, timeout=90, env={**os.environ, **env})
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        peers = ns_exec(g["gw"], "wg", "show", g["ifname"], "allowed-ips").stdout
        assert "198.18.200.2/32" in peers
        assert ns_exec(g["run"], "ping", "-c", "3", "-W", "2", "198.19.88.1", check=False).returncode == 0
        # The private key lives in hatun's memory only: no key file anywhere in its run directory.
        assert not [p for p in (tmp_path / "run").rglob("*.key")]
    finally:
        down = subprocess.run(["ip", "netns", "exec", g["run"], sys.executable, "-m", "hatun", "down", str(cfg)],
                              capture_output=True, text=True, timeout=90, env={**os.environ, **env})
    assert down.returncode == 0, down.stderr
    assert ns_exec(g["gw"], "wg", "show", g["ifname"], "peers").stdout.strip() == "", "withdrawn at stop"
    assert f"en{RUN_ID}" not in ns_exec(g["run"], "ip", "-o", "link").stdout


def test_the_enrolling_lab_three_gateways_failover_and_withdrawal(lab_factory):
    """`hatun lab up --enroll`: hatun enrolls at three gateways with the lab's job tokens (no key in
    its config), traffic reaches the LAN through each, a killed gateway's peer comes back when its
    WireGuard does, the others keep their flows, and `hatun down` withdraws every enrollment."""
    from hatun.lab import enroll, topology
    from hatun.lab.process import HatunProcess
    from tests.labutil import hatun_cli

    lab = lab_factory(3, enroll=True)
    assert "private_key" not in open(lab.config_path).read()
    env = enroll.runner_environment(lab)
    hatun = HatunProcess(lab, env=env).start(wait_ready=False)
    try:
        hatun.wait(lambda s: len(s["route"]["members"]) == 3, 30, "three enrolled tunnels in the route")
        seen = set()
        for _ in range(40):
            out = ns_exec(lab.runner, "curl", "-s", "--max-time", "3", "http://198.19.77.200/", check=False).stdout
            seen |= {w for w in ("gw1", "gw2", "gw3") if f"via gateway {w} " in out}
            if len(seen) == 3:
                break
        assert seen == {"gw1", "gw2", "gw3"}, seen
        trio.run(topology.lab_fail, lab.name, "gw2", "kill")
        hatun.wait(lambda s: s["route"]["members"] == ["gw1", "gw3"], 15, "gw2 out")
        trio.run(topology.lab_heal, lab.name, "gw2")
        hatun.wait(lambda s: len(s["route"]["members"]) == 3, 30, "gw2 back (its peer added again)")
    finally:
        res = hatun_cli(lab.runner, "down", lab.config_path)
    assert res.returncode == 0, res.stderr
    for i in (1, 2, 3):
        assert ns_exec(lab.gw_ns(i), "wg", "show", lab.gw_ifname(i), "peers").stdout.strip() == ""
