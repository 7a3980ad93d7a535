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
import logging
import math
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import trio

from hatun.wireguard import USERSPACE_HINT, link, uapi
from hatun.wireguard.goprocess import GoProcesses, read_new_lines, signal_name, wait_exit
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
STABLE_AFTER = 10.0  # a process that lived this long restarts at once; sooner deaths back off
BACKOFF_MIN, BACKOFF_MAX = 0.25, 10.0
LOG_POLL = 2.0  # seconds between looks at the wireguard-go log files (they write only on errors)
HANG_LIMIT = 3  # UAPI requests in a row left unanswered: our wireguard-go is hung and gets replaced...
HANG_AFTER = 2.0  # ...once silent for at least this long (callers with short timeouts are quick to count)
CHECK_INTERVAL = 1.0  # a device nothing talked to for this long is asked by the liveness check
CHECK_TIMEOUT = 1.0  # for liveness and adoption checks (it answers in well under a millisecond)


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

    def answered(self, pid: int | None) -> None:
        """PID answered a UAPI request (whatever it said)."""
        if pid is not None and self.pid == pid:
            self.timeouts = 0
            self.answered_at = trio.current_time()

    def unanswered(self, pid: int | None, started: float) -> None:
        """A UAPI request to PID, sent at STARTED, timed out."""
        # Requests that overlap one already counted (several callers at the same moment) are the
        # same silence: only a request sent after the last counted one gave up counts again. So
        # HANG_LIMIT timeouts really are that many timeouts in a row, whatever the callers.
        if pid is None or self.pid != pid or started < self.timeout_at:
            return
        if self.timeouts == 0:
            self.silent_since = started
        self.timeouts += 1
        self.timeout_at = trio.current_time()
        if self.timeouts >= HANG_LIMIT and self.timeout_at - self.silent_since >= HANG_AFTER and not self.hung.is_set():
            log.warning("%s: wireguard-go (pid %d) left %d UAPI requests in a row unanswered: it is hung",
                        self.ifname, pid, self.timeouts)
            self.hung.set()

    def new_process(self, pid: int, process: trio.Process | None) -> None:
        """PID (PROCESS when it is our child) serves the device now."""
        self.pid, self.process = pid, process
        self.timeouts, self.timeout_at, self.answered_at = 0, -math.inf, -math.inf
        if self.hung.is_set():
            self.hung = trio.Event()


class UserspaceBackend:
    """wireguard-go devices, one per interface, kept running and configured. Implements `Backend`.

    Make one with `open_userspace_backend`.
    """

    name = "userspace"

    def __init__(self, nursery: trio.Nursery, rtnl, *, executable: str, run_dir: str, netns: str | None,
                 socket_dir: str, on_recreated: Callable[[str], object] | None) -> None:
        self._nursery = nursery
        self._rtnl = rtnl
        self._procs = GoProcesses(executable, run_dir, netns, socket_dir)
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
            if self._procs.is_ours(pid, name):  # the directory is global: skip other namespaces' devices
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
            pids = {pid for pid in (dev.pid, serving) if pid and self._procs.is_ours(pid, ifname)}
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
                await self._procs.stop(pid, ifname, dev.process if dev.process and dev.process.pid == pid else None)
            paths = [self._procs.log_path(ifname)]
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
            await self._configure(settings, False, reset_peer=True)

    def generation(self, ifname: str) -> int:
        """How many wireguard-go processes this backend has started for IFNAME (0: none, or adopted)."""
        dev = self._devices.get(ifname)
        return dev.generation if dev else 0

    def pid(self, ifname: str) -> int | None:
        """PID of IFNAME's wireguard-go as last seen, or None."""
        dev = self._devices.get(ifname)
        return dev.pid if dev else None

    def watched(self) -> list[_Device]:
        """The devices whose processes are watched now."""
        return [dev for dev in self._devices.values() if dev.scope is not None]

    def log_path(self, ifname: str) -> str:
        """Where IFNAME's wireguard-go writes its log."""
        return self._procs.log_path(ifname)

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
                dev.unanswered(pid, started)
            raise
        except (uapi.UapiRefused, uapi.UapiProtocolError):  # it did answer
            if dev is not None:
                dev.answered(pid)
            raise
        if dev is not None:
            dev.answered(pid)
        return result

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

    # --- processes ---

    async def _spawn(self, dev: _Device) -> None:
        def started(process: trio.Process, log_start: int) -> None:
            dev.new_process(process.pid, process)
            dev.started_at = trio.current_time()
            if dev.scope is None:
                dev.log_pos = log_start

        await self._procs.start(dev.ifname, started)
        dev.generation += 1

    async def _ensure_running(self, dev: _Device) -> bool:
        """Adopt IFNAME's running wireguard-go or start one. True when a new process was started.

        A stopped or deadlocked wireguard-go still accepts connections (and SO_PEERCRED names it):
        one is adopted only when it answers a `get` within CHECK_TIMEOUT; a silent one is killed
        and replaced.
        """
        pid = await self._procs.owned_pid(dev.ifname)
        if pid is not None and (pid != dev.pid or dev.hung.is_set()):
            try:
                await uapi.get(dev.ifname, socket_dir=self._socket_dir, timeout=CHECK_TIMEOUT)
            except uapi.UapiTimeout:
                log.warning("%s: running wireguard-go (pid %d) accepts UAPI connections but does not answer:"
                            " replacing it", dev.ifname, pid)
                await self._procs.kill_hung(pid, dev.ifname, None)
                pid = None
            except uapi.NotRunning:  # it has just ended
                pid = None
            except WireGuardError:  # it answered, if with an error: alive, let the configure tell
                pass
            if pid is not None:
                log.info("%s: adopted running wireguard-go (pid %d)", dev.ifname, pid)
                dev.new_process(pid, None)
                dev.started_at = -math.inf  # age unknown: treat it as stable
                dev.log_pos = self._procs.log_size(dev.ifname)
        if pid is not None:
            return False
        await self._spawn(dev)
        return True

    async def _configure(self, settings: DeviceSettings, created: bool, *, reset_peer: bool = False) -> Changes:
        ifname = settings.ifname
        current = await self._uapi(uapi.get, ifname)
        lines, changed = uapi.diff_lines(settings, current, reset_peer=reset_peer)
        if lines:
            start = self._procs.log_size(ifname)
            try:
                await self._uapi(uapi.set, ifname, lines)
            except uapi.UapiRefused as e:
                # wireguard-go logs the reason before it replies: make it part of the error.
                tail = self._procs.log_tail(self._procs.log_path(ifname), start)
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
                why = f"killed by {signal_name(-code)}" if code < 0 else f"exited with status {code}"
            else:
                await wait_exit(pid)
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
                        if await self._procs.kill_hung(pid, dev.ifname, process):
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


async def follow_logs(backend: UserspaceBackend) -> None:
    """Forward new lines of every watched wireguard-go's log file to our logger (files, so they
    survive us). One task for all devices: a wakeup per device would cost more than the work."""
    while True:
        await trio.sleep(LOG_POLL)
        for dev in backend.watched():
            path = backend.log_path(dev.ifname)
            try:
                dev.log_pos, lines = read_new_lines(path, dev.log_pos)
            except OSError as e:  # e.g. EMFILE, or a symlink planted there: the log can wait
                problem = f"cannot read {path}: {e.strerror or e}"
                log.log(logging.DEBUG if problem == dev.log_problem else logging.WARNING, "%s: %s", dev.ifname, problem)
                dev.log_problem = problem
                continue
            dev.log_problem = None
            for level, message in lines:
                log.log(level, "%s: wireguard-go: %s", dev.ifname, message)


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
                nursery.start_soon(follow_logs, backend)
                nursery.start_soon(backend.serve_liveness)
                yield backend
            finally:
                nursery.cancel_scope.cancel()
