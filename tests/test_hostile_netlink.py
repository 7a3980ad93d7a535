"""Issue 12, item 7: floods from the rest of the namespace must not starve hatun's event loop.

- Route, rule and nexthop notifications that are not hatun's are dropped on their fixed header
  fields, undecoded (`EventFilter.keep`), and by the kernel itself (`EventFilter.bpf`).
- After an overflow the queue is emptied without decoding what is discarded.
- Foreign echo replies (another ping in the namespace) never reach Python (BPF on the raw sockets).
- A route flood in another table (a BGP daemon, Docker) while probing every 50 ms: no tunnel leaves
  service and no probe gap reaches the probe timeout, measured outside hatun (a packet tap on each
  tunnel device of the runner sees the probes leave).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import threading
import time

import pytest
import trio
from pyroute2.netlink.rtnl import RTNLGRP_IPV4_ROUTE

from hatun.netlink import EventFilter, EventsOverflow, Route, open_netlink, open_rtnl, open_rtnl_events
from hatun.netns import run_in_netns
from hatun.probes import PAYLOAD, PAYLOAD_MARK, _IcmpSocket, echo_reply_filter
from tests.labutil import edit_config, ns_output
from tests.nsutil import ip, ns_exec

FLOOD_ROUTES = 200_000
FLOOD_TABLE = 1000
PROBE_TIMEOUT = 0.25
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35


class ProbeWatcher:
    """Timestamps (the kernel's) of hatun's echo requests as they leave through a tunnel device of the
    runner: what hatun really sent, whatever it believes, and before either wireguard-go (both
    compete for the CPU with the flood) touches them."""

    def __init__(self, netns: str, ifname: str) -> None:
        def make() -> socket.socket:
            # Outgoing packets reach only ETH_P_ALL taps; a TUN device carries bare IP packets.
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            s.bind((ifname, ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.settimeout(0.2)
            return s

        self.sock = run_in_netns(netns, make)
        self.stamps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _, address = self.sock.recvmsg(512, 256)
            except (TimeoutError, OSError):
                continue
            if address[2] != PACKET_OUTGOING or not data or data[0] >> 4 != 4 or data[9] != socket.IPPROTO_ICMP:
                continue
            icmp = data[(data[0] & 0x0F) * 4:]
            if icmp[:1] != b"\x08" or icmp[8:8 + len(PAYLOAD_MARK)] != PAYLOAD_MARK:
                continue
            for level, ctype, cdata in anc:
                if level == socket.SOL_SOCKET and ctype == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack_from("qq", cdata)
                    self.stamps.append(sec + nsec / 1e9)

    def largest_gap(self, start: float, end: float) -> float:
        """The longest time without a probe between START and END (wall clock)."""
        inside = [start] + [t for t in self.stamps if start <= t <= end] + [end]
        return max(b - a for a, b in zip(inside, inside[1:]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def _flood(netns: str, path: str, count: int) -> float:
    """Add COUNT blackhole /32 routes of 198.18.0.0/15 to table FLOOD_TABLE (two metrics per address,
    so more routes than addresses), then delete them; returns the seconds it took. They route nothing:
    no rule looks up that table."""
    with open(path, "w") as f:
        for n in range(count):
            addr, metric = divmod(n, 2)
            f.write(f"route add blackhole 198.{18 + (addr >> 16)}.{addr >> 8 & 0xFF}.{addr & 0xFF}/32"
                    f" table {FLOOD_TABLE} metric {metric + 1}\n")
    t0 = time.monotonic()
    subprocess.run(["ip", "-n", netns, "-batch", path], check=True, capture_output=True, timeout=120)
    assert len(ns_output(netns, "ip", "route", "show", "table", str(FLOOD_TABLE)).splitlines()) == count
    subprocess.run(["ip", "-n", netns, "route", "flush", "table", str(FLOOD_TABLE)], check=True,
                   capture_output=True, timeout=120)
    return time.monotonic() - t0


@pytest.mark.netns
@pytest.mark.slow
def test_route_flood_in_another_table_starves_nothing(lab_factory, hatun_factory):
    lab = lab_factory(2)
    edit_config(lab, health={"interval": '"50ms"', "timeout": f'"{int(PROBE_TIMEOUT * 1000)}ms"'})
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: len(s["route"]["members"]) == 2, 15, "both tunnels in service")
    before = {t["name"]: t["transitions"] for t in hatun.status()["tunnels"]}
    watchers = {f"gw{i}": ProbeWatcher(lab.runner, lab.runner_ifname(i)) for i in (1, 2)}
    control = []  # how long status requests take meanwhile (reported, not asserted)
    flooding = threading.Event()

    def poll_status() -> None:
        for _ in range(10_000):
            if not flooding.is_set():
                return
            t0 = time.monotonic()
            hatun.status()
            control.append(time.monotonic() - t0)
            time.sleep(0.02)

    poller = threading.Thread(target=poll_status, daemon=True)
    try:
        time.sleep(1.0)
        flooding.set()
        poller.start()
        start = time.time()
        took = _flood(lab.runner, os.path.join(lab.dir, "flood.batch"), FLOOD_ROUTES)
        time.sleep(1.0)  # what the flood left queued is read by now
        end = time.time()
        gaps = {name: w.largest_gap(start, end) for name, w in watchers.items()}
    finally:
        flooding.clear()
        poller.join(timeout=30) if poller.is_alive() else None
        for w in watchers.values():
            w.close()
    status = hatun.status()
    print(f"route flood: {FLOOD_ROUTES} routes added and flushed in {took:.1f} s;"
          f" largest probe gap per tunnel: {', '.join(f'{n} {g * 1000:.0f} ms' for n, g in gaps.items())};"
          f" slowest status request {max(control, default=0) * 1000:.0f} ms;"
          f" {hatun.log().count('netlink events overflowed')} event overflows")
    assert {t["name"]: t["transitions"] for t in status["tunnels"]} == before, "a tunnel changed state"
    assert all(t["state"] == "up" for t in status["tunnels"])
    assert all(g < PROBE_TIMEOUT for g in gaps.values()), f"probe gaps {gaps} reach the timeout"


# -- the header filter, pure ------------------------------------------------------------------------

OURS = EventFilter(tables=range(51820, 51830), protocol=147, nexthop_ids=range(518200000, 518201004))
RTM_NEWLINK, RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_NEWNEXTHOP = 16, 24, 25, 32, 104
RTA_DST, RTA_TABLE, FRA_TABLE, FRA_PRIORITY, FRA_PROTOCOL, NHA_ID, NHA_BLACKHOLE = 1, 15, 15, 6, 21, 1, 4


def attr(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def message(msg_type: int, body: bytes, *attrs: bytes, pid: int = 0) -> bytes:
    payload = body + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(payload), msg_type, 0, 0, pid) + payload


def route(table: int, protocol: int, *, table_attr_first: bool = True, msg_type: int = RTM_NEWROUTE,
          pid: int = 0) -> bytes:
    # struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type; flags
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, table if table < 256 else 252, protocol, 0, 6, 0)
    attrs = [attr(RTA_TABLE, struct.pack("=I", table)), attr(RTA_DST, bytes([198, 18, 1, 2]))]
    return message(msg_type, body, *(attrs if table_attr_first else attrs[::-1]), pid=pid)


def rule(protocol: int | None) -> bytes:
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, 252, 0, 0, 1, 0)
    attrs = [attr(FRA_TABLE, struct.pack("=I", 51820)), attr(FRA_PRIORITY, struct.pack("=I", 1000))]
    if protocol is not None:
        attrs.append(attr(FRA_PROTOCOL, bytes([protocol])))
    return message(RTM_NEWRULE, body, *attrs)


def nexthop(nh_id: int) -> bytes:
    return message(RTM_NEWNEXTHOP, struct.pack("=BBBBI", socket.AF_INET, 0, 147, 0, 0),
                   attr(NHA_ID, struct.pack("=I", nh_id)), attr(NHA_BLACKHOLE, b""))


def run_bpf(program: bytes, packet: bytes) -> int:
    """A classic BPF interpreter for the instructions hatun's programs use: what the kernel would return."""
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    a = x = pc = 0
    for _ in range(len(insns)):  # forward jumps only: each instruction runs at most once
        code, jt, jf, k = insns[pc]
        pc += 1
        cls, mode = code & 0x07, code & 0xE0
        if cls == 0x00:  # LD
            if mode == 0x80:
                a = len(packet)
                continue
            size = {0x00: 4, 0x08: 2, 0x10: 1}[code & 0x18]
            off = k + (x if mode == 0x40 else 0)
            if off + size > len(packet):
                return 0  # a load past the end ends the program with "drop"
            a = int.from_bytes(packet[off:off + size], "big")
        elif cls == 0x01:  # LDX B MSH
            x = 4 * (packet[k] & 0x0F)
        elif cls == 0x04:  # ALU
            src = x if code & 0x08 else k
            a = {0x60: lambda: a << src, 0x40: lambda: a | src}[code & 0xF0]() & 0xFFFFFFFF
        elif cls == 0x05:  # JMP
            taken = {0x10: a == k, 0x20: a > k, 0x30: a >= k}[code & 0xF0]
            pc += jt if taken else jf
        elif cls == 0x06:  # RET
            return k
        elif cls == 0x07:  # TAX
            x = a
    raise AssertionError("BPF program ran off its end")


# (what, message, kept by `keep`, passed by the kernel's filter)
CASES = [
    ("route of another table > 255 (table 1000, RTA_TABLE)", route(1000, 147), False, False),
    ("route of another protocol in our table", route(51820, 186), False, False),
    ("route of ours, table > 255 in RTA_TABLE", route(51821, 147), True, True),
    ("route deletion of ours", route(51829, 147, msg_type=RTM_DELROUTE), True, True),
    ("route of ours in main", route(254, 147), False, False),
    ("route of another table < 256", route(10, 147), False, False),
    ("RTA_TABLE not first: only Python can tell", route(1000, 147, table_attr_first=False), False, True),
    ("RTA_TABLE not first, ours", route(51820, 147, table_attr_first=False), True, True),
    ("reply addressed to the socket", route(1000, 3, pid=4242), False, True),
    ("truncated route", route(1000, 3)[:24], True, True),
    ("rule with our protocol", rule(147), True, True),
    ("rule of another protocol", rule(4), False, True),
    ("rule without protocol", rule(None), False, True),
    ("nexthop of ours", nexthop(518200004), True, True),
    ("group of ours", nexthop(518201001), True, True),
    ("nexthop of someone else", nexthop(7), False, False),
    ("link", message(RTM_NEWLINK, b"\0" * 16, attr(3, b"eth0\0")), True, True),
]


def fix_truncated(data: bytes) -> bytes:
    # A message whose length field covers only what is there.
    return struct.pack("=I", len(data)) + data[4:] if len(data) < struct.unpack_from("=I", data)[0] else data


@pytest.mark.parametrize("what,data,kept,passed", CASES, ids=[c[0] for c in CASES])
def test_header_filter_decides_before_decoding(what, data, kept, passed):
    data = fix_truncated(data)
    msg_type = struct.unpack_from("=H", data, 4)[0]
    assert OURS.keep(data, 0, len(data), msg_type) is kept
    assert (run_bpf(OURS.bpf(4242), data) != 0) is passed
    if kept:
        assert passed, "the kernel's filter may only be less strict"


def test_header_filter_finds_the_message_inside_a_datagram():
    datagram = route(51820, 147) + route(1000, 147)
    second = len(route(51820, 147))
    assert OURS.keep(datagram, 0, second, RTM_NEWROUTE)
    assert not OURS.keep(datagram, second, len(datagram) - second, RTM_NEWROUTE)


def test_empty_filter_keeps_everything():
    for _, data, _, _ in CASES:
        data = fix_truncated(data)
        assert EventFilter().keep(data, 0, len(data), struct.unpack_from("=H", data, 4)[0])


def test_echo_reply_filter_keeps_only_hatun_replies():
    ip4 = bytes([0x45]) + b"\0" * 19
    ours = struct.pack("!BBHHH", 0, 0, 0, 77, 1) + PAYLOAD
    ping = struct.pack("!BBHHH", 0, 0, 0, 78, 1) + bytes(range(8, 64))
    for version, prefix, reply in ((4, ip4, 0), (6, b"", 129)):
        program = echo_reply_filter(version)
        assert run_bpf(program, prefix + bytes([reply]) + ours[1:]) != 0
        assert run_bpf(program, prefix + bytes([reply]) + ping[1:]) == 0
        assert run_bpf(program, prefix + bytes([reply]) + ours[1:16]) == 0  # short
        assert run_bpf(program, prefix + bytes([8 if version == 4 else 128]) + ours[1:]) == 0  # a request
    # IPv4 options: the ICMP header starts after IHL words.
    assert run_bpf(echo_reply_filter(4), bytes([0x46]) + b"\0" * 23 + ours) != 0


# -- in namespaces ------------------------------------------------------------------------------------

@pytest.mark.netns
async def test_overflow_is_drained_without_decoding(namespaces):
    ns = namespaces.new("drain")
    async with open_rtnl(ns) as rtnl, \
            open_netlink(netns=ns, groups=[RTNLGRP_IPV4_ROUTE], rcvbuf=4096) as events:
        decoded = []
        real_decode = events._decode
        events._decode = lambda *a: decoded.append(a[2]) or real_decode(*a)
        await rtnl.add_link("br-d", "bridge")
        br = await rtnl.link("br-d")
        await rtnl.set_link(br.index, up=True)
        for i in range(300):  # a burst, not read meanwhile: far more than 4 KiB of notifications
            await rtnl.add_route(Route(socket.AF_INET, 51820, f"198.18.7.{i % 256}/32", protocol=147,
                                       oif=br.index, priority=i // 256))
        with trio.fail_after(5), pytest.raises(EventsOverflow):
            await events.receive_events()
        assert decoded == [] and events.events_discarded > 0
        # Still usable: the next change is seen (and decoded).
        await rtnl.delete_route(Route(socket.AF_INET, 51820, "198.18.7.0/32", protocol=147, priority=0))
        with trio.fail_after(5):
            batch = await events.receive_events()
        assert [m["header"]["type"] for m in batch] == [RTM_DELROUTE] and decoded == [RTM_DELROUTE]


@pytest.mark.netns
async def test_kernel_drops_foreign_routes_before_they_reach_the_socket(namespaces, tmp_path):
    ns = namespaces.new("bpfnl")
    batch = tmp_path / "routes"
    batch.write_text("".join(f"route add blackhole 198.18.{i >> 8}.{i & 255}/32 table {t} proto {p}\n"
                             for i in range(3000) for t, p in ((1000, 3), (51820, 4))))
    async with open_rtnl_events(ns, filter=OURS) as events:
        await trio.to_thread.run_sync(lambda: ip("-batch", str(batch), netns=ns))
        ip("rule", "add", "pref", "500", "lookup", "1000", netns=ns)
        ip("route", "add", "blackhole", "198.19.1.1/32", "table", "51821", "proto", "147", netns=ns)
        seen = []
        with trio.fail_after(10):
            async for ev in events:
                seen.append(ev)
                if isinstance(ev.obj, Route):
                    break
        assert [(ev.action, ev.obj.dst, ev.obj.table) for ev in seen] == \
            [("new", ipaddress.ip_network("198.19.1.1/32"), 51821)]
        # 6000 routes dropped by the kernel; only the rule (which only Python can judge) got here.
        assert events.sock.events_filtered == 1


class CountingSocket:
    """A socket whose datagrams read are counted."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.reads = sock, 0

    def recvmsg(self, *args):
        result = self.sock.recvmsg(*args)
        self.reads += 1
        return result

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.netns
def test_foreign_echo_replies_never_reach_python(namespaces):
    a, b = namespaces.new("pinga"), namespaces.new("pingb")
    namespaces.veth(a, "pa", b, "pb")
    ip("addr", "add", "198.18.203.1/30", "dev", "pa", netns=a)
    ip("addr", "add", "198.18.203.2/30", "dev", "pb", netns=b)
    ip("-6", "addr", "add", "2001:2:0:203::1/64", "dev", "pa", "nodad", netns=a)
    ip("-6", "addr", "add", "2001:2:0:203::2/64", "dev", "pb", "nodad", netns=b)
    ifindex = int(ns_output(a, "cat", "/sys/class/net/pa/ifindex"))
    for version, peer in ((4, "198.18.203.2"), (6, "2001:2:0:203::2")):
        s = run_in_netns(a, lambda: _IcmpSocket(version))
        try:
            counted = s.sock = CountingSocket(s.sock)
            # Another ping in the namespace: the raw socket would get a copy of each of its replies.
            res = ns_exec(a, "ping", f"-{version}", "-c", "200", "-i", "0.002", "-q", peer, timeout=30)
            assert " 0% packet loss" in res.stdout
            pktinfo = s.pktinfo(ifindex)
            for seq in range(1, 6):
                assert s.send(pktinfo, (peer, 0), 4321, seq) is None
            got = []
            deadline = time.monotonic() + 5
            while len(got) < 5 and time.monotonic() < deadline:
                got += s.receive()
                time.sleep(0.01)
            assert sorted((ident, seq) for _, ident, seq, _ in got) == [(4321, n) for n in range(1, 6)]
            assert all(i == ifindex for i, *_ in got)
            # Python read our five replies and nothing else: the ping's 200 stayed in the kernel.
            assert s.receive() == [] and counted.reads == 5
        finally:
            s.sock.close()
