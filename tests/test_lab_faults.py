"""`hatun lab fail --mode oneway|loss:N|delay:D`: the mode syntax (pure), the delay line's netlink
messages and timing (pure), and each fault on a real lab: what it drops or delays, that heal removes
it, that a new fault replaces the old, and that `lab down` ends the delay line.

Traffic goes only between the namespaces of the test's own lab (underlay 198.18.1.0/30). Loss and
delay are checked with generous bounds, never exact figures."""

from __future__ import annotations

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


def test_parse_packets_and_acks():
    ack = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", 0) + bytes(16)
    refused = struct.pack("=IHHII", 36, 2, 0, 0, 0) + struct.pack("=i", -16) + bytes(16)
    ids, acks = delay.parse(_packet(5) + _packet(0xFFFFFFFF) + ack + refused)
    assert ids == [5, 0xFFFFFFFF]
    assert acks == [(1, 0), (0, 16)]
    with pytest.raises(ValueError):
        delay.parse(_packet(5) + struct.pack("=IHHII", 99, 3 << 8, 0, 0, 0) + bytes(8))  # a length past the end
    with pytest.raises(ValueError):
        delay.parse(struct.pack("=IHHII", 20, 3 << 8, 0, 0, 0) + bytes(4))  # no packet header


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


@pytest.mark.netns
def test_delay_line_alone_exits_cleanly_on_sigterm_and_refuses_a_taken_queue(lab_factory):
    lab = lab_factory(1)
    cmd = ["ip", "netns", "exec", lab.gw_ns(1), sys.executable, "-m", "hatun.lab.delay", "--queue",
           str(DELAY_QUEUE), "--delay", "0.01"]
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
