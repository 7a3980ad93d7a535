"""Lab fixtures: a lab per test (unique name, removed even when the test fails) and hatun running in
its runner namespace as a real process, driven through its control socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import trio

from hatun.lab import topology
from hatun.lab.process import HatunProcess
from hatun.lab.topology import Lab
from tests.nsutil import RUN_ID, have_netns

_counter = 0


def lab_name() -> str:
    global _counter
    _counter += 1
    return f"t{RUN_ID[:4]}{_counter}"


def make_lab(gateways: int = 3, *, ipv6: bool = False, backend: str = "userspace", enroll: bool = False) -> Lab:
    return trio.run(topology.lab_up, lab_name(), gateways, backend, ipv6, enroll)


def remove_lab(lab: Lab) -> None:
    trio.run(topology.lab_down, lab.name)


def edit_config(lab: Lab, *, path: str | None = None, routing: dict | None = None, health: dict | None = None,
                tunnels: dict[str, dict] | None = None, top: dict | None = None, drop: list[str] = ()) -> str:
    """Rewrite the lab's config with changes: ROUTING/HEALTH keys (TOML values as strings), per-tunnel
    keys by tunnel name, top-level keys, tunnels to DROP. Returns the path written."""
    path = path or lab.config_path
    text = topology.config_text(lab, health=health, extra_routing=routing)
    blocks = text.split("[[tunnels]]")
    head, tunnel_blocks = blocks[0], blocks[1:]
    if top:
        head = "\n".join(f"{k} = {v}" for k, v in top.items()) + "\n" + head
    out = [head]
    for block in tunnel_blocks:
        name = block.split('name = "', 1)[1].split('"', 1)[0]
        if name in drop:
            continue
        extra = (tunnels or {}).get(name, {})
        lines = [line for line in block.strip("\n").split("\n") if line.split(" = ")[0] not in extra]
        lines += [f"{k} = {v}" for k, v in extra.items()]
        out.append("\n".join(lines) + "\n\n")
    with open(path, "w") as f:
        f.write("[[tunnels]]\n".join(out))
    return path


@pytest.fixture
def lab_factory():
    """make(gateways=3, ipv6=False, backend="userspace") -> Lab; every lab is removed afterwards."""
    if not have_netns():
        pytest.skip("needs root and iproute2 to build the lab")
    labs: list[Lab] = []

    def make(gateways: int = 3, **kw) -> Lab:
        lab = make_lab(gateways, **kw)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            remove_lab(lab)


@pytest.fixture
def hatun_factory():
    """start(lab, config=None) -> HatunProcess (running and ready); all are stopped afterwards."""
    procs: list[HatunProcess] = []

    def start(lab: Lab, config: str | None = None, wait_ready: bool = True, **kw) -> HatunProcess:
        p = HatunProcess(lab, config, **kw)
        procs.append(p)
        return p.start(wait_ready=wait_ready)

    try:
        yield start
    finally:
        for p in procs:
            if p.proc is not None and p.proc.poll() is None:
                p.stop()


def hatun_cli(netns: str | None, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The hatun command as users run it (inside NETNS when given)."""
    cmd = (["ip", "netns", "exec", netns] if netns else []) + [sys.executable, "-m", "hatun", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)


def ns_output(netns: str, *cmd: str, check: bool = True) -> str:
    res = subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} in {netns}: {res.stderr}")
    return res.stdout


def routes_json(netns: str, *args: str) -> list:
    """`ip -j ARGS` parsed; a table that does not exist has no routes."""
    res = subprocess.run(["ip", "netns", "exec", netns, "ip", "-j", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        if "does not exist" in res.stderr:
            return []
        raise AssertionError(f"ip {' '.join(args)} in {netns}: {res.stderr}")
    return json.loads(res.stdout or "[]")


class NsTcpProxy:
    """Forwards 127.0.0.1:PORT of this namespace to TARGET inside NETNS (e.g. hatun's metrics port in
    the runner namespace), so that a Prometheus here can scrape it: loopback only, no route anywhere.
    Threads, bounded: each connection ends when either side closes; `close()` stops everything."""

    def __init__(self, netns: str, target: tuple[str, int]) -> None:
        import socket as _socket
        import threading

        from hatun.netns import run_in_netns

        self._socket, self._threading = _socket, threading
        self.netns, self.target = netns, target
        self._run_in_netns = run_in_netns
        self.listener = _socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self._threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client) -> None:
        try:
            upstream = self._run_in_netns(self.netns, lambda: self._socket.create_connection(self.target, timeout=5))
        except OSError:
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        src.settimeout(30)
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(self._socket.SHUT_RDWR)
                except OSError:
                    pass

    def get(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.address}{path}", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=2)


# Tests assert behaviour, benchmarks report figures. On a loaded 2-core machine a CPU-starved
# wireguard-go or traffic generator drops a few packets whatever hatun does, so "nothing lost" is
# checked as "no more than that noise" here; `hatun lab bench` reports the exact losses.
LOSS_NOISE = 0.01  # share of the packets sent


def assert_nothing_lost(flows, what: str) -> None:
    """FLOWS (traffic.Flow) lost no more than the machine's noise: a broken route or a moved flow
    loses far more (every packet of a flow for hundreds of ms)."""
    sent = sum(len(f.sent) for f in flows)
    lost = sum(len(f.lost()) for f in flows)
    assert lost <= max(3, LOSS_NOISE * sent), f"{what}: {lost} of {sent} packets lost"


def wait_until(check, what: str, timeout: float, interval: float = 0.05):
    """Call CHECK until it returns something true and return that; AssertionError naming WHAT after
    TIMEOUT seconds. What a test would otherwise sleep for, it waits on with this."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
