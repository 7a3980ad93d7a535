"""Issue 15: hatun as a GitHub Action (action.yml, action/*.js), run the way GitHub's runner runs it
(tests/actionrunner.py) against the built-in lab, with Debian's externally managed /usr/bin/python3
like the runners' and pip offline from the test wheelhouse.

The lab's namespaces have no route anywhere, so the action's steps run inside the lab's runner
namespace; nothing here sends a packet outside namespaces the tests create.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

pytest.importorskip("yaml", reason="the action runner harness reads action.yml with PyYAML (the test extra)")

from hatun.keys import PrivateKey  # noqa: E402
from hatun.lab import topology  # noqa: E402
from tests.actionrunner import ActionRunner, parse_file_command, process_output  # noqa: E402
from tests.labutil import ns_output, wait_until  # noqa: E402
from tests.test_lifecycle import hatun_leftovers  # noqa: E402
from tests.wheelhouse import offline_pip_env, system_python_or_skip  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")
TIMING_RE = re.compile(r"timing: install ([\d.]+) s \(venv ([\d.]+) s\), hatun up ([\d.]+) s")

needs_node = pytest.mark.skipif(NODE is None, reason="needs node (the runtime of the action)")


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="session")
def action_checkout(tmp_path_factory) -> Path:
    """The action as `uses: OWNER/hatun@REF` gets it: a checkout of this repository (the files git
    would commit, as they are now), so that pip builds hatun from it without touching this tree."""
    dest = tmp_path_factory.mktemp("action-checkout")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, timeout=30, check=True).stdout.splitlines()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="session")
def build_wheels(tmp_path_factory) -> Path:
    """setuptools for building hatun from the checkout offline (pip's build isolation needs it)."""
    d = tmp_path_factory.mktemp("build-wheels")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(d),
                        "setuptools>=68"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not list(d.glob("setuptools-*.whl")):
        pytest.skip(f"no setuptools wheel to build hatun offline: {r.stderr.strip()[-300:]}")
    return d


@pytest.fixture
def pip_env(wheelhouse, build_wheels) -> dict[str, str]:
    env = offline_pip_env(wheelhouse)
    env["PIP_FIND_LINKS"] = f"{wheelhouse} {build_wheels}"  # pip takes several, space-separated
    return env


@pytest.fixture
def make_runner():
    """ActionRunner(...) for a test; every job is closed afterwards (steps still running killed, the
    post step run if it has not), even when the test fails half-way."""
    made: list[ActionRunner] = []

    def make(*args, **kw) -> ActionRunner:
        runner = ActionRunner(*args, **kw)
        made.append(runner)
        return runner

    try:
        yield make
    finally:
        for runner in made:
            runner.close()


def hatun_wheel(wheelhouse: Path) -> str:
    return str(next(wheelhouse.glob("hatun-*.whl")))


def keyed_config(lab, keys: dict[int, str] | None = None) -> tuple[str, dict[str, str]]:
    """The lab's config with its private keys read from the environment (HATUN_GWi_KEY) instead of
    files, and the NAME -> VALUE secrets that go with it (KEYS: other keys for some gateways)."""
    text = topology.config_text(lab)
    secrets = {}
    for i in range(1, lab.gateways + 1):
        key_file = os.path.join(lab.dir, f"runner{i}.key")
        text = text.replace(f'private_key_file = "{key_file}"', f'private_key_env = "HATUN_GW{i}_KEY"')
        with open(key_file) as f:
            secrets[f"HATUN_GW{i}_KEY"] = (keys or {}).get(i) or f.read().strip()
    assert "private_key_file" not in text
    return text, secrets


def secrets_input(secrets: dict[str, str]) -> str:
    return "# one per gateway\n" + "\n".join(f"{k}={v}" for k, v in secrets.items()) + "\n"


def secret_forms(secrets: dict[str, str]) -> list[str]:
    """Each secret as users give it (base64) and as WireGuard's UAPI writes it (hex)."""
    return [form for v in secrets.values() for form in (v, PrivateKey.from_base64(v).hex)]


class EnvironWatch:
    """Samples /proc/*/environ while a step runs and records every process whose environment holds
    one of SECRETS: pip, venv, sudo, wireguard-go must never be among them."""

    def __init__(self, secrets: list[str]) -> None:
        self.needles = [s.encode() for s in secrets]
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in self.seen:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read()
                if any(n in environ for n in self.needles):
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        self.seen[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue


def is_hatun(cmdline: str) -> bool:
    """`hatun up` (the venv's console script) or the `hatun run` it starts."""
    return bool(re.search(r"/bin/hatun up |-m hatun run ", cmdline))


def assert_no_secret_leaks(secrets: dict[str, str], steps, files_under: list[Path]) -> None:
    forms = secret_forms(secrets)
    for step in steps:
        for line in step.stdout.splitlines():
            if any(s in line for s in forms):
                # The one place a value may appear: the mask command, which the runner does not log.
                assert line.startswith("::add-mask::") and line[len("::add-mask::"):] in secrets.values(), line
        assert not any(s in step.stderr for s in forms), f"a secret in the stderr of {step.step}"
        assert not any(s in line for s in forms for line in step.log)
        assert not any(s in step.summary for s in forms), f"a secret in the summary of {step.step}"
        for what in (step.outputs, step.state, step.env):
            assert not any(s in f"{k}={v}" for s in forms for k, v in what.items()), f"a secret in {what}"
    for top in files_under:
        for path in Path(top).rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 20_000_000:
                data = path.read_bytes()
                leaked = [s for s in forms if s.encode() in data]
                assert not leaked, f"a secret in {path}"


def cmdline(pid: int) -> str:
    """PID's command line ("" for a zombie or a process that is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_with(marker: str) -> dict[int, str]:
    """Live processes whose command line holds MARKER, with that command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and marker in (line := cmdline(int(entry))):
            found[int(entry)] = line
    return found


def hatun_processes(config_path: str) -> list[str]:
    """Command lines of the hatun processes (up, run) of CONFIG_PATH that are still alive."""
    return [line for line in pids_with(config_path).values() if "hatun" in line]


def timings(step) -> dict[str, float]:
    m = TIMING_RE.search(step.stdout)
    assert m, step.text()
    install, venv, up = map(float, m.groups())
    return {"install": install, "venv": venv, "pip": install - venv, "up": up}


# ------------------------------------------------------------------ the pure parts, through node


def node_eval(script: str):
    res = subprocess.run([NODE, "-e", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@needs_node
def test_inputs_parse_precisely_and_never_quote_a_secret():
    out = node_eval(r"""
    const i = require('./action/inputs.js');
    const cases = {
      good: 'HATUN_GW1_KEY=abc\n\n  # comment\n HATUN_GW2_KEY = d=e \r\n',
      noeq: 'HATUN_GW1_KEY=abc\nsecretvalueXYZ\n',
      badname: '1KEY=secretvalueXYZ',
      dup: 'A=1\nA=2',
      reserved: 'LD_PRELOAD=/tmp/x.so\nPYTHONPATH=/tmp\nPATH=/tmp',
      empty: 'HATUN_GW1_KEY=',
    };
    const secrets = Object.fromEntries(Object.entries(cases).map(([k, v]) => [k, i.parseSecrets(v)]));
    const durations = ['60', '60s', '2m', '1.5m', 'abc', '0', '-5', '5h', '3601'].map((t) => i.parseDuration('timeout', t));
    console.log(JSON.stringify({
      secrets, durations,
      counts: ['2', 'x', '-1', '11'].map((t) => i.parseCount('retry', t, { min: 0, max: 10 })),
      configPath: i.parseConfig('cfg/hatun.toml', '/ws'),
      configInline: i.parseConfig('[[tunnels]]\nname = "a"', '/ws'),
      configEmpty: i.parseConfig('', '/ws'),
      names: i.keyEnvNames('# private_key_env = "OLD"\nprivate_key_env = "A"\n  private_key_env=\'B\'\npreshared_key_env = "P"\n'),
      userspace: [i.wantsUserspace('backend = "userspace"\n[routing]\n'),
                  i.wantsUserspace('[routing]\nbackend = "userspace"\n'), i.wantsUserspace('backend = "auto"')],
      packages: [
        i.missingPackages({ haveNft: true, kernelWireGuard: true, haveWireguardGo: false, wantsUserspace: false, haveVenv: true }),
        i.missingPackages({ haveNft: false, kernelWireGuard: false, haveWireguardGo: false, wantsUserspace: false, haveVenv: false }),
        i.missingPackages({ haveNft: true, kernelWireGuard: true, haveWireguardGo: false, wantsUserspace: true, haveVenv: true }),
        i.missingPackages({ haveNft: true, kernelWireGuard: false, haveWireguardGo: true, wantsUserspace: false, haveVenv: true }),
      ],
    }));
    """)
    s = out["secrets"]
    assert s["good"]["env"] == {"HATUN_GW1_KEY": "abc", "HATUN_GW2_KEY": "d=e"} and s["good"]["problems"] == []
    assert s["noeq"]["problems"] == ["secrets, line 2: expected NAME=VALUE (the line is not shown: it may hold a secret)"]
    assert s["noeq"]["env"] == {"HATUN_GW1_KEY": "abc"}
    assert "line 1: the name before" in s["badname"]["problems"][0]
    assert s["dup"]["problems"] == ["secrets, line 2: A is given twice"]
    assert [p.split(":")[1].split()[0] for p in s["reserved"]["problems"]] == ["LD_PRELOAD", "PYTHONPATH", "PATH"]
    assert "HATUN_GW1_KEY has an empty value" in s["empty"]["problems"][0]
    assert "secretvalueXYZ" not in json.dumps([c["problems"] for c in s.values()])
    assert [d.get("value") for d in out["durations"]] == [60, 60, 120, 90, None, None, None, None, None]
    assert out["durations"][4]["problem"] == 'timeout: "abc" is not a duration (seconds: 60, 60s or 2m)'
    assert out["durations"][5]["problem"] == "timeout: 0 is out of range (1 s to 3600 s)"
    assert [c.get("value") for c in out["counts"]] == [2, None, None, None]
    assert out["configPath"] == {"value": {"inline": False, "path": "/ws/cfg/hatun.toml"}}
    assert out["configInline"] == {"value": {"inline": True, "text": '[[tunnels]]\nname = "a"\n'}}
    assert "required" in out["configEmpty"]["problem"]
    assert out["names"] == ["A", "B", "P"]
    assert out["userspace"] == [True, False, False]
    assert out["packages"] == [[], ["nftables", "wireguard-go", "python3-venv"], ["wireguard-go"], []]


@needs_node
def test_workflow_and_file_commands_read_back_as_the_runner_reads_them():
    out = node_eval(r"""
    const gh = require('./action/github.js');
    const r = require('./action/report.js');
    const value = 'two\nlines with = and << and ::error::x';
    console.log(JSON.stringify({
      entry: gh.fileCommandEntry('status', value) + gh.fileCommandEntry('n', '3'),
      command: gh.formatCommand('error', { title: 'a: b, c' }, '100% done\nsecond line'),
      variable: gh.inputVariable('min-healthy'),
      cell: r.cell('a|b\n<c>'),
    }));
    """)
    assert parse_file_command(out["entry"], "GITHUB_OUTPUT") == {"status": "two\nlines with = and << and ::error::x", "n": "3"}
    assert re.match(r"^status<<ghadelimiter_[0-9a-f-]{36}\n", out["entry"])
    commands, log, _ = process_output(out["command"])
    assert commands[0].properties == {"title": "a: b, c"} and commands[0].value == "100% done\nsecond line"
    assert out["variable"] == "INPUT_MIN-HEALTHY"
    assert out["cell"] == "a\\|b &lt;c&gt;"


# ------------------------------------------------------------------ inputs that are wrong: no lab needed


@needs_node
@pytest.mark.parametrize("with_, expected", [
    ({"config": "missing.toml"}, "config: cannot read {ws}/missing.toml: no such file"),
    ({"config": ""}, "config: required"),
    ({"config": "hatun.toml", "timeout": "soon"}, 'timeout: "soon" is not a duration'),
    ({"config": "hatun.toml", "retry": "many"}, 'retry: "many" is not a whole number'),
    ({"config": "hatun.toml", "add-to-path": "maybe"}, 'add-to-path: "maybe" is neither true nor false'),
    ({"config": "hatun.toml", "secrets": "HATUN_GW1_KEY=k1\nsecretvalueXYZ"}, "secrets, line 2: expected NAME=VALUE"),
    ({"config": "hatun.toml", "secrets": "LD_PRELOAD=/tmp/evil.so"}, "secrets, line 1: LD_PRELOAD is reserved"),
    ({"config": "hatun.toml", "secrets": ""}, 'secrets: the config reads private_key_env / preshared_key_env "HATUN_GW1_KEY", which the secrets input does not give'),
    ({"config": '[[tunnels]]\nname = "gw1"\nenroll = "https://gw1.example.net:8443"\n'},
     "the config enrolls its tunnels (enroll = ...), which needs the job's OIDC token: add `permissions: id-token: write`"),
])
def test_bad_inputs_fail_at_once_with_a_clear_error(make_runner, tmp_path, with_, expected):
    runner = make_runner(ROOT, tmp_path, env={"PIP_NO_INDEX": "1"})
    (runner.workspace / "hatun.toml").write_text('[[tunnels]]\nname = "gw1"\nprivate_key_env = "HATUN_GW1_KEY"\n')
    main = runner.main(with_, timeout=60)
    assert main.returncode == 1 and not main.timed_out, main.text()
    assert any(e.startswith(expected.format(ws=runner.workspace)) for e in main.errors), main.text()
    assert "secretvalueXYZ" not in main.stdout + main.stderr
    assert not list(runner.temp.iterdir()), "nothing installed, nothing written"
    assert main.state == {} and main.outputs == {}
    post = runner.post(timeout=60)
    assert post.ok and "nothing to tear down" in post.stdout, post.text()


# ------------------------------------------------------------------ bounded children, cancellation: no lab


def fake_python(path: Path, on_venv: str) -> str:
    """A python that answers the action's probe like /usr/bin/python3 and, for `-m venv`, records its
    environment and then does ON_VENV (shell)."""
    path.write_text(f"""#!/bin/bash
if [[ $1 == -m && $2 == venv ]]; then
  env > {path}.env
  {on_venv}
fi
exec /usr/bin/python3 "$@"
""")
    path.chmod(0o755)
    return str(path)


@needs_node
def test_a_hung_install_is_stopped_at_its_timeout(make_runner, tmp_path):
    """A child that ignores SIGTERM is killed after the grace: the step ends, with a clear error."""
    system_python_or_skip()
    python = fake_python(tmp_path / "python-hangs", "trap '' TERM INT; exec -a hatun-test-hang sleep 600")
    runner = make_runner(ROOT, tmp_path / "job")
    (runner.workspace / "hatun.toml").write_text('[[tunnels]]\nname = "gw1"\n')
    main = runner.main({"config": "hatun.toml", "python": python, "install-timeout": "10", "system-packages": "false"},
                       timeout=120)
    assert main.returncode == 1 and not main.timed_out, main.text()
    assert any("-m venv timed out after 10 s and was stopped" in e for e in main.errors), main.text()
    wait_until(lambda: not pids_with("hatun-test-hang"), "the hung child gone", 10)
    post = runner.post(timeout=60)
    assert post.ok and "nothing to tear down" in post.stdout


@needs_node
def test_sigterm_during_the_install_stops_the_step_and_its_children(make_runner, tmp_path):
    """The runner's second signal alone (SIGTERM) also stops the step at once; the post step then has
    nothing to tear down. The install child got no secret and no input in its environment."""
    system_python_or_skip()
    python = fake_python(tmp_path / "python-slow", "exec -a hatun-test-slow sleep 600")
    runner = make_runner(ROOT, tmp_path / "job")
    (runner.workspace / "hatun.toml").write_text('[[tunnels]]\nname = "gw1"\nprivate_key_env = "HATUN_GW1_KEY"\n')
    secret = PrivateKey.generate().base64
    step = runner.start_main({"config": "hatun.toml", "python": python, "secrets": f"HATUN_GW1_KEY={secret}",
                              "system-packages": "false"}, timeout=120)
    step.wait_for(lambda out: "Install hatun" in out, "the install")
    wait_until(lambda: pids_with("hatun-test-slow"), "the venv child running", 30)
    step.cancel(signal.SIGTERM)
    main = step.wait()
    assert main.signals_sent == ["SIGTERM"], "stopped by its first signal, before the runner had to kill it"
    assert main.returncode == 1 and any("cancelled (SIGTERM)" in e for e in main.errors), main.text()
    assert not pids_with("hatun-test-slow"), "the child was stopped with the step"
    child_env = Path(python + ".env").read_text()
    assert secret not in child_env and "INPUT_" not in child_env and "HATUN_GW1_KEY" not in child_env
    post = runner.post(timeout=60)
    assert post.ok and "nothing to tear down" in post.stdout


# ------------------------------------------------------------------ against the lab


@needs_node
@pytest.mark.netns
@pytest.mark.slow
def test_action_brings_the_tunnels_up_and_its_post_step_removes_everything(lab_factory, make_runner, action_checkout,
                                                                         pip_env, tmp_path):
    python = system_python_or_skip()
    lab = lab_factory(2)
    config, secrets = keyed_config(lab)
    runner = make_runner(action_checkout, tmp_path / "job", netns=lab.runner, env=pip_env)
    with EnvironWatch(list(secrets.values())) as during_main:
        main = runner.main({"config": config, "secrets": secrets_input(secrets), "python": python, "timeout": "60"})
    assert main.ok, main.text()
    assert main.outputs["tunnels-in-service"] == "2" and main.outputs["tunnels"] == "gw1,gw2", main.outputs
    assert main.outputs["healthy"] == "2" and main.outputs["backend"] == lab.backend
    print(f"\nmain step timings: {timings(main)}")

    # hatun went into a venv of its own made from the system Python, which stays untouched.
    hatun_bin = Path(main.outputs["hatun"])
    venv = hatun_bin.parent.parent
    assert venv.is_relative_to(runner.temp) and (venv / "pyvenv.cfg").exists()
    cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    assert cfg["home"] == str(Path(python).parent)
    assert subprocess.run([python, "-c", "import hatun"], capture_output=True, timeout=30, cwd=tmp_path).returncode != 0
    assert main.path == [str(venv / "bin")]
    # Inline TOML: a 0600 file under RUNNER_TEMP.
    config_path = Path(main.outputs["config"])
    assert config_path.is_relative_to(runner.temp) and stat.S_IMODE(config_path.stat().st_mode) == 0o600
    assert "| gw1 | up | yes |" in main.summary and "| gw2 | up | yes |" in main.summary, main.summary

    # A job step: the private LAN through the tunnels, and the hatun the action put on PATH.
    ping = ns_output(lab.runner, "ping", "-c", "3", "-i", "0.2", "-W", "2", topology.SERVICE)
    assert " 0% packet loss" in ping
    job_env = {**os.environ, "PATH": os.pathsep.join([*runner.job_path, os.environ["PATH"]])}
    status = subprocess.run(["ip", "netns", "exec", lab.runner, "hatun", "status", "--json", "--config", str(config_path)],
                            capture_output=True, text=True, timeout=60, env=job_env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["route"]["members"] == ["gw1", "gw2"]
    assert hatun_leftovers(lab), "sanity: the leftover check sees what hatun made"
    # hatun's own environment has its keys, but none of the action's inputs.
    [run_pid] = [pid for pid, line in pids_with(str(config_path)).items() if line.startswith(f"{venv}/bin/python -m hatun run ")]
    with open(f"/proc/{run_pid}/environ", "rb") as f:
        environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    assert {k.decode() for k in environ if k.startswith(b"HATUN_")} == set(secrets)
    assert not [k for k in environ if k.startswith((b"INPUT_", b"STATE_"))]

    with EnvironWatch(list(secrets.values())) as during_post:
        post = runner.post()
    assert post.ok, post.text()
    assert "hatun stopped; its tunnels, routes and rules are removed" in post.stdout
    assert "### hatun down: done" in post.summary
    assert hatun_leftovers(lab) == []
    wait_until(lambda: hatun_processes(str(config_path)) == [], "no hatun process left", 15)

    # The secrets: masked, and nowhere else but in hatun's own environment.
    assert sorted(main.masks) == sorted(secrets.values())
    assert_no_secret_leaks(secrets, [main, post], [tmp_path, Path(lab.dir) / "run"])
    others = {pid: cmd for pid, cmd in {**during_main.seen, **during_post.seen}.items()
              if not is_hatun(cmd) and not re.search(r"node \S+/action/(main|post)\.js", cmd)}
    assert others == {}, f"processes other than hatun (and the action's node) had a secret in their environment: {others}"
    print(f"processes that had a secret in their environment: {sorted(set(during_main.seen.values()))}")
    assert any(is_hatun(cmd) for cmd in during_main.seen.values()), "sanity: the watch sees hatun's environment"


@needs_node
@pytest.mark.netns
@pytest.mark.slow
def test_a_failing_up_is_retried_then_fails_clearly_and_post_cleans_up(lab_factory, make_runner, wheelhouse, pip_env,
                                                                      tmp_path):
    python = system_python_or_skip()
    lab = lab_factory(2)
    # Keys the gateways do not know: no handshake, ever.
    config, secrets = keyed_config(lab, keys={1: PrivateKey.generate().base64, 2: PrivateKey.generate().base64})
    runner = make_runner(ROOT, tmp_path / "job", netns=lab.runner, env=pip_env)
    (runner.workspace / "hatun.toml").write_text(config)
    main = runner.main({"config": "hatun.toml", "secrets": secrets_input(secrets), "python": python,
                        "package": hatun_wheel(wheelhouse), "timeout": "3", "retry": "1"})
    assert main.returncode == 1, main.text()
    attempts = re.findall(r"^hatun up, attempt (\d) of (\d)", main.stdout, re.M)
    assert attempts == [("1", "2"), ("2", "2")], main.text()
    assert "hatun down before the next attempt: done" in main.stdout
    assert len(main.warnings) == 1 and main.warnings[0].startswith("hatun up, attempt 1 of 2 failed")
    [error] = main.errors
    assert error.startswith("hatun NOT up after 2 attempts: fewer than 1 tunnels healthy after 3 s"), error
    assert "gw1: no handshake with the gateway at 198.18.1.2:51820: wrong keys" in error
    assert main.outputs["tunnels-in-service"] == "0" and main.outputs["tunnels"] == ""
    assert "### hatun: NOT up (2 attempts)" in main.summary and "| gw2 | no handshake" in main.summary
    assert main.state.get("started") == "true" and "up" not in main.state

    post = runner.post()
    assert post.ok, post.text()
    assert hatun_leftovers(lab) == []
    assert_no_secret_leaks(secrets, [main, post], [tmp_path, Path(lab.dir) / "run"])


@needs_node
@pytest.mark.netns
@pytest.mark.slow
def test_a_cancelled_main_step_stops_promptly_and_post_cleans_up(lab_factory, make_runner, wheelhouse, pip_env, tmp_path):
    """Cancelled while `hatun up` waits (gw2 is dark and both must be healthy): the step stops on the
    runner's SIGINT, its `hatun up` with it (which begins to stop what it started, as a failed wait);
    whatever is left then, the post step removes."""
    python = system_python_or_skip()
    lab = lab_factory(2)
    trio.run(topology.lab_fail, lab.name, "gw2", "blackhole")
    config, secrets = keyed_config(lab)
    runner = make_runner(ROOT, tmp_path / "job", netns=lab.runner, env=pip_env)
    step = runner.start_main({"config": config, "secrets": secrets_input(secrets), "python": python,
                              "package": hatun_wheel(wheelhouse), "timeout": "120", "min-healthy": "2"})
    step.wait_for(lambda out: "hatun up, attempt 1 of 3" in out, "hatun up")
    wait_until(lambda: f"hl{lab.name}r1" in ns_output(lab.runner, "ip", "-o", "link"), "hatun's tunnels", 60)
    step.cancel(signal.SIGINT)
    main = step.wait()
    assert main.signals_sent == ["SIGINT"], "stopped within the SIGINT grace: the runner did not have to escalate"
    assert main.returncode == 1 and any("cancelled (SIGINT)" in e for e in main.errors), main.text()
    config_path = main.state["config"]
    assert not [c for c in hatun_processes(config_path) if " up " in c], "hatun up was stopped with the step"

    post = runner.post()
    assert post.ok, post.text()
    assert hatun_leftovers(lab) == []
    wait_until(lambda: hatun_processes(config_path) == [], "no hatun process left", 15)
    assert_no_secret_leaks(secrets, [main, post], [tmp_path, Path(lab.dir) / "run"])


@needs_node
@pytest.mark.netns
def test_an_invalid_config_fails_without_retries(namespaces, make_runner, wheelhouse, pip_env, tmp_path):
    """hatun's own verdict on the config reaches the log, and is not retried: it would not change."""
    python = system_python_or_skip()
    ns = namespaces.new("act")  # empty: should the config be valid after all, nothing reaches the host
    config = (f'run_dir = "{tmp_path}/run"\n[control]\nsocket = "{tmp_path}/hatun.sock"\n[routing]\n'
              'prefixes = ["198.19.77.0/24"]\n[[tunnels]]\nname = "gw1"\nprivate_key_env = "HATUN_GW1_KEY"\n'
              'address = "198.18.101.2/30"\npeer_public_key = "AW4MSYDTquJyjMqM8znXuPeCfYwzXU/3vJ8qI7eTdH0="\n'
              'endpont = "198.18.1.2:51820"\n')
    secrets = {"HATUN_GW1_KEY": PrivateKey.generate().base64}
    runner = make_runner(ROOT, tmp_path / "job", netns=ns, env=pip_env)
    main = runner.main({"config": config, "secrets": secrets_input(secrets), "python": python,
                        "package": hatun_wheel(wheelhouse), "retry": "3"})
    assert main.returncode == 1, main.text()
    assert re.findall(r"^hatun up, attempt \d of \d", main.stdout, re.M) == ["hatun up, attempt 1 of 4"]
    [error] = main.errors
    assert "is not valid" in error and "endpont" in error and "(not retried: trying again would not change it)" in error
    post = runner.post()
    assert post.ok and "nothing to tear down" in post.stdout and not post.warnings, post.text()
    assert_no_secret_leaks(secrets, [main, post], [tmp_path])


def test_the_example_workflow_uses_the_action_as_declared():
    import yaml

    workflow = yaml.safe_load((ROOT / "config" / "github-actions.example.yml").read_text())
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    [job] = workflow["jobs"].values()
    [step] = [s for s in job["steps"] if "hatun" in s.get("uses", "")]
    assert set(step["with"]) <= set(action["inputs"]), "only declared inputs"
    assert not [s for s in job["steps"] if "down" in s.get("run", "")], "the post step tears down"
    config = (ROOT / step["with"]["config"]).read_text()
    given = [line.split("=", 1)[0].strip() for line in step["with"]["secrets"].splitlines() if line.strip()]
    assert sorted(given) == sorted(re.findall(r'private_key_env = "(\w+)"', config))
    for name in re.findall(r"steps\.hatun\.outputs\.([\w-]+)", (ROOT / "config" / "github-actions.example.yml").read_text()):
        assert name in action["outputs"]


@needs_node
def test_as_an_unprivileged_user_hatun_runs_through_sudo_n(make_runner, wheelhouse):
    """As on GitHub's runners (user `runner`, passwordless sudo): `hatun up` goes through `sudo -n`
    with only its keys preserved. Here sudo is a stand-in that records the call and refuses like a
    sudo that wants a password: a clear error, no retry, nothing for the post step."""
    import tempfile

    system_python_or_skip()
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root (to become another user) and setpriv")
    root = Path(tempfile.mkdtemp(prefix="hatun-action-user-"))
    try:
        root.chmod(0o755)
        wheels = root / "wheels"
        shutil.copytree(wheelhouse, wheels)
        wheels.chmod(0o755)
        fakebin = root / "bin"
        fakebin.mkdir()
        calls = root / "calls"
        calls.mkdir(mode=0o777)
        calls.chmod(0o777)
        (fakebin / "sudo").write_text(f"""#!/bin/bash
{{ printf '%s\\n' "$@"; echo ---; env; }} > {calls}/call-$$
echo "sudo: a password is required" >&2
exit 1
""")
        (fakebin / "sudo").chmod(0o755)
        nobody = (65534, 65534)
        env = {**offline_pip_env(wheels), "PIP_NO_CACHE_DIR": "1", "PATH": f"{fakebin}:{os.environ['PATH']}"}
        runner = make_runner(ROOT, root / "job", env=env, user=nobody)
        (runner.workspace / "hatun.toml").write_text('[[tunnels]]\nname = "gw1"\nprivate_key_env = "HATUN_GW1_KEY"\n')
        secret = PrivateKey.generate().base64
        main = runner.main({"config": "hatun.toml", "secrets": f"HATUN_GW1_KEY={secret}", "python": "/usr/bin/python3",
                            "package": str(next(wheels.glob("hatun-*.whl"))), "system-packages": "false"}, timeout=300)
        assert main.returncode == 1, main.text()
        [error] = main.errors
        assert "hatun up exit status 1: sudo: a password is required" in error and "passwordless sudo" in error, main.text()
        assert "(not retried" in error
        [call] = [p.read_text() for p in calls.iterdir()]
        argv, _, environ = call.partition("---\n")
        hatun_bin = main.outputs["hatun"]
        assert argv.splitlines()[:5] == ["-n", "--preserve-env=HATUN_GW1_KEY", "--", hatun_bin, "up"]
        assert f"HATUN_GW1_KEY={secret}" in environ.splitlines() and "INPUT_" not in environ
        assert Path(hatun_bin).stat().st_uid == nobody[0], "installed by the unprivileged user"
        post = runner.post(timeout=60)
        assert post.ok and "nothing to tear down" in post.stdout, post.text()
        assert secret not in main.stderr + post.stdout + post.stderr + main.summary
    finally:
        shutil.rmtree(root, ignore_errors=True)
