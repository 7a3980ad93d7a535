"""`hatun run` inside a lab's runner namespace, as users run it, driven through its control socket.
Used by the demo, the benchmarks and the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from hatun.control import ControlError, request
from hatun.lab.topology import Lab


class HatunProcess:
    """One `hatun run` process for LAB (its config, or CONFIG), output appended to LOG_PATH."""

    def __init__(self, lab: Lab, config: str | None = None, log_path: str | None = None,
                 args: tuple[str, ...] = ("--log-level", "debug"), env: dict | None = None) -> None:
        self.lab = lab
        self.config = config or lab.config_path
        self.log_path = log_path or os.path.join(lab.dir, f"hatun-{time.monotonic_ns()}.log")
        self.args = args
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> HatunProcess:
        """Start it (in its own session, so a Ctrl-C meant for the caller does not reach it)."""
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.runner, sys.executable, "-m", "hatun", "run", self.config,
                 *self.args], stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                env={**os.environ, **self.env} if self.env else None)
        if wait_ready:
            self.wait(lambda s: s["ready"], timeout, "ready")
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def control(self, req: dict) -> dict:
        return request(self.lab.control_socket, req)

    def status(self) -> dict:
        return self.control({"command": "status"})["status"]

    def tunnel(self, name: str) -> dict:
        return next(t for t in self.status()["tunnels"] if t["name"] == name)

    def members(self) -> list[str]:
        return self.status()["route"]["members"]

    def wait(self, predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.05) -> dict:
        """Poll the status until PREDICATE(status) holds (bounded); return that status.
        Raises AssertionError (with the end of hatun's log) on timeout or when hatun exits."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"hatun exited with {self.proc.returncode} waiting for {what}:\n{self.log()[-3000:]}")
            try:
                status = self.status()
                if predicate(status):
                    return status
            except (ControlError, OSError, KeyError, StopIteration) as e:
                last_error = e
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout} s waiting for {what} ({last_error});"
                             f" log:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal it and wait for its exit (clean-up included); kill it if it takes too long."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError(f"hatun did not stop within {timeout} s after {signal.Signals(sig).name}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=5)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""
