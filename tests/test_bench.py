"""The benchmark harness keeps working: a quick smoke run of every scenario (1 run, small sizes).
Nothing here is about speed; the figures are checked for presence and sanity only."""

import json
import subprocess
import sys

import pytest

from tests.nsutil import have_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_quick_bench_of_every_scenario():
    if not have_netns():
        pytest.skip("needs root")
    res = subprocess.run([sys.executable, "-m", "hatun", "lab", "bench", "--quick", "--runs", "1", "--json"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["backend"] in ("kernel", "userspace")
    scenarios = {f["scenario"].split("/")[0] for f in doc["figures"] if f["values"]}
    assert scenarios >= {"failover", "drain", "restart", "weights", "scale"}, scenarios
    for f in doc["figures"]:
        for v in f["values"]:
            assert v >= 0, f
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    assert " hl-b" not in " " + res.stdout, "a benchmark lab was left behind"
