"""A throwaway systemd machine for tests: `systemd-nspawn --boot` of a small OS tree made in a
temporary directory, with the host's own /usr (read-only) and systemd as the container's PID 1.

The tree is only what /usr does not hold: a few files in /etc (identity, users, a default target,
a few masked units that need a console or D-Bus), empty /var, /run, /tmp, and the merged-/usr
links (/bin -> usr/bin ...). Nothing is downloaded; a boot takes about a second here.

No systemd runs on the host (it is not PID 1 here), so there is no machined to register with:
`--register=no --keep-unit`. The container is then placed in cgroups of its own, made per machine
before nspawn starts (otherwise nspawn puts its payload at a fixed path of the caller's cgroup,
shared by every container started from there). Where the host has a cgroup2 hierarchy (here beside
the v1 ones), the container runs on cgroup v2 alone, as current distributions do: systemd then
enforces a unit's DevicePolicy= with BPF, which the read-only v1 devices controller of a container
cannot do.

Every wait is bounded. `terminate()` removes the machine whatever state it is in: an orderly
poweroff first (SIGTERM to the nspawn we started, which forwards SIGRTMIN+3), then SIGKILL to the
container's init through a pidfd taken at boot (which ends every process in its PID namespace) and
to our nspawn; then its cgroups and its tree.
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.nsutil import RUN_ID

NSPAWN = "systemd-nspawn"
INIT = "/usr/lib/systemd/systemd"
BOOT_TIMEOUT = 90.0  # about 1-2 s here; far more on an emulated CPU (callers pass their own)
COMMAND_TIMEOUT = 60.0
# An orderly poweroff stops every unit; hatun's unit may take up to its TimeoutStopSec (30 s).
POWEROFF_TIMEOUT = 45.0
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
# Units that would wait for a console or need D-Bus (systemctl and journalctl need neither).
MASKED = ("getty.target", "console-getty.service", "systemd-logind.service", "dbus.socket", "dbus.service",
          "systemd-firstboot.service")
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

_serial = itertools.count(1)


class ContainerError(RuntimeError):
    """The container could not be made, booted or removed; the message says why (console log tail)."""


def unavailable() -> str | None:
    """Why no systemd container can boot here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn)"
    if shutil.which(NSPAWN) is None:
        return "systemd-nspawn is not installed (Debian package systemd-container; scripts/setup.sh installs it)"
    if shutil.which("nsenter") is None:
        return "nsenter (util-linux) is not installed"
    if not os.access(INIT, os.X_OK):
        return f"no systemd at {INIT} to boot in the container (Debian package systemd)"
    for name in ("bin", "sbin", "lib"):
        if not os.path.islink(f"/{name}"):
            return f"/{name} is not a link into /usr (no merged /usr): the host's /usr alone cannot be booted"
    if not _cgroup_mounts():
        return "no cgroup hierarchy (cgroup2 or the v1 name=systemd one) is mounted"
    return None


# ------------------------------------------------------------------ cgroups


def _cgroup_mounts() -> dict[str, str]:
    """Mount points of the hierarchies systemd uses: {"v2": path, "name=systemd": path} (those mounted)."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            fstype, _, options = (after.split() + ["", "", ""])[:3]
            mount_point = before.split()[4]
            if fstype == "cgroup2":
                found.setdefault("v2", mount_point)
            elif fstype == "cgroup" and "name=systemd" in options.split(","):
                found.setdefault("name=systemd", mount_point)
    return found


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup in each of those hierarchies."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "":
                own["v2"] = path
            elif "name=systemd" in controllers.split(","):
                own["name=systemd"] = path
    return own


class Cgroups:
    """A cgroup named NAME under ours in each hierarchy systemd uses, for one container."""

    def __init__(self, name: str) -> None:
        mounts, own = _cgroup_mounts(), _own_cgroups()
        self.dirs = [Path(mounts[h] + own[h].rstrip("/")) / name for h in mounts if h in own]
        if not self.dirs:
            raise ContainerError("this process is in no cgroup of a hierarchy systemd uses")
        for d in self.dirs:
            d.mkdir()

    @property
    def unified(self) -> bool:
        """The host has a cgroup2 hierarchy (alone or beside v1 ones)."""
        return "v2" in _cgroup_mounts()

    def wrap(self, cmd: list[str]) -> list[str]:
        """CMD started by a shell that first moves itself into these cgroups (no preexec_fn)."""
        moves = "; ".join(f"echo $$ > '{d}/cgroup.procs' || exit 125" for d in self.dirs)
        return ["/bin/sh", "-c", f'{moves}; exec "$@"', "sh", *cmd]

    def pids(self) -> list[int]:
        pids: set[int] = set()
        for d in self.dirs:
            for sub, _, files in os.walk(d):
                if "cgroup.procs" in files:
                    try:
                        pids.update(int(p) for p in Path(sub, "cgroup.procs").read_text().split())
                    except OSError:
                        pass
        return sorted(pids)

    def remove(self, timeout: float = 10.0) -> None:
        """Remove the cgroups (deepest first). Processes still in them are the container's: killed.
        Raises ContainerError when they cannot be removed within TIMEOUT."""
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            busy = []
            for d in self.dirs:
                if not d.exists():
                    continue
                for sub, _, _ in sorted(os.walk(d), key=lambda w: -len(w[0])):
                    try:
                        os.rmdir(sub)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        busy.append(f"{sub}: {e.strerror}")
            if not busy:
                return
            if time.monotonic() > deadline:
                raise ContainerError(f"cannot remove the container's cgroups: {'; '.join(busy)}")
            time.sleep(0.1)


# ------------------------------------------------------------------ the tree


def make_tree(root: Path) -> None:
    """A minimal OS tree at ROOT that boots with the host's /usr bound onto ROOT/usr."""
    for d in ("etc/systemd/system", "var/log/journal", "var/tmp", "var/lib", "run", "tmp", "opt", "root",
              "home", "proc", "sys", "dev", "usr", "srv", "mnt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "var/tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    for name in MERGED_USR:
        host = Path("/", name)
        if host.is_symlink():
            (root / name).symlink_to(os.readlink(host))
    etc = root / "etc"
    # nspawn looks for os-release before /usr is bound: a copy, not a link into /usr.
    shutil.copyfile("/usr/lib/os-release", etc / "os-release")
    (etc / "machine-id").write_text("")  # empty: systemd makes a transient one per boot
    for name in ("passwd", "group", "nsswitch.conf"):
        if Path("/etc", name).is_file():
            shutil.copyfile(Path("/etc", name), etc / name)
    units = etc / "systemd/system"
    (units / "default.target").symlink_to("/usr/lib/systemd/system/multi-user.target")
    for unit in MASKED:
        (units / unit).symlink_to("/dev/null")


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        return [p for p in (line.split()[4] for line in f) if p == prefix[:-1] or p.startswith(prefix)]


def _alive(fd: int) -> bool:
    """The process of pidfd FD has not exited."""
    return not select.select([fd], [], [], 0)[0]


def _wait_fd(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


# ------------------------------------------------------------------ the machine


class Container:
    """One systemd machine: `boot()`, `run()` commands in it, `terminate()` it (idempotent)."""

    def __init__(self, label: str = "c") -> None:
        self.name = f"hatun-t{RUN_ID}-{next(_serial)}-{label}"[:64]
        self.dir = Path(tempfile.mkdtemp(prefix=f"hatun-nspawn-{RUN_ID}-"))
        self.root = self.dir / "root"
        self.log_path = self.dir / "console.log"
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None  # host PID of the container's init
        self._leader_fd = -1
        self.cgroups: Cgroups | None = None
        self.boot_seconds: float | None = None
        make_tree(self.root)

    # -------------------------------------------------------------- boot and stop

    def boot(self, *, netns: str | None = None, binds: dict[str, str] | None = None,
             binds_ro: dict[str, str] | None = None, timeout: float = BOOT_TIMEOUT) -> Container:
        """Boot the machine and return once systemd reports it running (bounded by TIMEOUT).

        netns: path of a network namespace to join (None: a private one, with no link at all).
        binds, binds_ro: host path -> container path, bound read-write / read-only.
        Raises ContainerError (with the console's last lines) when it does not come up.
        """
        if self.proc is not None:
            raise ContainerError(f"{self.name} was booted already")
        network = [f"--network-namespace-path={netns}"] if netns else ["--private-network"]
        mounts = [f"--bind={h}:{c}" for h, c in (binds or {}).items()]
        mounts += [f"--bind-ro={h}:{c}" for h, c in (binds_ro or {}).items()]
        cmd = [NSPAWN, "--quiet", "--boot", f"--directory={self.root}", f"--machine={self.name}",
               "--register=no", "--keep-unit", "--settings=no", "--link-journal=no", "--resolv-conf=off",
               "--timezone=off", "--console=pipe", "--bind-ro=/usr", *mounts, *network,
               # nspawn grants CAP_NET_ADMIN only with a network of the container's own making.
               "--capability=CAP_NET_ADMIN",
               # bpf(): nspawn's seccomp filter refuses it by default, and without it the container's
               # systemd cannot enforce DevicePolicy= (cgroup v2 device programs): it would ignore it.
               "--system-call-filter=bpf"]
        self.cgroups = Cgroups(self.name)
        # /proc/sys/net writable (the rest of /proc/sys stays read-only): hatun sets net.* sysctls.
        env = {**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
        if self.cgroups.unified:
            env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cgroups.wrap(cmd), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = started + timeout
        state = "no init yet"
        while True:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self.proc.returncode} while booting:"
                                     f"\n{self.console()[-3000:]}")
            if self.leader is None:
                self._find_leader()
            if self.leader is not None:
                res = self.run("systemctl", "is-system-running", check=False, timeout=max(1.0, deadline - time.monotonic()))
                state = res.stdout.strip() or res.stderr.strip()
                if state in ("running", "degraded"):
                    break
            if time.monotonic() > deadline:
                raise ContainerError(f"{self.name} did not finish booting within {timeout:g} s (last state:"
                                     f" {state}):\n{self.console()[-3000:]}")
            time.sleep(0.1)
        self.boot_seconds = time.monotonic() - started
        return self

    def _find_leader(self) -> None:
        # The container's init is a child of nspawn running systemd; its pidfd guards every signal
        # sent to it later against a reused PID.
        assert self.proc is not None
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    after = f.read().rsplit(")", 1)[1].split()
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue
            if int(after[1]) == self.proc.pid and comm == "systemd":
                try:
                    self._leader_fd = os.pidfd_open(int(entry))
                except ProcessLookupError:
                    return
                self.leader = int(entry)
                return

    def terminate(self) -> None:
        """Power the machine off (bounded), kill what is left, remove its cgroups and tree. Idempotent."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # nspawn: SIGRTMIN+3 to the container, a clean poweroff
                try:
                    self.proc.wait(POWEROFF_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass
            if self._leader_fd >= 0:
                if _alive(self._leader_fd):
                    signal.pidfd_send_signal(self._leader_fd, signal.SIGKILL)  # its whole PID namespace
                    _wait_fd(self._leader_fd, 10)
                os.close(self._leader_fd)
                self._leader_fd = -1
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            if self.cgroups is not None:
                self.cgroups.remove()
                self.cgroups = None
            if self.dir.exists():
                left = _mounts_under(self.dir)
                if left:  # never delete through a mount (e.g. the host's /usr)
                    raise ContainerError(f"{self.dir} still has mounts, not removed: {left}")
                shutil.rmtree(self.dir)

    # -------------------------------------------------------------- inside

    def run(self, *cmd: str, check: bool = True, timeout: float = COMMAND_TIMEOUT, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run CMD inside the machine (all its namespaces; text output captured). With CHECK, a
        failure raises ContainerError with its output."""
        if self.leader is None:
            raise ContainerError(f"{self.name} is not running")
        base = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0",
                "TERM": "dumb"}
        res = subprocess.run([shutil.which("nsenter") or "nsenter", f"--target={self.leader}", "--all", "--", *cmd],
                             capture_output=True, text=True, timeout=timeout, input=input,
                             env={**base, **(env or {})})
        if check and res.returncode != 0:
            raise ContainerError(f"in {self.name}: {' '.join(cmd)}: exit {res.returncode}:\n{res.stdout}{res.stderr}")
        return res

    def systemctl(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args, check=False, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show UNIT -p PROPS` as a dict."""
        res = self.run("systemctl", "show", unit, "-p", ",".join(props))
        return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", "-b", *args).stdout

    def host_path(self, path: str) -> str:
        """Where the host reaches PATH of the running machine (also its /run, a tmpfs of its own)."""
        return f"/proc/{self.leader}/root{path}"

    def host_pid(self, pid: int) -> int | None:
        """The host's PID of the machine's process PID (None: no such process)."""
        ns = os.readlink(f"/proc/{self.leader}/ns/pid")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                    continue
                nspid = next(line for line in Path(f"/proc/{entry}/status").read_text().splitlines()
                             if line.startswith("NSpid:"))
            except (OSError, StopIteration):
                continue
            if int(nspid.split()[-1]) == pid:
                return int(entry)
        return None

    def console(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
