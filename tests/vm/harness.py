"""Run a command inside a small VM that boots a real Debian kernel with the WireGuard module.

The dev and CI machines have no WireGuard module, and KVM does not work there (nested
virtualisation: "KVM internal error"), so this boots a Debian kernel under QEMU's software
emulation with virtme-ng (`vng`). The guest sees the host's whole filesystem read-only over 9p, so
the host's Python, its venv and the checkout are usable inside; /tmp, /etc, /var, /usr, /opt,
/home and /srv are writable overlays whose writes stay in guest RAM and vanish with the VM.

How a run works: the command is written to a script in a fresh run directory on the host, which
the guest gets read-write (`--rwdir`). Inside, the script's output and exit status are written to
files there, and the host reads them after the VM has powered off. vng's own exit status and
stdout are NOT used: where the host has no udev (containers, our CI), the guest finds no
/dev/virtio-ports/* links, falls back to the serial console, and vng exits 255 whatever the
command returned.

Everything `tests/vm/setup.sh` installs is what this module needs. Typical use from a host test:

    ok, why = vm_available()
    if not ok:
        pytest.skip(why)
    res = run_in_vm("python -m pytest -m vm_inside tests/test_x.py", timeout=900, cwd=REPO,
                    stream=sys.stderr)
    assert res.returncode == 0, res.output

Costs measured on the shared 2-core dev machine (software emulation: CPU-bound work ~20-30x
slower than on the host): boot to the first command 6-10 s; `true` end to end 12-20 s; one Python
process importing trio, pyroute2, pydantic, pytest and cryptography 20-35 s; pytest with two
trivial tests 45-80 s; the one `vm` test of tests/test_kernel_backend.py 120 s. With 2 vCPUs the
pytest run took 1.5x as long as with 1 (115-133 s against 76-81 s, same load), probably
because cross-vCPU synchronisation (TLB flushes on every exec/mmap) is costly under emulation;
hence cpus=1 by default. Run one pytest process per VM, not one VM per test.
"""

from __future__ import annotations

import codecs
import fcntl
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, TextIO

#: Where setup.sh puts extracted kernel packages: VM_DIR/kernel/<version>/{boot,lib/modules}.
#: Not under /var/cache: the guest mounts an empty tmpfs there (see GUEST_HIDDEN).
VM_DIR = Path(os.environ.get("HATUN_VM_DIR", "/var/lib/hatun-vm"))

#: The virtme-ng version setup.sh installs and this module was checked against.
VIRTME_NG_VERSION = "1.42"

#: Host paths the guest does not see: virtme-ng-init mounts empty tmpfs (or its own) over them.
GUEST_HIDDEN = (
    "/var/cache", "/var/tmp", "/var/log", "/var/lib/private", "/var/lib/apt", "/var/lib/sudo",
    "/var/lib/machines", "/var/lib/portables", "/var/spool/rsyslog", "/var/lib/snapd/cookie",
    "/run", "/dev", "/proc", "/sys",
)

#: Largest guest memory allowed: the machines are shared (2 cores, other work running).
MAX_MEMORY_MIB = 1536

# Only one VM at a time on a machine, whoever starts it: runs wait for this lock.
LOCK_PATH = Path(os.environ.get("HATUN_VM_LOCK", "/tmp/hatun-vm.lock"))

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")

log = logging.getLogger(__name__)


class VMError(RuntimeError):
    """The VM could not run the command (did not start, crashed, reported no exit status)."""

    def __init__(self, message: str, *, output: str = "", console: str = "", rundir: str = "") -> None:
        super().__init__(message)
        self.output = output
        self.console = console
        self.rundir = rundir  # the run's host directory (removed unless HATUN_VM_KEEP is set)


class VMTimeout(VMError):
    """The run did not finish within its timeout; the VM was killed (output is what came so far)."""


@dataclass(frozen=True)
class Kernel:
    image: Path  # the vmlinuz file given to vng --run
    version: str  # uname -r inside the guest
    moddir: Path  # its modules directory on the host


@dataclass(frozen=True)
class VMResult:
    """The outcome of run_in_vm: like subprocess.CompletedProcess with stderr merged into stdout."""

    command: str
    returncode: int  # the command's exit status inside the guest
    output: str  # the command's stdout and stderr, interleaved
    console: str  # vng's and the guest kernel's console log (for diagnosing the VM itself)
    seconds: float  # wall time, boot and power-off included

    @property
    def stdout(self) -> str:
        return self.output

    def check_returncode(self) -> None:
        """Raise subprocess.CalledProcessError if the command failed inside the guest."""
        if self.returncode != 0:
            raise subprocess.CalledProcessError(self.returncode, self.command, self.output)


# --- finding the tools and the kernel ----------------------------------------------------------


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=path)


def find_vng() -> Path | None:
    """The vng command: $HATUN_VNG, else next to this Python (its venv), else on PATH."""
    if os.environ.get("HATUN_VNG"):
        return Path(os.environ["HATUN_VNG"])
    # Not resolved: a venv's python is a symlink to the base interpreter, vng sits beside the link.
    beside = Path(sys.executable).parent / "vng"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("vng")
    return Path(found) if found else None


def _version_key(version: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", version)]


def _hidden_in_guest(path: Path) -> str | None:
    for prefix in GUEST_HIDDEN:
        if path == Path(prefix) or Path(prefix) in path.parents:
            return prefix
    return None


def _has_wireguard(moddir: Path) -> bool:
    # Debian 12 ships plain .ko files; newer kernels compress them (.ko.xz, .ko.zst).
    return any((moddir / "kernel" / "drivers" / "net" / "wireguard").glob("wireguard.ko*"))


def _kernel_from_image(image: Path) -> Kernel | None:
    match = re.fullmatch(r"vmlinuz-(.+)", image.name)
    if not match:
        return None
    version = match.group(1)
    # vng's rule: the modules are in <the first ancestor holding lib/modules>/lib/modules/<version>.
    for root in image.parents:
        moddir = root / "lib" / "modules" / version
        if moddir.is_dir():
            return Kernel(image=image, version=version, moddir=moddir)
    return None


def find_kernel() -> tuple[Kernel | None, str]:
    """The kernel to boot, newest first: $HATUN_VM_KERNEL (a vmlinuz path), then VM_DIR/kernel,
    then /boot. Only kernels whose modules include wireguard count. Returns (kernel, reason)."""
    explicit = os.environ.get("HATUN_VM_KERNEL")
    if explicit:
        candidates = [Path(explicit)]
    else:
        candidates = []
        for pattern_root, pattern in ((VM_DIR / "kernel", "*/boot/vmlinuz-*"), (Path("/boot"), "vmlinuz-*")):
            found = sorted(pattern_root.glob(pattern), key=lambda p: _version_key(p.name), reverse=True)
            candidates.extend(found)
    if not candidates:
        return None, f"no kernel in {VM_DIR}/kernel or /boot: run tests/vm/setup.sh"
    problems = []
    for image in candidates:
        kernel = _kernel_from_image(image)
        if kernel is None:
            problems.append(f"{image}: no lib/modules/<version> beside it")
        elif not _has_wireguard(kernel.moddir):
            problems.append(f"{image}: its modules have no wireguard.ko")
        elif hidden := _hidden_in_guest(kernel.moddir):
            problems.append(f"{image}: its modules are under {hidden}, which the guest does not see")
        elif not os.access(image, os.R_OK):
            problems.append(f"{image}: not readable")
        else:
            return kernel, f"kernel {kernel.version} ({image})"
    return None, "no usable kernel: " + "; ".join(problems)


def vm_available() -> tuple[bool, str]:
    """Whether run_in_vm can work here, and why not (or what it will boot). Cheap: no VM starts."""
    if os.environ.get("HATUN_IN_VM"):
        return False, "already inside the test VM (no nested VMs)"
    if os.uname().machine != "x86_64":
        return False, f"the VM harness supports x86_64 hosts only (this is {os.uname().machine})"
    vng = find_vng()
    if vng is None:
        return False, "vng (PyPI virtme-ng) not found beside this Python or on PATH: run tests/vm/setup.sh"
    if not os.access(vng, os.X_OK):
        return False, f"{vng} (HATUN_VNG) is not an executable file"
    if not (vng.parent / "virtme-run").exists() and not shutil.which("virtme-run"):
        return False, f"virtme-run (part of virtme-ng) is neither beside {vng} nor on PATH"
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static"),
                          ("modprobe", "kmod"), ("depmod", "kmod")):
        if _which(tool) is None:
            return False, f"{tool} not found (Debian package {package}): run tests/vm/setup.sh"
    kernel, why = find_kernel()
    if kernel is None:
        return False, why
    return True, f"{why}, {vng}"


# --- running a command -------------------------------------------------------------------------


def _memory_mib(memory: str) -> int:
    match = re.fullmatch(r"(\d+)([MG]?)", memory.strip().upper())
    if not match:
        raise ValueError(f"memory: expected like '1G' or '768M', got {memory!r}")
    value, unit = int(match.group(1)), match.group(2)
    return value * 1024 if unit == "G" else value


def _guest_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {
        # The guest's init sets a PATH without the venv; the venv's python comes first here.
        "PATH": os.pathsep.join([venv_bin, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
                                 "/sbin", "/bin"]),
        "HOME": "/root",
        "LANG": "C.UTF-8",
        # /tmp in the guest is a writable overlay in guest RAM; the checkout is read-only.
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        # Hypothesis keeps its example database in the cwd by default: the read-only checkout.
        "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis",
        # pytest's cache would go to the read-only checkout (a warning at the end of every run).
        "PYTEST_ADDOPTS": "-p no:cacheprovider",
        "HATUN_IN_VM": "1",
    }
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    env.update(extra or {})
    return env


def _write_scripts(rundir: Path, command: str, cwd: Path, env: Mapping[str, str]) -> Path:
    (rundir / "command.sh").write_text(command + "\n")
    lines = ["# Written by tests/vm/harness.py; runs inside the VM (as root, /bin/sh)."]
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"env: not a variable name: {key!r}")
        lines.append(f"export {key}={shlex.quote(value)}")
    d = shlex.quote(str(rundir))
    lines += [
        f"(cd {shlex.quote(str(cwd))} && exec /bin/sh {d}/command.sh) </dev/null >{d}/output 2>&1",
        # Written then renamed: the host never reads a half-written status.
        f"echo $? >{d}/status.tmp && mv {d}/status.tmp {d}/status",
    ]
    run_sh = rundir / "run.sh"
    run_sh.write_text("\n".join(lines) + "\n")
    return run_sh


def _group_members(pgid: int) -> list[int]:
    """PIDs of live processes in process group PGID (from /proc; zombies excluded)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _leader_exited(pid: int) -> bool:
    # WNOWAIT: leave the leader a zombie, so its PID (the group's id) cannot be reused while we
    # may still signal the group.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _end_group(proc: subprocess.Popen, grace: float) -> list[int]:
    """End every process of the VM's process group (vng, virtme-run, qemu), then reap vng.
    Returns the PIDs that survived (empty when all is clean)."""
    pgid = proc.pid  # start_new_session: vng leads its own group, qemu is in it
    if not _leader_exited(pgid):
        _signal_group(pgid, signal.SIGTERM)  # qemu exits cleanly on SIGTERM
        deadline = time.monotonic() + grace
        while not _leader_exited(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    survivors = [p for p in _group_members(pgid) if p != pgid]
    while (survivors or not _leader_exited(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
        survivors = [p for p in _group_members(pgid) if p != pgid]
    try:
        proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        survivors.append(pgid)
    return survivors


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class _Follower:
    """Copies what the guest appends to its output file to a stream, as it arrives."""

    def __init__(self, path: Path, stream: TextIO | None) -> None:
        self.path, self.stream, self.offset = path, stream, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def pump(self) -> None:
        if self.stream is None:
            return
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read(1 << 20)
        except FileNotFoundError:
            return
        if data:
            self.offset += len(data)
            self.stream.write(self.decoder.decode(data))
            self.stream.flush()


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _lock(deadline: float):
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise VMTimeout(f"timed out waiting for another VM to finish (lock {LOCK_PATH})") from None
            time.sleep(0.5)


def run_in_vm(
    command: str,
    *,
    timeout: float,
    cpus: int = 1,
    memory: str = "1G",
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> VMResult:
    """Boot the VM, run COMMAND there with /bin/sh as root, power off, return its result.

    command: shell text, run in CWD (default: this process's cwd) with no stdin and this
        environment (see _guest_env): the host venv's bin first on PATH, TMPDIR=/tmp (a writable
        overlay in guest RAM), PYTEST_ADDOPTS="-p no:cacheprovider", HYPOTHESIS_STORAGE_DIRECTORY
        under /tmp, HATUN_IN_VM=1 (nothing else of the host's environment).
    timeout: seconds for everything (waiting for another VM, boot, command, power-off). On expiry
        the VM's processes are killed (by process group) and VMTimeout is raised.
    cpus, memory: guest size (memory at most 1.5G: the machines are shared).
    env: more variables for the command (e.g. PYTEST_ADDOPTS).
    stream: if given, the command's output is copied there while it runs.

    Returns a VMResult whose returncode is the command's own exit status. Raises VMError when the
    VM is unavailable or ended without reporting one (crash, panic), VMTimeout on timeout. No
    process started here outlives the call.
    """
    ok, why = vm_available()
    if not ok:
        raise VMError(f"the VM cannot run here: {why}")
    if _memory_mib(memory) > MAX_MEMORY_MIB:
        raise ValueError(f"memory: at most {MAX_MEMORY_MIB}M on these shared machines, got {memory!r}")
    if cpus < 1:
        raise ValueError(f"cpus: at least 1, got {cpus}")
    kernel, _ = find_kernel()
    assert kernel is not None
    vng = find_vng()
    assert vng is not None
    cwd = Path(cwd or os.getcwd()).absolute()
    start = time.monotonic()
    deadline = start + timeout

    # The run directory is shared read-write with the guest, at the same path; it must be
    # somewhere the guest sees (e.g. not /var/tmp), so /tmp unless told otherwise.
    rundir = Path(tempfile.mkdtemp(prefix="hatun-vm-", dir=os.environ.get("HATUN_VM_RUNDIR", "/tmp")))
    keep = bool(os.environ.get("HATUN_VM_KEEP"))
    lock_fd = None
    try:
        if hidden := _hidden_in_guest(rundir):
            raise VMError(f"run directory {rundir} is under {hidden}, which the guest does not see",
                          rundir=str(rundir))
        run_sh = _write_scripts(rundir, command, cwd, _guest_env(env))
        host_tmp = rundir / "host-tmp"  # vng's own temporary files, removed with the run
        host_tmp.mkdir()
        argv = [
            str(vng), "--run", str(kernel.image),
            "--disable-kvm",  # KVM fails under nested virtualisation ("KVM internal error")
            # Debian's qemu ships the old C virtiofsd, which vng tries and fails with for ~3 s
            # per exported directory before it falls back to 9p anyway.
            "--force-9p",
            "--verbose",  # the kernel log goes to the console file: the only clue when boot fails
            "--cpus", str(cpus), "--memory", memory,
            "--rwdir", str(rundir),
            "--exec", f"/bin/sh {shlex.quote(str(run_sh))}",
        ]
        host_env = dict(os.environ)
        # vng runs `virtme-run` through the shell: it must be on PATH, as must modprobe/depmod.
        host_env["PATH"] = os.pathsep.join([str(vng.parent), host_env.get("PATH", ""), *_SBIN])
        host_env["TMPDIR"] = str(host_tmp)
        lock_fd = _lock(deadline)
        follower = _Follower(rundir / "output", stream)
        with (rundir / "console.log").open("wb") as console:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                    cwd=rundir, env=host_env, start_new_session=True)
            timed_out = False
            try:
                while not _leader_exited(proc.pid):
                    if time.monotonic() >= deadline:
                        timed_out = True
                        break
                    follower.pump()
                    time.sleep(0.25)
            finally:
                survivors = _end_group(proc, grace=5)
        follower.pump()
        seconds = time.monotonic() - start
        output, console_log = _read(rundir / "output"), _read(rundir / "console.log")
        if survivors:
            raise VMError(f"processes of the VM run survived SIGKILL: {survivors}", output=output,
                          console=console_log, rundir=str(rundir))
        if timed_out:
            raise VMTimeout(f"VM run timed out after {timeout:.0f} s (killed): {command!r}\n"
                            f"--- output so far ---\n{output[-4000:]}\n--- console tail ---\n"
                            f"{console_log[-3000:]}", output=output, console=console_log, rundir=str(rundir))
        status = _read(rundir / "status").strip()
        if not status.lstrip("-").isdigit():
            raise VMError(f"the VM ended without reporting the command's exit status (vng exit "
                          f"{proc.returncode}, {seconds:.0f} s): {command!r}\n--- output ---\n"
                          f"{output[-4000:]}\n--- console tail ---\n{console_log[-4000:]}",
                          output=output, console=console_log, rundir=str(rundir))
        return VMResult(command=command, returncode=int(status), output=output, console=console_log,
                        seconds=seconds)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        if keep:
            log.warning("HATUN_VM_KEEP: run directory kept at %s", rundir)
        else:
            shutil.rmtree(rundir, ignore_errors=True)
