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
import stat

import trio

from hatun.keys import redact
from hatun.serving import serve_bounded

log = logging.getLogger("hatun.control")

MAX_LINE = 64 * 1024  # a request line longer than this is refused
CLIENT_TIMEOUT = 10.0  # a client has this long to send its request line (and to read the answer)
RELOAD_WAIT = 60.0  # a `reload` request waits this long for the result; the reload itself goes on
RELOAD_CLIENT_TIMEOUT = RELOAD_WAIT + 10.0
STATUS_MAX_AGE = 0.2  # s: status polled faster than this reuses the counters it read last


class ControlError(Exception):
    """The control socket cannot be reached or answered with an error; the message says which."""


class NotRunning(ControlError):
    """No hatun answers on that socket."""


class _BadRequest(Exception):
    pass


async def _read_line(stream: trio.abc.Stream) -> bytes | None:
    """The first line the client sends (without the newline); None when it closes before one.
    Raises _BadRequest for a line longer than MAX_LINE."""
    buf = bytearray()
    while True:
        chunk = await stream.receive_some(16384)
        if not chunk:
            return None if not buf else bytes(buf)  # a last line without its newline still counts
        end = chunk.find(b"\n")
        if end >= 0:
            buf += chunk[:end]
            if len(buf) > MAX_LINE:
                raise _BadRequest(f"request longer than {MAX_LINE} bytes")
            return bytes(buf)
        buf += chunk
        if len(buf) > MAX_LINE:
            raise _BadRequest(f"request longer than {MAX_LINE} bytes")


def parse_request(line: bytes) -> dict:
    """One request line -> the request object. Raises _BadRequest saying what is wrong."""
    try:
        req = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _BadRequest(f"not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise _BadRequest("nested too deeply") from None
    except ValueError as e:
        raise _BadRequest(f"not JSON: {e}") from None
    if not isinstance(req, dict):
        raise _BadRequest("expected a JSON object")
    return req


async def _handle(sup, stream: trio.abc.Stream) -> None:
    """One connection: one request line, one reply line. Nothing the client sends can raise out of here
    but a broken connection (which `serve_bounded` logs and survives)."""
    with trio.move_on_after(CLIENT_TIMEOUT) as reading:
        try:
            line = await _read_line(stream)
        except _BadRequest as e:
            line, reply = None, {"ok": False, "error": f"bad request: {e}"}
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        else:
            reply = None
    if reading.cancelled_caught:
        return  # silent or too slow: hang up
    if reply is None:
        if line is None:
            return
        try:
            reply = await _dispatch(sup, parse_request(line))
        except _BadRequest as e:
            reply = {"ok": False, "error": f"bad request: {e}"}
    try:
        data = json.dumps(reply).encode() + b"\n"
    except (TypeError, ValueError) as e:
        log.error("control reply cannot be encoded: %s", e)
        data = b'{"ok": false, "error": "internal error: reply cannot be encoded"}\n'
    with trio.move_on_after(CLIENT_TIMEOUT):
        try:
            await stream.send_all(data)
            if line is None:
                # Refused before reading it all: read on (bounded) so that closing does not reset
                # the connection before the client has read the reason.
                await stream.send_eof()
                with trio.move_on_after(2.0):
                    for _ in range(1024):
                        if not await stream.receive_some(65536):
                            break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _dispatch(sup, req: dict) -> dict:
    try:
        return await _command(sup, req)
    except Exception as e:  # noqa: BLE001 - a request must never take hatun down
        command = req.get("command")
        log.error("control request %.40r failed: %s: %s", command if isinstance(command, str) else type(command).__name__,
                  type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        return {"ok": False, "error": redact(f"internal error: {type(e).__name__}: {e}")}


async def _command(sup, req: dict) -> dict:
    cmd = req.get("command")
    if cmd == "status":
        await sup.refresh_statuses(max_age=STATUS_MAX_AGE)  # fresh counters and rates, bounded
        return {"ok": True, "status": sup.status().to_json()}
    if cmd in ("drain", "undrain"):
        name = req.get("tunnel")
        if not isinstance(name, str):
            return {"ok": False, "error": "give the tunnel's name as a string"}
        try:
            rt = sup.drain(name, cmd == "drain")
        except KeyError:
            return {"ok": False, "error": f"no tunnel named {name[:64]!r} (tunnels: {', '.join(sup.tunnels)})"}
        return {"ok": True, "tunnel": name, "state": str(rt.state)}
    if cmd == "reload":
        # The supervisor owns the reload: when this request gives up waiting, the reload goes on.
        result = sup.start_reload()
        with trio.move_on_after(RELOAD_WAIT):
            await result.done.wait()
        if not result.done.is_set():
            return {"ok": False, "error": f"the reload is still running after {RELOAD_WAIT:.0f} s; `hatun status`"
                                          " shows its result once it is done"}
        return {"ok": True, "message": result.message} if result.ok else {"ok": False, "error": result.message}
    if cmd == "stop":
        cleanup = req.get("cleanup")
        if cleanup is not None and not isinstance(cleanup, bool):
            return {"ok": False, "error": "cleanup must be true or false"}
        sup.stop(cleanup=cleanup)
        return {"ok": True}
    shown = cmd[:64] if isinstance(cmd, str) else type(cmd).__name__
    return {"ok": False, "error": f"unknown command {shown!r} (commands: status, drain, undrain, reload, stop)"}


def prepare_path(path: str) -> None:
    """Make the directory; remove a stale socket; refuse when another hatun answers there, or when
    the path is anything but a socket (a file of someone else's is never removed)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
        raise ControlError(f"control socket path {path} exists and is {kind}, not a socket: hatun will not remove"
                           " it; set [control] socket to another path")
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
    ours = os.lstat(path).st_ino
    sock.listen(64)
    listener = trio.SocketListener(sock)
    try:
        await serve_bounded(listener, lambda stream: _handle(sup, stream), name="control socket",
                            task_status=task_status)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        try:
            if os.lstat(path).st_ino == ours:  # still our socket, not something put there since
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
            raise NotRunning(f"hatun is not running (no answer on {path}); start it with `hatun run CONFIG`,"
                             " `systemctl start hatun` or `hatun up CONFIG`, or name its socket with --config"
                             " CONFIG / --socket PATH") from None
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
        raise ControlError(f"hatun closed the connection without answering ({path}; busy, or not a hatun)")
    try:
        reply = json.loads(buf)
    except (ValueError, RecursionError):
        raise ControlError(f"the answer on {path} is not a hatun reply") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the answer on {path} is not a hatun reply")
    return reply
