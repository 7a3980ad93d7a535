"""Runs a JavaScript action's steps the way GitHub's runner does, for tests.

What the runner does for a `uses:` step of a node action, and this harness does too:

- reads `action.yml` (refusing `${{ }}` in it, which the runner would try to evaluate and fail on);
- sets `INPUT_<NAME>` (upper case, spaces to `_`, hyphens kept) for every declared input, from
  `with:` or the declared default (an undeclared `with:` key is an error here, a warning there);
- gives each step fresh GITHUB_OUTPUT, GITHUB_STATE, GITHUB_ENV, GITHUB_PATH and GITHUB_STEP_SUMMARY
  files and reads them back afterwards (`name=value` and `name<<DELIMITER` entries, with the
  runner's errors for a missing delimiter or a malformed line); GITHUB_ENV and GITHUB_PATH apply to
  later steps, saved state becomes `STATE_<name>` of the post step;
- sets RUNNER_TEMP, GITHUB_WORKSPACE (the working directory) and GITHUB_ACTION_PATH;
- runs `node <main>`, then `node <post>` as `post-if` says (default `always()`);
- processes workflow commands on the step's output: `::add-mask::`, `::error::`, `::warning::`,
  `::notice::`, `::group::`, `::stop-commands::TOKEN` ... `::TOKEN::`, and shows the log with the
  masks applied;
- cancels like the runner: SIGINT to node, SIGTERM 7.5 s later, then SIGKILL to the whole process
  tree 2.5 s after that.

Every step is bounded by a timeout (expiry cancels it the same way and is reported). With `netns`,
node runs inside that network namespace (`ip netns exec NS node ...`, which execs: the PID is node's).
With `user`, node runs as that unprivileged user (as on GitHub's runners, where the user `runner` has
sudo) and the job's directories belong to it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The runner's cancel sequence (docs: "Canceling a workflow").
SIGINT_GRACE = 7.5
SIGTERM_GRACE = 2.5

_COMMAND_RE = re.compile(r"^::([A-Za-z][A-Za-z0-9_-]*)(?: ([^:]*))?::(.*)$")


class ActionError(Exception):
    """The action (its action.yml or what a step wrote) breaks the runner's rules."""


@dataclass(frozen=True)
class Command:
    name: str
    properties: dict[str, str]
    value: str


@dataclass
class StepResult:
    step: str  # "main" or "post"
    returncode: int | None  # negative: killed by that signal
    stdout: str  # raw, as node wrote it (masks not applied)
    stderr: str
    commands: list[Command]
    log: list[str]  # what the runner would show: commands processed, masks applied
    masks: list[str]
    outputs: dict[str, str]
    state: dict[str, str]
    env: dict[str, str]
    path: list[str]
    summary: str
    signals_sent: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def messages(self, kind: str) -> list[str]:
        """Values of the ::KIND:: commands (error, warning, notice, ...)."""
        return [c.value for c in self.commands if c.name == kind]

    @property
    def errors(self) -> list[str]:
        return self.messages("error")

    @property
    def warnings(self) -> list[str]:
        return self.messages("warning")

    def text(self) -> str:
        """Everything the step printed, for assertion messages."""
        return f"--- {self.step}: exit {self.returncode}, signals {self.signals_sent}\n{self.stdout}\n--- stderr\n{self.stderr}"


# ------------------------------------------------------------------ the runner's file and line formats


def unescape_data(value: str) -> str:
    return value.replace("%0D", "\r").replace("%0A", "\n").replace("%25", "%")


def unescape_property(value: str) -> str:
    return unescape_data(value.replace("%3A", ":").replace("%2C", ","))


def parse_file_command(text: str, what: str) -> dict[str, str]:
    """Entries of a GITHUB_OUTPUT / GITHUB_STATE / GITHUB_ENV file, read as the runner reads them."""
    values: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\r")
        i += 1
        if line == "":
            continue
        eq, heredoc = line.find("="), line.find("<<")
        if eq >= 0 and (heredoc < 0 or eq < heredoc):
            name, value = line[:eq], line[eq + 1:]
        elif heredoc >= 0:
            name, delimiter = line[:heredoc], line[heredoc + 2:]
            if not delimiter:
                raise ActionError(f"{what}: empty delimiter for {name!r}")
            body = []
            while True:
                if i >= len(lines):
                    raise ActionError(f"{what}: matching delimiter not found for {name!r}")
                current = lines[i].rstrip("\r")
                i += 1
                if current == delimiter:
                    break
                body.append(current)
            value = "\n".join(body)
        else:
            raise ActionError(f"{what}: invalid format {line[:40]!r}")
        if not name:
            raise ActionError(f"{what}: entry without a name")
        values[name] = value
    return values


def process_output(stdout: str) -> tuple[list[Command], list[str], list[str]]:
    """Workflow commands in STDOUT, the log lines as shown (masks applied), and the masks."""
    commands: list[Command] = []
    shown: list[str] = []
    masks: list[str] = []
    stopped_until: str | None = None
    for line in stdout.splitlines():
        if stopped_until is not None:
            if line == f"::{stopped_until}::":
                stopped_until = None
            else:
                shown.append(line)
            continue
        m = _COMMAND_RE.match(line)
        if not m:
            shown.append(line)
            continue
        name, props_text, value = m.group(1), m.group(2) or "", unescape_data(m.group(3))
        props = {}
        for part in filter(None, props_text.split(",")):
            key, _, val = part.partition("=")
            props[key.strip()] = unescape_property(val)
        commands.append(Command(name, props, value))
        if name == "add-mask":
            if value:
                masks.append(value)
        elif name == "stop-commands":
            stopped_until = value
        elif name in ("error", "warning", "notice"):
            shown.append(f"{name.capitalize()}: {value}")
        elif name == "group":
            shown.append(f"> {value}")
    masked = []
    for line in shown:
        for secret in sorted(masks, key=len, reverse=True):
            line = line.replace(secret, "***")
        masked.append(line)
    return commands, masked, masks


def process_tree(pid: int) -> list[int]:
    """PID and all its descendants (by parent PID, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


# ------------------------------------------------------------------ the action and its steps


def load_action(action_dir: Path) -> dict:
    """action.yml (or action.yaml) of ACTION_DIR, checked for what this harness relies on."""
    for name in ("action.yml", "action.yaml"):
        path = Path(action_dir) / name
        if path.exists():
            break
    else:
        raise ActionError(f"no action.yml in {action_dir}")
    text = path.read_text()
    # The runner evaluates ${{ }} even in descriptions, where no context exists: the action fails to load.
    if "${{" in "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")):
        raise ActionError(f"{path}: contains ${{{{ }}}}, which the runner cannot evaluate in an action's metadata")
    doc = yaml.safe_load(text)
    runs = doc.get("runs") or {}
    if not str(runs.get("using", "")).startswith("node"):
        raise ActionError(f"{path}: runs.using is {runs.get('using')!r}, not a node runtime")
    if "main" not in runs:
        raise ActionError(f"{path}: runs.main missing")
    for name, spec in (doc.get("inputs") or {}).items():
        if "description" not in (spec or {}):
            raise ActionError(f"{path}: input {name!r} has no description")
    return doc


def input_variable(name: str) -> str:
    return "INPUT_" + name.replace(" ", "_").upper()


class RunningStep:
    """A step's node process while it runs: its output so far, waiting on it, cancelling it."""

    def __init__(self, runner: ActionRunner, step: str, cmd: list[str], env: dict, files: dict[str, Path], timeout: float):
        self.runner, self.step, self.files, self.timeout = runner, step, files, timeout
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, cwd=runner.workspace, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stdout, self._out), (self.proc.stderr, self._err))]
        for t in self._readers:
            t.start()
        self.signals_sent: list[str] = []
        self.timed_out = False

    def _read(self, stream, buf: list[bytes]) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            with self._lock:
                buf.append(chunk)

    def output(self) -> str:
        with self._lock:
            return b"".join(self._out).decode(errors="replace")

    def wait_for(self, predicate, what: str, timeout: float = 120) -> None:
        """Wait until PREDICATE(stdout so far) is true; AssertionError (with the output) if the step
        ends first or after TIMEOUT seconds."""
        deadline = time.monotonic() + timeout
        while not predicate(self.output()):
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the readers take the last output
                if predicate(self.output()):
                    return
                raise AssertionError(f"{self.step} ended (exit {self.proc.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}:\n{self.output()}")
            time.sleep(0.05)

    def cancel(self, first: int = signal.SIGINT) -> None:
        """Cancel as the runner does: FIRST (SIGINT), SIGTERM after 7.5 s, SIGKILL to the process tree
        after 2.5 s more. Returns once the process is gone."""
        grace = [(first, SIGINT_GRACE), (signal.SIGTERM, SIGTERM_GRACE)] if first == signal.SIGINT else [(first, SIGTERM_GRACE)]
        for sig, wait in grace:
            if self.proc.poll() is not None:
                return
            self.signals_sent.append(signal.Signals(sig).name)
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.signals_sent.append("SIGKILL")
            for pid in process_tree(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=30)

    def wait(self) -> StepResult:
        """Wait for the step to end (cancelling it when its timeout expires) and read what it wrote."""
        remaining = self.timeout - (time.monotonic() - self.started)
        try:
            self.proc.wait(timeout=max(remaining, 0.01))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.cancel()
        for t in self._readers:
            t.join(timeout=10)
        return self.runner._finish(self)


class ActionRunner:
    """One job that uses the action in ACTION_DIR: its steps share RUNNER_TEMP, the workspace, the
    job's environment and PATH additions, and the main step's state (for the post step).

    ROOT: a fresh directory for the job (temp/, workspace/, home/, steps/). NETNS: run node in it.
    ENV: extra environment of every step (as `env:` of the step would give). NODE: the node binary.
    USER: (uid, gid) to run node as (the job's directories are given to it); None: as we are."""

    def __init__(self, action_dir: Path, root: Path, *, netns: str | None = None, env: dict[str, str] | None = None,
                 node: str = "node", action_name: str = "hatun", user: tuple[int, int] | None = None) -> None:
        self.action_dir = Path(action_dir).resolve()
        self.action = load_action(self.action_dir)
        self.root = Path(root)
        self.temp = self.root / "temp"
        self.workspace = self.root / "workspace"
        self.home = self.root / "home"
        self.user = user
        for d in (self.root, self.temp, self.workspace, self.home, self.root / "steps"):
            d.mkdir(parents=True, exist_ok=True)
            self._own(d)
        self.netns, self.extra_env, self.node, self.action_name = netns, dict(env or {}), node, action_name
        self.job_env: dict[str, str] = {}
        self.job_path: list[str] = []
        self.inputs: dict[str, str] | None = None
        self.main_result: StepResult | None = None
        self.post_ran = False
        self._steps = 0
        self._started: list[RunningStep] = []

    def _own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, *self.user)

    # -- inputs and environment

    def input_env(self, with_: dict) -> dict[str, str]:
        declared = self.action.get("inputs") or {}
        unknown = set(with_) - set(declared)
        if unknown:
            raise ActionError(f"unexpected inputs {sorted(unknown)} (declared: {sorted(declared)})")
        env = {}
        for name, spec in declared.items():
            spec = spec or {}
            if name in with_:
                value = with_[name]
                value = ("true" if value else "false") if isinstance(value, bool) else str(value)
            else:
                value = "" if spec.get("default") is None else str(spec.get("default"))
            env[input_variable(name)] = value
        return env

    def _step_env(self, files: dict[str, Path], state: dict[str, str]) -> dict[str, str]:
        base_path = os.environ.get("PATH", os.defpath)
        env = {
            "PATH": os.pathsep.join([*reversed(self.job_path), base_path]),
            "HOME": str(self.home) if self.user is not None else os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_ACTION": self.action_name,
            "GITHUB_ACTION_PATH": str(self.action_dir),
            "GITHUB_WORKSPACE": str(self.workspace),
            "RUNNER_TEMP": str(self.temp),
            "RUNNER_OS": "Linux",
            "RUNNER_ARCH": "X64",
            **{f"GITHUB_{k.upper()}": str(v) for k, v in files.items()},
            **self.job_env,
            **self.extra_env,
            **(self.inputs or {}),
            **{f"STATE_{k}": v for k, v in state.items()},
        }
        return env

    # -- steps

    def start(self, step: str, *, timeout: float) -> RunningStep:
        script = self.action["runs"][step]
        self._steps += 1
        d = self.root / "steps" / f"{self._steps}-{step}"
        d.mkdir()
        self._own(d)
        files = {}
        for name in ("output", "state", "env", "path", "step_summary"):
            p = d / name
            p.touch()
            self._own(p)
            files[name] = p
        state = self.main_result.state if (step == "post" and self.main_result) else {}
        cmd = [self.node, str(self.action_dir / script)]
        if self.user is not None:
            uid, gid = self.user
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        running = RunningStep(self, step, cmd, self._step_env(files, state), files, timeout)
        self._started.append(running)
        return running

    def start_main(self, with_: dict, *, timeout: float = 900) -> RunningStep:
        self.inputs = self.input_env(with_)
        return self.start("main", timeout=timeout)

    def main(self, with_: dict, *, timeout: float = 900) -> StepResult:
        return self.start_main(with_, timeout=timeout).wait()

    def post(self, *, timeout: float = 300) -> StepResult | None:
        """The post step, if the action has one and `post-if` lets it run (None otherwise)."""
        runs = self.action["runs"]
        if "post" not in runs or self.main_result is None:
            return None
        cond = str(runs.get("post-if", "always()")).strip()
        failed = not self.main_result.ok
        cancelled = bool(self.main_result.signals_sent)
        run = {"always()": True, "success()": not failed, "failure()": failed and not cancelled,
               "cancelled()": cancelled}.get(cond)
        if run is None:
            raise ActionError(f"post-if {cond!r}: not understood by this harness")
        self.post_ran = True
        return self.start("post", timeout=timeout).wait() if run else None

    def close(self, post_timeout: float = 120) -> None:
        """End of the job, also when a test failed half-way: kill any step still running (its whole
        process tree), then run the post step if the main step ran and the post step did not, as
        the runner always does. Never raises."""
        for running in self._started:
            if running.proc.poll() is None:
                for pid in process_tree(running.proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    running.wait()
                except Exception:  # noqa: BLE001 - clean-up goes on
                    pass
        if self.main_result is not None and not self.post_ran:
            try:
                self.post(timeout=post_timeout)
            except Exception:  # noqa: BLE001
                pass

    def _finish(self, running: RunningStep) -> StepResult:
        stdout = b"".join(running._out).decode(errors="replace")
        stderr = b"".join(running._err).decode(errors="replace")
        commands, log, masks = process_output(stdout)
        f = running.files
        outputs = parse_file_command(f["output"].read_text(), "GITHUB_OUTPUT")
        state = parse_file_command(f["state"].read_text(), "GITHUB_STATE")
        env = parse_file_command(f["env"].read_text(), "GITHUB_ENV")
        path = [line.strip() for line in f["path"].read_text().splitlines() if line.strip()]
        self.job_env.update(env)
        self.job_path.extend(path)
        result = StepResult(running.step, running.proc.returncode, stdout, stderr, commands, log, masks, outputs, state,
                            env, path, f["step_summary"].read_text(), running.signals_sent, running.timed_out)
        if running.step == "main":
            self.main_result = result
        return result
