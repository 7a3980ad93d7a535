"""wireguard-go processes: started with a minimal environment in their own session (and, where
asked, another network namespace), recognised by command line and namespace, stopped and killed
through pidfds (a PID reused meanwhile is never signalled), and their log files: opened without
following symlinks, only when they are regular files of ours.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import stat
import subprocess
from collections.abc import Callable

import trio

from hatun.childenv import child_environment
from hatun.netns import netns_path, setns_preexec
from hatun.wireguard import uapi
from hatun.wireguard.model import WireGuardError

log = logging.getLogger("hatun.wireguard")

START_TIMEOUT = 5.0  # spawn -> UAPI socket answers (measured: ~10 ms)
STOP_TIMEOUT = 2.0  # per step of delete: link removal, SIGTERM, SIGKILL
LOG_MAX = 1 << 20  # a log file bigger than this is truncated when a new wireguard-go starts
# wireguard-go is the data plane: kernel WireGuard does its work in softirq context, ahead of every
# process, and a user-space one starved by batch work delays and drops packets (and its tunnel looks
# dead to the probes). So it runs at a higher priority than ordinary processes (a smaller nice value).
NICE = -10
EXIT_POLL = 0.5  # seconds between looks at a process we cannot get a pidfd for (EMFILE)
# wireguard-go's own line format: "ERROR: (wg0) 2024/01/31 12:00:00 message"
_GO_LINE = re.compile(r"(DEBUG|INFO|ERROR): \(.*?\) \d{4}/\d\d/\d\d \d\d:\d\d:\d\d (.*)")
_GO_LEVEL = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "ERROR": logging.WARNING}


def _netns_path(netns: str | None) -> str:
    return "/proc/self/ns/net" if netns is None else netns_path(netns)


def signal_name(number: int) -> str:
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


def proc_state(pid: int | str) -> str | None:
    """PID's state letter from /proc (R, S, T for stopped, Z ...); None when it is gone or unknown.
    (A thread: "PID/task/TID".)"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def runnable(pid: int) -> bool:
    """Whether any thread of PID is running or waiting for a CPU (state R): busy or starved, as
    opposed to idle (S: waiting for packets) or frozen (T)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(proc_state(f"{pid}/task/{tid}") == "R" for tid in tids[:256])


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


async def collect(process: trio.Process | None) -> None:
    # Our own child, ended: reap it (bounded, in case "ended" was a wrong guess).
    if process is not None:
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()


def _close_fd(fd: int) -> None:
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


def open_log(path: str, flags: int) -> int:
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


async def wait_exit(pid: int, timeout: float = math.inf) -> bool:
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


def read_new_lines(path: str, pos: int, limit: int = 256 * 1024) -> tuple[int, list[tuple[int, str]]]:
    """The whole lines of the log file PATH after byte POS (at most LIMIT bytes), as (log level,
    message), and the position after them (0 first when the file was truncated by a restart). A
    line repeated at once is given once (it logs a refused `set` twice). Raises OSError."""
    try:
        size = os.lstat(path).st_size  # cheap look first: it writes only on errors
        if size == pos:
            return pos, []
        with open(open_log(path, os.O_RDONLY), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < pos:  # truncated by a restart
                pos = 0
            f.seek(pos)
            data = f.read(min(size - pos, limit))
    except FileNotFoundError:
        return pos, []
    end = data.rfind(b"\n") + 1  # whole lines only; the rest comes next time
    if end == 0 and len(data) < limit:
        return pos, []
    lines, previous = [], None
    for line in data[:end or len(data)].decode(errors="replace").splitlines():
        if line == previous or not line.strip():
            continue
        previous = line
        m = _GO_LINE.fullmatch(line)
        lines.append((_GO_LEVEL[m.group(1)], m.group(2)) if m else (logging.INFO, line))
    return pos + (end or len(data)), lines


class GoProcesses:
    """The wireguard-go processes of one backend: started, recognised, stopped, killed; their logs."""

    def __init__(self, executable: str, run_dir: str, netns: str | None, socket_dir: str) -> None:
        self.executable = executable
        self.run_dir = run_dir
        self.netns = netns
        self.socket_dir = socket_dir

    def log_path(self, ifname: str) -> str:
        return os.path.join(self.run_dir, f"wg-{ifname}.log")

    def log_size(self, ifname: str) -> int:
        # lstat: the size of what is there, never of a symlink's target; 0 for anything odd.
        path = self.log_path(ifname)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.debug("%s: cannot stat %s: %s", ifname, path, e.strerror or e)
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    @staticmethod
    def log_tail(path: str, start: int, limit: int = 400) -> str:
        # wireguard-go logs no secrets, so its last words may go into an error message.
        try:
            with open(open_log(path, os.O_RDONLY), "rb") as f:
                f.seek(start)
                text = f.read(64 * 1024).decode(errors="replace")
        except OSError:
            return ""
        lines = [m.group(2) if (m := _GO_LINE.fullmatch(ln)) else ln for ln in text.splitlines() if ln.strip()]
        return "; ".join(dict.fromkeys(lines))[-limit:]  # it logs a refused set twice

    def is_ours(self, pid: int, ifname: str) -> bool:
        """PID runs wireguard-go for IFNAME, in our network namespace."""
        argv = _cmdline(pid)
        names = {"wireguard-go", os.path.basename(self.executable)}
        return (len(argv) >= 2 and os.path.basename(argv[0]) in names and argv[-1] == ifname
                and _same_file(f"/proc/{pid}/ns/net", _netns_path(self.netns)))

    async def owned_pid(self, ifname: str) -> int | None:
        """PID of the wireguard-go that answers for IFNAME, if it is ours to manage; None if nothing answers.

        Raises WireGuardError when something else answers (e.g. the same name in another namespace:
        the socket directory is global).
        """
        try:
            pid = await uapi.server_pid(ifname, socket_dir=self.socket_dir)
        except uapi.NotRunning:
            return None
        if not self.is_ours(pid, ifname):
            raise WireGuardError(
                f"the UAPI socket of {ifname} is served by PID {pid} ({' '.join(_cmdline(pid))[:80]!r}),"
                " not a wireguard-go for it in this network namespace; use another interface name")
        return pid

    async def start(self, ifname: str, started: Callable[[trio.Process, int], None]) -> trio.Process:
        """Start wireguard-go for IFNAME and wait until its UAPI socket answers, served by this very
        process. STARTED(process, log_start) is called as soon as the process exists (before the
        wait), with where its output begins in the log file. Raises WireGuardError, with the end of
        its log when it exited at start."""
        path = self.log_path(ifname)
        # Only what it needs: our environment may hold keys (private_key_env variables).
        env = child_environment({"WG_PROCESS_FOREGROUND": "1"})  # stay our child, no daemonizing, no banner
        log_fd = ns_fd = -1
        try:
            what = f"log file {path}"
            os.makedirs(self.run_dir, mode=0o750, exist_ok=True)
            log_fd = open_log(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            start = os.fstat(log_fd).st_size
            if start > LOG_MAX:  # truncated only once it is known to be our own regular file
                os.ftruncate(log_fd, 0)
                start = 0
            if self.netns:
                what = f"network namespace {self.netns}"
                ns_fd = os.open(_netns_path(self.netns), os.O_RDONLY | os.O_CLOEXEC)
            what = self.executable
            enter = setns_preexec(ns_fd) if ns_fd >= 0 else None

            def prepare() -> None:  # in the child, before exec: what it execs inherits both
                if enter is not None:
                    enter()
                try:
                    os.setpriority(os.PRIO_PROCESS, 0, NICE)
                except OSError:
                    pass  # no CAP_SYS_NICE: it runs at our own priority

            process = await trio.lowlevel.open_process(
                [self.executable, ifname], stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=env,
                start_new_session=True, preexec_fn=prepare)
        except (OSError, subprocess.SubprocessError) as e:
            raise WireGuardError(f"{ifname}: cannot start wireguard-go: {what}: {getattr(e, 'strerror', None) or e}"
                                 ) from None
        finally:
            for fd in (ns_fd, log_fd):
                if fd >= 0:
                    os.close(fd)
        started(process, start)
        log.info("%s: started wireguard-go (pid %d)", ifname, process.pid)

        with trio.move_on_after(START_TIMEOUT):
            while process.poll() is None:
                try:
                    pid = await uapi.server_pid(ifname, socket_dir=self.socket_dir, timeout=0.5)
                except uapi.NotRunning:
                    await trio.sleep(0.005)
                    continue
                if pid != process.pid:
                    raise WireGuardError(f"{ifname}: PID {pid} took the UAPI socket of our wireguard-go")
                return process
            tail = self.log_tail(path, start)
            raise WireGuardError(f"{ifname}: wireguard-go exited at start with status {process.returncode}"
                                 + (f": {tail}" if tail else ""))
        process.kill()  # our own child, stuck before serving: nothing to adopt later
        await process.wait()
        raise WireGuardError(f"{ifname}: wireguard-go did not open its UAPI socket within {START_TIMEOUT:g}s")

    async def stop(self, pid: int, ifname: str, process: trio.Process | None) -> None:
        # Deleting the link is the gentle way (it exits at once); then SIGTERM, then SIGKILL. Signals
        # go through a pidfd, after checking again that PID is ours: it cannot be reused meanwhile.
        fd = _pidfd(pid)
        if fd is None:
            return
        try:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    if not self.is_ours(pid, ifname):
                        break  # ended meanwhile (a zombie has no command line): nothing to signal
                    if sig is signal.SIGTERM and proc_state(pid) in ("T", "t"):
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
        await collect(process)

    async def kill_hung(self, pid: int, ifname: str, process: trio.Process | None) -> bool:
        """SIGKILL PID if it still runs wireguard-go for IFNAME in our namespace (a stopped process
        does not act on SIGTERM until continued) and wait for its end. True when killed, False when
        it had gone (or is no longer ours). Raises WireGuardError when it cannot be killed."""
        fd = _pidfd(pid)
        if fd is None:
            return False
        try:
            # The signal goes through the pidfd: if PID ended and its number was reused after this
            # check, it reaches nobody rather than the new process.
            if not self.is_ours(pid, ifname):
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
        await collect(process if process is not None and process.pid == pid else None)
        return killed
