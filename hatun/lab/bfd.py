"""The failover benchmark's baseline: BIRD2 with BFD over the lab's own tunnels.

What hatun does with probes, a routing daemon does with BFD. BIRD in the runner namespace routes the
lab's LAN over the tunnels with one ECMP static route whose next hops are each guarded by a BFD
session, and withdraws a next hop when its session goes down; BIRD in each gateway's namespace
answers BFD on its end of the tunnel. The tunnels are those hatun made (it ran with
`keep_on_exit = true` and was stopped), so both are measured over the same devices, keys and paths.

Each BIRD is our child process in the foreground; its config, control socket, pid file and log sit
in LAB_DIR/bfd, and all of it goes on exit, also after a failure or a cancellation. IPv4 only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from hatun.lab import topology
from hatun.lab.topology import LAN, SOURCE, Lab, LabError, tunnel_net

BIRD = "bird"
BIRDC = "birdc"
START_TIMEOUT = 20.0  # config check and control socket: well under a second here
STOP_GRACE = 5.0  # per signal: a SIGTERMed BIRD withdraws its kernel route and exits within milliseconds
QUERY_TIMEOUT = 5.0
POLL_INTERVAL = 0.02
# Where hatun steers from when it runs with the lab's config (its defaults: [routing] rule_priority
# uses 3 priorities from 5200, nft_table "hatun"); a stop with keep_on_exit leaves them in place.
HATUN_RULE_PRIORITIES = range(5200, 5203)
HATUN_NFT_TABLE = "hatun"


# ---------------------------------------------------------------- configs (pure)


def _timers(interval_ms: int, multiplier: int) -> str:
    return f"interval {interval_ms} ms; multiplier {multiplier};"


def runner_config(lab: Lab, gateways: list[int], interval_ms: int, multiplier: int) -> str:
    """BIRD's config for the runner: the LAN over the tunnels to GATEWAYS, one next hop per tunnel
    (the gateway's tunnel address on the runner's device), each guarded by a BFD session."""
    devices = ", ".join(f'"{lab.runner_ifname(i)}"' for i in gateways)
    hops = " ".join(f"via {tunnel_net(i)[1]}%'{lab.runner_ifname(i)}' bfd" for i in gateways)
    return "\n".join([
        f"# BFD baseline of lab {lab.name!r}, runner side (written by hatun.lab.bfd)",
        "log stderr all;",
        f"router id {SOURCE};",
        "protocol device {}",
        f"protocol bfd {{ interface {devices} {{ {_timers(interval_ms, multiplier)} }}; }}",
        # One multipath route: BIRD exports it with the next hops whose sessions are up, and
        # withdraws it when none is.
        f"protocol static {{ ipv4; route {LAN} {hops}; }}",
        # Into the main table, with the source address the gateways accept and route back (as
        # hatun's route has it); routes BIRD did not make are left alone.
        f"protocol kernel {{ ipv4 {{ import none; export filter {{ krt_prefsrc = {SOURCE}; accept; }}; }}; }}",
        "",
    ])


def gateway_config(lab: Lab, i: int, interval_ms: int, multiplier: int) -> str:
    """BIRD's config for gateway I: a BFD session with the runner's end of tunnel I."""
    net, device = tunnel_net(i), lab.gw_ifname(i)
    return "\n".join([
        f"# BFD baseline of lab {lab.name!r}, gateway gw{i} (written by hatun.lab.bfd)",
        "log stderr all;",
        f"router id {net[1]};",
        "protocol device {}",
        # BIRD answers only the sessions it was asked for: the neighbor statement asks for this one.
        f'protocol bfd {{ interface "{device}" {{ {_timers(interval_ms, multiplier)} }}; '
        f'neighbor {net[2]} dev "{device}" local {net[1]}; }}',
        "",
    ])


def parse_sessions(text: str, devices: dict[str, int]) -> dict[int, str]:
    """Gateway -> BFD session state ("Up", "Down", "Init", "AdminDown") from `birdc show bfd
    sessions` TEXT; DEVICES maps the runner's tunnel devices to gateways, other lines are ignored."""
    states = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] in devices:
            states[devices[fields[1]]] = fields[2]
    return dict(sorted(states.items()))


def parse_next_hops(routes: list[dict], devices: dict[str, int]) -> list[int]:
    """Gateways that are next hops of BIRD's route among ROUTES (`ip -j route show` output)."""
    hops = []
    for route in routes:
        if route.get("protocol") == "bird":
            hops += [devices[h["dev"]] for h in route.get("nexthops", [route]) if h.get("dev") in devices]
    return sorted(hops)


# ---------------------------------------------------------------- the runner's state


async def _ip_json(netns: str, *args: str) -> list[dict]:
    out = await topology.run(["ip", "-n", netns, "-j", *args], timeout=QUERY_TIMEOUT)
    return json.loads(out.stdout or "[]")


async def _lan_routes(netns: str) -> list[dict]:
    """Routes for the LAN in NETNS's main table."""
    return await _ip_json(netns, "route", "show", str(LAN), "table", "main")


async def _hatun_rules(netns: str) -> list[int]:
    return [r["priority"] for r in await _ip_json(netns, "rule", "show") if r.get("priority") in HATUN_RULE_PRIORITIES]


async def clear_hatun_steering(lab: Lab) -> None:
    """Hand the runner's tunnels over to another router: remove hatun's nftables table and policy
    rules (what a stop with keep_on_exit = true leaves besides the tunnels and the source address)
    and every route for the LAN in the main table. hatun must not be running. Idempotent.
    Raises LabError when a rule or route cannot be removed."""
    ns = lab.runner
    await topology.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", HATUN_NFT_TABLE], check=False)
    # `ip rule del pref P` removes one rule of that priority per call; hatun has one per tunnel at 5200.
    for priority in await _hatun_rules(ns):
        await topology.run(["ip", "-n", ns, "rule", "del", "pref", str(priority)])
    for _ in await _lan_routes(ns):
        await topology.run(["ip", "-n", ns, "route", "del", str(LAN), "table", "main"])


async def _check_runner(lab: Lab, gateways: list[int]) -> None:
    """Raise LabError unless the runner has the tunnels (up, with their addresses) and the source
    address, and nothing but BIRD would steer the LAN."""
    links = {link["ifname"]: link for link in await _ip_json(lab.runner, "address", "show")}

    def has(ifname: str, address: str) -> bool:
        link = links.get(ifname, {})
        return "UP" in link.get("flags", ()) and any(a.get("local") == address for a in link.get("addr_info", ()))

    missing = [lab.runner_ifname(i) for i in gateways if not has(lab.runner_ifname(i), str(tunnel_net(i)[2]))]
    if missing:
        raise LabError(f"lab {lab.name!r}: no tunnel device up with its address for {', '.join(missing)} in the runner:"
                       " run hatun on the lab with keep_on_exit = true and stop it (its tunnels stay)")
    if not any(has(ifname, SOURCE) for ifname in links):
        raise LabError(f"lab {lab.name!r}: the runner has no source address {SOURCE} (hatun puts it on lo and"
                       " keeps it with keep_on_exit = true)")
    rules, routes = await _hatun_rules(lab.runner), await _lan_routes(lab.runner)
    if rules or routes:
        what = [f"hatun's rules (priority {', '.join(map(str, sorted(set(rules))))})"] if rules else []
        what += [f"a route for {LAN} in the main table"] if routes else []
        raise LabError(f"lab {lab.name!r}: {' and '.join(what)} would steer the LAN instead of BIRD:"
                       " stop hatun and call clear_hatun_steering first")


async def _hash_by_ports(lab: Lab) -> None:
    # The same hashing as hatun's (its default hash_policy "l4"): flows spread over the next hops.
    await topology.run(["ip", "netns", "exec", lab.runner, "sh", "-c",
                        "echo 1 > /proc/sys/net/ipv4/fib_multipath_hash_policy"])


# ---------------------------------------------------------------- BIRD processes


class _Bird:
    """One BIRD daemon, our child in network namespace NETNS; its files are DIRECTORY/LABEL.*."""

    def __init__(self, netns: str, directory: str, label: str) -> None:
        self.netns, self.label = netns, label
        base = os.path.join(directory, label)
        self.config, self.socket, self.pidfile, self.log = (base + ext for ext in (".conf", ".ctl", ".pid", ".log"))
        self.process: trio.Process | None = None

    async def start(self, text: str) -> None:
        """Write TEXT as the config, check it and start BIRD; return once its control socket answers.
        Raises LabError with BIRD's own words when it refuses the config, exits or does not come up."""
        with open(self.config, "w") as f:
            f.write(text)
        checked = await topology.run([BIRD, "-p", "-c", self.config], check=False)
        if checked.returncode != 0:
            raise LabError(f"BIRD refuses the config for {self.label}: {checked.stderr.strip() or checked.stdout.strip()}")
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            # `ip netns exec` execs BIRD: the child's PID is BIRD's. Its own session: a Ctrl-C meant
            # for the caller does not reach it, the caller's clean-up ends it.
            self.process = await trio.lowlevel.open_process(
                ["ip", "netns", "exec", self.netns, BIRD, "-f", "-c", self.config, "-s", self.socket, "-P", self.pidfile],
                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True)
        finally:
            os.close(fd)
        with trio.move_on_after(START_TIMEOUT):
            while self.process.poll() is None:
                if (await self.birdc("show", "status", check=False)).returncode == 0:
                    return
                await trio.sleep(POLL_INTERVAL)
            raise LabError(f"BIRD for {self.label} in {self.netns} exited at start with status"
                           f" {self.process.returncode}: {self.log_tail()}")
        raise LabError(f"BIRD for {self.label} in {self.netns} did not answer on {self.socket} within"
                       f" {START_TIMEOUT:g} s: {self.log_tail()}")

    async def birdc(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A BIRD command through its control socket (birdc connects by path from any namespace)."""
        return await topology.run([BIRDC, "-s", self.socket, *command], check=check, timeout=QUERY_TIMEOUT)

    def check_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise LabError(f"BIRD for {self.label} in {self.netns} exited with status {self.process.returncode}:"
                           f" {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-lines:]) or "(no output)"
        except OSError:
            return "(no log)"

    async def stop(self) -> None:
        """SIGTERM (BIRD withdraws its kernel route), SIGKILL after STOP_GRACE; waits for the exit."""
        if self.process is None:
            return
        self.process.terminate()
        with trio.move_on_after(STOP_GRACE):
            await self.process.wait()
            return
        self.process.kill()
        with trio.move_on_after(STOP_GRACE):
            await self.process.wait()


# ---------------------------------------------------------------- the baseline


@dataclass(frozen=True)
class BfdState:
    """The runner's view: each gateway's BFD session state (no entry: no session yet) and the
    gateways that are next hops of the kernel's route for the LAN."""

    sessions: dict[int, str]
    next_hops: list[int]


class BfdRouting:
    """BIRD with BFD routing a lab's LAN over the tunnels to some of its gateways (see bfd_routing)."""

    def __init__(self, lab: Lab, gateways: list[int], runner: _Bird, birds: list[_Bird], directory: str) -> None:
        self.lab, self.gateways, self.directory = lab, gateways, directory
        self._runner, self._birds = runner, birds
        self._devices = {lab.runner_ifname(i): i for i in gateways}

    @property
    def pids(self) -> dict[str, int]:
        """PID of each BIRD: "runner", "gw1", ..."""
        return {b.label: b.process.pid for b in self._birds if b.process is not None}

    def _check_running(self) -> None:
        for bird in self._birds:
            bird.check_running()

    async def sessions(self) -> dict[int, str]:
        """Gateway -> state of its BFD session, as the runner's BIRD reports it."""
        self._check_running()
        return parse_sessions((await self._runner.birdc("show", "bfd", "sessions")).stdout, self._devices)

    async def next_hops(self) -> list[int]:
        """Gateways that are next hops of the kernel's route for the LAN in the runner (main table)."""
        self._check_running()
        return parse_next_hops(await _lan_routes(self.lab.runner), self._devices)

    async def state(self) -> BfdState:
        # The route first: BIRD changes it after a session changes, so the sessions read next are
        # at least as new as what the route shows (the other order can pair an old "Up" with a
        # next hop already withdrawn).
        next_hops = await self.next_hops()
        return BfdState(await self.sessions(), next_hops)

    async def wait_for(self, predicate: Callable[[BfdState], bool], what: str, timeout: float) -> BfdState:
        """Poll the state until PREDICATE(state) holds and return that state. Raises LabError
        naming WHAT and the last state after TIMEOUT seconds, or when a BIRD exited."""
        state = None
        with trio.move_on_after(timeout):
            while not predicate(state := await self.state()):
                await trio.sleep(POLL_INTERVAL)
            return state
        raise LabError(f"BFD baseline of lab {self.lab.name!r}: no {what} within {timeout:g} s (last seen: {state})")

    async def wait_up(self, timeout: float = 10.0) -> BfdState:
        """Wait until every session is up and every gateway is a next hop (see wait_for)."""
        return await self.wait_for(
            lambda s: all(s.sessions.get(i) == "Up" for i in self.gateways) and s.next_hops == self.gateways,
            "session up and next hop for every gateway", timeout)


def _checked_gateways(lab: Lab, gateways: Iterable[int], interval_ms: int, multiplier: int) -> list[int]:
    wanted = sorted(set(gateways))
    if not wanted:
        raise LabError("the BFD baseline needs at least one gateway")
    for i in wanted:
        lab.gateway_index(str(i))
    if interval_ms < 1 or not 1 <= multiplier <= 255:  # BFD's detect multiplier is one byte; BIRD checks neither
        raise LabError(f"BFD timers {interval_ms} ms x {multiplier}: use at least 1 ms and a multiplier of 1..255")
    return wanted


@asynccontextmanager
async def bfd_routing(lab: Lab, gateways: Iterable[int], *, interval_ms: int = 50,
                      multiplier: int = 3) -> AsyncIterator[BfdRouting]:
    """BIRD2 in the runner namespace routes the lab's LAN over the tunnels to GATEWAYS (indices) as
    an ECMP static route in the main table (source topology.SOURCE) whose next hops are each guarded
    by a BFD session of INTERVAL_MS x MULTIPLIER; BIRD2 in each gateway's namespace answers BFD on its
    tunnel. Removed on exit (processes ended by PID, route and files deleted), also on errors and
    cancellation.

    The runner must have the tunnels and the source address as hatun leaves them when stopped with
    keep_on_exit = true, and nothing else steering the LAN (see clear_hatun_steering). Sets the
    runner's fib_multipath_hash_policy to 1, as hatun does. Raises LabError (with BIRD's own message
    when BIRD fails)."""
    topology.require_root()
    if shutil.which(BIRD) is None or shutil.which(BIRDC) is None:
        raise LabError("the BFD baseline needs BIRD 2 (apt-get install --no-install-recommends bird2)")
    wanted = _checked_gateways(lab, gateways, interval_ms, multiplier)
    await _check_runner(lab, wanted)
    await _hash_by_ports(lab)
    directory = os.path.join(lab.dir, "bfd")
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        raise LabError(f"lab {lab.name!r} already has a BFD baseline ({directory}); `hatun lab down` removes what a"
                       " crashed one left") from None
    gw_birds = {i: _Bird(lab.gw_ns(i), directory, f"gw{i}") for i in wanted}
    runner = _Bird(lab.runner, directory, "runner")
    birds = [*gw_birds.values(), runner]
    try:
        # Gateways first: they answer as soon as the runner's sessions start.
        for i, bird in gw_birds.items():
            await bird.start(gateway_config(lab, i, interval_ms, multiplier))
        await runner.start(runner_config(lab, wanted, interval_ms, multiplier))
        yield BfdRouting(lab, wanted, runner, birds, directory)
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for bird in birds:
                    nursery.start_soon(bird.stop)
            # A BIRD that had to be killed left its route behind.
            await topology.run(["ip", "-n", lab.runner, "route", "del", str(LAN), "table", "main", "proto", "bird"],
                               check=False)
            shutil.rmtree(directory, ignore_errors=True)
