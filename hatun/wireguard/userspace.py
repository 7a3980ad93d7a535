"""The userspace backend: wireguard-go processes, supervised, configured over their UAPI socket.

Crash-only: a wireguard-go process outlives the backend (and hatun). It runs in its own session, so
a Ctrl-C on hatun's terminal does not reach it, and writes to a log file, not a pipe, so it does not
die of SIGPIPE when hatun is gone. A restarted hatun adopts the running process (its UAPI socket
answers; SO_PEERCRED names its PID) instead of restarting it, so tunnels keep their handshakes.

While the backend runs, it watches every device it applied (pidfd, for children and adopted
processes alike); when a wireguard-go dies it starts a new one and re-applies the last settings,
with a growing pause when it keeps dying, and tells the owner through `on_recreated`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import trio

from hatun.netns import netns_path, setns_preexec
from hatun.wireguard import USERSPACE_HINT, link, uapi
from hatun.wireguard.model import BackendUnavailable, Changes, DeviceSettings, DeviceStatus, WireGuardError

log = logging.getLogger("hatun.wireguard")

RUN_DIR = "/run/hatun"
START_TIMEOUT = 5.0  # spawn -> UAPI socket answers (measured: ~10 ms)
STOP_TIMEOUT = 2.0  # per step of delete: link removal, SIGTERM, SIGKILL
STABLE_AFTER = 10.0  # a process that lived this long restarts at once; sooner deaths back off
BACKOFF_MIN, BACKOFF_MAX = 0.25, 10.0
LOG_POLL = 2.0  # seconds between looks at the wireguard-go log files (they write only on errors)
LOG_MAX = 1 << 20  # a log file bigger than this is truncated when a new wireguard-go starts
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
# wireguard-go's own line format: "ERROR: (wg0) 2024/01/31 12:00:00 message"
_GO_LINE = re.compile(r"(DEBUG|INFO|ERROR): \(.*?\) \d{4}/\d\d/\d\d \d\d:\d\d:\d\d (.*)")
_GO_LEVEL = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "ERROR": logging.WARNING}


def check_ifname(ifname: str) -> None:
    """Raise WireGuardError unless IFNAME is safe as an interface name, a file name and an argument.

    A leading '-' would be taken for a flag by wireguard-go (`--help` creates an interface named so).
    """
    if not _IFNAME.fullmatch(ifname):
        raise WireGuardError(f"bad interface name {ifname!r}: 1-15 characters of A-Z a-z 0-9 _ . -,"
                             " not starting with '-' or '.'")


def _netns_path(netns: str | None) -> str:
    return "/proc/self/ns/net" if netns is None else netns_path(netns)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals have no name
        return f"signal {number}"


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _reap(pid: int) -> None:
    # A process we started (perhaps through an earlier backend in this process) becomes our
    # zombie when it exits; collect it so that "gone" really means gone.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


async def _wait_exit(pid: int, timeout: float = math.inf) -> bool:
    """Wait until PID has exited (any parent); True if it did within TIMEOUT."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(fd)
            _reap(pid)
            return True
        return False
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


@dataclass(eq=False)
class _Device:
    ifname: str
    settings: DeviceSettings | None = None  # last applied; what a restart re-applies
    pid: int | None = None
    process: trio.Process | None = None  # when this backend started it
    started_at: float = -math.inf
    generation: int = 0
    log_pos: int = 0
    deleted: bool = False
    scope: trio.CancelScope | None = None  # the watcher and log follower
    lock: trio.Lock = field(default_factory=trio.Lock)  # one apply / restart / delete at a time


class UserspaceBackend:
    """wireguard-go devices, one per interface, kept running and configured. Implements `Backend`.

    Make one with `open_userspace_backend`.
    """

    name = "userspace"

    def __init__(self, nursery: trio.Nursery, rtnl, *, executable: str, run_dir: str, netns: str | None,
                 socket_dir: str, on_recreated: Callable[[str], object] | None) -> None:
        self._nursery = nursery
        self._rtnl = rtnl
        self._exe = executable
        self._run_dir = run_dir
        self._netns = netns
        self._socket_dir = socket_dir
        self._on_recreated = on_recreated
        self._devices: dict[str, _Device] = {}

    # --- the Backend protocol ---

    async def apply(self, settings: DeviceSettings) -> Changes:
        """Start (or adopt) IFNAME's wireguard-go and make it match SETTINGS, touching only what differs.

        Afterwards the device is watched: if its process dies, it is restarted and SETTINGS re-applied.
        Raises WireGuardError when wireguard-go cannot be started or refuses the configuration.
        """
        check_ifname(settings.ifname)
        while True:
            dev = self._devices.setdefault(settings.ifname, _Device(settings.ifname))
            await dev.lock.acquire()
            if self._devices.get(settings.ifname) is dev:
                break
            dev.lock.release()  # deleted while we waited: start over with a fresh record
        try:
            dev.deleted = False
            created = await self._ensure_running(dev)
            changes = await self._configure(settings, created)
            dev.settings = settings
            if dev.scope is None:  # under the lock: one watcher per device
                await self._nursery.start(self._supervise, dev)
        finally:
            dev.lock.release()
        return changes

    async def get(self, ifname: str, *, with_link: bool = True) -> DeviceStatus | None:
        """IFNAME's configuration, counters and link state (never its private key); None if missing.
        WITH_LINK=False skips the link state (index, addresses, MTU): counters only, cheaper."""
        check_ifname(ifname)
        try:
            status = await uapi.get(ifname, socket_dir=self._socket_dir)
        except uapi.NotRunning:
            return None
        if not with_link:
            return status
        state = await link.link_state(self._rtnl, ifname)
        if state is None:  # answering socket, but no such link in our namespace
            return None
        ifindex, addresses, mtu, up = state
        return dataclasses.replace(status, ifindex=ifindex, addresses=tuple(addresses), mtu=mtu, up=up)

    async def list(self) -> list[str]:
        """Interfaces whose wireguard-go answers on its UAPI socket and runs in our network namespace."""
        try:
            names = sorted(n[:-5] for n in os.listdir(self._socket_dir) if n.endswith(".sock"))
        except FileNotFoundError:
            return []
        found = []
        for name in filter(_IFNAME.fullmatch, names):
            try:
                pid = await uapi.server_pid(name, socket_dir=self._socket_dir)
            except uapi.NotRunning:
                continue
            if self._is_ours(pid, name):  # the directory is global: skip other namespaces' devices
                found.append(name)
        return found

    async def delete(self, ifname: str) -> None:
        """Stop watching IFNAME, delete its link (wireguard-go then exits), make sure the process is
        gone (SIGTERM, then SIGKILL, only to a wireguard-go for IFNAME in our namespace), and remove its
        socket and log files. Deleting a missing device is not an error.

        Raises WireGuardError when the process does not go away.
        """
        check_ifname(ifname)
        dev = self._devices.get(ifname) or _Device(ifname)
        dev.deleted = True
        if dev.scope is not None:
            dev.scope.cancel()
        async with dev.lock:
            try:
                serving = await uapi.server_pid(ifname, socket_dir=self._socket_dir)
            except uapi.NotRunning:
                serving = None
            # Only processes that run wireguard-go for IFNAME in our namespace: the socket directory
            # is global, and a PID may have been reused since we saw it.
            pids = {pid for pid in (dev.pid, serving) if pid and self._is_ours(pid, ifname)}
            await link.delete_link(self._rtnl, ifname)
            for pid in pids:
                await self._stop(pid, dev.process if dev.process and dev.process.pid == pid else None)
            paths = [self._log_path(ifname)]
            try:
                await uapi.server_pid(ifname, socket_dir=self._socket_dir)
            except uapi.NotRunning:  # stale (after SIGKILL) or gone; one that answers is not ours
                paths.append(uapi.socket_path(ifname, self._socket_dir))
            for path in paths:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            if self._devices.get(ifname) is dev:
                del self._devices[ifname]
        if pids:
            log.info("%s: deleted (wireguard-go pid %s ended)", ifname, ", ".join(map(str, sorted(pids))))

    # --- for the owner ---

    async def reset_peer(self, settings: DeviceSettings) -> None:
        """Drop the peer's session and configure it afresh: the next packet starts a new handshake
        at once (instead of WireGuard's own retry after 15 s without replies, e.g. when the gateway
        restarted and lost the session). Raises WireGuardError."""
        check_ifname(settings.ifname)
        dev = self._devices.get(settings.ifname)
        if dev is None:
            return
        async with dev.lock:
            await uapi.set(settings.ifname, [f"public_key={settings.peer.public_key.hex}", "remove=true"],
                           socket_dir=self._socket_dir)
            await self._configure(settings, False)

    def generation(self, ifname: str) -> int:
        """How many wireguard-go processes this backend has started for IFNAME (0: none, or adopted)."""
        dev = self._devices.get(ifname)
        return dev.generation if dev else 0

    def pid(self, ifname: str) -> int | None:
        """PID of IFNAME's wireguard-go as last seen, or None."""
        dev = self._devices.get(ifname)
        return dev.pid if dev else None

    # --- processes ---

    def _log_path(self, ifname: str) -> str:
        return os.path.join(self._run_dir, f"wg-{ifname}.log")

    def _is_ours(self, pid: int, ifname: str) -> bool:
        """PID runs wireguard-go for IFNAME, in our network namespace."""
        argv = _cmdline(pid)
        names = {"wireguard-go", os.path.basename(self._exe)}
        return (len(argv) >= 2 and os.path.basename(argv[0]) in names and argv[-1] == ifname
                and _same_file(f"/proc/{pid}/ns/net", _netns_path(self._netns)))

    async def _owned_pid(self, ifname: str) -> int | None:
        """PID of the wireguard-go that answers for IFNAME, if it is ours to manage; None if nothing answers.

        Raises WireGuardError when something else answers (e.g. the same name in another namespace:
        the socket directory is global).
        """
        try:
            pid = await uapi.server_pid(ifname, socket_dir=self._socket_dir)
        except uapi.NotRunning:
            return None
        if not self._is_ours(pid, ifname):
            raise WireGuardError(
                f"the UAPI socket of {ifname} is served by PID {pid} ({' '.join(_cmdline(pid))[:80]!r}),"
                " not a wireguard-go for it in this network namespace; use another interface name")
        return pid

    async def _ensure_running(self, dev: _Device) -> bool:
        """Adopt IFNAME's running wireguard-go or start one. True when a new process was started."""
        pid = await self._owned_pid(dev.ifname)
        if pid is not None:
            if pid != dev.pid:
                log.info("%s: adopted running wireguard-go (pid %d)", dev.ifname, pid)
                dev.pid, dev.process = pid, None
                dev.started_at = -math.inf  # age unknown: treat it as stable
                dev.log_pos = self._log_size(dev.ifname)
            return False
        await self._spawn(dev)
        return True

    def _log_size(self, ifname: str) -> int:
        try:
            return os.stat(self._log_path(ifname)).st_size
        except FileNotFoundError:
            return 0

    async def _spawn(self, dev: _Device) -> None:
        ifname = dev.ifname
        path = self._log_path(ifname)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        if self._log_size(ifname) > LOG_MAX:
            flags |= os.O_TRUNC
        env = {k: v for k, v in os.environ.items() if k not in ("WG_TUN_FD", "WG_UAPI_FD")}
        env["WG_PROCESS_FOREGROUND"] = "1"  # stay our child, no daemonizing, no banner
        log_fd = ns_fd = -1
        try:
            what = f"log file {path}"
            os.makedirs(self._run_dir, mode=0o750, exist_ok=True)
            log_fd = os.open(path, flags, 0o640)
            start = os.fstat(log_fd).st_size
            if self._netns:
                what = f"network namespace {self._netns}"
                ns_fd = os.open(_netns_path(self._netns), os.O_RDONLY | os.O_CLOEXEC)
            what = self._exe
            process = await trio.lowlevel.open_process(
                [self._exe, ifname], stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=env,
                start_new_session=True, preexec_fn=setns_preexec(ns_fd) if ns_fd >= 0 else None)
        except (OSError, subprocess.SubprocessError) as e:
            raise WireGuardError(f"{ifname}: cannot start wireguard-go: {what}: {getattr(e, 'strerror', None) or e}"
                                 ) from None
        finally:
            for fd in (ns_fd, log_fd):
                if fd >= 0:
                    os.close(fd)
        dev.pid, dev.process, dev.started_at = process.pid, process, trio.current_time()
        if dev.scope is None:
            dev.log_pos = start
        log.info("%s: started wireguard-go (pid %d)", ifname, process.pid)

        # Ready when its UAPI socket answers, served by this very process.
        with trio.move_on_after(START_TIMEOUT):
            while process.poll() is None:
                try:
                    pid = await uapi.server_pid(ifname, socket_dir=self._socket_dir, timeout=0.5)
                except uapi.NotRunning:
                    await trio.sleep(0.005)
                    continue
                if pid != process.pid:
                    raise WireGuardError(f"{ifname}: PID {pid} took the UAPI socket of our wireguard-go")
                dev.generation += 1
                return
            tail = self._log_tail(path, start)
            raise WireGuardError(f"{ifname}: wireguard-go exited at start with status {process.returncode}"
                                 + (f": {tail}" if tail else ""))
        process.kill()  # our own child, stuck before serving: nothing to adopt later
        await process.wait()
        raise WireGuardError(f"{ifname}: wireguard-go did not open its UAPI socket within {START_TIMEOUT:g}s")

    @staticmethod
    def _log_tail(path: str, start: int, limit: int = 400) -> str:
        # wireguard-go logs no secrets, so its last words may go into an error message.
        try:
            with open(path, "rb") as f:
                f.seek(start)
                text = f.read(64 * 1024).decode(errors="replace")
        except OSError:
            return ""
        lines = [m.group(2) if (m := _GO_LINE.fullmatch(ln)) else ln for ln in text.splitlines() if ln.strip()]
        return "; ".join(dict.fromkeys(lines))[-limit:]  # it logs a refused set twice

    async def _stop(self, pid: int, process: trio.Process | None) -> None:
        # Deleting the link is the gentle way (it exits at once); then SIGTERM, then SIGKILL.
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                log.info("wireguard-go pid %d still running: sending %s", pid, sig.name)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if await _wait_exit(pid, STOP_TIMEOUT):
                if process is not None:
                    await process.wait()
                return
        raise WireGuardError(f"wireguard-go pid {pid} did not exit after SIGKILL")

    async def _configure(self, settings: DeviceSettings, created: bool) -> Changes:
        ifname = settings.ifname
        current = await uapi.get(ifname, socket_dir=self._socket_dir)
        lines, changed = uapi.diff_lines(settings, current)
        if lines:
            start = self._log_size(ifname)
            try:
                await uapi.set(ifname, lines, socket_dir=self._socket_dir)
            except uapi.NotRunning:
                raise
            except WireGuardError as e:
                # wireguard-go logs the reason before it replies: make it part of the error.
                tail = self._log_tail(self._log_path(ifname), start)
                raise WireGuardError(f"{e}; its log: {tail}" if tail else str(e)) from None
        # After the UAPI part, so that the device has its key and peer when it comes up.
        changed |= await link.configure_link(self._rtnl, ifname, addresses=settings.addresses,
                                              mtu=settings.mtu, up=True)
        if created or changed:
            log.info("%s: %s%s", ifname, "created; " if created else "", "set " + ", ".join(sorted(changed)))
        return Changes(created=created, changed=changed)

    # --- supervision ---

    async def _supervise(self, dev: _Device, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            dev.scope = scope
            task_status.started()
            try:
                await self._watch(dev)
            finally:
                if dev.scope is scope:
                    dev.scope = None

    async def _watch(self, dev: _Device) -> None:
        backoff = 0.0
        while True:
            pid, process = dev.pid, dev.process
            if pid is None:
                why = "is not running"
            elif process is not None and process.pid == pid:
                code = await process.wait()
                why = f"killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
            else:
                await _wait_exit(pid)
                why = "exited"
            async with dev.lock:
                if dev.deleted:
                    return
                if dev.pid != pid:  # apply() already replaced it
                    continue
                lived = trio.current_time() - dev.started_at
            backoff = 0.0 if lived >= STABLE_AFTER else min(max(2 * backoff, BACKOFF_MIN), BACKOFF_MAX)
            log.warning("%s: wireguard-go (pid %s) %s%s; restarting%s", dev.ifname, pid, why,
                        f" after {lived:.1f}s" if lived < math.inf else "", f" in {backoff:g}s" if backoff else "")
            while True:
                await trio.sleep(backoff)
                async with dev.lock:
                    if dev.deleted:
                        return
                    try:
                        created = await self._ensure_running(dev)
                        await self._configure(dev.settings, created)
                    except WireGuardError as e:
                        backoff = min(max(2 * backoff, BACKOFF_MIN), BACKOFF_MAX)
                        log.error("%s: restart failed: %s; next try in %gs", dev.ifname, e, backoff)
                        continue
                # A new process means a new TUN device (new ifindex), whoever started it.
                if self._on_recreated is not None:
                    try:
                        self._on_recreated(dev.ifname)
                    except Exception:
                        log.exception("%s: on_recreated callback failed", dev.ifname)
                break

    async def follow_logs(self) -> None:
        """Forward new lines of every watched wireguard-go's log file to our logger (files, so they
        survive us). One task for all devices: a wakeup per device would cost more than the work."""
        while True:
            await trio.sleep(LOG_POLL)
            for dev in list(self._devices.values()):
                if dev.scope is not None:
                    self._read_log(dev)

    def _read_log(self, dev: _Device) -> None:
        path = self._log_path(dev.ifname)
        try:
            self._read_log_file(dev, path)
        except OSError as e:  # e.g. EMFILE: the log can wait for the next look
            log.debug("%s: reading %s: %s", dev.ifname, path, e)

    def _read_log_file(self, dev: _Device, path: str) -> None:
        try:
            size = os.stat(path).st_size
            if size < dev.log_pos:  # truncated by a restart
                dev.log_pos = 0
            if size == dev.log_pos:
                return
            with open(path, "rb") as f:
                f.seek(dev.log_pos)
                data = f.read(min(size - dev.log_pos, 256 * 1024))
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only; the rest comes next time
        if end == 0 and len(data) < 256 * 1024:
            return
        dev.log_pos += end or len(data)
        previous = None
        for line in data[:end or len(data)].decode(errors="replace").splitlines():
            if line == previous or not line.strip():  # it logs a refused `set` twice
                continue
            previous = line
            if m := _GO_LINE.fullmatch(line):
                log.log(_GO_LEVEL[m.group(1)], "%s: wireguard-go: %s", dev.ifname, m.group(2))
            else:
                log.info("%s: wireguard-go: %s", dev.ifname, line)


@asynccontextmanager
async def open_userspace_backend(
    *, run_dir: str = RUN_DIR, rtnl=None, netns: str | None = None, executable: str = "wireguard-go",
    socket_dir: str = uapi.SOCKET_DIR, on_recreated: Callable[[str], object] | None = None,
) -> AsyncIterator[UserspaceBackend]:
    """A UserspaceBackend whose watchers live inside this context.

    Args:
        run_dir: where wireguard-go's log files go (`wg-IFNAME.log`).
        rtnl: an rtnetlink socket from `hatun.netlink.rtnl.open_rtnl` (opened here when None).
        netns: network namespace (name under /run/netns, or a path) for the processes and for `rtnl`
            when it is opened here; None: ours.
        executable: the wireguard-go binary (looked up on PATH).
        socket_dir: wireguard-go's UAPI socket directory (compiled into it; only tests change it).
        on_recreated: called with the interface name after a dead wireguard-go was replaced and
            reconfigured (the new device has a new ifindex: routes through it must be re-made).

    Leaving the context stops the watching, never the devices (crash-only: the owner deletes
    explicitly). Raises BackendUnavailable when wireguard-go is not installed.
    """
    exe = shutil.which(executable)
    if exe is None:
        raise BackendUnavailable(f"{executable} not found on PATH: {USERSPACE_HINT}")
    async with AsyncExitStack() as stack:
        if rtnl is None:
            from hatun.netlink.rtnl import open_rtnl
            rtnl = await stack.enter_async_context(open_rtnl(netns=netns))
        async with trio.open_nursery() as nursery:
            try:
                backend = UserspaceBackend(nursery, rtnl, executable=exe, run_dir=run_dir, netns=netns,
                                           socket_dir=socket_dir, on_recreated=on_recreated)
                nursery.start_soon(backend.follow_logs)
                yield backend
            finally:
                nursery.cancel_scope.cancel()
