"""Status polled in a tight loop reads each device at most every STATUS_MAX_AGE (pure: a fake backend
stands in for the device reads; the real reads are covered by the lab tests)."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from hatun.control import STATUS_MAX_AGE
from hatun.supervisor import Supervisor
from hatun.wireguard.model import DeviceStatus, PeerStatus


class CountingBackend:
    def __init__(self) -> None:
        self.reads = 0

    async def get(self, ifname: str, *, with_link: bool = True, timeout=None) -> DeviceStatus:
        self.reads += 1
        peer = PeerStatus(public_key=None, endpoint=None, keepalive=0, allowed_ips=(),
                          rx_bytes=1000 * self.reads, tx_bytes=500 * self.reads, last_handshake=None)
        return DeviceStatus(ifname=ifname, public_key=None, listen_port=0, fwmark=0, peers=(peer,))


def _runtime(name: str = "gw1") -> SimpleNamespace:
    return SimpleNamespace(name=name, ifname=f"hat-{name}", status=None, status_at=None, rate_sample=None,
                           rx_rate=0.0, tx_rate=0.0, status_reading=None, hs_wall=None, hs_at=None)


def _supervisor(backend, runtimes=()) -> SimpleNamespace:
    sup = SimpleNamespace(backend=backend, runtimes=lambda: list(runtimes))
    sup._note_status = lambda rt, status: Supervisor._note_status(sup, rt, status)
    sup.read_status = lambda rt, max_age=0.0: Supervisor.read_status(sup, rt, max_age)
    return sup


async def test_status_polls_within_max_age_reuse_the_last_read(autojump_clock):
    sup = _supervisor(CountingBackend())
    rt = _runtime()
    for _ in range(50):  # 50 polls, 10 ms apart: 0.5 s
        await Supervisor.read_status(sup, rt, max_age=STATUS_MAX_AGE)
        await trio.sleep(0.01)
    assert 2 <= sup.backend.reads <= 0.5 / STATUS_MAX_AGE + 1
    assert rt.status.peer.rx_bytes == 1000 * sup.backend.reads


async def test_without_max_age_every_call_reads_the_device(autojump_clock):
    sup = _supervisor(CountingBackend())
    rt = _runtime()
    for _ in range(5):
        await Supervisor.read_status(sup, rt)
    assert sup.backend.reads == 5


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
    runtimes = [_runtime(n) for n in ("a", "b", "stuck", "c")]
    backend = SlowBackend()
    sup = _supervisor(backend, runtimes)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:  # two scrapes at once
        for _ in range(2):
            nursery.start_soon(Supervisor.refresh_statuses, sup, 1.0, 2.0)
    assert trio.current_time() - start == 2.0  # the autojump clock: exact
    assert all(rt.status is not None for rt in runtimes if rt.name != "stuck")
    assert backend.reads == {"hat-a": 1, "hat-b": 1, "hat-stuck": 1, "hat-c": 1}
    assert runtimes[2].status_reading is None  # the cancelled read left nothing behind
    await Supervisor.refresh_statuses(sup, 5.0, 2.0)  # reads younger than max_age (5 s here): reused
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
    import hatun.supervisor as supervisor

    wall = [1_800_000_000.0]
    monkeypatch.setattr(supervisor.time, "time", lambda: wall[0] + trio.current_time())
    backend = HandshakeBackend()
    sup = _supervisor(backend)
    rt = _runtime()
    age = lambda: Supervisor._handshake_age(sup, rt)  # noqa: E731
    backend.handshake = wall[0] + trio.current_time() - 5.0  # 5 s ago
    await Supervisor.read_status(sup, rt)
    assert age() == 5.0
    await trio.sleep(10)
    wall[0] += 600  # the clock steps 10 minutes forward
    await Supervisor.read_status(sup, rt)
    assert age() == 15.0  # unchanged handshake: aged by the monotonic clock only
    backend.handshake = wall[0] + trio.current_time() - 1.0  # a new handshake, seen after the step
    await trio.sleep(3)
    wall[0] += 900  # and a step between it and our read: bounded by our previous read (3 s ago)
    await Supervisor.read_status(sup, rt)
    assert age() == 3.0
    wall[0] -= 3600  # backwards: a handshake "in the future" has age 0, never negative
    backend.handshake = wall[0] + trio.current_time() + 100
    await trio.sleep(1)
    await Supervisor.read_status(sup, rt)
    assert age() == 0.0
