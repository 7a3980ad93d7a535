"""The userspace backend: wireguard-go processes, supervised, configured over their UAPI socket.

Crash-only: a wireguard-go process outlives the backend (and hatun). It runs in its own session, so
a Ctrl-C on hatun's terminal does not reach it, and writes to a log file, not a pipe, so it does not
die of SIGPIPE when hatun is gone. A restarted hatun adopts the running process (its UAPI socket
answers; SO_PEERCRED names its PID) instead of restarting it, so tunnels keep their handshakes.

While the backend runs, it watches every device it applied (pidfd, for children and adopted
processes alike); when a wireguard-go dies it starts a new one and re-applies the last settings,
with a growing pause when it keeps dying, and tells the owner through `on_recreated`. A hung one
(SIGSTOPped or deadlocked: it still accepts UAPI connections, then never answers) is replaced the
same way once HANG_LIMIT requests in a row went unanswered, whoever sent them; a liveness check
asks every device that nothing else talked to lately, so a hang is noticed even when nobody asks.

Children get a minimal environment (`hatun.childenv`): never our secrets. Log files are opened
without following symlinks and must be regular files of ours.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import trio

from hatun.childenv import child_environment
from hatun.netns import netns_path, setns_preexec
from hatun.wireguard import USERSPACE_HINT, link, uapi
from hatun.wireguard.model import (
    BackendUnavailable,
    Changes,
    DeviceSettings,
    DeviceStatus,
    WireGuardError,
    check_ifname,
    valid_ifname,
)

log = logging.getLogger("hatun.wireguard")

RUN_DIR = "/run/hatun"
START_TIMEOUT = 5.0  # spawn -> UAPI socket answers (measured: ~10 ms)
STOP_TIMEOUT = 2.0  # per step of delete: link removal, SIGTERM, SIGKILL
STABLE_AFTER = 10.0  # a process that lived this long restarts at once; sooner deaths back off
BACKOFF_MIN, BACKOFF_MAX = 0.25, 10.0
LOG_POLL = 2.0  # seconds between looks at the wireguard-go log files (they write only on errors)
LOG_MAX = 1 << 20  # a log file bigger than this is truncated when a new wireguard-go starts
HANG_LIMIT = 3  # UAPI requests in a row left unanswered: our wireguard-go is hung and gets replaced...
HANG_AFTER = 2.0  # ...once silent for at least this long (callers with short timeouts are quick to count)
CHECK_INTERVAL = 1.0  # a device nothing talked to for this long is asked by the liveness check
CHECK_TIMEOUT = 1.0  # for liveness and adoption checks (it answers in well under a millisecond)
EXIT_POLL = 0.5  # seconds between looks at a process we cannot get a pidfd for (EMFILE)
# wireguard-go's own line format: "ERROR: (wg0) 2024/01/31 12:00:00 message"
_GO_LINE = re.compile(r"(DEBUG|INFO|ERROR): \(.*?\) \d{4}/\d\d/\d\d \d\d:\d\d:\d\d (.*)")
_GO_LEVEL = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "ERROR": logging.WARNING}


def _netns_path(netns: str | None) -> str:
    return "/proc/self/ns/net" if netns is None else netns_path(netns)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals have no name
        return f"signal {number}"


def _cmdline(pid: int) -> list[str]:
    """PID's argv; [] when it is gone (or a zombie). Raises WireGuardError when /proc cannot be read
    (EMFILE...): "cannot tell" must not pass for "not ours", nor the reverse."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return []
    except OSError as e:
        raise WireGuardError(f"cannot read the command line of PID {pid}: {e.strerror or e}") from None


def _same_file(a: str, b: str) -> bool:
    """A and B are the same file; False when either is missing. Raises WireGuardError otherwise."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError as e:
        raise WireGuardError(f"cannot compare {a} with {b}: {e.strerror or e}") from None
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _proc_state(pid: int) -> str | None:
    """PID's state letter from /proc (R, S, T for stopped, Z ...); None when it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only asks whether PID exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pidfd(pid: int) -> int | None:
    """A pidfd for PID, None when it has exited. Raises WireGuardError when none can be had (EMFILE)."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except OSError as e:
        raise WireGuardError(f"cannot watch PID {pid} (pidfd_open): {e.strerror or e}") from None


async def _wait_fd(fd: int, pid: int, timeout: float) -> bool:
    """Wait until the process of pidfd FD (PID) exits; True if it did within TIMEOUT."""
    with trio.move_on_after(timeout):
        await trio.lowlevel.wait_readable(fd)
        _reap(pid)
        return True
    return False


async def _collect(process: trio.Process | None) -> None:
    # Our own child, ended: reap it (bounded, in case "ended" was a wrong guess).
    if process is not None:
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()


def _close_fd(fd: int) -> None:
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


def _open_log(path: str, flags: int) -> int:
    """Open hatun's log file PATH: never through a symlink (O_NOFOLLOW: a link planted in run_dir
    must not make us append to /etc/shadow), never blocking on a FIFO, and only a regular file of
    ours with one name (a hard link would be written through too). Raises OSError saying why."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o640)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symbolic link: refusing to follow it") from None
        if e.errno == errno.ENXIO:  # a FIFO without reader, opened for writing
            raise OSError(errno.ENXIO, "it is not a regular file: refusing to use it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EPERM, "it is not a regular file: refusing to use it")
        if st.st_nlink != 1 or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, "it has other names or another owner: refusing to use it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reap(pid: int) -> None:
    # A process we started (perhaps through an earlier backend in this process) becomes our
    # zombie when it exits; collect it so that "gone" really means gone.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


async def _wait_exit(pid: int, timeout: float = math.inf) -> bool:
    """Wait until PID has exited (any parent); True if it did within TIMEOUT. Never raises: without
    a descriptor to spare (EMFILE) it polls until one is free or the process is gone."""
    warned = False
    with trio.move_on_after(timeout):
        while True:
            try:
                fd = _pidfd(pid)
            except WireGuardError as e:
                if not warned:
                    log.warning("%s; polling every %gs instead", e, EXIT_POLL)
                    warned = True
                _reap(pid)
                if not _exists(pid):
                    return True
                await trio.sleep(EXIT_POLL)
                continue
            if fd is None:
                return True
            try:
                return await _wait_fd(fd, pid, math.inf)
            finally:
                _close_fd(fd)
    return False


@dataclass(eq=False)
class _Device:
    ifname: str
    settings: DeviceSettings | None = None  # last applied; what a restart re-applies
    pid: int | None = None
    process: trio.Process | None = None  # when this backend started it
    started_at: float = -math.inf
    generation: int = 0
    log_pos: int = 0
    log_problem: str | None = None  # last trouble reading its log (warned once, not every look)
    deleted: bool = False
    # Hang detection: UAPI requests in a row it left unanswered (overlapping ones count once), when
    # the last counted one gave up, its last reply, and the flag its watcher waits for.
    timeouts: int = 0
    silent_since: float = -math.inf
    timeout_at: float = -math.inf
    answered_at: float = -math.inf
    hung: trio.Event = field(default_factory=trio.Event)
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
            known = dev.pid
            created = await self._ensure_running(dev)
            changes = await self._configure(settings, created)
            dev.settings = settings
            if dev.scope is None:  # under the lock: one watcher per device
                await self._nursery.start(self._supervise, dev)
        finally:
            dev.lock.release()
        if created and known is not None:  # replaced a dead or hung one before its watcher did
            self._notify_recreated(settings.ifname)
        return changes

    async def get(self, ifname: str, *, with_link: bool = True, timeout: float | None = None) -> DeviceStatus | None:
        """IFNAME's configuration, counters and link state (never its private key); None if missing.
        WITH_LINK=False skips the link state (index, addresses, MTU): counters only, cheaper.
        TIMEOUT: seconds for wireguard-go's answer (default uapi.TIMEOUT).

        Raises UapiTimeout (a DeviceTimeout) when wireguard-go is connected but does not answer
        (hung: it counts towards its replacement), WireGuardError for other failures.
        """
        check_ifname(ifname)
        try:
            status = await self._uapi(uapi.get, ifname, timeout=uapi.TIMEOUT if timeout is None else timeout)
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
        """Interfaces whose wireguard-go answers on its UAPI socket and runs in our network namespace.
        Raises WireGuardError when the socket directory or /proc cannot be read."""
        try:
            names = sorted(n[:-5] for n in os.listdir(self._socket_dir) if n.endswith(".sock"))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise WireGuardError(f"cannot list {self._socket_dir}: {e.strerror or e}") from None
        found = []
        for name in filter(valid_ifname, names):
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
            # Only a TUN device: a bridge or a NIC of that name is never ours to delete.
            try:
                present = await self._rtnl.link(ifname)
            except link.NETLINK_FAILURES as e:
                raise WireGuardError(f"{ifname}: cannot read the device: {link.describe(e)}") from None
            if present is not None and present.kind != "tun":
                log.warning("%s: not deleting it: it is a %s device, not wireguard-go's", ifname,
                            present.kind or "network")
            else:
                await link.delete_link(self._rtnl, ifname)
            for pid in pids:
                await self._stop(pid, ifname, dev.process if dev.process and dev.process.pid == pid else None)
            paths = [self._log_path(ifname)]
            try:
                await uapi.server_pid(ifname, socket_dir=self._socket_dir)
            except uapi.NotRunning:  # stale (after SIGKILL) or gone; one that answers is not ours
                paths.append(uapi.socket_path(ifname, self._socket_dir))
            for path in paths:
                try:
                    os.unlink(path)  # a symlink planted there is removed, never its target
                except FileNotFoundError:
                    pass
                except OSError as e:  # the device is gone all the same; the file stays behind
                    log.warning("%s: cannot remove %s: %s", ifname, path, e.strerror or e)
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
            # One request: the peer is removed and added again in order, never missing in between.
            lines, _ = uapi.diff_lines(settings, await self._uapi(uapi.get, settings.ifname), reset_peer=True)
            await self._uapi(uapi.set, settings.ifname, lines)

    def generation(self, ifname: str) -> int:
        """How many wireguard-go processes this backend has started for IFNAME (0: none, or adopted)."""
        dev = self._devices.get(ifname)
        return dev.generation if dev else 0

    def pid(self, ifname: str) -> int | None:
        """PID of IFNAME's wireguard-go as last seen, or None."""
        dev = self._devices.get(ifname)
        return dev.pid if dev else None

    # --- hang detection ---

    async def _uapi(self, request, ifname: str, *args, timeout: float = uapi.TIMEOUT):
        """`request(ifname, *args)` (uapi.get or uapi.set) on IFNAME's socket, counting its answers: a
        reply of any kind resets the count, HANG_LIMIT timeouts in a row (and HANG_AFTER seconds of
        silence at least) mark the device hung."""
        dev = self._devices.get(ifname)
        pid, started = (dev.pid if dev else None), trio.current_time()
        try:
            result = await request(ifname, *args, socket_dir=self._socket_dir, timeout=timeout)
        except uapi.UapiTimeout:
            if dev is not None:
                self._unanswered(dev, pid, started)
            raise
        except (uapi.UapiRefused, uapi.UapiProtocolError):  # it did answer
            if dev is not None:
                self._answered(dev, pid)
            raise
        if dev is not None:
            self._answered(dev, pid)
        return result

    @staticmethod
    def _answered(dev: _Device, pid: int | None) -> None:
        if pid is not None and dev.pid == pid:
            dev.timeouts = 0
            dev.answered_at = trio.current_time()

    @staticmethod
    def _unanswered(dev: _Device, pid: int | None, started: float) -> None:
        # Requests that overlap one already counted (several callers at the same moment) are the
        # same silence: only a request sent after the last counted one gave up counts again. So
        # HANG_LIMIT timeouts really are that many timeouts in a row, whatever the callers.
        if pid is None or dev.pid != pid or started < dev.timeout_at:
            return
        if dev.timeouts == 0:
            dev.silent_since = started
        dev.timeouts += 1
        dev.timeout_at = trio.current_time()
        if dev.timeouts >= HANG_LIMIT and dev.timeout_at - dev.silent_since >= HANG_AFTER and not dev.hung.is_set():
            log.warning("%s: wireguard-go (pid %d) left %d UAPI requests in a row unanswered: it is hung",
                        dev.ifname, pid, dev.timeouts)
            dev.hung.set()

    @staticmethod
    def _new_process(dev: _Device, pid: int, process: trio.Process | None) -> None:
        dev.pid, dev.process = pid, process
        dev.timeouts, dev.timeout_at, dev.answered_at = 0, -math.inf, -math.inf
        if dev.hung.is_set():
            dev.hung = trio.Event()

    async def serve_liveness(self) -> None:
        """Ask every watched wireguard-go that nothing else talked to lately for its state, so that a
        hung one is noticed (and replaced) even when nobody else asks. One task for all devices; the
        devices are asked concurrently, each under CHECK_TIMEOUT."""
        while True:
            due = [dev for dev in self._devices.values()
                   if dev.scope is not None and not dev.deleted and dev.pid is not None and not dev.hung.is_set()
                   and trio.current_time() - dev.answered_at >= CHECK_INTERVAL]
            timed_out = False

            async def check(dev: _Device) -> None:
                nonlocal timed_out
                try:
                    await self._uapi(uapi.get, dev.ifname, timeout=CHECK_TIMEOUT)
                except uapi.UapiTimeout:
                    timed_out = True
                except WireGuardError as e:  # a dead process is its watcher's business
                    log.debug("%s: liveness check: %s", dev.ifname, e)

            async with trio.open_nursery() as nursery:
                for dev in due:
                    nursery.start_soon(check, dev)
            # A device that just went silent is asked again at once (the timeout paces it).
            await trio.sleep(0.1 if timed_out else CHECK_INTERVAL)

    async def _kill_hung(self, pid: int, ifname: str, process: trio.Process | None) -> bool:
        """SIGKILL PID if it still runs wireguard-go for IFNAME in our namespace (a stopped process
        does not act on SIGTERM until continued) and wait for its end. True when killed, False when
        it had gone (or is no longer ours). Raises WireGuardError when it cannot be killed."""
        fd = _pidfd(pid)
        if fd is None:
            return False
        try:
            # The signal goes through the pidfd: if PID ended and its number was reused after this
            # check, it reaches nobody rather than the new process.
            if not self._is_ours(pid, ifname):
                killed = False  # ended meanwhile (a zombie has no command line)
                _reap(pid)
            else:
                log.warning("%s: killing hung wireguard-go (pid %d) with SIGKILL", ifname, pid)
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    killed = True
                except ProcessLookupError:
                    killed = False
                if not await _wait_fd(fd, pid, STOP_TIMEOUT):
                    raise WireGuardError(f"{ifname}: hung wireguard-go pid {pid} did not exit after SIGKILL")
        finally:
            _close_fd(fd)
        await _collect(process if process is not None and process.pid == pid else None)
        return killed

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
        """Adopt IFNAME's running wireguard-go or start one. True when a new process was started.

        A stopped or deadlocked wireguard-go still accepts connections (and SO_PEERCRED names it):
        one is adopted only when it answers a `get` within CHECK_TIMEOUT; a silent one is killed
        and replaced.
        """
        pid = await self._owned_pid(dev.ifname)
        if pid is not None and (pid != dev.pid or dev.hung.is_set()):
            try:
                await uapi.get(dev.ifname, socket_dir=self._socket_dir, timeout=CHECK_TIMEOUT)
            except uapi.UapiTimeout:
                log.warning("%s: running wireguard-go (pid %d) accepts UAPI connections but does not answer:"
                            " replacing it", dev.ifname, pid)
                await self._kill_hung(pid, dev.ifname, None)
                pid = None
            except uapi.NotRunning:  # it has just ended
                pid = None
            except WireGuardError:  # it answered, if with an error: alive, let the configure tell
                pass
            if pid is not None:
                log.info("%s: adopted running wireguard-go (pid %d)", dev.ifname, pid)
                self._new_process(dev, pid, None)
                dev.started_at = -math.inf  # age unknown: treat it as stable
                dev.log_pos = self._log_size(dev.ifname)
        if pid is not None:
            return False
        await self._spawn(dev)
        return True

    def _log_size(self, ifname: str) -> int:
        # lstat: the size of what is there, never of a symlink's target; 0 for anything odd.
        path = self._log_path(ifname)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.debug("%s: cannot stat %s: %s", ifname, path, e.strerror or e)
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    async def _spawn(self, dev: _Device) -> None:
        ifname = dev.ifname
        path = self._log_path(ifname)
        # Only what it needs: our environment may hold keys (private_key_env variables).
        env = child_environment({"WG_PROCESS_FOREGROUND": "1"})  # stay our child, no daemonizing, no banner
        log_fd = ns_fd = -1
        try:
            what = f"log file {path}"
            os.makedirs(self._run_dir, mode=0o750, exist_ok=True)
            log_fd = _open_log(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            start = os.fstat(log_fd).st_size
            if start > LOG_MAX:  # truncated only once it is known to be our own regular file
                os.ftruncate(log_fd, 0)
                start = 0
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
        self._new_process(dev, process.pid, process)
        dev.started_at = trio.current_time()
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
            with open(_open_log(path, os.O_RDONLY), "rb") as f:
                f.seek(start)
                text = f.read(64 * 1024).decode(errors="replace")
        except OSError:
            return ""
        lines = [m.group(2) if (m := _GO_LINE.fullmatch(ln)) else ln for ln in text.splitlines() if ln.strip()]
        return "; ".join(dict.fromkeys(lines))[-limit:]  # it logs a refused set twice

    async def _stop(self, pid: int, ifname: str, process: trio.Process | None) -> None:
        # Deleting the link is the gentle way (it exits at once); then SIGTERM, then SIGKILL. Signals
        # go through a pidfd, after checking again that PID is ours: it cannot be reused meanwhile.
        fd = _pidfd(pid)
        if fd is None:
            return
        try:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    if not self._is_ours(pid, ifname):
                        break  # ended meanwhile (a zombie has no command line): nothing to signal
                    if sig is signal.SIGTERM and _proc_state(pid) in ("T", "t"):
                        continue  # stopped: it would act on SIGTERM only once continued
                    log.info("wireguard-go pid %d still running: sending %s", pid, sig.name)
                    try:
                        signal.pidfd_send_signal(fd, sig)
                    except ProcessLookupError:
                        pass
                if await _wait_fd(fd, pid, STOP_TIMEOUT):
                    break
            else:
                raise WireGuardError(f"wireguard-go pid {pid} did not exit after SIGKILL")
        finally:
            _close_fd(fd)
        await _collect(process)

    async def _configure(self, settings: DeviceSettings, created: bool) -> Changes:
        ifname = settings.ifname
        current = await self._uapi(uapi.get, ifname)
        lines, changed = uapi.diff_lines(settings, current)
        if lines:
            start = self._log_size(ifname)
            try:
                await self._uapi(uapi.set, ifname, lines)
            except uapi.UapiRefused as e:
                # wireguard-go logs the reason before it replies: make it part of the error.
                tail = self._log_tail(self._log_path(ifname), start)
                raise uapi.UapiRefused(f"{e}; its log: {tail}" if tail else str(e)) from None
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

    async def _wait_trouble(self, dev: _Device, pid: int | None, process: trio.Process | None) -> str:
        """Wait until DEV's process PID exits or is found hung; say what happened."""
        if pid is None:
            return "is not running"
        why = "is hung"

        async def exited() -> None:
            nonlocal why
            if process is not None and process.pid == pid:
                code = await process.wait()
                why = f"killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
            else:
                await _wait_exit(pid)
                why = "exited"
            nursery.cancel_scope.cancel()

        async def hung() -> None:
            await dev.hung.wait()
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(exited)
            nursery.start_soon(hung)
        return why

    async def _watch(self, dev: _Device) -> None:
        backoff = 0.0
        while True:
            pid, process = dev.pid, dev.process
            why = await self._wait_trouble(dev, pid, process)
            async with dev.lock:
                if dev.deleted:
                    return
                if dev.pid != pid:  # apply() already replaced it
                    continue
                if pid is not None and dev.hung.is_set():
                    try:
                        if await self._kill_hung(pid, dev.ifname, process):
                            why = f"did not answer {dev.timeouts} UAPI requests in a row: killed it (SIGKILL)"
                    except WireGuardError as e:
                        why = ""
                        log.error("%s: cannot end hung wireguard-go (pid %d): %s; next try in %gs",
                                  dev.ifname, pid, e, BACKOFF_MAX)
                lived = trio.current_time() - dev.started_at
            if not why:
                await trio.sleep(BACKOFF_MAX)
                continue
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
                self._notify_recreated(dev.ifname)
                break

    def _notify_recreated(self, ifname: str) -> None:
        # A new process means a new TUN device (new ifindex), whoever started it.
        if self._on_recreated is not None:
            try:
                self._on_recreated(ifname)
            except Exception:
                log.exception("%s: on_recreated callback failed", ifname)

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
        except OSError as e:  # e.g. EMFILE, or a symlink planted there: the log can wait
            problem = f"cannot read {path}: {e.strerror or e}"
            log.log(logging.DEBUG if problem == dev.log_problem else logging.WARNING, "%s: %s", dev.ifname, problem)
            dev.log_problem = problem
        else:
            dev.log_problem = None

    def _read_log_file(self, dev: _Device, path: str) -> None:
        try:
            size = os.lstat(path).st_size  # cheap look first: it writes only on errors
            if size == dev.log_pos:
                return
            with open(_open_log(path, os.O_RDONLY), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < dev.log_pos:  # truncated by a restart
                    dev.log_pos = 0
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
        on_recreated: called with the interface name after a dead or hung wireguard-go was replaced
            and reconfigured (the new device has a new ifindex: routes through it must be re-made).

    Leaving the context stops the watching, never the devices (crash-only: the owner deletes
    explicitly). Raises BackendUnavailable when wireguard-go is not installed.
    """
    exe = shutil.which(executable)
    if exe is None:
        raise BackendUnavailable(f"{executable} not found on PATH: {USERSPACE_HINT}")
    async with AsyncExitStack() as stack:
        if rtnl is None:
            rtnl = await link.enter_rtnl(stack, netns)
        async with trio.open_nursery() as nursery:
            try:
                backend = UserspaceBackend(nursery, rtnl, executable=exe, run_dir=run_dir, netns=netns,
                                           socket_dir=socket_dir, on_recreated=on_recreated)
                nursery.start_soon(backend.follow_logs)
                nursery.start_soon(backend.serve_liveness)
                yield backend
            finally:
                nursery.cancel_scope.cancel()
