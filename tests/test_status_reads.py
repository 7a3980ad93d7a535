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

    async def get(self, ifname: str, *, with_link: bool = True) -> DeviceStatus:
        self.reads += 1
        peer = PeerStatus(public_key=None, endpoint=None, keepalive=0, allowed_ips=(),
                          rx_bytes=1000 * self.reads, tx_bytes=500 * self.reads, last_handshake=None)
        return DeviceStatus(ifname=ifname, public_key=None, listen_port=0, fwmark=0, peers=(peer,))


def _runtime() -> SimpleNamespace:
    return SimpleNamespace(name="gw1", ifname="hat-gw1", status=None, status_at=None, rate_sample=None,
                           rx_rate=0.0, tx_rate=0.0)


async def test_status_polls_within_max_age_reuse_the_last_read(autojump_clock):
    sup = SimpleNamespace(backend=CountingBackend())
    rt = _runtime()
    for _ in range(50):  # 50 polls, 10 ms apart: 0.5 s
        await Supervisor.read_status(sup, rt, max_age=STATUS_MAX_AGE)
        await trio.sleep(0.01)
    assert 2 <= sup.backend.reads <= 0.5 / STATUS_MAX_AGE + 1
    assert rt.status.peer.rx_bytes == 1000 * sup.backend.reads


async def test_without_max_age_every_call_reads_the_device(autojump_clock):
    sup = SimpleNamespace(backend=CountingBackend())
    rt = _runtime()
    for _ in range(5):
        await Supervisor.read_status(sup, rt)
    assert sup.backend.reads == 5
