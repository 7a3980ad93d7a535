"""The lab with keyless runners (`hatun lab up --enroll`): an OIDC issuer of its own, and on each
gateway `hatun enroll serve` instead of a peer for the runner.

- The issuer (`hatun.lab.issuer`, one signing key for the whole lab) serves its discovery document
  and JWKS on 127.0.0.1:18089 inside every gateway's namespace (where the enrollment service looks
  for them) and GitHub's job-token endpoint on 127.0.0.1:18090 inside the runner's namespace (what
  ACTIONS_ID_TOKEN_REQUEST_URL points to; the request token is in `enroll/request-token`).
- Gateway I: WireGuard without any peer, its address 198.18.(200+I).1/24 the first of its pool;
  `hatun enroll serve` on https://198.18.I.2:8443 with a certificate made for it (the runner's
  config pins it), audience `hatun-gwI`, allowing the lab issuer's repository `acme/app`.
- The runner's config: `enroll = ...` tunnels only, no key, no source (hatun masquerades to each
  tunnel's address).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
import subprocess
import sys

import trio

from hatun.lab.issuer import IssuerKey

ISSUER = "http://127.0.0.1:18089"
ISSUER_LISTEN = "127.0.0.1:18089"
TOKEN_LISTEN = "127.0.0.1:18090"
ENROLL_PORT = 8443
MAX_GATEWAYS = 50  # pools 198.18.201.0/24 .. 198.18.250.0/24
START_TIMEOUT = 60.0


def pool(i: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"198.18.{200 + i}.0/24")


def audience(i: int) -> str:
    return f"hatun-gw{i}"


def enroll_dir(lab) -> str:
    return os.path.join(lab.dir, "enroll")


def runner_environment(lab) -> dict[str, str]:
    """What GitHub's runner would set for a job with `id-token: write`: the lab's token endpoint."""
    with open(os.path.join(enroll_dir(lab), "request-token")) as f:
        token = f.read().strip()
    return {"ACTIONS_ID_TOKEN_REQUEST_URL": f"http://{TOKEN_LISTEN}/token?api-version=2.0",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": token}


def _write_secret(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _certificate(lab, i: int, address: str) -> str:
    """A self-signed certificate for gateway I's enrollment service; returns its SHA-256 (the pin)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gw{i}.{lab.name}.lab")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    d = enroll_dir(lab)
    with open(os.path.join(d, f"gw{i}.crt"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(os.path.join(d, f"gw{i}.key"), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def prepare(lab, gateway_address) -> dict[int, str]:
    """Keys, certificates and files of the lab's enrollment (before anything runs); returns the
    certificate pin of each gateway's service. GATEWAY_ADDRESS(i): gateway I's underlay address."""
    d = enroll_dir(lab)
    os.makedirs(d, mode=0o700, exist_ok=True)
    key_path = os.path.join(d, "issuer.json")
    if not os.path.exists(key_path):
        IssuerKey.generate(ISSUER).save(key_path)
        _write_secret(os.path.join(d, "request-token"), secrets.token_urlsafe(24).encode())
    pins = {}
    for i in range(1, lab.gateways + 1):
        pins[i] = _certificate(lab, i, gateway_address(i))
        with open(os.path.join(d, f"gw{i}.toml"), "w") as f:
            f.write(f"""# Gateway gw{i}'s enrollment service, written by `hatun lab up --enroll`.
[enroll]
listen = "{gateway_address(i)}:{ENROLL_PORT}"
tls_cert = "{d}/gw{i}.crt"
tls_key = "{d}/gw{i}.key"
issuer = "{ISSUER}"
audience = "{audience(i)}"
interface = "{lab.gw_ifname(i)}"
endpoint = "{gateway_address(i)}:51820"
pool = "{pool(i)}"
max_ttl = "1h"
state_file = "{d}/gw{i}-state.json"
[[enroll.allow]]
repository = "acme/app"
ref = "refs/heads/main"
""")
    with open(os.path.join(d, "pins"), "w") as f:
        f.write("".join(f"{i} {pin}\n" for i, pin in pins.items()))
    return pins


def pins(lab) -> dict[int, str]:
    with open(os.path.join(enroll_dir(lab), "pins")) as f:
        return {int(i): pin for i, pin in (line.split() for line in f if line.strip())}


async def start(lab, run) -> None:
    """Start the issuer (gateways and runner) and each gateway's enrollment service; return once
    every service answers. RUN is topology.run. Raises RuntimeError naming what did not start."""
    d = enroll_dir(lab)
    log = open(os.path.join(d, "services.log"), "ab")
    env = {**os.environ, "HATUN_LAB_REQUEST_TOKEN": runner_environment(lab)["ACTIONS_ID_TOKEN_REQUEST_TOKEN"]}

    def spawn(label: str, ns: str, *args: str) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, env=env, start_new_session=True)
        lab.pids[label] = proc.pid

    spawn("token-service", lab.runner, "-m", "hatun.lab.issuer", os.path.join(d, "issuer.json"), TOKEN_LISTEN)
    for i in range(1, lab.gateways + 1):
        spawn(f"issuer-gw{i}", lab.gw_ns(i), "-m", "hatun.lab.issuer", os.path.join(d, "issuer.json"), ISSUER_LISTEN)
        spawn(f"enroll-gw{i}", lab.gw_ns(i), "-m", "hatun", "enroll", "serve", os.path.join(d, f"gw{i}.toml"))
    log.close()
    with trio.move_on_after(START_TIMEOUT):
        pending = list(range(1, lab.gateways + 1))
        while pending:
            still = []
            for i in pending:
                address = _listen_address(os.path.join(d, f"gw{i}.toml"))
                res = await run(["ip", "netns", "exec", lab.runner, "curl", "-s", "--max-time", "2", "--cacert",
                                 os.path.join(d, f"gw{i}.crt"), f"https://{address}/healthz"], check=False)
                if res.returncode != 0:
                    still.append(i)
            pending = still
            if pending:
                await trio.sleep(0.1)
        return
    raise RuntimeError(f"the lab's enrollment services did not start within {START_TIMEOUT:.0f} s:"
                       f" see {d}/services.log")


def _listen_address(path: str) -> str:
    with open(path) as f:
        for line in f:
            if line.startswith("listen = "):
                return line.split('"')[1]
    raise RuntimeError(f"{path}: no listen")


def gateway_wg_quick(lab, i: int, key_file: str, lan: str) -> str:
    """Gateway I's WireGuard for enrollment: no peer (the service adds them), the first address of
    its pool, forwarding and masquerading into the LAN."""
    net = pool(i)
    return f"""# Gateway gw{i} of lab {lab.name!r} for keyless runners: peers come from `hatun enroll serve`.
[Interface]
Address = {net[1]}/{net.prefixlen}
ListenPort = 51820
PostUp = wg set %i private-key {key_file}
PostUp = sysctl -q -w net.ipv4.ip_forward=1
PostUp = nft 'add table inet hatun_%i; add chain inet hatun_%i postrouting {{ type nat hook postrouting priority srcnat; }}; flush chain inet hatun_%i postrouting; add rule inet hatun_%i postrouting iifname "%i" ip daddr {{ {lan} }} masquerade'
PostDown = nft delete table inet hatun_%i
"""


def tunnel_lines(lab, i: int, pin: str, underlay_gateway: str) -> list[str]:
    """The runner config's tunnel I in an enrolling lab."""
    return [
        "[[tunnels]]",
        f'name = "gw{i}"',
        f'interface = "{lab.runner_ifname(i)}"',
        f'enroll = "https://{underlay_gateway}:{ENROLL_PORT}"',
        f'enroll_audience = "{audience(i)}"',
        f'enroll_pin = "{pin}"',
        "keepalive = 25",
        "",
    ]
