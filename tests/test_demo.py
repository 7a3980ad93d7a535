"""`hatun lab demo` runs to its end, shows failover, and leaves nothing behind."""

import subprocess
import sys

import pytest

from hatun.lab import topology
from tests.labutil import lab_name
from tests.nsutil import have_netns

pytestmark = pytest.mark.netns


def test_demo_runs_to_its_end_and_leaves_nothing(tmp_path):
    if not have_netns():
        pytest.skip("needs root")
    name = lab_name()
    try:
        res = subprocess.run([sys.executable, "-m", "hatun", "lab", "demo", "--duration", "14", "--name", name],
                             capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-2000:]
        out = res.stdout
        assert "gw1's path goes dark" in out and "gw3 back in service" in out
        assert "demo finished" in out
        assert "down" in out  # a failover was shown in the status view
        assert topology.existing_namespaces(name) == []
    finally:
        import trio

        trio.run(topology.lab_down, name)
