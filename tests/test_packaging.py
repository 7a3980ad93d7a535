"""Packages: the wheel and sdist that CI builds, installed the ways the README tells (pipx on a host,
a virtual environment from a git URL on a runner), with Debian's externally managed system Python.

Installs run offline from the session's wheelhouse (tests/wheelhouse.py): the same packages, no index.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.wheelhouse import ROOT, offline_pip_env, system_python_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """`python -m build`: the sdist, and the wheel built from that sdist (as PyPI would get them)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)])
    return out


def test_wheel_and_sdist_hold_hatun(dist):
    wheel = next(dist.glob("hatun-*-py3-none-any.whl"))
    sdist = next(dist.glob("hatun-*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("hatun/cli.py", "hatun/gateway.py", "hatun/lab/topology.py", "hatun/wireguard/kernel.py",
                   "hatun/netlink/rtnl.py", "hatun/config/models.py", "hatun/enroll/server.py"):
        assert module in names
    assert not any(n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hatun = hatun.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: MIT" in metadata and "Requires-Dist: pyroute2" in metadata
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    assert any(m.endswith("/pyproject.toml") for m in members) and any(m.endswith("/README.md") for m in members)


def test_pipx_installs_the_wheel_with_the_system_python(dist, wheelhouse, tmp_path):
    python = system_python_or_skip()
    wheel = next(dist.glob("hatun-*-py3-none-any.whl"))
    env = {"PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin"),
           "PIPX_MAN_DIR": str(tmp_path / "man"), **offline_pip_env(wheelhouse)}
    _run([sys.executable, "-m", "pipx", "install", "--python", python, str(wheel)], env)
    hatun = tmp_path / "bin" / "hatun"
    assert _run([str(hatun), "--version"]).stdout.startswith("hatun ")
    _run([str(hatun), "check", "--skip-secrets", str(ROOT / "config" / "runner.example.toml")])
    # pipx made its own venv from the system Python: nothing went into the system's site-packages.
    r = subprocess.run([python, "-c", "import hatun"], capture_output=True, timeout=30, cwd=tmp_path)
    assert r.returncode != 0


def test_venv_from_a_git_url(wheelhouse, tmp_path):
    """What a runner (or the GitHub Action with `source:`) does: a venv, then pip install git+URL."""
    python = system_python_or_skip()
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    venv = tmp_path / "venv"
    _run([python, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "pip"), "install", "--quiet", f"git+file://{ROOT}"], offline_pip_env(wheelhouse))
    assert _run([str(venv / "bin" / "hatun"), "--version"]).stdout.startswith("hatun ")
