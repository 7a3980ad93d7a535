"""hatun installed as a user would, in a systemd container (tests/systemd/container.py), its unit
(config/hatun.service, byte for byte) running on a lab's runner namespace.

The installation is made once: Debian's /usr/bin/python3 makes a virtual environment at
/opt/hatun/venv inside a container that has no network at all, pip installs hatun from the
session's wheels only, and /usr/local/bin/hatun links to it. Its two directories live on the host
and are bound read-only into every later container, at the same paths (a venv's scripts name its
interpreter by absolute path).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hatun.control import ControlError, request
from hatun.lab import topology
from hatun.lab.topology import Lab
from tests.labutil import edit_config
from tests.systemd.container import Container, ContainerError
from tests.wheelhouse import offline_pip_env

ROOT = Path(__file__).resolve().parents[2]
UNIT_FILE = ROOT / "config" / "hatun.service"
UNIT = "hatun.service"
VENV = "/opt/hatun/venv"
HATUN = "/usr/local/bin/hatun"
CONFIG_DIR = "/etc/hatun"
CONFIG = f"{CONFIG_DIR}/hatun.toml"
CONTROL_SOCKET = "/run/hatun/hatun.sock"  # the default of [control] socket, which the unit's ExecReload uses
WHEELS = "/srv/wheels"


@dataclass
class Install:
    """Host directories that become /opt/hatun and /usr/local in the containers."""

    dir: Path

    @classmethod
    def make(cls) -> Install:
        d = Path(tempfile.mkdtemp(prefix="hatun-install-"))
        (d / "opt").mkdir()
        (d / "local" / "bin").mkdir(parents=True)
        return cls(d)

    def binds(self) -> dict[str, str]:
        return {str(self.dir / "opt"): "/opt/hatun", str(self.dir / "local"): "/usr/local"}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def install_hatun(c: Container, python: str) -> str:
    """Install hatun in C (booted with Install.binds() read-write and the wheels at WHEELS) as a user
    would; returns `hatun --version`. Raises ContainerError."""
    c.run(python, "-m", "venv", VENV, timeout=120)
    c.run(f"{VENV}/bin/pip", "install", "--quiet", "hatun", env=offline_pip_env(Path(WHEELS)), timeout=300)
    c.run("ln", "-sf", f"{VENV}/bin/hatun", HATUN)
    return c.run(HATUN, "--version").stdout.strip()


def container_config(lab: Lab, **edit) -> tuple[str, dict[str, str]]:
    """The lab's hatun config (with EDIT, as tests.labutil.edit_config takes it) for a host where
    hatun is installed as the unit expects: key files in /etc/hatun, run_dir and control socket at
    their defaults (/run/hatun). Returns the text and the files it names: host path -> container path."""
    with tempfile.NamedTemporaryFile("r", suffix=".toml") as tmp:
        edit_config(lab, path=tmp.name, **edit)
        text = tmp.read()
    files: dict[str, str] = {}

    def move(m: re.Match) -> str:
        files[m.group(1)] = f"{CONFIG_DIR}/{os.path.basename(m.group(1))}"
        return f'"{files[m.group(1)]}"'

    lines = []
    for line in text.splitlines():
        if line.startswith("#") or line.startswith("run_dir = ") or line.startswith("socket = "):
            continue
        lines.append(re.sub(rf'"({re.escape(lab.dir)}/[^"/]+)"', move, line))
    out = "\n".join(lines) + "\n"
    if lab.dir in out:
        raise AssertionError(f"the container's config still names the lab's directory:\n{out}")
    return out, files


class HatunService:
    """hatun's unit in container C, which has joined LAB's runner namespace (booted by the caller
    after `prepare()`)."""

    def __init__(self, c: Container, lab: Lab) -> None:
        self.c, self.lab = c, lab
        self.start_seconds: float | None = None

    # -------------------------------------------------------------- files

    def prepare(self, **edit) -> None:
        """Put the unit and the config (with EDIT) with its key files into the container's tree."""
        (self.c.root / CONFIG_DIR.lstrip("/")).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.write_config(**edit)
        shutil.copyfile(UNIT_FILE, self.c.root / "etc/systemd/system" / UNIT)

    def write_config(self, **edit) -> None:
        """Write the config (with EDIT) and copy the key files it names (mode 0600)."""
        text, files = container_config(self.lab, **edit)
        for host, inside in files.items():
            target = self.c.root / inside.lstrip("/")
            shutil.copyfile(host, target)
            target.chmod(0o600)
        self.write_config_text(text)

    def write_config_text(self, text: str) -> None:
        path = self.c.root / CONFIG.lstrip("/")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o600)
        os.replace(tmp, path)

    def secrets(self) -> list[str]:
        """Every key of the lab (runners', gateways', preshared), base64 and hex: none may be logged."""
        found = []
        for path in Path(self.lab.dir).glob("*.key"):
            b64 = path.read_text().strip()
            found += [b64, base64.b64decode(b64).hex()]
        return found

    # -------------------------------------------------------------- systemd's view

    def start(self, timeout: float = 120):
        started = time.monotonic()
        res = self.c.systemctl("start", UNIT, timeout=timeout)
        self.start_seconds = time.monotonic() - started
        return res

    def props(self, *names: str) -> dict[str, str]:
        return self.c.show(UNIT, *names)

    def main_pid(self) -> int:
        """hatun's main PID as the host sees it. Raises AssertionError when systemd has none."""
        pid = int(self.props("MainPID")["MainPID"])
        host = self.c.host_pid(pid) if pid else None
        if host is None:
            raise AssertionError(f"no main process (MainPID={pid}):\n{self.journal_text()[-3000:]}")
        return host

    def journal_text(self) -> str:
        return self.c.journal("-u", UNIT, "-o", "cat")

    def journal_entries(self) -> list[dict]:
        """The unit's journal entries of this boot (systemd's own and hatun's), as journalctl's JSON."""
        return [json.loads(line) for line in self.c.journal("-u", UNIT, "-o", "json").splitlines() if line]

    def diagnose(self, res=None) -> str:
        """What to show when something fails: the command's output, the unit's state and journal."""
        parts = [f"{res.args}: exit {res.returncode}\n{res.stdout}{res.stderr}"] if res is not None else []
        try:
            parts.append(self.c.systemctl("status", UNIT).stdout)
            parts.append(self.journal_text()[-4000:])
        except (ContainerError, OSError) as e:
            parts.append(f"(no journal: {e})")
        return "\n".join(parts)

    # -------------------------------------------------------------- hatun's view

    def status(self, timeout: float = 10.0) -> dict:
        """hatun's status through its control socket (reached from the host). Raises ControlError."""
        return request(self.c.host_path(CONTROL_SOCKET), {"command": "status"}, timeout=timeout)["status"]

    def wait(self, predicate, timeout: float, what: str) -> dict:
        """Poll the status until PREDICATE(status) holds (bounded); return that status."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                s = self.status(timeout=max(1.0, min(30.0, deadline - time.monotonic())))
                if predicate(s):
                    return s
            except (ControlError, OSError, KeyError, StopIteration) as e:
                last = e
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what} ({last}):\n{self.diagnose()}")
            time.sleep(0.05)

    def runner_wireguard_go(self) -> dict[str, int]:
        """The lab's runner-side wireguard-go processes, running (not zombies): interface -> host PID."""
        found = {}
        prefix = f"hl{self.lab.name}r"
        for pid in topology.namespace_pids(self.lab.runner):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and len(argv) >= 2 and argv[0].endswith("wireguard-go") and argv[-1].startswith(prefix):
                found[argv[-1]] = pid
        return found

    def run_dir(self) -> list[str]:
        """What /run/hatun of the container holds."""
        return sorted(os.listdir(self.c.host_path("/run/hatun")))
