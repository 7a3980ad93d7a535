"""`hatun lab demo`: the lab, hatun on it, steady traffic through it, and gateways failing and healing
one after another, shown live; everything removed at the end (also on Ctrl-C).

The caller (the CLI) passes `show(frame)` to draw each frame; this module never prints.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from hatun.control import ControlError, request
from hatun.lab import topology
from hatun.lab.process import HatunProcess
from hatun.lab.services import gateway_of
from hatun.lab.traffic import udp_socket
from hatun.render import status_text
from hatun.status import Status

PACKET = struct.Struct("!Id")


@dataclass
class Live:
    """Counters of the demo's traffic, per second."""

    sent: int = 0
    received: int = 0
    by_gateway: dict[str, int] = field(default_factory=dict)
    pending: dict[int, float] = field(default_factory=dict)  # seq -> send time
    lost: int = 0
    lost_this_second: int = 0

    def roll(self) -> tuple[dict[str, int], int]:
        by, lost = self.by_gateway, self.lost_this_second
        self.by_gateway, self.lost_this_second = {}, 0
        return by, lost


async def _traffic(netns: str, live: Live, flows: int = 24, rate: float = 240.0) -> None:
    """Steady UDP flows to the service host, counting replies per gateway and losses. Each flow lives
    5-15 s and is replaced by a new one (a new source port): existing flows show that they stay on
    their tunnel, new ones show how the route spreads them."""
    import random

    rng = random.Random(7)
    seq = 0

    async def flow_slot() -> None:
        nonlocal seq
        await trio.sleep(rng.uniform(0, flows / rate))
        while True:
            raw = udp_socket(netns, topology.SERVICE)
            sock = trio.socket.from_stdlib_socket(raw)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_receive, sock, live)
                    end = trio.current_time() + rng.uniform(5, 15)
                    while trio.current_time() < end:
                        now = trio.current_time()
                        try:
                            raw.send(PACKET.pack(seq, now))
                        except OSError:
                            pass
                        live.pending[seq] = now
                        live.sent += 1
                        seq += 1
                        await trio.sleep(flows / rate)
                    await trio.sleep(0.5)  # the last replies
                    nursery.cancel_scope.cancel()
            finally:
                raw.close()

    async def expire() -> None:
        while True:
            now = trio.current_time()
            for old, sent in list(live.pending.items()):
                if now - sent > 1.0:
                    del live.pending[old]
                    live.lost += 1
                    live.lost_this_second += 1
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(expire)
        for _ in range(flows):
            nursery.start_soon(flow_slot)


async def _receive(sock, live: Live) -> None:
    while True:
        try:
            data = await sock.recv(2048)
        except OSError:
            continue
        body, _, src = data.rpartition(b"|")
        if len(body) >= PACKET.size:
            seq, _ = PACKET.unpack_from(body)
            if live.pending.pop(seq, None) is not None:
                live.received += 1
                gw = gateway_of(src.decode(errors="replace"))
                live.by_gateway[gw] = live.by_gateway.get(gw, 0) + 1


def _scenario(duration: float) -> list[tuple[float, str, str, str]]:
    """(time, action, gateway, words) scaled to DURATION."""
    steps = [
        (0.12, "fail", "gw1", "gw1's path goes dark (every packet dropped on its link)"),
        (0.28, "heal", "gw1", "gw1's path is back"),
        (0.42, "kill", "gw2", "gw2's WireGuard peer is killed"),
        (0.58, "heal", "gw2", "gw2's WireGuard peer restarts"),
        (0.72, "drain", "gw3", "gw3 drained for maintenance: no new flows, existing ones stay"),
        (0.86, "undrain", "gw3", "gw3 back in service"),
    ]
    return [(duration * f, a, gw, words) for f, a, gw, words in steps]


def _traffic_line(by: dict[str, int], lost: int, live: Live) -> str:
    total = sum(by.values()) or 1
    shares = "  ".join(f"{gw} {100 * n / total:3.0f}%" for gw, n in sorted(by.items())) or "no replies"
    return (f"traffic (24 UDP flows at a time, each living 5-15 s, 240 packets/s): {shares}\n"
            f"lost this second: {lost}, in all: {live.lost} of {live.sent}")


async def run_demo(show: Callable[[str], None], *, name: str = "demo", duration: float = 60.0,
                   backend: str = "auto", enroll: bool = False) -> dict:
    """Run the demo for DURATION seconds; returns a summary. Cleans up whatever happens."""
    events: deque[str] = deque(maxlen=6)
    t0 = time.monotonic()

    def event(text: str) -> None:
        events.append(f"{time.monotonic() - t0:5.1f}s  {text}")

    topology.require_root()
    event("building the lab: a runner, 3 gateways, a private LAN"
          + (", an OIDC issuer and an enrollment service per gateway" if enroll else ""))
    await topology.lab_down(name)
    lab = await topology.lab_up(name, 3, backend, False, enroll)
    proc = None
    summary: dict = {}
    try:
        env = None
        if enroll:
            from hatun.lab.enroll import runner_environment

            env = runner_environment(lab)  # what a GitHub job with `id-token: write` has
            event("hatun enrolls at each gateway with the job's OIDC token (no key in the config)")
        hatun = HatunProcess(lab, log_path=os.path.join(lab.dir, "hatun.log"), args=(), env=env)
        hatun.start(wait_ready=False)
        proc = hatun.proc
        event(f"hatun started in {lab.runner} (log: {lab.dir}/hatun.log)")
        status = await _wait_ready(lab, proc)
        event("all tunnels up: traffic starts")
        live = Live()
        plan = _scenario(duration)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_traffic, lab.runner, live)
            start = trio.current_time()
            while trio.current_time() - start < duration:
                elapsed = trio.current_time() - start
                while plan and plan[0][0] <= elapsed:
                    _, action, gw, words = plan.pop(0)
                    event(words)
                    nursery.start_soon(_act, lab, action, gw)
                await trio.sleep(1.0)
                try:
                    status = await trio.to_thread.run_sync(lambda: request(lab.control_socket, {"command": "status"})["status"])
                except ControlError as e:
                    status = None
                    event(f"hatun does not answer: {e}")
                by, lost = live.roll()
                frame = [status_text(Status.from_json(status)) if status else "(no status)", "", _traffic_line(by, lost, live), "",
                         "events:", *events, "", f"demo: {elapsed:.0f} of {duration:.0f} s; Ctrl-C ends it early"]
                show("\n".join(frame))
            nursery.cancel_scope.cancel()
        summary = {"sent": live.sent, "lost": live.lost,
                   "transitions": {t["name"]: t["transitions"] for t in (status or {}).get("tunnels", [])}}
    finally:
        with trio.CancelScope(shield=True):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(20):
                    while proc.poll() is None:
                        await trio.sleep(0.1)
                if proc.poll() is None:
                    proc.kill()
            await topology.lab_down(name)
    return summary


async def _act(lab, action: str, gw: str) -> None:
    if action in ("fail", "kill"):
        await topology.lab_fail(lab.name, gw, "blackhole" if action == "fail" else "kill")
    elif action == "heal":
        await topology.lab_heal(lab.name, gw)
    else:
        await trio.to_thread.run_sync(lambda: request(lab.control_socket, {"command": action, "tunnel": gw}))


async def _wait_ready(lab, proc, timeout: float = 30.0) -> dict:
    deadline = trio.current_time() + timeout
    while trio.current_time() < deadline:
        if proc.poll() is not None:
            raise topology.LabError(f"hatun exited with status {proc.returncode}: see {lab.dir}/hatun.log")
        try:
            status = await trio.to_thread.run_sync(lambda: request(lab.control_socket, {"command": "status"})["status"])
            if len(status["route"]["members"]) == 3:
                return status
        except (ControlError, OSError):
            pass
        await trio.sleep(0.2)
    raise topology.LabError(f"the tunnels did not come up within {timeout:.0f} s: see {lab.dir}/hatun.log")

