"""Network namespaces for tests: unique names per run, removed even when a test fails.

Tests use only 198.18.0.0/15 (and 2001:2::/48 for IPv6) inside namespaces they create; no namespace
gets a route to the outside world.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess

RUN_ID = secrets.token_hex(3)


def have_netns() -> bool:
    """True where this process may create network namespaces (root with iproute2)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGS` (in NETNS if given); raise with ip's own message when it fails."""
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res


def ns_exec(netns: str, *cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """Run CMD inside NETNS and return the completed process (text output captured)."""
    res = subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True,
                         timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"in {netns}: {' '.join(cmd)}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def ns_pids(netns: str) -> list[int]:
    res = ip("netns", "pids", netns, check=False)
    return [int(p) for p in res.stdout.split()]


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP PID and return once every thread of it is stopped. kill() returns before the stop
    takes effect: a thread that is running on the other core can still answer a request for a while
    (seen in CI: a "frozen" wireguard-go answered a UAPI get)."""
    import time

    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):
            return  # gone: nothing left that could answer
        if states and all(s in ("T", "t", "Z", "X") for s in states):
            return
        time.sleep(0.005)
    raise RuntimeError(f"pid {pid} did not stop within {timeout} s of SIGSTOP")


def kill_ns_processes(netns: str, grace: float = 3.0) -> None:
    """End the processes running inside NETNS (all of them were started by the test), by PID."""
    import trio

    from hatun.lab.topology import kill_pids

    trio.run(kill_pids, ns_pids(netns), grace)


class Namespaces:
    """Creates namespaces named hatun-t<run>-<n>-<label>; `cleanup()` removes all of them."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self._n = 0

    def new(self, label: str = "ns") -> str:
        self._n += 1
        name = f"hatun-t{RUN_ID}-{self._n}-{label}"
        ip("netns", "add", name)
        self.created.append(name)
        ip("link", "set", "lo", "up", netns=name)
        return name

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        """A veth pair with one end in each namespace, both ends up."""
        ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        ip("link", "set", if_a, "up", netns=ns_a)
        ip("link", "set", if_b, "up", netns=ns_b)

    def cleanup(self) -> None:
        for name in reversed(self.created):
            kill_ns_processes(name)
            ip("netns", "del", name, check=False)
        self.created.clear()
