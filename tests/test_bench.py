"""The benchmark harness keeps working: a quick smoke run of every scenario (1 run, small sizes).
Nothing here is about speed; the figures are checked for presence and sanity only."""

import json
import subprocess
import sys
import warnings

import pytest

from tests.nsutil import have_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_quick_bench_of_every_scenario():
    if not have_netns():
        pytest.skip("needs root")
    bench = subprocess.Popen([sys.executable, "-m", "hatun", "lab", "bench", "--quick", "--runs", "1", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = bench.communicate(timeout=900)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 0, stderr[-3000:]
    doc = json.loads(stdout)
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["backend"] in ("kernel", "userspace")
    scenarios = {f["scenario"].split("/")[0] for f in doc["figures"] if f["values"]}
    assert scenarios >= {"failover", "gray", "drain", "weights", "scale"}, (scenarios, doc["notes"])
    # restart (kill -9 and a new hatun under traffic) is asserted by tests/test_lifecycle.py; here it
    # stopped once with an error that the report names (issue 14's note): the harness must say why.
    if "restart" not in scenarios:
        assert any(n.startswith("restart: ") for n in doc["notes"]), doc["notes"]
        warnings.warn(f"bench restart gave no figure: {[n for n in doc['notes'] if n.startswith('restart')]}")
    for f in doc["figures"]:
        for v in f["values"]:
            assert v >= 0, f
    # Its labs are named b<its pid % 10000, 4 digits><n>: none may be left (other suites may run labs).
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    assert f" hl-b{bench.pid % 10000:04d}" not in " " + res.stdout, "a benchmark lab was left behind"
