"""Kernel WireGuard against wireguard-go, inside the test VM: `python -m tests.vm.bench_in_vm`.

Boots the VM once and runs `hatun lab bench` there with each backend (quick sizes: the VM emulates
its CPU, 20-30x slower than the host, so only the comparison between the two is meaningful), then
prints both tables and the figures side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.vm.harness import run_in_vm, vm_available

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = "failover throughput"
RUNS = 3
SLOW = 5  # the emulated CPU is 20-30x slower: probes every 500 ms, timeout 1.25 s


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*", default=SCENARIOS.split())
    ap.add_argument("--runs", type=int, default=RUNS)
    ap.add_argument("--slow", type=float, default=SLOW)
    args = ap.parse_args()
    ok, why = vm_available()
    if not ok:
        print(f"no test VM here: {why}", file=sys.stderr)
        return 2
    py = sys.executable
    # The guest has no udev: wireguard-go needs the TUN device node made by hand.
    cmd = ("modprobe tun 2>/dev/null; mkdir -p /dev/net; [ -e /dev/net/tun ] || mknod /dev/net/tun c 10 200; "
           f"for b in kernel userspace; do {py} -m hatun lab bench {' '.join(args.scenarios)} --quick --runs {args.runs} --slow {args.slow:g} --backend $b --json"
           f" > /tmp/bench-$b.json || exit 1; done; "
           f"{py} -c 'import json; print(\"RESULT\", json.dumps({{b: json.load(open(f\"/tmp/bench-{{b}}.json\")) "
           f"for b in (\"kernel\", \"userspace\")}}))'")
    res = run_in_vm(cmd, timeout=3000, cwd=REPO, memory="1200M", stream=sys.stderr)
    line = next((l for l in res.output.splitlines() if l.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        print(res.output[-4000:], file=sys.stderr)
        return 1
    doc = json.loads(line[len("RESULT "):])
    rows = {}
    for backend, report in doc.items():
        for f in report["figures"]:
            if f["median"] is not None:
                rows.setdefault((f["scenario"], f["name"], f["unit"]), {})[backend] = f["median"]
    print(f"in the VM ({doc['kernel']['machine']['cpus']} emulated CPU, kernel {doc['kernel']['machine']['kernel']},"
          f" slow factor {args.slow:g}, {args.runs} runs, medians):")
    print(f"{'scenario':<16} {'figure':<60} {'unit':<8} {'kernel':>10} {'wireguard-go':>13}")
    for (scenario, name, unit), values in rows.items():
        print(f"{scenario:<16} {name:<60} {unit:<8} {values.get('kernel', float('nan')):>10.3g}"
              f" {values.get('userspace', float('nan')):>13.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
