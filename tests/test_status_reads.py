"""Status polled in a tight loop reads each device at most every STATUS_MAX_AGE (pure: a fake backend
stands in for the device reads; the real reads are covered by the lab tests)."""

from __future__ import annotations

import trio

from hatun.control import STATUS_MAX_AGE
from hatun.tunnel import refresh_statuses
from hatun.wireguard.model import DeviceStatus, PeerStatus
from hatun.counters import DeviceCounters
from tests.fakes import make_runner


class CountingBackend:
    def __init__(self) -> None:
        self.reads = 0

    async def get(self, ifname: str, *, with_link: bool = True, timeout=None) -> DeviceStatus:
        self.reads += 1
        peer = PeerStatus(public_key=None, endpoint=None, keepalive=0, allowed_ips=(),
                          rx_bytes=1000 * self.reads, tx_bytes=500 * self.reads, last_handshake=None)
        return DeviceStatus(ifname=ifname, public_key=None, listen_port=0, fwmark=0, peers=(peer,))


async def test_status_polls_within_max_age_reuse_the_last_read(autojump_clock):
    backend = CountingBackend()
    rt = make_runner(backend=backend)
    for _ in range(50):  # 50 polls, 10 ms apart: 0.5 s
        await rt.read_status(max_age=STATUS_MAX_AGE)
        await trio.sleep(0.01)
    assert 2 <= backend.reads <= 0.5 / STATUS_MAX_AGE + 1
    assert rt.counters.status.peer.rx_bytes == 1000 * backend.reads


async def test_without_max_age_every_call_reads_the_device(autojump_clock):
    backend = CountingBackend()
    rt = make_runner(backend=backend)
    for _ in range(5):
        await rt.read_status()
    assert backend.reads == 5


class SlowBackend:
    """One device (hat-stuck) never answers; the others answer at once. Counts reads."""

    def __init__(self) -> None:
        self.reads: dict[str, int] = {}

    async def get(self, ifname: str, *, with_link: bool = True, timeout=None) -> DeviceStatus:
        self.reads[ifname] = self.reads.get(ifname, 0) + 1
        if ifname == "hat-stuck":
            await trio.sleep_forever()
        return await CountingBackend().get(ifname)


async def test_refresh_reads_all_devices_at_once_under_one_deadline(autojump_clock):
    """A scrape or status with a hung device costs the deadline once, not a timeout per tunnel, and
    concurrent refreshes share one read per device (issue 12, item 2)."""
    backend = SlowBackend()
    runtimes = [make_runner(n, backend) for n in ("a", "b", "stuck", "c")]
    start = trio.current_time()
    async with trio.open_nursery() as nursery:  # two scrapes at once
        for _ in range(2):
            nursery.start_soon(refresh_statuses, runtimes, 1.0, 2.0)
    assert trio.current_time() - start == 2.0  # the autojump clock: exact
    assert all(rt.counters.status is not None for rt in runtimes if rt.name != "stuck")
    assert backend.reads == {"hat-a": 1, "hat-b": 1, "hat-stuck": 1, "hat-c": 1}
    assert not runtimes[2].counters.reading  # the cancelled read left nothing behind
    await refresh_statuses(runtimes, 5.0, 2.0)  # reads younger than max_age (5 s here): reused
    assert backend.reads["hat-a"] == 1


class HandshakeBackend:
    def __init__(self) -> None:
        self.handshake: float | None = None

    async def get(self, ifname: str, *, with_link: bool = True, timeout=None) -> DeviceStatus:
        peer = PeerStatus(public_key=None, endpoint=None, keepalive=0, allowed_ips=(), rx_bytes=0, tx_bytes=0,
                          last_handshake=self.handshake)
        return DeviceStatus(ifname=ifname, public_key=None, listen_port=0, fwmark=0, peers=(peer,))


async def test_handshake_age_ignores_wall_clock_steps(autojump_clock, monkeypatch):
    """A forward step of the wall clock by minutes does not age a handshake (issue 12, item 9): the
    age runs on the monotonic clock from when the handshake was seen."""
    import hatun.counters

    wall = [1_800_000_000.0]
    monkeypatch.setattr(hatun.counters.time, "time", lambda: wall[0] + trio.current_time())
    backend = HandshakeBackend()
    counters = DeviceCounters(backend, "hat-gw1", "gw1")
    age = counters.handshake_age
    backend.handshake = wall[0] + trio.current_time() - 5.0  # 5 s ago
    await counters.read()
    assert age() == 5.0
    await trio.sleep(10)
    wall[0] += 600  # the clock steps 10 minutes forward
    await counters.read()
    assert age() == 15.0  # unchanged handshake: aged by the monotonic clock only
    backend.handshake = wall[0] + trio.current_time() - 1.0  # a new handshake, seen after the step
    await trio.sleep(3)
    wall[0] += 900  # and a step between it and our read: bounded by our previous read (3 s ago)
    await counters.read()
    assert age() == 3.0
    wall[0] -= 3600  # backwards: a handshake "in the future" has age 0, never negative
    backend.handshake = wall[0] + trio.current_time() + 100
    await trio.sleep(1)
    await counters.read()
    assert age() == 0.0
