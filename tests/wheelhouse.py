"""A directory of wheels for hatun and its dependencies, built once per test session.

Tests that install hatun the way users do (a fresh virtual environment from the system Python, inside a
namespace or container without a route to any package index) point pip at it with
`PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR`. The wheels are built with the project's own venv (same CPython
minor version as Debian's /usr/bin/python3, so binary wheels fit both).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


def system_python_or_skip() -> str:
    """Debian's externally managed Python, as on GitHub's Ubuntu runners; skip where it cannot make a venv."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs {SYSTEM_PYTHON}")
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv, sys; sys.exit(sys.version_info < (3, 11))"],
                       capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"{SYSTEM_PYTHON} cannot create a virtual environment (python3-venv) or is older than 3.11")
    return SYSTEM_PYTHON


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    """Wheels of hatun (built from this checkout) and of everything it needs at run time (in pytest's
    temporary directory, which keeps only the last few runs)."""
    d = tmp_path_factory.mktemp("wheels")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                        "--wheel-dir", str(d), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{r.stdout}\n{r.stderr}")
    # What building hatun from source needs (a git URL install builds it), and the pip that pipx
    # upgrades its shared environment to, for offline installs too.
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--dest", str(d), "setuptools>=77", "pip"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"pip download setuptools failed:\n{r.stdout}\n{r.stderr}")
    if not list(d.glob("hatun-*.whl")):
        pytest.fail(f"no hatun wheel in {d}: {sorted(p.name for p in d.iterdir())}")
    return d


def offline_pip_env(wheels: Path) -> dict[str, str]:
    """Environment entries that make pip install from `wheels` only, never from an index."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
