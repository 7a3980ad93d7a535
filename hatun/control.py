"""The control socket: JSON lines over a unix socket (mode 0600), one request and one reply each.

Requests: {"command": "status"}, {"command": "drain"|"undrain", "tunnel": NAME},
{"command": "reload"}, {"command": "stop", "cleanup": true|false}. Replies: {"ok": true, ...} or
{"ok": false, "error": "..."}. `request()` is the client side, used by the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import socket

import trio

log = logging.getLogger("hatun.control")

MAX_LINE = 64 * 1024
CLIENT_TIMEOUT = 10.0
STATUS_MAX_AGE = 0.2  # s: status polled faster than this reuses the counters it read last


class ControlError(Exception):
    """The control socket cannot be reached or answered with an error; the message says which."""


class NotRunning(ControlError):
    """No hatun answers on that socket."""


async def _handle(sup, stream: trio.SocketStream) -> None:
    try:
        with trio.move_on_after(CLIENT_TIMEOUT):
            buf = b""
            while b"\n" not in buf and len(buf) < MAX_LINE:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buf += chunk
            try:
                req = json.loads(buf.split(b"\n", 1)[0])
                if not isinstance(req, dict):
                    raise ValueError("expected a JSON object")
            except ValueError as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
            else:
                reply = await _dispatch(sup, req)
            await stream.send_all(json.dumps(reply).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def _dispatch(sup, req: dict) -> dict:
    try:
        return await _command(sup, req)
    except Exception as e:  # noqa: BLE001 - a request must never take hatun down
        log.exception("control request %r failed", req.get("command"))
        return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}


async def _command(sup, req: dict) -> dict:
    cmd = req.get("command")
    if cmd == "status":
        for rt in list(sup.tunnels.values()):
            await sup.read_status(rt, max_age=STATUS_MAX_AGE)  # fresh counters and rates
        return {"ok": True, "status": sup.snapshot()}
    if cmd in ("drain", "undrain"):
        name = req.get("tunnel")
        if not isinstance(name, str):
            return {"ok": False, "error": "give the tunnel's name as a string"}
        try:
            rt = sup.drain(name, cmd == "drain")
        except KeyError:
            return {"ok": False, "error": f"no tunnel named {name!r} (tunnels: {', '.join(sup.tunnels)})"}
        return {"ok": True, "tunnel": name, "state": str(rt.state)}
    if cmd == "reload":
        ok, message = await sup.reload()
        return {"ok": ok, "message": message} if ok else {"ok": False, "error": message}
    if cmd == "stop":
        cleanup = req.get("cleanup")
        if cleanup is not None and not isinstance(cleanup, bool):
            return {"ok": False, "error": "cleanup must be true or false"}
        sup.stop(cleanup=cleanup)
        return {"ok": True}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def prepare_path(path: str) -> None:
    """Make the directory; remove a stale socket; refuse when another hatun answers there."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left by a hatun that died
        else:
            raise ControlError(f"another hatun is running with control socket {path}: stop it, or set"
                               " [control] socket to another path")
        finally:
            probe.close()


async def serve_control(sup, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket of SUP (path from its config) until cancelled; then remove it."""
    path = sup.config.control.socket
    prepare_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: only root talks to hatun
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            while True:
                stream = await listener.accept()
                nursery.start_soon(_handle, sup, stream)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        try:
            os.unlink(path)
        except OSError:
            pass


def request(path: str, req: dict, timeout: float = CLIENT_TIMEOUT) -> dict:
    """Send REQ to the hatun at PATH and return its reply (blocking; for the CLI).

    Raises NotRunning when nothing answers there, ControlError for other failures.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"hatun is not running (no answer on {path})") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (the control socket is root's)") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        raise ControlError(f"hatun did not answer within {timeout:.0f} s on {path}") from None
    finally:
        s.close()
    if not buf:
        raise ControlError(f"hatun closed the connection without answering ({path})")
    return json.loads(buf)
