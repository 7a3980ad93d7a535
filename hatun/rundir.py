"""The run directory (`run_dir`, default /run/hatun): lock, state file, log paths.

hatun runs as root and writes here, so the directory is checked before use: it must be a real
directory (not a symlink), owned by hatun's user and writable by nobody else; otherwise another
user could plant a symlink and make hatun write any file. Files are opened with O_NOFOLLOW.

The state file records what hatun changed on the host (the sysctls it set, with their previous
values) so that a later `hatun run` or `hatun down` can restore them. It is input from disk, and so
hostile: only the sysctl keys hatun itself sets are restored, with plain integer values.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field

log = logging.getLogger("hatun")

STATE_MAX = 64 * 1024  # a state file larger than this is not hatun's
# The only sysctls hatun changes (and so the only ones a state file may ask to restore).
SAVED_SYSCTLS = frozenset({
    "net.ipv4.fib_multipath_hash_policy",
    "net.ipv6.fib_multipath_hash_policy",
    "net.ipv4.conf.all.src_valid_mark",
})
_SYSCTL_VALUE = re.compile(r"-?[0-9]{1,10}")


class RunDirError(Exception):
    """The run directory cannot be used safely; the message says why and what to do."""


class Locked(RunDirError):
    """Another hatun holds the lock of this run directory."""


@dataclass
class State:
    """What state.json holds; every field validated on load."""

    pid: int | None = None
    config: str | None = None
    socket: str | None = None
    sysctls: dict[str, str] = field(default_factory=dict)  # key (dotted) -> value to restore
    sources: list[str] = field(default_factory=list)  # routing.source addresses hatun put on lo


def parse_state(text: str) -> State:
    """Validate the text of a state file (pure). Anything not as hatun writes it is dropped, and a
    sysctl that hatun does not set is never restored. Raises ValueError for text that is not a JSON object."""
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    state = State()
    pid = doc.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 1 << 22:
        state.pid = pid
    for key in ("config", "socket"):
        value = doc.get(key)
        if isinstance(value, str) and value.startswith("/") and len(value) < 4096 and "\0" not in value:
            setattr(state, key, value)
    sources = doc.get("sources")
    if isinstance(sources, list):
        for value in sources[:16]:
            try:
                if not isinstance(value, str):
                    raise TypeError
                state.sources.append(str(ipaddress.ip_address(value)))
            except (TypeError, ValueError):
                log.warning("state file: ignoring source address %.60r", value)
    sysctls = doc.get("sysctls")
    if isinstance(sysctls, dict):
        for key, value in sysctls.items():
            if key in SAVED_SYSCTLS and isinstance(value, str) and _SYSCTL_VALUE.fullmatch(value):
                state.sysctls[key] = value
            else:
                log.warning("state file: ignoring sysctl entry %.60r (hatun sets only %s)", key,
                            ", ".join(sorted(SAVED_SYSCTLS)))
    return state


class RunDir:
    """One hatun's run directory. `prepare()` before writing; `lock()` once per process."""

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def lock_path(self) -> str:
        return os.path.join(self.path, "lock")

    @property
    def state_path(self) -> str:
        return os.path.join(self.path, "state.json")

    @property
    def log_path(self) -> str:
        """Where `hatun up` sends the background hatun's output."""
        return os.path.join(self.path, "hatun.log")

    def prepare(self) -> None:
        """Create the directory (mode 0700) if needed and check that it is safe to write into.
        Raises RunDirError."""
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"run_dir {self.path}: cannot create it: {e.strerror or e}") from None
        self.check()

    def check(self) -> None:
        """Raise RunDirError unless the directory is a real directory of ours, writable only by us."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise RunDirError(f"run_dir {self.path} does not exist") from None
        except OSError as e:
            raise RunDirError(f"run_dir {self.path}: {e.strerror or e}") from None
        if stat.S_ISLNK(st.st_mode):
            raise RunDirError(f"run_dir {self.path} is a symbolic link: give the real directory")
        if not stat.S_ISDIR(st.st_mode):
            raise RunDirError(f"run_dir {self.path} is not a directory")
        if st.st_uid != os.geteuid():
            raise RunDirError(f"run_dir {self.path} belongs to uid {st.st_uid}, not to hatun's user"
                              f" (uid {os.geteuid()}): use a directory of hatun's own")
        if st.st_mode & 0o022:
            raise RunDirError(f"run_dir {self.path} is writable by group or others (mode"
                              f" {stat.S_IMODE(st.st_mode):04o}): run `chmod go-w {self.path}`")

    def _open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)

    def lock(self) -> int:
        """Take the exclusive lock (released by the kernel however the process ends); returns its fd.
        Raises Locked (naming the holder's pid when known) or RunDirError."""
        try:
            fd = self._open(self.lock_path, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise RunDirError(f"{self.lock_path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.load_state().pid
            raise Locked(f"another hatun (pid {pid}) is running with run_dir {self.path}:"
                         " stop it first, or give this one another run_dir") from None
        return fd

    def is_locked(self) -> bool:
        """True while a hatun holds the lock."""
        try:
            fd = self._open(self.lock_path, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def load_state(self) -> State:
        """The validated state file; an empty State when it is missing, unreadable or malformed."""
        try:
            fd = self._open(self.state_path, os.O_RDONLY)
        except FileNotFoundError:
            return State()
        except OSError as e:
            log.warning("state file %s: %s; ignoring it", self.state_path, e.strerror or e)
            return State()
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read(STATE_MAX + 1)
        except OSError as e:
            log.warning("state file %s: %s; ignoring it", self.state_path, e.strerror or e)
            return State()
        if len(data) > STATE_MAX:
            log.warning("state file %s is larger than %d bytes; ignoring it", self.state_path, STATE_MAX)
            return State()
        try:
            return parse_state(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("state file %s is not valid (%s); ignoring it", self.state_path, e)
            return State()

    def save_state(self, state: State) -> None:
        """Write the state file atomically (temporary file, then rename). Raises RunDirError."""
        tmp = self.state_path + ".tmp"
        doc = {"pid": state.pid, "config": state.config, "socket": state.socket, "sysctls": state.sysctls,
               "sources": state.sources}
        try:
            try:
                os.unlink(tmp)  # whatever was there (a planted symlink): never written through
            except FileNotFoundError:
                pass
            fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self.state_path)
        except OSError as e:
            raise RunDirError(f"cannot write {self.state_path}: {e.strerror or e}") from None

    def remove_state(self) -> None:
        try:
            os.unlink(self.state_path)
        except OSError:
            pass
