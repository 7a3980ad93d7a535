"""TunnelRunner without root: its tasks run against fakes of netlink, the probe engine and the
backend (the lab tests run the same code against real tunnels)."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio

from hatun.health import State
from hatun.tunnel import KICK_INTERVAL
from tests.fakes import FakeProbes, FakeRtnl, RecordingBackend, make_env, make_runner


def started_runner(pokes=None):
    rtnl, probes = FakeRtnl(), FakeProbes()
    backend = RecordingBackend(rtnl)
    runner = make_runner(env=make_env(backend, pokes, rtnl=rtnl, probes=probes))
    return runner, backend, rtnl, probes


async def wait_until(predicate, limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.01)


@asynccontextmanager
async def serving(runner, probes):
    """RUNNER serving in a nursery of the test's; yields its probe stream once registered, stops it at the end."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.serve)
        await wait_until(lambda: probes.streams)
        yield probes.streams[0]
        runner.stop()


def results(stream, ok: bool, count: int) -> None:
    """COUNT probe results of STREAM: answered (1 ms) or timed out."""
    for _ in range(count):
        if ok:
            stream.on_result(True, 0.001, None)
        else:
            stream.on_result(False, None, "timeout")


async def test_serve_creates_the_device_and_registers_probes(autojump_clock):
    pokes = []
    runner, backend, rtnl, probes = started_runner(pokes)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.serve)
        await wait_until(lambda: probes.streams)
        assert runner.present and runner.ifindex == rtnl.links["hat-gw1"].index
        assert [s.ifname for s in backend.applied] == ["hat-gw1"] and pokes
        runner.stop()
    assert runner.done.is_set() and not probes.streams  # stopping unregistered its probes


async def test_stop_ends_every_task_of_the_tunnel_and_nothing_else(autojump_clock):
    runner, backend, rtnl, probes = started_runner()
    other = trio.Event()

    async def neighbour():  # another task of the same parent nursery
        await trio.sleep(3600)
        other.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.serve)
        nursery.start_soon(neighbour)
        await wait_until(lambda: probes.streams)
        stream = probes.streams[0]
        results(stream, True, runner.health.rise)
        assert runner.health.health is State.UP
        stream.on_result(False, None, "timeout")  # starts a congestion check: a task of the tunnel's
        await trio.sleep(0)
        runner.stop()
        await runner.done.wait()
        assert not other.is_set()  # the neighbour runs on
    assert other.is_set()


async def test_a_down_silent_tunnel_gets_session_kicks_and_an_up_one_none(autojump_clock):
    runner, backend, rtnl, probes = started_runner()
    async with serving(runner, probes) as stream:
        results(stream, True, runner.health.rise)
        await trio.sleep(10 * KICK_INTERVAL)
        assert backend.resets == 0  # up: no kicks
        results(stream, False, runner.health.fall)
        await wait_until(lambda: runner.health.health is State.DOWN)  # nothing arrived: down
        await trio.sleep(3.5 * KICK_INTERVAL)
        assert backend.resets == 3  # one per interval, from the first interval after going down
        results(stream, True, runner.health.rise)
        kicked = backend.resets
        await trio.sleep(10 * KICK_INTERVAL)
        assert runner.health.health is State.UP and backend.resets <= kicked + 1


async def fail_while_traffic_arrives(runner, rtnl, stream) -> None:
    """An up tunnel whose probes fail `fall` times while a lot arrives through it."""
    results(stream, True, runner.health.rise)
    results(stream, False, runner.health.fall - 1)
    await trio.sleep(0.05)  # the baseline of the rx counter is read (at the failure before the last)
    rtnl.add("hat-gw1", rtnl.links["hat-gw1"].index, rx=1_000_000)  # the way in works
    results(stream, False, 1)


async def test_congestion_guard_keeps_a_tunnel_that_receives_and_answers_late(autojump_clock):
    runner, backend, rtnl, probes = started_runner()
    async with serving(runner, probes) as stream:
        await fail_while_traffic_arrives(runner, rtnl, stream)
        await trio.sleep(0.5)
        assert runner.health.health is State.UP and runner.health.suspect
        stream.on_late(0.8)  # the way out works too, slowly
        assert runner.health.health is State.UP and not runner.health.suspect and runner.detector.congested == 1


async def test_congestion_guard_takes_a_one_way_failure_down(autojump_clock):
    runner, backend, rtnl, probes = started_runner()
    async with serving(runner, probes) as stream:
        await fail_while_traffic_arrives(runner, rtnl, stream)  # and no reply comes back
        await wait_until(lambda: runner.health.health is State.DOWN, 10)


async def test_a_runner_stopped_before_it_starts_never_runs(autojump_clock):
    runner, backend, rtnl, probes = started_runner()
    runner.stop()
    assert runner.done.is_set()
    await runner.serve()
    assert backend.applied == [] and probes.streams == []


async def test_kicks_go_on_when_a_down_tunnels_tasks_restart(autojump_clock):
    from hatun.netlink.rtnl import Link
    from hatun.wireguard.model import WireGuardError

    runner, backend, rtnl, probes = started_runner()
    failures = [WireGuardError("refused once")]
    real_apply = backend.apply

    async def apply(settings):
        if failures and backend.applied:
            raise failures.pop()
        return await real_apply(settings)

    backend.apply = apply
    async with serving(runner, probes) as stream:
        results(stream, False, runner.health.fall)
        await wait_until(lambda: runner.health.health is State.DOWN)
        await trio.sleep(2.5 * KICK_INTERVAL)
        assert backend.resets == 2
        link = rtnl.links["hat-gw1"]
        runner.set_link(Link(link.index, link.name, "tun", False, False, 1420))  # set down: re-applied...
        await wait_until(lambda: runner.restarts == 1)  # ...which fails once: the tunnel's tasks restart
        rtnl.add("hat-gw1", link.index)
        await wait_until(lambda: runner.present)
        kicked = backend.resets
        await trio.sleep(3.5 * KICK_INTERVAL)
        assert runner.health.health is State.DOWN and backend.resets >= kicked + 3


async def test_a_tunnel_full_of_its_own_data_waits_for_the_queue_not_for_death(autojump_clock):
    """Nothing arrived, but much was sent into it: its probes may wait behind that data. A reply within
    QUEUE_WAIT keeps it; without one (and nothing received) it is dead."""
    for reply in (True, False):
        runner, backend, rtnl, probes = started_runner()
        async with serving(runner, probes) as stream:
            results(stream, True, runner.health.rise)
            results(stream, False, runner.health.fall - 1)
            await trio.sleep(0.05)  # the baseline is read
            rtnl.add("hat-gw1", rtnl.links["hat-gw1"].index, tx=10_000_000)  # much sent, nothing received
            results(stream, False, 1)
            await trio.sleep(0.1)
            assert runner.health.health is State.UP and runner.health.suspect
            if reply:
                stream.on_late(0.2)
                await trio.sleep(3)
                assert runner.health.health is State.UP
            else:
                await wait_until(lambda: runner.health.health is State.DOWN, 1)
