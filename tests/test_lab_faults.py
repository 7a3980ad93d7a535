"""`hatun lab fail --mode oneway|loss:N|delay:D`: the mode syntax (pure), the delay line's netlink
messages and timing (pure), and each fault on a real lab: what it drops or delays, that heal removes
it, that a new fault replaces the old, and that `lab down` ends the delay line.

Traffic goes only between the namespaces of the test's own lab (underlay 198.18.1.0/30). Loss and
delay are checked with generous bounds, never exact figures."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from decimal import Decimal

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from hatun.cli import main
from hatun.lab import delay, topology
from hatun.lab.faults import DELAY_QUEUE, nft_ruleset, parse_fault
from hatun.netns import run_in_netns
from tests.labutil import hatun_cli, ns_output, wait_until

RUNNER_UL, GW_UL = (a.split("/")[0] for a in topology.underlay(1))


# ---------------------------------------------------------------- the mode syntax (no root)


@pytest.mark.parametrize("text, kind, canonical, loss, seconds", [
    ("blackhole", "blackhole", "blackhole", None, None),
    ("kill", "kill", "kill", None, None),
    ("oneway", "oneway", "oneway", None, None),
    ("loss:30", "loss", "loss:30", Decimal(30), None),
    ("loss:30.0", "loss", "loss:30", Decimal(30), None),
    ("loss:2.50", "loss", "loss:2.5", Decimal("2.5"), None),
    ("loss:0.01", "loss", "loss:0.01", Decimal("0.01"), None),
    ("loss:100", "loss", "loss:100", Decimal(100), None),
    ("delay:80ms", "delay", "delay:80ms", None, 0.08),
    ("delay:0.08s", "delay", "delay:80ms", None, 0.08),
    ("delay:1ms", "delay", "delay:1ms", None, 0.001),
    ("delay:10s", "delay", "delay:10s", None, 10.0),
])
def test_modes_parse_to_one_spelling(text, kind, canonical, loss, seconds):
    fault = parse_fault(text)
    assert (fault.kind, str(fault), fault.loss) == (kind, canonical, loss)
    assert fault.delay == pytest.approx(seconds) if seconds else fault.delay is None
    assert parse_fault(str(fault)) == fault


@pytest.mark.parametrize("text, message", [
    ("bogus", "unknown failure mode 'bogus': use blackhole, kill, oneway, loss:N"),
    ("Blackhole", "unknown failure mode"),
    ("blackhole:1", "unknown failure mode"),
    ("loss", "needs a value, e.g. loss:30"),
    ("loss:", "loss:: N must be a percentage"),
    ("loss:0", "loss:0: N must be more than 0 and at most 100"),
    ("loss:0.00", "more than 0"),
    ("loss:101", "loss:101: N must be more than 0 and at most 100"),
    ("loss:abc", "loss:abc: N must be a percentage"),
    ("loss:-5", "N must be a percentage"),
    ("loss:2.555", "at most two decimals"),
    ("loss:30%", "N must be a percentage"),
    ("delay", "needs a value, e.g. delay:80ms"),
    ("delay:-5ms", "delay:-5ms: expected a duration with a unit"),
    ("delay:10h", "delay:10h: out of range, use 1ms..10s"),
    ("delay:11s", "out of range"),
    ("delay:0.5ms", "out of range"),
    ("delay:0ms", "out of range"),
    ("delay:80", "delay:80: give a unit, e.g. delay:80ms"),
    ("delay:fast", "expected a duration with a unit"),
])
def test_bad_modes_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_fault(text)


def test_bad_modes_are_lab_errors_before_anything_is_touched():
    """lab_fail checks the mode first: no root, no lab needed to be told."""
    for mode in ("loss:0", "loss:101", "loss:abc", "delay:-5ms", "delay:10h", "bogus"):
        with pytest.raises(topology.LabError, match=re.escape(mode)):
            trio.run(topology.lab_fail, "nolab", "gw1", mode)


@pytest.mark.parametrize("mode", ["loss:0", "loss:101", "loss:abc", "delay:-5ms", "delay:10h", "bogus"])
def test_cli_rejects_bad_modes_as_usage_errors(capsys, mode):
    with pytest.raises(SystemExit) as e:
        main(["lab", "fail", "gw1", "--name", "nolab", "--mode", mode])
    assert e.value.code == 2  # like any other usage error (argparse `choices` before)
    err = capsys.readouterr().err
    assert "argument --mode: " in err and mode in err


def test_cli_takes_good_modes(capsys):
    # Parsed, then refused for the missing lab (exit 1, as every LabError).
    assert main(["lab", "fail", "gw1", "--name", "nolab", "--mode", "delay:0.08s"]) == 1
    assert "no lab named 'nolab'" in capsys.readouterr().err
    assert "loss:N" in subprocess.run([sys.executable, "-m", "hatun", "lab", "fail", "--help"], check=True,
                                      capture_output=True, text=True).stdout


def test_nft_rulesets():
    blackhole = nft_ruleset(parse_fault("blackhole"))
    assert 'chain in { type filter hook input priority -300; iifname "ul" drop; }' in blackhole
    assert 'chain out { type filter hook output priority -300; oifname "ul" drop; }' in blackhole
    oneway = nft_ruleset(parse_fault("oneway"))
    assert 'iifname "ul" drop' in oneway and "output" not in oneway
    loss = nft_ruleset(parse_fault("loss:30"))
    assert loss.count("numgen random mod 100 < 30 drop") == 2  # both directions
    assert nft_ruleset(parse_fault("loss:2.5")).count("numgen random mod 1000 < 25 drop") == 2
    assert "numgen random mod 10000 < 1 drop" in nft_ruleset(parse_fault("loss:0.01"))
    assert "mod 100 < 100 drop" in nft_ruleset(parse_fault("loss:100"))
    assert nft_ruleset(parse_fault("kill")) is None and nft_ruleset(parse_fault("delay:80ms")) is None
    assert parse_fault("loss:30").round_trip_loss == pytest.approx(0.51)


# ---------------------------------------------------------------- the delay line's messages (no root)


def test_bind_message_layout():
    msg = delay.bind_message(7, 65536)
    length, kind, flags, seq, port = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq, port) == (len(msg), 3 << 8 | 2, 1 | 4, 1, 0)
    assert msg[16:20] == bytes([0, 0, 0, 7])  # nfgenmsg: AF_UNSPEC, version 0, queue big-endian
    attrs, offset = {}, 20
    while offset < len(msg):
        alen, atype = struct.unpack_from("=HH", msg, offset)
        attrs[atype] = msg[offset + 4:offset + alen]
        offset += (alen + 3) & ~3
    assert offset == len(msg)
    assert attrs == {
        1: bytes([1, 0, 0, 0]),  # command bind
        2: struct.pack("!IB", 0, 1),  # copy range 0, copy metadata (5 bytes: packed struct)
        3: struct.pack("!I", 65536),
        4: struct.pack("!I", 1),  # mask and flags: fail-open
        5: struct.pack("!I", 1),
    }


def test_verdict_batch_and_unbind():
    msg = delay.accept_up_to(7, 0xDEADBEEF)
    assert struct.unpack_from("=IHH", msg) == (len(msg), 3 << 8 | 3, 1)
    assert msg[20:] == struct.pack("=HH", 12, 2) + struct.pack("!II", 1, 0xDEADBEEF)
    unbind = delay.unbind_message(7)
    assert unbind[24] == 2 and struct.unpack_from("=H", unbind, 6)[0] == 1 | 4


def _packet(packet_id: int, seq: int = 0) -> bytes:
    # A notification as the kernel sends it: another attribute first, then the header, padded.
    attrs = struct.pack("=HH", 5, 10) + b"x\0\0\0" + struct.pack("=HH", 11, 1) + struct.pack("!IHB", packet_id, 0x800, 0)
    attrs += b"\0" * (-len(attrs) % 4)
    body = bytes([2, 0, 0, 7]) + attrs
    return struct.pack("=IHHII", 16 + len(body), 3 << 8 | 0, 0, seq, 0) + body


def _header(length: int, kind: int, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", length, kind, 0, seq, 0)


def _packet_with_header_of_length(length: int) -> bytes:
    return _header(28, 3 << 8) + bytes(4) + struct.pack("=HH", length, 1) + bytes(4)


ACK = _header(36, 2, seq=1) + struct.pack("=i", 0) + bytes(16)
REFUSED = _header(36, 2) + struct.pack("=i", -16) + bytes(16)


def test_parse_packets_and_acks():
    assert delay.parse(_packet(5) + _packet(0xFFFFFFFF) + ACK + REFUSED) == ([5, 0xFFFFFFFF], [(1, 0), (0, 16)], [])


@pytest.mark.parametrize("garbage, ids, acks, why", [
    (_header(99, 3 << 8) + bytes(8), [5], [], "length 99"),  # a length past the end: the rest is lost
    (_header(8, 3 << 8) + bytes(8), [5], [], "length 8"),  # shorter than its own header
    (_header(20, 3 << 8) + bytes(4) + _packet(6), [5, 6], [], "without NFQA_PACKET_HDR"),
    (_header(17, 2) + b"\xff\0\0\0" + _packet(6), [5, 6], [], "error message with a body of 1 bytes"),
    (_header(16, 2) + _packet(6) + ACK, [5, 6], [(1, 0)], "error message with a body of 0 bytes"),
    (_packet_with_header_of_length(40) + _packet(6), [5, 6], [], "attribute of length 40"),  # past its message
    (_packet_with_header_of_length(6) + _packet(6), [5, 6], [], "NFQA_PACKET_HDR of length 6"),  # too short for an id
    (b"\1\2\3", [5], [], "3 stray bytes"),
])
def test_parse_skips_a_malformed_message_and_says_why(garbage, ids, acks, why):
    """A malformed message is skipped and described, never raised: the well-formed ones around it
    still count (after it, unless its own length is wrong)."""
    parsed = delay.parse(_packet(5) + garbage)
    assert (parsed.ids, parsed.acks) == (ids, acks)
    assert len(parsed.malformed) == 1 and why in parsed.malformed[0], parsed.malformed


@given(st.lists(st.one_of(st.binary(max_size=64), st.integers(0, 2**32 - 1).map(_packet), st.just(ACK)), max_size=8))
def test_parse_never_raises(pieces):
    parsed = delay.parse(b"".join(pieces))
    assert all(0 <= i < 2**32 for i in parsed.ids)


def test_later_compares_ids_as_the_kernel_does():
    assert delay.later(None, None) is None and delay.later(None, 3) == 3 and delay.later(3, None) == 3
    assert delay.later(3, 4) == 4 and delay.later(4, 3) == 4
    assert delay.later(0xFFFFFFFF, 2) == 2  # the ids wrapped around
    line = delay.DelayLine(0.0)
    for packet_id in (0xFFFFFFFE, 5, 0xFFFFFFFF):  # the kernel's last id, put on the line late
        line.arrived(packet_id, 0.0)
    assert line.newest == 5 and line.release(0.0) == 5


PROC = """    0  31337     0 2  4016     0     0       12  1
    7   4242     3 1     0     0     0      200  1
"""


def test_kernel_queue_and_bound_port():
    assert delay.kernel_queue(PROC, 7) == delay.KernelQueue(portid=4242, total=3, last_id=200)
    assert delay.kernel_queue(PROC, 8) is None and delay.kernel_queue("", 7) is None
    log = ("... delay[9] cannot bind NFQUEUE 7: Device or resource busy\n"
           "... delay[10] queue 7 bound by netlink port 4242: each packet waits 40 ms\n")
    assert delay.bound_port(log, 7) == 4242 and delay.bound_port(log, 8) is None
    assert delay.bound_port(log.splitlines()[0], 7) is None


# ---------------------------------------------------------------- the delay line's loop (no root)


class FakeNetlink:
    """A netlink socket for Delayer: the items fed are handed out in turn (bytes, or an OSError to
    raise), then BlockingIOError; the verdicts sent are decoded into VERDICTS (an OSError in
    SEND_ERRORS is raised instead, in turn). Its file descriptor is a pipe's, readable while items
    are left, for poll; AFTER runs once they are all handed out."""

    def __init__(self, reads=(), send_errors=(), after=None):
        self.reads, self.send_errors, self.after = [], list(send_errors), after
        self.verdicts: list[int] = []
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.feed(*reads)

    def feed(self, *items):
        if items and not self.reads:
            os.write(self.w, b"x")
        self.reads += items

    def fileno(self):
        return self.r

    def getsockname(self):
        return (4242, 0)

    def recv_into(self, buf, size, flags=0):
        if not self.reads:
            raise BlockingIOError
        item = self.reads.pop(0)
        if not self.reads:
            os.read(self.r, 1)
            if self.after:
                self.after()
        if isinstance(item, OSError):
            raise item
        buf[:len(item)] = item
        return len(item)

    def sendto(self, data, address):
        if self.send_errors:
            raise self.send_errors.pop(0)
        assert struct.unpack_from("=H", data, 4)[0] == 3 << 8 | 3
        self.verdicts.append(struct.unpack_from("!I", data, 28)[0])

    def close(self):
        os.close(self.r)
        os.close(self.w)


@pytest.fixture
def kernel(monkeypatch):
    """What the loop reads of the kernel's queue list (portid 4242 is the fake socket's)."""
    state = {"queue": delay.KernelQueue(4242, 0, 0)}
    monkeypatch.setattr(delay, "read_kernel_queue", lambda queue, pid="self": state["queue"])
    return state


def _refusal(code: int) -> bytes:
    return _header(36, 2, seq=delay.VERDICT_SEQ) + struct.pack("=i", -code) + bytes(16)


def test_the_loop_skips_malformed_messages_and_keeps_delaying(kernel, caplog):
    fake = FakeNetlink([_packet(1) + _header(17, 2) + b"\1", _header(20, 3 << 8) + bytes(4), _packet(2) + b"\0\0"])
    d = delay.Delayer(7, 0.0, sock=fake)
    kernel["queue"] = delay.KernelQueue(4242, 3, 3)  # 3 waits in the kernel, its notification skipped
    d.wakeup()
    assert fake.verdicts == [3] and d.packets == 2 and d.malformed == 3 and not d.unchecked
    assert len([r for r in caplog.records if "malformed" in r.message]) == 1  # rate-limited
    fake.feed(_refusal(errno.ENOENT), _refusal(errno.EINVAL), _refusal(errno.EINVAL))
    d.wakeup()  # nothing left to accept is no refusal; a refusal is logged, once
    assert [r.message for r in caplog.records if "refused" in r.message] == ["verdict refused: Invalid argument"]


def test_a_failed_verdict_goes_out_with_the_next_wakeup(kernel):
    fake = FakeNetlink([_packet(1)], send_errors=[OSError(errno.ENOBUFS, "No buffer space available")])
    d = delay.Delayer(7, 0.0, sock=fake)
    d.wakeup()
    assert fake.verdicts == [] and d.unsent == 1 and d._poll_timeout(time.monotonic()) == 50
    d.wakeup()  # nothing new: the unsent verdict alone
    assert fake.verdicts == [1] and d.unsent is None and d._poll_timeout(time.monotonic()) is None
    fake.feed(_packet(2))
    fake.send_errors = [BlockingIOError(errno.EAGAIN, "again")]
    d.wakeup()
    fake.feed(_packet(3))
    d.wakeup()  # one verdict for both
    assert fake.verdicts == [1, 3] and d.failed_sends == 2


def test_after_a_loss_the_kernels_last_id_is_put_on_the_line(kernel):
    fake = FakeNetlink([_packet(1), OSError(errno.ENOBUFS, "No buffer space available")])
    d = delay.Delayer(7, 0.05, sock=fake)
    kernel["queue"] = delay.KernelQueue(4242, 2, 9)  # 9 waits there unseen
    d.wakeup()
    assert d.lost == 1 and not d.unchecked and [i for _, i in d.line.waiting] == [1, 9]
    assert 1 <= d._poll_timeout(time.monotonic()) <= 50
    time.sleep(0.06)
    d.wakeup()
    assert fake.verdicts == [9]
    kernel["queue"] = delay.KernelQueue(4242, 0, 12)  # nothing waits: 10..12 passed at once
    fake.feed(OSError(errno.ENOBUFS, "No buffer space available"))
    d.wakeup()
    assert not d.line.waiting and d._poll_timeout(time.monotonic()) is None


def test_while_a_loss_is_unchecked_the_loop_wakes_every_50_ms(kernel):
    d = delay.Delayer(7, 5.0, sock=FakeNetlink())
    d.line.arrived(1, time.monotonic())
    assert d._poll_timeout(time.monotonic()) >= 4900
    d.unchecked = True
    assert d._poll_timeout(time.monotonic()) == 50


@pytest.mark.parametrize("reads, send_errors, why", [
    ([_packet(1), _refusal(errno.ENODEV)], [], "the queue is not bound"),
    ([_packet(1), _refusal(errno.EPERM)], [], "bound to another socket"),
    ([OSError(errno.EBADF, "Bad file descriptor")], [], "reading the netlink socket failed"),
    ([_packet(1)], [OSError(errno.EBADF, "Bad file descriptor")], "sending a verdict failed"),
])
def test_only_a_lost_queue_ends_the_loop(kernel, reads, send_errors, why):
    d = delay.Delayer(7, 0.0, sock=FakeNetlink(reads, send_errors))
    with pytest.raises(delay.QueueLost, match=why):
        for _ in range(3):
            d.wakeup()


def test_a_loss_check_finding_the_queue_gone_ends_the_loop(kernel):
    d = delay.Delayer(7, 0.0, sock=FakeNetlink([OSError(errno.ENOBUFS, "No buffer space available")]))
    kernel["queue"] = delay.KernelQueue(999, 0, 0)
    with pytest.raises(delay.QueueLost, match="bound to netlink port 999, not to us"):
        d.wakeup()
    kernel["queue"] = None
    d.unchecked = True
    with pytest.raises(delay.QueueLost, match="bound to nobody"):
        d.wakeup()


def test_serve_survives_garbage_and_ends_on_its_stop_fd(kernel):
    """The whole loop, fed through poll: malformed datagrams, a refused verdict, a loss and a failed
    send go by; the signal pipe ends it normally."""
    stop_r, stop_w = os.pipe()
    garbage = [b"\0" * 3, _header(17, 2) + b"\1", _packet(1) + _header(99, 0), _refusal(errno.EINVAL),
               OSError(errno.ENOBUFS, "No buffer space available"), _packet(2)]
    fake = FakeNetlink(garbage, send_errors=[OSError(errno.ENOBUFS, "No buffer space available")],
                       after=lambda: os.write(stop_w, b"x"))
    d = delay.Delayer(7, 0.0, sock=fake)
    try:
        d.serve(stop_r)
        assert d.packets == 2 and d.malformed == 3 and d.lost == 1
        d.wakeup()
        assert fake.verdicts[-1] == 2
    finally:
        fake.close()
        os.close(stop_r)
        os.close(stop_w)


def test_serve_ends_with_queue_lost_when_the_socket_is_closed(kernel):
    stop_r, stop_w = os.pipe()
    fake = FakeNetlink()
    os.close(fake.w)  # the pipe's read end now reports a hang-up
    try:
        with pytest.raises(delay.QueueLost, match="closed"):
            delay.Delayer(7, 0.0, sock=fake).serve(stop_r)
    finally:
        os.close(fake.r)
        os.close(stop_r)
        os.close(stop_w)


def test_delay_line_is_fifo_with_a_constant_delay():
    line = delay.DelayLine(0.04, limit=3)
    assert line.timeout(0.0) is None and line.release(1.0) is None
    line.arrived(1, 0.000)
    line.arrived(2, 0.010)
    line.arrived(3, 0.011)
    assert line.timeout(0.0) == pytest.approx(0.04)
    assert line.release(0.039) is None
    assert line.release(0.0505) == 2  # one verdict for 1 and 2
    assert line.timeout(0.0505) == pytest.approx(0.0005)
    line.arrived(4, 0.02)
    line.arrived(5, 0.02)
    line.arrived(6, 0.02)
    assert line.release(0.02) == 3  # over the limit: the oldest goes early, never dropped
    assert len(line.waiting) == 3 and line.newest == 6
    assert line.timeout(1.0) == 0.0


# ---------------------------------------------------------------- on a real lab


def _ping(netns: str, address: str, count: int, interval: float, wait: float = 1.0) -> tuple[int, list[float]]:
    """(packets sent, RTTs in ms of the replies) of `ping` from NETNS."""
    out = ns_output(netns, "ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait), address, check=False)
    sent = int(re.search(r"(\d+) packets transmitted", out).group(1))
    return sent, [float(t) for t in re.findall(r"time=([0-9.]+) ms", out)]


def _nfqueue_rules(lab) -> list[str]:
    return [r for r in ns_output(lab.gw_ns(1), "iptables", "-w", "-t", "mangle", "-S").splitlines() if "NFQUEUE" in r]


@pytest.mark.netns
def test_loss_drops_about_the_round_trip_share(lab_factory):
    lab = lab_factory(1)
    res = hatun_cli(None, "lab", "fail", "gw1", "--name", lab.name, "--mode", "loss:30")
    assert res.returncode == 0, res.stderr
    assert "30 % random loss" in res.stdout and "51 %" in res.stdout
    assert topology.Lab.load(lab.name).failed == {"gw1": "loss:30"}
    sent, rtts = _ping(lab.runner, GW_UL, 400, 0.002)
    loss = 1 - len(rtts) / sent
    assert 0.20 <= loss <= 0.80, f"{loss:.0%} of round trips lost with loss:30 on each direction (expected ~51 %)"
    print(f"loss:30 on each direction: {loss:.0%} of {sent} round trips lost")
    assert hatun_cli(None, "lab", "heal", "gw1", "--name", lab.name).returncode == 0
    assert "hatunfail" not in ns_output(lab.gw_ns(1), "nft", "list", "tables")
    sent, rtts = _ping(lab.runner, GW_UL, 50, 0.005)
    assert sent - len(rtts) <= 2


@pytest.mark.netns
def test_oneway_drops_only_what_the_runner_sends(lab_factory):
    lab = lab_factory(1)
    trio.run(topology.lab_fail, lab.name, "gw1", "oneway")

    def udp(netns, address):
        s = run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        s.bind((address, 0))
        s.settimeout(0.2)
        return s

    runner, gw = udp(lab.runner, RUNNER_UL), udp(lab.gw_ns(1), GW_UL)
    try:
        def received(dst, src, count=20):
            got = 0
            for n in range(count):
                src.sendto(b"%d" % n, dst.getsockname())
            try:
                while got < count:
                    dst.recv(64)
                    got += 1
            except TimeoutError:
                pass
            return got

        assert received(runner, gw) >= 18  # the gateway's packets still reach the runner
        assert received(gw, runner) == 0  # the runner's never reach the gateway
        trio.run(topology.lab_heal, lab.name, "gw1")
        assert received(gw, runner) >= 18
    finally:
        runner.close()
        gw.close()


@pytest.mark.netns
def test_delay_adds_to_the_round_trip_and_heal_removes_it(lab_factory):
    lab = lab_factory(1)
    _, before = _ping(lab.runner, GW_UL, 20, 0.02)
    base = statistics.median(before)
    assert trio.run(topology.lab_fail, lab.name, "gw1", "delay:80ms") == "gw1: round trip through its underlay 80ms longer"
    pid = topology.Lab.load(lab.name).pids["delay-gw1"]
    assert topology._is_delay_line(pid) and len(_nfqueue_rules(lab)) == 2
    _, during = _ping(lab.runner, GW_UL, 20, 0.02)
    assert len(during) >= 18
    assert statistics.median(during) >= base + 0.7 * 80, (base, sorted(during))
    assert statistics.median(during) < base + 80 + 100  # added once per round trip, not twice
    print(f"median RTT over the underlay: {base:.2f} ms, with delay:80ms {statistics.median(during):.1f} ms")

    # Heal while pings are in flight: the rules go first, then the line accepts what it holds.
    pinger = subprocess.Popen(["ip", "netns", "exec", lab.runner, "ping", "-n", "-c", "40", "-i", "0.01", "-W", "1",
                               GW_UL], stdout=subprocess.PIPE, text=True)
    time.sleep(0.2)
    trio.run(topology.lab_heal, lab.name, "gw1")
    out = pinger.communicate(timeout=20)[0]
    assert len(re.findall("time=", out)) >= 38, out[-300:]
    assert not os.path.exists(f"/proc/{pid}") and _nfqueue_rules(lab) == []
    assert "delay-gw1" not in topology.Lab.load(lab.name).pids
    _, after = _ping(lab.runner, GW_UL, 20, 0.02)
    assert statistics.median(after) < base + 20, sorted(after)
    with open(os.path.join(lab.dir, "delay-gw1.log")) as f:
        assert "unbound" in f.read()  # it ended cleanly, by SIGTERM
    trio.run(topology.lab_heal, lab.name, "gw1")  # idempotent


@pytest.mark.netns
def test_a_new_fault_replaces_the_old_and_down_ends_the_delay_line(lab_factory):
    lab = lab_factory(1)
    trio.run(topology.lab_fail, lab.name, "gw1", "delay:50ms")
    first = topology.Lab.load(lab.name).pids["delay-gw1"]
    trio.run(topology.lab_fail, lab.name, "gw1", "loss:10")
    assert not topology._is_delay_line(first) and _nfqueue_rules(lab) == []
    assert "mod 100 < 10 drop" in ns_output(lab.gw_ns(1), "nft", "list", "table", "inet", "hatunfail")
    trio.run(topology.lab_fail, lab.name, "gw1", "delay:50ms")
    assert "hatunfail" not in ns_output(lab.gw_ns(1), "nft", "list", "tables")
    second = topology.Lab.load(lab.name).pids["delay-gw1"]
    assert topology._is_delay_line(second) and len(_nfqueue_rules(lab)) == 2
    trio.run(topology.lab_fail, lab.name, "gw1", "delay:20ms")  # delay after delay: one line, two rules
    third = topology.Lab.load(lab.name).pids["delay-gw1"]
    assert not topology._is_delay_line(second) and len(_nfqueue_rules(lab)) == 2
    trio.run(topology.lab_down, lab.name)
    assert not topology._is_delay_line(third)


def _bound(pid: int) -> bool:
    """The kernel lists DELAY_QUEUE as bound in PID's network namespace."""
    try:
        with open(f"/proc/{pid}/net/netfilter/nfnetlink_queue") as f:
            return any(line.split()[:1] == [str(DELAY_QUEUE)] for line in f)
    except FileNotFoundError:
        return False


def _delay_line_command(lab) -> list[str]:
    return ["ip", "netns", "exec", lab.gw_ns(1), sys.executable, "-m", "hatun.lab.delay", "--queue",
            str(DELAY_QUEUE), "--delay", "0.01"]


@pytest.mark.netns
def test_delay_line_alone_exits_cleanly_on_sigterm_and_refuses_a_taken_queue(lab_factory):
    lab = lab_factory(1)
    cmd = _delay_line_command(lab)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _bound(proc.pid), "the queue bound", 20)
        second = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=20)
        assert second.returncode == 1 and "cannot bind NFQUEUE 7" in second.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "unbound" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.netns
def test_a_leftover_delay_line_holding_the_queue_fails_the_fault(lab_factory):
    """A delay line the lab does not know of (an earlier run's) holds the queue: the new one is
    refused, and lab_fail says so instead of taking the leftover's queue for its own."""
    lab = lab_factory(1)
    cmd = _delay_line_command(lab)
    leftover = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _bound(leftover.pid), "the queue bound", 20)
        with pytest.raises(topology.LabError, match=r"exited with status 1: .*cannot bind NFQUEUE 7"):
            trio.run(topology.lab_fail, lab.name, "gw1", "delay:50ms")
        state = topology.Lab.load(lab.name)
        assert "delay-gw1" not in state.pids and "gw1" not in state.failed and _nfqueue_rules(lab) == []
        leftover.send_signal(signal.SIGTERM)
        assert leftover.wait(timeout=10) == 0
        out = leftover.stdout.read()
        held = re.search(r"queue 7 bound by netlink port (\d+)", out)
        assert held and "unbound" in out, out
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
