"""`hatun lab bench`: hatun's numbers, measured the same way every time on the lab.

Every scenario builds its own lab, runs hatun on it as users do (`hatun run` in the runner
namespace), measures with real traffic, and tears everything down. Each figure is measured in every
run and reported as median, min and max over the runs, with its target. Benchmarks report; they do
not assert (the tests assert behaviour).

Scenarios: failover (default and fast health settings), drain, restart (kill -9), weights,
throughput (hatun's route against a hand-written multipath route and a single tunnel), scale
(hatun's own CPU and memory with many tunnels).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import trio

from hatun.lab import topology, traffic
from hatun.lab.process import HatunProcess
from hatun.lab.topology import Lab

SCENARIOS = ("failover", "gray", "saturation", "drain", "restart", "weights", "throughput", "scale", "enroll")
SLOW = 1.0  # set by run_bench: health timings x SLOW, packet rates / SLOW (emulated CPUs)


def _health(profile: str) -> dict:
    """The [health] section for PROFILE, its timings stretched by SLOW."""
    from hatun.config.models import HEALTH_PROFILES

    keys = {"profile": f'"{profile}"'}
    if SLOW != 1.0:
        p = HEALTH_PROFILES[profile]
        keys.update({k: f'"{p[k] * SLOW:g}s"' for k in ("interval", "timeout", "min_timeout")})
    return keys


@dataclass
class Figure:
    scenario: str
    name: str
    unit: str
    target: str = ""  # e.g. "< 400", "= 0", ">= 0.97"
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def meets(self) -> bool | None:
        if not self.target or self.median is None:
            return None
        op, _, bound = self.target.partition(" ")
        value, bound = self.median, float(bound)
        return {"<": value < bound, "<=": value <= bound, "=": value == bound, ">=": value >= bound}[op]


@dataclass
class Report:
    machine: dict
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def figure(self, scenario: str, name: str, unit: str, target: str = "") -> Figure:
        for f in self.figures:
            if (f.scenario, f.name) == (scenario, name):
                return f
        f = Figure(scenario, name, unit, target)
        self.figures.append(f)
        return f

    def to_json(self) -> dict:
        return {"machine": self.machine, "notes": self.notes,
                "figures": [{**asdict(f), "median": f.median, "min": min(f.values, default=None),
                             "max": max(f.values, default=None), "meets_target": f.meets()} for f in self.figures]}

    def table(self) -> str:
        from hatun.render import table

        rows = []
        for f in self.figures:
            if not f.values:
                continue
            fmt = (lambda v: f"{v:.0f}") if f.unit in ("ms", "packets", "flows", "Mbit/s", "MiB") else (lambda v: f"{v:.3g}")
            ok = {True: "yes", False: "NO", None: ""}[f.meets()]
            rows.append((f.scenario, f.name, f.unit, fmt(f.median), fmt(min(f.values)), fmt(max(f.values)),
                         len(f.values), f.target, ok))
        m = self.machine
        head = (f"machine: {m['cpus']} CPUs ({m['cpu']}), kernel {m['kernel']}, backend {m['backend']},"
                f" wireguard-go {m['wireguard_go']}, python {m['python']}")
        return head + "\n" + table(("scenario", "figure", "unit", "median", "min", "max", "runs", "target", "met"), rows) + \
            "".join(f"\nnote: {n}" for n in self.notes)


def machine_info(backend: str) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    wg = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True).stdout.split("\n")[0] \
        if shutil.which("wireguard-go") else "not installed"
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "backend": backend,
            "wireguard_go": wg.replace("wireguard-go ", ""), "python": platform.python_version()}


# ---------------------------------------------------------------- helpers

_n = 0


def _lab_name() -> str:
    global _n
    _n += 1
    return f"b{os.getpid() % 10000:04d}{_n}"[:8]


async def _thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)



class _Scene:
    """A lab with hatun on it, removed on exit."""

    def __init__(self, gateways: int, backend: str, health: dict | None = None, routing: dict | None = None,
                 tunnels: dict | None = None, top: dict | None = None) -> None:
        self.gateways, self.backend = gateways, backend
        self.health, self.routing, self.tunnels, self.top = health, routing, tunnels, top
        self.lab: Lab | None = None
        self.hatun: HatunProcess | None = None

    async def __aenter__(self) -> _Scene:
        self.lab = await topology.lab_up(_lab_name(), self.gateways, self.backend, False)
        write_config(self.lab, self.health, self.routing, self.tunnels, self.top)
        self.hatun = HatunProcess(self.lab, args=("--log-level", "info"))
        await _thread(lambda: self.hatun.start(timeout=60 * SLOW))
        await _thread(lambda: self.hatun.wait(lambda s: len(s["route"]["members"]) == self.expected_members(),
                                              60 * SLOW, "tunnels in service"))
        return self

    def expected_members(self) -> int:
        tiers = [int((self.tunnels or {}).get(f"gw{i}", {}).get("priority", "0")) for i in range(1, self.gateways + 1)]
        return tiers.count(min(tiers))

    async def __aexit__(self, *exc) -> None:
        with trio.CancelScope(shield=True):
            if self.hatun is not None and self.hatun.proc is not None and self.hatun.proc.poll() is None:
                try:
                    await _thread(lambda: self.hatun.stop(timeout=30))
                except AssertionError:
                    pass
            if self.lab is not None:
                await topology.lab_down(self.lab.name)


def write_config(lab: Lab, health=None, routing=None, tunnels=None, top=None) -> None:
    """The lab's config with changes (TOML values as strings), per section and per tunnel."""
    text = topology.config_text(lab, health=health, extra_routing=routing)
    if top:
        text = "\n".join(f"{k} = {v}" for k, v in top.items()) + "\n" + text
    for name, keys in (tunnels or {}).items():
        marker = f'name = "{name}"\n'
        text = text.replace(marker, marker + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    with open(lab.config_path, "w") as f:
        f.write(text)


async def _wait_status(hatun: HatunProcess, predicate, timeout: float, what: str) -> dict:
    return await _thread(lambda: hatun.wait(predicate, timeout, what, interval=0.01 * SLOW))  # polling must not load a slow CPU


# ---------------------------------------------------------------- scenarios


FAILOVER_TARGETS = {"default": "<= 200", "fast": "<= 60"}  # loss window, ms (issue 14)


async def _failover_window(lab: Lab, fail: Callable, out: Callable, t: float) -> tuple[float, float, list]:
    """UDP flows through the lab; 2 s in, FAIL() breaks gw2 and OUT() waits until it is out of the
    route; healed 1 s later. Returns the loss window of gw2's flows taken together (seconds), its
    resolution, and the run's flows."""
    marks: dict[str, float] = {}

    async def chaos():
        await trio.sleep(2.0 * t)
        marks["fail"] = trio.current_time()
        await fail()
        await out()
        await trio.sleep(1.0 * t)
        await topology.lab_heal(lab.name, "gw2")

    run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=64, rate=1000 / t, duration=4.0 * t,
                                  on_start=chaos, linger=t)
    failed = [f for f in run.flows if f.gateways()[:1] == ["gw2"]]
    if "fail" not in marks or not failed:
        raise topology.LabError("no flow went through gw2, or gw2 was never failed")
    window, resolution = traffic.longest_gap(failed, marks["fail"] - 0.5 * t, marks["fail"] + 1.5 * t)
    return window, resolution, run.flows


async def _bfd_window(lab: Lab, t: float) -> tuple[float, float]:
    """The same measure with BIRD2 + BFD (50 ms x 3) routing over the same tunnels (hatun stopped
    with keep_on_exit: its tunnels stay, its steering goes)."""
    from hatun.lab import bfd

    await bfd.clear_hatun_steering(lab)
    async with bfd.bfd_routing(lab, range(1, lab.gateways + 1), interval_ms=round(50 * t)) as routing:
        await routing.wait_up(timeout=30 * t)

        async def out():
            await routing.wait_for(lambda st: 2 not in st.next_hops, "gw2's next hop withdrawn", 10 * t)

        window, resolution, _ = await _failover_window(
            lab, lambda: topology.lab_fail(lab.name, "gw2", "blackhole"), out, t)
    return window, resolution


async def bench_failover(report: Report, backend: str, runs: int, quick: bool, baseline: str | None = None) -> None:
    from hatun.config.models import HEALTH_PROFILES

    if baseline == "bfd":
        report.notes.append("failover: BIRD2 + BFD runs after hatun in each run's lab, over the same tunnels"
                            " (hatun stopped with keep_on_exit), same flows and the same blackhole of gw2")
    for profile in ["default"] if quick else ["default", "fast"]:
        sc = f"failover/{profile}"
        window = report.figure(sc, "loss window of the failed tunnel's flows, taken together", "ms",
                               FAILOVER_TARGETS[profile])
        resolution = report.figure(sc, "resolution of that window (median spacing of their packets)", "ms")
        if baseline == "bfd":
            bfd_window = report.figure(sc, "BIRD2 + BFD 50 ms x 3, same lab and flows: loss window", "ms")
            ratio = report.figure(sc, "hatun / BIRD2 + BFD", "ratio", "<= 0.5" if profile == "fast" else "")
        lost_other = report.figure(sc, "packets lost on the other tunnels", "packets", "= 0")
        moved = report.figure(sc, "share of flows that changed tunnel", "%")
        failback = report.figure(sc, "failback: heal -> back in the route", "ms")
        broken = report.figure(sc, "TCP connections broken at failback", "flows", "= 0")
        share = report.figure(sc, "healed tunnel's share of new flows 5 s after failback", "%")
        false_down = report.figure(sc, "healthy tunnels taken out of service (false failovers)", "transitions", "= 0")
        t = SLOW  # the whole timeline stretches on a slow (emulated) CPU
        for _ in range(runs):
            async with _Scene(3, backend, health=_health(profile), top={"keep_on_exit": "true"}) as s:
                lab, hatun = s.lab, s.hatun

                async def out():
                    await _wait_status(hatun, lambda st: "gw2" not in st["route"]["members"], 10 * t, "gw2 out")

                w, res, flows = await _failover_window(lab, lambda: topology.lab_fail(lab.name, "gw2", "blackhole"),
                                                       out, t)
                window.values.append(1000 * w)
                resolution.values.append(1000 * res)
                others = [f for f in flows if f.gateways()[:1] not in (["gw2"], [])]
                lost_other.values.append(sum(len(f.lost(end=max(f.sent.values()) - t)) for f in others))
                moved.values.append(100 * sum(len(f.gateways()) > 1 for f in flows) / len(flows))
                # Failback: TCP connections opened while gw2 is out must survive its return. First gw2
                # stays up for its recovery time: failing again sooner is flapping, which hatun
                # answers with the recovery time (its own figure: `gray`).
                await _wait_status(hatun, lambda st: "gw2" in st["route"]["members"], 30 * t, "gw2 back")
                await trio.sleep(HEALTH_PROFILES[profile]["recover_time"] * t)
                await topology.lab_fail(lab.name, "gw2", "blackhole")
                await _wait_status(hatun, lambda st: "gw2" not in st["route"]["members"], 10 * t, "gw2 out")
                marks: dict[str, float] = {}

                async def heal():
                    await trio.sleep(1.0 * t)
                    marks["heal"] = trio.current_time()
                    await topology.lab_heal(lab.name, "gw2")
                    await _wait_status(hatun, lambda st: "gw2" in st["route"]["members"], 30 * t, "gw2 back")
                    marks["back"] = trio.current_time()

                async with trio.open_nursery() as n:
                    n.start_soon(heal)
                    conns = await traffic.tcp_connections(lab.runner, topology.SERVICE, count=8,
                                                          duration=(5.0 if not quick else 3.0) * t)
                if "back" in marks:
                    failback.values.append(1000 * (marks["back"] - marks["heal"]))
                broken.values.append(sum(1 for c in conns if c.broken))
                st = await _thread(hatun.status)
                false_down.values.append(sum(t["transitions"].get("down", 0) for t in st["tunnels"] if t["name"] != "gw2"))
                if "back" in marks and not quick:
                    await trio.sleep(max(0.0, marks["back"] + 5.0 * t - trio.current_time()))
                new = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=60, rate=600 / t, duration=t, linger=t)
                share.values.append(100 * new.share().get("gw2", 0.0))
                if baseline == "bfd":
                    await _thread(lambda: hatun.stop(timeout=30))  # its tunnels stay (keep_on_exit)
                    b, _ = await _bfd_window(lab, t)
                    bfd_window.values.append(1000 * b)
                    ratio.values.append(w / b if b else 0.0)


GRAY_MODES = ("loss:10", "loss:30", "loss:60", "delay:80ms")


async def bench_gray(report: Report, backend: str, runs: int, quick: bool) -> None:
    """Gray failures: gw2 lossy or slow for a while (60 s; quick: 5 s), with flows on every tunnel.
    Counts gw2's transitions (out and back) and everything the other tunnels did."""
    from hatun.config.models import HEALTH_PROFILES

    seconds = (5.0 if quick else 60.0) * SLOW
    modes = GRAY_MODES[1:2] if quick else GRAY_MODES
    for _ in range(runs):
        async with _Scene(3, backend, health=_health("default")) as s:
            lab, hatun = s.lab, s.hatun
            for mode in modes:
                sc = f"gray/{mode}"
                outs = report.figure(sc, f"gw2 left service (during {seconds:g} s of {mode} and its recovery)",
                                     "transitions", "<= 1" if mode == "loss:30" else "")
                backs = report.figure(sc, "gw2 came back", "transitions", "<= 1" if mode == "loss:30" else "")
                others = report.figure(sc, "transitions of the other tunnels", "transitions", "= 0")
                moved = report.figure(sc, "flows of the other tunnels that moved", "flows", "= 0")
                back_after = report.figure(sc, "heal -> gw2 back in service", "s")
                before = {t["name"]: dict(t["transitions"]) for t in (await _thread(hatun.status))["tunnels"]}
                marks: dict[str, float] = {}

                async def fault():
                    await trio.sleep(1.0 * SLOW)
                    await topology.lab_fail(lab.name, "gw2", mode)
                    await trio.sleep(seconds)
                    await topology.lab_heal(lab.name, "gw2")
                    marks["heal"] = time.monotonic()

                run = await traffic.udp_flows(lab.runner, topology.SERVICE, flows=48, rate=200 / SLOW,
                                              duration=seconds + 3 * SLOW, on_start=fault, linger=SLOW)
                st = await _wait_status(hatun, lambda st: "gw2" in st["route"]["members"], 120 * SLOW, "gw2 back")
                back_after.values.append(time.monotonic() - marks["heal"])
                # The next fault after gw2's recovery time: sooner, a death would be flapping.
                await trio.sleep(HEALTH_PROFILES["default"]["recover_time"] * SLOW)
                delta = {t["name"]: {k: v - before[t["name"]].get(k, 0) for k, v in t["transitions"].items()}
                         for t in st["tunnels"]}
                outs.values.append(delta["gw2"].get("down", 0))
                backs.values.append(delta["gw2"].get("up", 0))
                others.values.append(sum(sum(d.values()) for name, d in delta.items() if name != "gw2"))
                healthy = [f for f in run.flows if f.gateways()[:1] in (["gw1"], ["gw3"])]
                moved.values.append(sum(len(f.gateways()) > 1 for f in healthy))
    report.notes.append("gray: loss:N drops N % on each direction of gw2's link (a probe's round trip is lost"
                        " with probability 1-(1-N/100)^2); default profile; 48 flows at 200 packets/s meanwhile")


async def bench_saturation(report: Report, backend: str, runs: int, quick: bool) -> None:
    """False failovers while iperf3 saturates every tunnel, then while busy loops saturate every CPU
    (60 s each; quick: 5 s), per profile."""
    if not shutil.which("iperf3"):
        report.notes.append("saturation: iperf3 not installed (apt-get install iperf3); skipped")
        return
    seconds = 5 if quick else 60
    for profile in ["default"] if quick else ["default", "fast"]:
        sc = f"saturation/{profile}"
        by_iperf = report.figure(sc, f"tunnels taken out during {seconds} s of iperf3 through every tunnel",
                                 "transitions", "= 0")
        by_cpu = report.figure(sc, f"tunnels taken out during {seconds} s of busy loops on every CPU",
                               "transitions", "= 0")
        for _ in range(runs):
            async with _Scene(3, backend, health=_health(profile)) as s:
                lab, hatun = s.lab, s.hatun

                def downs() -> int:
                    return sum(t["transitions"].get("down", 0) for t in hatun.status()["tunnels"])

                server = subprocess.Popen(["ip", "netns", "exec", lab.lan, "iperf3", "-s", "-B", topology.SERVICE],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    await trio.sleep(0.5)
                    d0 = await _thread(downs)
                    try:
                        await _thread(_iperf, lab, seconds, 16)
                    except topology.LabError as e:
                        report.notes.append(f"saturation: {e}")
                    by_iperf.values.append(await _thread(downs) - d0)
                finally:
                    server.send_signal(signal.SIGTERM)
                    server.wait(timeout=10)
                d0 = await _thread(downs)
                burners = [subprocess.Popen(["timeout", str(seconds), "sh", "-c", "while :; do :; done"])
                           for _ in range(2 * (os.cpu_count() or 1))]
                try:
                    await traffic.udp_flows(lab.runner, topology.SERVICE, flows=16, rate=100, duration=seconds)
                finally:
                    for b in burners:
                        b.kill()
                        b.wait(timeout=10)
                by_cpu.values.append(await _thread(downs) - d0)


async def bench_drain(report: Report, backend: str, runs: int, quick: bool) -> None:
    lost = report.figure("drain", "packets lost during a drain", "packets", "= 0")
    for _ in range(runs):
        async with _Scene(3, backend) as s:
            async def drain():
                await trio.sleep(1.0)
                await _thread(lambda: s.hatun.control({"command": "drain", "tunnel": "gw1"}))

            run = await traffic.udp_flows(s.lab.runner, topology.SERVICE, flows=32, rate=500, duration=3.0, on_start=drain)
            lost.values.append(sum(len(f.lost()) for f in run.flows))


async def bench_restart(report: Report, backend: str, runs: int, quick: bool) -> None:
    lost = report.figure("restart", "packets lost across kill -9 and restart", "packets", "= 0")
    for _ in range(runs):
        async with _Scene(3, backend) as s:
            async def crash():
                await trio.sleep(1.0)
                await _thread(s.hatun.kill9)
                await trio.sleep(0.3)
                s.hatun = HatunProcess(s.lab, args=("--log-level", "info"))
                await _thread(lambda: s.hatun.start(timeout=60))

            run = await traffic.udp_flows(s.lab.runner, topology.SERVICE, flows=48, rate=600, duration=4.0, on_start=crash)
            lost.values.append(sum(len(f.lost()) for f in run.flows))


async def bench_weights(report: Report, backend: str, runs: int, quick: bool) -> None:
    flows = 300 if quick else 3000
    err = report.figure("weights", f"largest deviation of a tunnel's share from its weight's ({flows} flows, 1:2:3)", "%", "<= 5")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, flows + 1024)), hard))
    for _ in range(runs):
        async with _Scene(3, backend, tunnels={"gw1": {"weight": "1"}, "gw2": {"weight": "2"}, "gw3": {"weight": "3"}}) as s:
            run = await traffic.udp_flows(s.lab.runner, topology.SERVICE, flows=flows, rate=3000, duration=flows / 3000 * 2)
            counts: dict[str, int] = {}
            for f in run.flows:
                if f.gateways():
                    counts[f.gateways()[0]] = counts.get(f.gateways()[0], 0) + 1
            total = sum(counts.values()) or 1
            # Relative deviation: |share - weight share| / weight share.
            err.values.append(100 * max(abs(counts.get(f"gw{i}", 0) / total - i / 6) / (i / 6) for i in (1, 2, 3)))
    report.notes.append(f"weights: each flow hashes to a bucket at random, so over {flows} flows a share"
                        f" scatters by about {100 * ((1 / 6 * 5 / 6 / flows) ** 0.5) / (1 / 6):.1f}% (relative) for weight 1 of 6")


def _iperf(lab: Lab, seconds: float, streams: int = 16) -> float:
    """Aggregate throughput (Mbit/s) of STREAMS TCP streams from the runner to the service host."""
    res = subprocess.run(["ip", "netns", "exec", lab.runner, "iperf3", "-c", topology.SERVICE, "-P", str(streams),
                          "-t", str(seconds), "-J"], capture_output=True, text=True, timeout=seconds + 60)
    try:
        doc = json.loads(res.stdout or "{}")
    except ValueError:
        doc = {}
    summary = doc.get("end", {}).get("sum_received")
    if doc.get("error") or not summary:
        raise topology.LabError(f"iperf3: {doc.get('error') or res.stderr.strip() or 'no result'}")
    return summary["bits_per_second"] / 1e6


async def bench_throughput(report: Report, backend: str, runs: int, quick: bool) -> None:
    if not shutil.which("iperf3"):
        report.notes.append("throughput: iperf3 not installed (apt-get install iperf3); skipped")
        return
    seconds = 2 if quick else 6
    report.notes.append("throughput: health timeout 1 s, fall 3 during these runs (iperf3 saturates the CPUs;"
                        " see the failover figures for the default settings)")
    for n in ([2] if quick else [2, 3]):
        via_hatun = report.figure(f"throughput/{n}", f"through hatun's route over {n} tunnels", "Mbit/s")
        by_hand = report.figure(f"throughput/{n}", f"hand-written multipath route over the same {n} tunnels", "Mbit/s")
        ratio = report.figure(f"throughput/{n}", "hatun / hand-written", "ratio", ">= 0.97")
        single = report.figure(f"throughput/{n}", "one tunnel alone", "Mbit/s")
        own_cpu = report.figure(f"throughput/{n}", "hatun's own CPU while traffic runs through its route", "% of a core")
        for _ in range(runs):
            # iperf3 saturates both CPUs of a small machine: probes through the busy tunnels queue far
            # beyond 250 ms, so a tolerant timeout keeps false failovers out of a data-plane figure.
            async with _Scene(n, backend, top={"keep_on_exit": "true"},
                              health={"interval": f'"{0.1 * SLOW:g}s"', "timeout": f'"{SLOW:g}s"', "rise": "3",
                                      "fall": "3"}) as s:
                lab = s.lab
                server = subprocess.Popen(["ip", "netns", "exec", lab.lan, "iperf3", "-s", "-B", topology.SERVICE],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    await trio.sleep(0.5)
                    await _thread(_iperf, lab, 1.0)  # warm-up (handshakes, neighbours, conntrack): not counted
                    # Alternate hatun's route and the hand-written one, so that the machine's drift
                    # (other load, CPU frequency) affects both alike.
                    a_runs, b_runs, cpu_runs = [], [], []
                    for _ in range(1 if quick else 3):
                        c0, w0 = _proc_cpu_seconds(s.hatun.pid), time.monotonic()
                        a_runs.append(await _thread(_iperf, lab, seconds))
                        cpu_runs.append(100 * (_proc_cpu_seconds(s.hatun.pid) - c0) / (time.monotonic() - w0))
                        # hatun leaves its tunnels (keep_on_exit); its route and rules make way for one by hand.
                        await _thread(lambda: s.hatun.stop(timeout=30))
                        await _hand_route(lab, [lab.runner_ifname(i) for i in range(1, n + 1)])
                        b_runs.append(await _thread(_iperf, lab, seconds))
                        await topology.run(["ip", "-n", lab.runner, "route", "del", "198.19.77.0/24"])
                        s.hatun = HatunProcess(lab, args=("--log-level", "info"))
                        await _thread(lambda: s.hatun.start(timeout=60))
                        await _wait_status(s.hatun, lambda st: len(st["route"]["members"]) == n, 30, "back in route")
                    a, b = statistics.median(a_runs), statistics.median(b_runs)
                    await _thread(lambda: s.hatun.stop(timeout=30))
                    await _hand_route(lab, [lab.runner_ifname(1)])
                    c = await _thread(_iperf, lab, seconds)
                finally:
                    server.send_signal(signal.SIGTERM)
                    server.wait(timeout=10)
                via_hatun.values.append(a)
                by_hand.values.append(b)
                ratio.values.append(a / b if b else 0.0)
                single.values.append(c)
                own_cpu.values.append(statistics.median(cpu_runs))


async def _hand_route(lab: Lab, ifnames: list[str]) -> None:
    """Replace hatun's steering with a plain multipath route in the main table, as one would by hand."""
    script = ["nft delete table inet hatun 2>/dev/null; true"]
    script += [f"ip rule del pref {p} 2>/dev/null; ip rule del pref {p} 2>/dev/null; ip rule del pref {p} 2>/dev/null; true"
               for p in (5200, 5201, 5202)]
    hops = " ".join(f"nexthop dev {i}" for i in ifnames)
    script.append(f"ip route replace 198.19.77.0/24 src {topology.SOURCE} {hops}")
    await topology.run(["ip", "netns", "exec", lab.runner, "sh", "-c", "; ".join(script)])


def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


SCALE_CPU_TARGETS = {("fast", 32): "< 5", ("fast", 128): "< 15", ("default", 32): "< 3"}


async def bench_scale(report: Report, backend: str, runs: int, quick: bool) -> None:
    """hatun's own CPU and memory with many tunnels, per profile (the same lab, hatun restarted)."""
    from hatun.config.models import HEALTH_PROFILES

    sizes = [4] if quick else [4, 32, 128]
    profiles = ["fast"] if quick else ["default", "fast"]
    measure = 3.0 if quick else 10.0
    for n in sizes:
        cpu = {p: report.figure(f"scale/{n}", f"hatun CPU, {p} profile (probes every"
                                f" {HEALTH_PROFILES[p]['interval'] * 1000:g} ms)", "% of a core",
                                SCALE_CPU_TARGETS.get((p, n), "")) for p in profiles}
        rss = report.figure(f"scale/{n}", "hatun peak RSS", "MiB", "< 100" if n == 32 else "")
        ready = report.figure(f"scale/{n}", "start -> all tunnels in service", "s", "< 3" if n == 32 else "")
        for _ in range(runs):
            if backend == "userspace":
                _ensure_inotify(2 * n)
            lab = await topology.lab_up(_lab_name(), n, backend, False)
            try:
                for profile in profiles:
                    write_config(lab, _health(profile), top={"keep_on_exit": "true"})
                    hatun = HatunProcess(lab, args=("--log-level", "warning"))
                    try:
                        t0 = time.monotonic()
                        await _thread(lambda: hatun.start(wait_ready=False))
                        await _thread(lambda: hatun.wait(lambda s: len(s["route"]["members"]) == n, 120,
                                                         "all in service", 0.02))
                        ready.values.append(time.monotonic() - t0)
                        await trio.sleep(2.0)  # settle
                        pid = hatun.pid
                        c0, w0 = _proc_cpu_seconds(pid), time.monotonic()
                        await trio.sleep(measure)
                        cpu[profile].values.append(100 * (_proc_cpu_seconds(pid) - c0) / (time.monotonic() - w0))
                        rss.values.append(_peak_rss_mib(pid))
                    finally:
                        with trio.CancelScope(shield=True):
                            try:
                                await _thread(lambda: hatun.stop(timeout=60))
                            except AssertionError:
                                pass
            finally:
                with trio.CancelScope(shield=True):
                    await topology.lab_down(lab.name)


_INOTIFY = "/proc/sys/fs/inotify/max_user_instances"
_inotify_saved: list[str] = []


def _ensure_inotify(needed: int) -> None:
    """wireguard-go holds one inotify instance per process (128 per user by default): a large lab
    raises the limit for the benchmark's duration (restored by `run_bench`)."""
    limit, used = topology.inotify_instances()
    if used + needed + 16 > limit:
        with open(_INOTIFY) as f:
            if not _inotify_saved:
                _inotify_saved.append(f.read().strip())
        with open(_INOTIFY, "w") as f:
            f.write(str(used + needed + 64))


def _restore_inotify() -> None:
    if _inotify_saved:
        with open(_INOTIFY, "w") as f:
            f.write(_inotify_saved.pop())


async def bench_enroll(report: Report, backend: str, runs: int, quick: bool) -> None:
    """`hatun up` to every tunnel in service, keyless: job tokens from the lab's issuer, enrollment at
    3 gateways (HTTPS, pinned), tunnels up, probes passing; then `hatun down` withdrawing them."""
    from hatun.lab import enroll

    up = report.figure("enroll", "hatun up to 3 tunnels in service, enrolling at 3 gateways", "s")
    down = report.figure("enroll", "hatun down, withdrawing 3 enrollments", "s")
    name = f"be{os.getpid() % 10000}"
    await topology.lab_down(name)
    lab = await topology.lab_up(name, 3, backend, False, True)
    env = {**os.environ, **enroll.runner_environment(lab)}

    def timed(*args: str) -> float:
        t0 = time.monotonic()
        res = subprocess.run(["ip", "netns", "exec", lab.runner, sys.executable, "-m", "hatun", *args],
                             capture_output=True, text=True, timeout=120, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"hatun {args[0]}: {(res.stdout + res.stderr).strip()[-300:]}")
        return time.monotonic() - t0

    try:
        for _ in range(runs):
            up.values.append(await _thread(timed, "up", lab.config_path, "--wait", "60", "--min-healthy", "3"))
            down.values.append(await _thread(timed, "down", lab.config_path))
    finally:
        with trio.CancelScope(shield=True):
            await topology.lab_down(name)


RUNNERS: dict[str, Callable] = {
    "failover": bench_failover, "gray": bench_gray, "saturation": bench_saturation, "drain": bench_drain,
    "restart": bench_restart, "weights": bench_weights, "throughput": bench_throughput, "scale": bench_scale,
    "enroll": bench_enroll,
}


async def run_bench(scenarios: list[str], *, runs: int, quick: bool, backend: str = "auto", slow: float = 1.0,
                    baseline: str | None = None, progress: Callable[[str], None] = lambda s: None) -> Report:
    """Run SCENARIOS (all when empty) RUNS times each; QUICK: small sizes (a smoke run for CI).
    SLOW > 1 stretches health timings and lowers packet rates, for emulated (slow) CPUs. BASELINE
    "bfd": the failover scenario also measures BIRD2 + BFD in the same labs."""
    global SLOW
    SLOW = slow
    from hatun.wireguard import select_backend

    topology.require_root()
    kind = await select_backend(backend)
    report = Report(machine_info(kind))
    if slow != 1.0:
        report.notes.append(f"slow factor {slow:g}: health intervals and timeouts x{slow:g}, packet rates /{slow:g}")
    for name in scenarios or list(SCENARIOS):
        if name not in RUNNERS:
            raise topology.LabError(f"unknown scenario {name!r}: choose from {', '.join(SCENARIOS)}")
        progress(f"bench: {name} ({runs} run{'s' if runs != 1 else ''})")
        t0 = time.monotonic()
        try:
            if name == "failover":
                await bench_failover(report, kind, runs, quick, baseline)
            else:
                await RUNNERS[name](report, kind, runs, quick)
        except Exception as e:  # noqa: BLE001 - one scenario failing must not lose the others' figures
            leaf = e
            while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
                leaf = leaf.exceptions[0]
            text = (str(leaf).splitlines() or [type(leaf).__name__])[0][:300]
            report.notes.append(f"{name}: stopped by an error: {type(leaf).__name__}: {text}")
            progress(f"bench: {name} failed: {type(leaf).__name__}: {text}")
        finally:
            _restore_inotify()
        progress(f"bench: {name} done in {time.monotonic() - t0:.0f} s")
    return report
