"""Runner mode (CI): `hatun up` starts the supervisor in the background and waits until enough
tunnels are healthy; `hatun down` stops it and removes everything, idempotently.

The background process is an ordinary `hatun run` (its own session, output in RUN_DIR/hatun.log), so
everything a service does (adoption, clean stop) holds here too. Private keys can come from
environment variables (CI secrets): the child inherits the environment.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

from hatun.config import Config
from hatun.control import ControlError, NotRunning, request
from hatun.rundir import RunDir, RunDirError
from hatun.status import Status, StatusError, TunnelStatus

POLL = 0.2


@dataclass
class UpResult:
    ok: bool
    status: Status | None
    diagnoses: dict[str, str]
    message: str
    pid: int | None = None


def log_path(config: Config) -> str:
    return RunDir(config.run_dir).log_path


def _status(socket_path: str) -> Status | None:
    try:
        reply = request(socket_path, {"command": "status"}, timeout=5)
        return Status.from_json(reply.get("status")) if reply.get("ok") else None
    except (NotRunning, ControlError, StatusError):
        return None


def diagnose(t: TunnelStatus) -> str:
    """Why tunnel T is not healthy, in words that point at the fix."""
    if t.state == "up":
        return "healthy"
    if t.endpoint_error:
        return f"{t.endpoint_error}: check the endpoint's DNS name"
    if not t.present:
        return f"the tunnel device is missing ({t.last_error or 'not created yet'})"
    if t.handshake_age_seconds is None:
        return (f"no handshake with the gateway at {t.endpoint or t.endpoint_configured}: wrong keys (the"
                " gateway must have this host's public key as a peer, and peer_public_key must be the gateway's),"
                " wrong endpoint, or UDP to it blocked")
    reason = t.last_failure or "no reply"
    return (f"handshake OK ({t.handshake_age_seconds:.0f} s ago) but probes to {t.probe} fail ({reason}): the"
            " gateway does not forward into the private network, or the probe target is wrong")


def up(config: Config, config_path: str, *, wait: float, min_healthy: int, keep_on_failure: bool = False) -> UpResult:
    """Start hatun for CONFIG in the background (unless it already runs) and wait up to WAIT seconds
    until MIN_HEALTHY tunnels are up. On failure the background hatun is stopped and cleaned up
    (unless KEEP_ON_FAILURE)."""
    sock = config.control.socket
    pid = None
    proc = None
    if _status(sock) is None:
        rundir = RunDir(config.run_dir)
        try:
            rundir.prepare()
            fd = os.open(rundir.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except (RunDirError, OSError) as e:
            return UpResult(False, None, {}, f"cannot start hatun: {e}")
        with os.fdopen(fd, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hatun", "run", os.path.abspath(config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True)
        pid = proc.pid
    deadline = time.monotonic() + wait
    status = None
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                return UpResult(False, None, {}, f"hatun exited with status {proc.returncode}:\n{_log_tail(config)}", pid)
            status = _status(sock) or status
            if status is not None:
                if status.healthy >= min_healthy and status.in_service:
                    return UpResult(True, status, {t.name: diagnose(t) for t in status.tunnels},
                                    f"{status.healthy} of {len(status.tunnels)} tunnels healthy", status.pid)
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while waiting: as a failed wait, nothing half up is left
        if proc is not None and not keep_on_failure:
            _ignore_interrupts()
            down(config)
        raise
    diagnoses = {t.name: diagnose(t) for t in status.tunnels} if status else {}
    message = (f"fewer than {min_healthy} tunnels healthy after {wait:g} s" if status
               else f"hatun did not answer on {sock} within {wait:g} s:\n{_log_tail(config)}")
    if proc is not None and not keep_on_failure:  # never stop a hatun that this `up` did not start
        _ignore_interrupts()
        down(config)
    return UpResult(False, status, diagnoses, message, pid)


def _ignore_interrupts() -> None:
    """From here on a second Ctrl-C or SIGTERM must not abort the clean-up halfway."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _log_tail(config: Config, lines: int = 15) -> str:
    try:
        with open(log_path(config), errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


def down(config: Config, timeout: float = 30.0) -> tuple[bool, list[str]]:
    """Stop the hatun of CONFIG (removing what it made) and clean up anything a crashed one left.
    Returns (a hatun was running, what the clean-up removed). Idempotent."""
    import trio

    from hatun.teardown import cleanup

    sock = config.control.socket
    was_running = False
    try:
        request(sock, {"command": "stop", "cleanup": True}, timeout=5)
        was_running = True
    except NotRunning:
        pass
    except ControlError:
        # No proper answer: a hatun that is hung (its run_dir lock is held: wait for it below, then
        # clean up anyway), or something else on that path (no lock: not a hatun, nothing to wait for).
        was_running = RunDir(config.run_dir).is_locked()
    deadline = time.monotonic() + timeout
    while was_running and time.monotonic() < deadline:
        if _status(sock) is None and not os.path.exists(sock):
            break
        time.sleep(POLL)
    _wait_unlocked(config, deadline)
    removed = trio.run(cleanup, config)
    # A hatun killed with SIGKILL leaves its control socket: nothing listens there any more (a socket
    # anything answers on, hatun or not, is never removed).
    if _stale_socket(sock) and not RunDir(config.run_dir).is_locked():
        try:
            os.unlink(sock)
            removed.append(f"control socket {sock}")
        except OSError:
            pass
    return was_running, removed


def _stale_socket(path: str) -> bool:
    """PATH is a Unix socket whose listener is gone (connecting is refused)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(2)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()
    return False


def _wait_unlocked(config: Config, deadline: float) -> None:
    """Wait until no hatun holds the run_dir lock (its clean-up is done), bounded."""
    rundir = RunDir(config.run_dir)
    while rundir.is_locked() and time.monotonic() < deadline:
        time.sleep(POLL)
