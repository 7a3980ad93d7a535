"""The alerting rules and the example Prometheus configuration, checked by promtool."""

import shutil
import subprocess

import pytest

from tests.promutil import ALERTS, REPO

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool not installed (Debian: apt-get install prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [
    ("check", "rules", str(ALERTS.relative_to(REPO))),
    ("test", "rules", "config/alerts.test.yml"),
    ("check", "config", "config/prometheus.example.yml"),
], ids=" ".join)
def test_promtool(args):
    res = promtool(*args)
    assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}{res.stderr}"
