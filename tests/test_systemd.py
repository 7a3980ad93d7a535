"""Issue 15, part 2: config/hatun.service under a real systemd, as PID 1 of a container.

Mechanism: `systemd-nspawn --boot` (Debian package systemd-container) of a small tree made in a
temporary directory around the host's own /usr, bound read-only: the host's systemd 252, Python
and wireguard-go, nothing downloaded, a boot in about a second (tests/systemd/container.py). The
container JOINS the network namespace of a lab's runner (`--network-namespace-path`), so hatun
under systemd manages that lab's tunnels and nothing touches the host's network; nspawn gives it
CAP_NET_ADMIN, a writable /proc/sys/net (the rest of /proc/sys stays read-only) and /dev/net/tun.
hatun is installed in it as a user would (tests/systemd/service.py): a virtual environment made by
Debian's externally managed /usr/bin/python3 at /opt/hatun/venv, from wheels only, in a container
with no network at all; /usr/local/bin/hatun links to it; the unit is config/hatun.service, byte
for byte, with the config in /etc/hatun.

Why not the alternatives: `--directory=/ --volatile=...` boots the host's own /etc with every
service enabled there (and /usr/local stays the host's, read-only); debootstrap needs the network
and minutes; a VM with systemd as init runs 20-30x slower here (software emulation, no KVM), so a
VM is used only where a real kernel WireGuard is needed (the last test).

Timings seen on the 2-core dev machine: container boot 0.2-0.6 s, `systemctl start hatun` to READY
(ExecStartPre `hatun check` included) 1.1-1.6 s, kill -9 to a restarted, ready hatun 3.6 s
(RestartSec=2 included); in the test VM (emulated CPU) boot ~15 s, start to READY ~30 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from hatun import __version__
from hatun.keys import PrivateKey
from hatun.lab import topology, traffic
from hatun.netns import netns_path
from tests.labutil import assert_nothing_lost, routes_json, wait_until
from tests.systemd.container import BOOT_TIMEOUT, Container, ContainerError, unavailable
from tests.systemd.service import (CONFIG, HATUN, ROOT, UNIT, UNIT_FILE, WHEELS, HatunService, Install,
                                   install_hatun)
from tests.test_lifecycle import hatun_leftovers
from tests.vm.harness import run_in_vm, vm_available
from tests.wheelhouse import system_python_or_skip, wheelhouse  # noqa: F401 (fixture)

CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_NICE = 12, 13, 23


def members(s: dict) -> list[str]:
    return s["route"]["members"]


def timing(what: str, seconds: float | None) -> None:
    # Figures for the report (shown with -s); never asserted.
    print(f"\n[systemd] {what}: {seconds:.2f} s" if seconds is not None else f"\n[systemd] {what}: -")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def installed(request):
    """hatun installed in a container without network; yields (Install, that container or None).
    The whole module is skipped, with the reason, where no systemd container boots. Inside the
    test VM, the host's installation is used as it is ($HATUN_SYSTEMD_INSTALL): pip there would
    take minutes."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    if os.environ.get("HATUN_SYSTEMD_INSTALL"):
        yield Install(Path(os.environ["HATUN_SYSTEMD_INSTALL"])), None
        return
    wheels = request.getfixturevalue("wheelhouse")
    python = system_python_or_skip()
    install = Install.make()
    c = Container("install")
    try:
        try:
            c.boot(binds=install.binds(), binds_ro={str(wheels): WHEELS})
        except ContainerError as e:
            pytest.skip(f"systemd-nspawn cannot boot a systemd container on this machine: {e}")
        timing("boot of the install container", c.boot_seconds)
        install_hatun(c, python)
        yield install, c
    finally:
        try:
            c.terminate()
        finally:
            install.remove()


@pytest.fixture
def on_lab(lab_factory, installed):
    """make(gateways=2, backend="userspace", boot_timeout=..., **config_edit) -> HatunService: a
    lab, and a booted container in its runner namespace with hatun installed, its config written,
    the unit not started yet. Containers are removed before their labs (this fixture needs
    lab_factory, which is torn down after it)."""
    install, _ = installed
    made: list[Container] = []

    def make(gateways: int = 2, backend: str = "userspace", boot_timeout: float = BOOT_TIMEOUT, **edit) -> HatunService:
        lab = lab_factory(gateways, backend=backend)
        c = Container("lab")
        made.append(c)
        svc = HatunService(c, lab)
        svc.prepare(**edit)
        c.boot(netns=netns_path(lab.runner), binds_ro=install.binds(), timeout=boot_timeout)
        timing("container boot", c.boot_seconds)
        return svc

    try:
        yield make
    finally:
        errors = []
        for c in made:
            try:
                c.terminate()
            except ContainerError as e:
                errors.append(e)
        if errors:
            raise errors[0]


def started(on_lab, gateways: int = 2, **edit) -> HatunService:
    svc = on_lab(gateways, **edit)
    res = svc.start()
    assert res.returncode == 0, svc.diagnose(res)
    timing("systemctl start -> READY", svc.start_seconds)
    names = [f"gw{i}" for i in range(1, gateways + 1)]
    svc.wait(lambda s: members(s) == names, 15, "every tunnel in the route")
    return svc


# ---------------------------------------------------------------- (a) start, READY, traffic


@pytest.mark.netns
@pytest.mark.slow
def test_start_reaches_ready_and_the_tunnels_carry_traffic(on_lab):
    svc = on_lab(2)
    res = svc.start()
    assert res.returncode == 0, svc.diagnose(res)
    timing("systemctl start -> READY", svc.start_seconds)
    # Type=notify: `systemctl start` returns once hatun has sent READY=1, so right now hatun already
    # says it is ready and every tunnel has its first verdict. (Were READY not awaited, start would
    # return at the fork, long before the control socket exists.)
    s = svc.status()
    assert s["ready"] is True
    assert [t["state"] for t in s["tunnels"] if t["state"] == "init"] == [], s["tunnels"]
    p = svc.props("Type", "ActiveState", "SubState", "StatusText", "NRestarts", "MainPID", "NotifyAccess")
    assert (p["Type"], p["NotifyAccess"], p["ActiveState"], p["SubState"]) == ("notify", "main", "active", "running")
    assert re.fullmatch(r"[0-2]/2 tunnels in service", p["StatusText"]), p  # READY=1's STATUS=, from the main PID
    assert int(p["MainPID"]) == s["pid"] and p["NRestarts"] == "0"
    assert b"hatun\0run\0" + CONFIG.encode() in Path(f"/proc/{svc.main_pid()}/cmdline").read_bytes()
    svc.wait(lambda s: members(s) == ["gw1", "gw2"], 15, "both tunnels up and in the route")
    run = trio.run(lambda: traffic.udp_flows(svc.lab.runner, topology.SERVICE, flows=16, rate=200, duration=2.0))
    assert set(run.share()) == {"gw1", "gw2"}, run.share()
    assert_nothing_lost(run.flows, "through the tunnels of hatun under systemd")


# ---------------------------------------------------------------- (b) reload


@pytest.mark.netns
@pytest.mark.slow
def test_reload_refuses_a_broken_config_and_applies_a_good_one(on_lab):
    svc = started(on_lab, 2)
    main, tunnels = svc.props("MainPID")["MainPID"], svc.runner_wireguard_go()
    svc.write_config(tunnels={"gw2": {"weight": "0"}})
    res = svc.c.systemctl("reload", UNIT)
    # ExecReload is `hatun reload`, which waits for hatun's answer: the reload job fails...
    assert res.returncode != 0 and f"Job for {UNIT} failed" in res.stderr, svc.diagnose(res)
    # ... the journal says why, and the old config keeps running: same process, same tunnels.
    journal = svc.journal_text()
    assert f"Reload failed for {UNIT}" in journal, journal[-3000:]
    assert "hatun: reload refused, still running the previous config: tunnels[1].weight: must be >= 1" in journal
    p = svc.props("ActiveState", "SubState", "MainPID", "NRestarts")
    assert (p["ActiveState"], p["SubState"], p["MainPID"], p["NRestarts"]) == ("active", "running", main, "0")
    s = svc.status()
    assert members(s) == ["gw1", "gw2"] and s["reload"]["ok"] is False
    assert svc.runner_wireguard_go() == tunnels
    # The admin's own command says it too.
    res = svc.c.run(HATUN, "reload", check=False)
    assert res.returncode == 1 and "weight: must be >= 1" in res.stderr, res.stdout + res.stderr
    # A good change is applied in place.
    svc.write_config(tunnels={"gw2": {"weight": "3"}})
    res = svc.c.systemctl("reload", UNIT)
    assert res.returncode == 0, svc.diagnose(res)
    s = svc.status()
    assert s["reload"] == {"ok": True, "message": s["reload"]["message"], "counts": {"failure": 2, "success": 1}}
    assert next(t for t in s["tunnels"] if t["name"] == "gw2")["configured_weight"] == 3
    assert "~gw2" in svc.journal_text()
    assert svc.props("MainPID", "ActiveState") == {"MainPID": main, "ActiveState": "active"}
    assert svc.runner_wireguard_go() == tunnels


# ---------------------------------------------------------------- (c) kill -9: restart and adoption

RESTART_FLOWS_SECONDS = 15.0  # the flows outlast the restart (~4 s here: RestartSec=2, then start)
RESTART_TIMEOUT = 60.0


@pytest.mark.netns
@pytest.mark.slow
def test_kill9_is_restarted_and_adopts_the_tunnels_without_losing_a_packet(on_lab):
    svc = started(on_lab, 2)
    tunnels = svc.runner_wireguard_go()
    assert len(tunnels) == 2
    old = svc.main_pid()
    old_fd = os.pidfd_open(old)
    observed: dict = {}

    def restarted() -> bool:
        p = svc.props("NRestarts", "ActiveState", "SubState", "MainPID")
        if (p["NRestarts"], p["ActiveState"], p["SubState"]) != ("1", "active", "running"):
            return False
        try:
            s = svc.status()
        except Exception:  # noqa: BLE001 - not answering yet
            return False
        return s["ready"] and s["pid"] == int(p["MainPID"]) and members(s) == ["gw1", "gw2"]

    def wait_restarted() -> None:
        import time

        deadline = time.monotonic() + RESTART_TIMEOUT
        while not restarted():
            assert time.monotonic() < deadline, f"no restarted, ready hatun after {RESTART_TIMEOUT:g} s:\n{svc.diagnose()}"
            time.sleep(0.1)

    async def crash_and_wait() -> None:
        await trio.sleep(1.0)
        observed["route"] = routes_json(svc.lab.runner, "route", "show", "table", "51820")
        signal.pidfd_send_signal(old_fd, signal.SIGKILL)
        observed["killed"] = trio.current_time()
        await trio.to_thread.run_sync(wait_restarted)
        observed["restarted"] = trio.current_time()

    try:
        run = trio.run(lambda: traffic.udp_flows(svc.lab.runner, topology.SERVICE, flows=16, rate=200,
                                                 duration=RESTART_FLOWS_SECONDS, on_start=crash_and_wait))
    finally:
        os.close(old_fd)
    # While no hatun ran, the kernel kept routing: tunnels and routes stayed.
    assert observed["route"], "no route while hatun was down"
    # The flows were still running well after the restart was complete (the test covers all of it).
    assert observed["restarted"] < run.ended - 2.0, (observed, run.ended)
    timing("kill -9 -> restarted hatun ready", observed["restarted"] - observed["killed"])
    sent = sum(len(f.sent) for f in run.flows)
    lost = sum(len(f.lost()) for f in run.flows)
    print(f"[systemd] kill -9 and restart: {lost} of {sent} packets lost")
    assert_nothing_lost(run.flows, "kill -9 and restart by systemd")
    assert all(len(f.gateways()) == 1 for f in run.flows), "flows moved"
    # KillMode=process: the same wireguard-go processes, adopted by the new hatun.
    assert svc.runner_wireguard_go() == tunnels
    journal = svc.journal_text()
    assert "adopting the kernel state" in journal
    assert journal.count("adopted running wireguard-go") == 2, journal[-3000:]
    p = svc.props("NRestarts", "MainPID")
    assert p["NRestarts"] == "1" and svc.main_pid() != old


# ---------------------------------------------------------------- (d) stop removes everything


@pytest.mark.netns
@pytest.mark.slow
def test_stop_removes_everything_hatun_made(on_lab):
    svc = started(on_lab, 2)
    assert hatun_leftovers(svc.lab)  # sanity: the check sees hatun's objects
    tunnels = svc.runner_wireguard_go()
    assert len(tunnels) == 2
    assert {"hatun.sock", "state.json", "lock"} <= set(svc.run_dir())
    res = svc.c.systemctl("stop", UNIT)
    assert res.returncode == 0, svc.diagnose(res)
    p = svc.props("ActiveState", "Result", "ExecMainStatus", "MainPID")
    assert p == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0", "MainPID": "0"}, p
    # KillMode=process signals hatun alone: hatun itself removed its wireguard-go processes.
    assert hatun_leftovers(svc.lab) == []
    assert svc.runner_wireguard_go() == {}
    assert not [pid for pid in tunnels.values() if os.path.exists(f"/proc/{pid}")]
    # /run/hatun is kept (RuntimeDirectoryPreserve: the state of a crashed hatun must survive); a
    # clean stop leaves only the lock file in it. No socket of ours in /run/wireguard.
    assert svc.run_dir() == ["lock"]
    assert [f for f in os.listdir(svc.c.host_path("/run/wireguard")) if f.startswith(f"hl{svc.lab.name}")] == []
    assert "removed hatun's routes, rules, nexthops and 2 tunnel devices" in svc.journal_text()


# ---------------------------------------------------------------- (e) the journal


@pytest.mark.netns
@pytest.mark.slow
def test_the_journal_has_hatuns_log_and_never_a_key(on_lab):
    svc = on_lab(2)
    # At debug level (a drop-in, as an admin would add one): the most hatun ever logs.
    dropin = svc.c.root / f"etc/systemd/system/{UNIT}.d"
    dropin.mkdir()
    (dropin / "debug.conf").write_text(f"[Service]\nExecStart=\nExecStart={HATUN} run {CONFIG} --log-level debug\n")
    svc.c.run("systemctl", "daemon-reload")
    res = svc.start()
    assert res.returncode == 0, svc.diagnose(res)
    svc.wait(lambda s: members(s) == ["gw1", "gw2"], 15, "both in the route")
    main = svc.props("MainPID")["MainPID"]  # as the journal records it: in the machine's PID namespace
    trio.run(topology.lab_fail, svc.lab.name, "gw2", "blackhole")
    svc.wait(lambda s: members(s) == ["gw1"], 15, "gw2 out")
    svc.write_config(tunnels={"gw1": {"weight": "2"}})
    assert svc.c.systemctl("reload", UNIT).returncode == 0
    assert svc.c.systemctl("stop", UNIT).returncode == 0
    entries = svc.journal_entries()
    lines = [field_text(e.get("MESSAGE")) for e in entries if e.get("SYSLOG_IDENTIFIER") == "hatun" and e.get("_PID") == main]
    text = "\n".join(lines)
    for expected in (f"hatun {__version__} running: 2 tunnels, backend userspace", "tunnels in service", "gw2 down",
                     "reload", "received SIGTERM", "removed hatun's routes"):
        assert expected in text, f"{expected!r} not in hatun's journal:\n{text[-4000:]}"
    assert "nftables table inet hatun updated" in text  # a debug line: the drop-in's level took effect
    # No key anywhere in this boot's journal (every unit, every field), nor in `systemctl status`.
    everything = "\n".join(field_text(v) for e in map(json.loads, svc.c.journal("-o", "json").splitlines()) for v in e.values())
    everything += svc.c.systemctl("status", UNIT).stdout
    public = PrivateKey.from_base64(Path(svc.lab.dir, "runner1.key").read_text()).public_key.base64
    assert public in everything  # sanity: the search sees what `hatun check` printed (public keys)
    leaked = [k[:6] + "..." for k in svc.secrets() if k in everything]
    assert leaked == [], f"keys in the journal: {leaked}"


def field_text(value) -> str:
    """A journal field as journalctl's JSON gives it: a string, or bytes as a list of numbers (a
    message with control characters or not UTF-8), or a list of either (a field set twice)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, int) for b in value):
        return bytes(value).decode("latin-1")
    if isinstance(value, list):
        return "\n".join(field_text(v) for v in value)
    return "" if value is None else str(value)


@pytest.mark.netns
@pytest.mark.slow
def test_journal_priorities_follow_hatuns_log_levels(on_lab):
    svc = started(on_lab, 2)
    trio.run(topology.lab_fail, svc.lab.name, "gw2", "blackhole")
    svc.wait(lambda s: members(s) == ["gw1"], 15, "gw2 out")
    warnings = svc.c.journal("-u", UNIT, "-p", "warning", "-o", "cat")
    assert "gw2 down" in warnings, warnings


@pytest.mark.netns
@pytest.mark.slow
def test_systemctl_status_follows_the_tunnels_in_service(on_lab):
    svc = started(on_lab, 2)
    trio.run(topology.lab_fail, svc.lab.name, "gw2", "blackhole")
    svc.wait(lambda s: members(s) == ["gw1"], 15, "gw2 out")
    wait_until(lambda: svc.props("StatusText")["StatusText"] == "1/2 tunnels in service", "STATUS=1/2", 10)


# ---------------------------------------------------------------- (f) the sandbox


def caps(pid: int) -> dict[str, set[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("CapBnd", "CapEff", "CapPrm"):
            bits = int(value, 16)
            out[key] = {i for i in range(64) if bits >> i & 1}
        elif key in ("NoNewPrivs", "Seccomp"):
            out[key] = {int(value)}
    return out


def nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.mark.netns
@pytest.mark.slow
def test_the_sandbox_leaves_hatun_what_it_needs(on_lab):
    svc = started(on_lab, 2)
    main = svc.main_pid()
    wanted = {CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_NICE}
    # CapabilityBoundingSet, NoNewPrivileges, seccomp (RestrictAddressFamilies...): for hatun and
    # for the wireguard-go processes it started.
    for pid in (main, *svc.runner_wireguard_go().values()):
        c = caps(pid)
        assert c["CapBnd"] == wanted and c["CapEff"] == wanted, (pid, c)
        assert c["NoNewPrivs"] == {1} and c["Seccomp"] == {2}, (pid, c)
    # CAP_SYS_NICE: wireguard-go, the data plane, runs at nice -10 as hatun asks.
    assert {nice(pid) for pid in svc.runner_wireguard_go().values()} == {-10}
    # /proc/sys/net writable (ProtectKernelTunables + ReadWritePaths), in the lab's namespace.
    for key in ("net.ipv4.fib_multipath_hash_policy", "net.ipv4.conf.all.src_valid_mark"):
        value = subprocess.run(["ip", "netns", "exec", svc.lab.runner, "sysctl", "-n", key], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        assert value == "1", key
    # /run/hatun (state, socket) and /run/wireguard (wireguard-go's sockets) writable; /dev/net/tun
    # usable (the TUN devices exist); CAP_NET_RAW (ICMP probes answered: both up).
    assert {"hatun.sock", "state.json"} <= set(svc.run_dir())
    sockets = os.listdir(svc.c.host_path("/run/wireguard"))
    assert {f"{svc.lab.runner_ifname(i)}.sock" for i in (1, 2)} <= set(sockets)
    assert all(t["state"] == "up" and t["present"] for t in svc.status()["tunnels"])
    # PrivateTmp: hatun's /tmp is not the machine's.
    ino = lambda p: (os.stat(p).st_dev, os.stat(p).st_ino)  # noqa: E731
    assert ino(f"/proc/{main}/root/tmp") != ino(svc.c.host_path("/tmp"))
    p = svc.props("DevicePolicy", "ProtectSystem", "ProtectHome", "NoNewPrivileges")
    assert p == {"DevicePolicy": "closed", "ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes"}


# What hatun and wireguard-go need from the system, checked by a small program run under the unit's
# own sandbox options (every option of config/hatun.service about privileges and file system).
PROBE = r'''
import errno, fcntl, json, os, socket, struct
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def tun():
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH", b"hatunprobe0", 0x0001 | 0x1000))  # TUNSETIFF, IFF_TUN|IFF_NO_PI
    finally:
        os.close(fd)
def sysctl():
    path = "/proc/sys/net/ipv4/conf/all/src_valid_mark"
    value = open(path).read()
    with open(path, "w") as f:
        f.write(value)
def write_in(d):
    def fn():
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "probe"), "w") as f:
            f.write("x")
        os.unlink(os.path.join(d, "probe"))
    return fn
def kernel_tunable():
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(open("/proc/sys/kernel/hostname").read())
def netlink():
    for proto in (0, 16):  # NETLINK_ROUTE, NETLINK_GENERIC (WireGuard's kernel API)
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
        s.bind((0, 0))
        s.close()
print(json.dumps({
    "tun": attempt(tun),
    "sysctl_net": attempt(sysctl),
    "raw_icmp": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()),
    "netlink": attempt(netlink),
    "nice": attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, -10)),
    "run_hatun": attempt(write_in("/run/hatun")),
    "run_wireguard": attempt(write_in("/run/wireguard")),
    "run": attempt(write_in("/run/probe")),
    "etc": attempt(write_in("/etc/hatun")),
    "usr_local": attempt(write_in("/usr/local/bin")),
    "sysctl_kernel": attempt(kernel_tunable),
    "packet_socket": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()),
}, sort_keys=True))
'''
NEEDED = {"tun": "ok", "sysctl_net": "ok", "raw_icmp": "ok", "netlink": "ok", "nice": "ok", "run_hatun": "ok",
          "run_wireguard": "ok", "run": "EROFS", "etc": "EROFS", "usr_local": "EROFS", "sysctl_kernel": "EROFS",
          "packet_socket": "EAFNOSUPPORT"}
SANDBOX_KEYS = re.compile(r"^(Capability|NoNewPrivileges|Protect|ReadWritePaths|ReadOnlyPaths|Private|Device|Restrict|"
                          r"LockPersonality|SystemCall|RuntimeDirectory|UMask|Memory)")


def sandbox_lines(unit_text: str) -> list[str]:
    """The [Service] lines of a unit that restrict what its processes may do."""
    section, out = None, []
    for line in unit_text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#") and SANDBOX_KEYS.match(line):
            out.append(line)
    return out


# Each option is needed (removed, the probe loses exactly what it gave) and enforced in this
# container (so the first case proves something): (name, lines to drop, lines to add, changed results).
ABLATIONS = [
    ("unit as shipped", [], [], {}),
    ("without DeviceAllow", ["DeviceAllow=/dev/net/tun rw"], [], {"tun": "EPERM"}),
    ("without ReadWritePaths=/proc/sys/net", ["ReadWritePaths=/proc/sys/net"], [], {"sysctl_net": "EROFS"}),
    ("without CAP_NET_RAW", ["CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_NICE"],
     ["CapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_NICE"], {"raw_icmp": "EPERM"}),
    ("without CAP_SYS_NICE", ["CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_NICE"],
     ["CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW"], {"nice": "EACCES"}),
    # A fresh boot has no /run/wireguard: with only "ReadWritePaths=-/run/wireguard" the unit starts
    # (the "-"), but wireguard-go cannot create its socket directory (the bug the unit had).
    ("without RuntimeDirectory wireguard", ["RuntimeDirectory=hatun wireguard"], ["RuntimeDirectory=hatun"],
     {"run_wireguard": "EROFS"}),
    # ProtectKernelTunables= implies MountAPIVFS=, which leaves all of /run writable.
    ("without ReadOnlyPaths=/run", ["ReadOnlyPaths=/run"], [], {"run": "ok"}),
]


@pytest.mark.netns
@pytest.mark.slow
def test_every_sandbox_option_is_enforced_and_leaves_what_hatun_needs(installed):
    _, c = installed
    if c is None:
        pytest.skip("uses the install container, which only the host has")
    lines = sandbox_lines(UNIT_FILE.read_text())
    assert "DevicePolicy=closed" in lines and "ProtectSystem=strict" in lines, lines
    (c.root / "srv/hatun-probe.py").write_text(PROBE)
    got = {}
    for i, (name, drop, add, changed) in enumerate(ABLATIONS):
        assert set(drop) <= set(lines), (name, drop)
        unit = f"hatun-probe{i}.service"
        body = [line for line in lines if line not in drop] + add
        (c.root / "etc/systemd/system" / unit).write_text(
            "[Service]\nType=oneshot\nExecStart=/usr/bin/python3 /srv/hatun-probe.py\n" + "\n".join(body) + "\n")
        c.run("rm", "-rf", "/run/hatun", "/run/wireguard")  # as on a fresh boot
        c.run("systemctl", "daemon-reload")
        res = c.systemctl("start", unit)
        assert res.returncode == 0, c.run("journalctl", "-b", "-u", unit, "-o", "cat").stdout
        out = c.run("journalctl", "-b", "-u", unit, "-o", "cat").stdout
        got[name] = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    wrong = {name: {k: f"{v} (wanted {want[k]})" for k, v in got[name].items() if v != want.get(k)}
             for name, want in ((name, {**NEEDED, **changed}) for name, _, _, changed in ABLATIONS)}
    assert {name: w for name, w in wrong.items() if w} == {}


# ---------------------------------------------------------------- (g) systemd-analyze verify


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    """The unit file as systemd reads it (no systemd as PID 1 needed): no error and no warning. The
    root holds the system's units (its dependencies) and /usr/local/bin/hatun (verify checks that
    every Exec*= command exists)."""
    analyze, units = shutil.which("systemd-analyze"), Path("/usr/lib/systemd/system")
    if analyze is None or not units.is_dir():
        pytest.skip("needs systemd-analyze and the system's units (Debian package systemd)")
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "usr/local/bin").mkdir(parents=True)
    fake = tmp_path / HATUN.lstrip("/")
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copyfile(UNIT_FILE, tmp_path / "etc/systemd/system" / UNIT)

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run([analyze, "verify", "--man=no", f"--root={tmp_path}", UNIT], capture_output=True,
                              text=True, timeout=60)

    res = verify()
    assert (res.returncode, res.stdout + res.stderr) == (0, "")
    # The check has teeth: a typo is reported (as a warning, with exit status 0: hence "no output").
    (tmp_path / "etc/systemd/system" / UNIT).write_text(UNIT_FILE.read_text().replace("KillMode=process", "KillMode=proces"))
    assert "Failed to parse kill mode" in verify().stderr
    fake.unlink()
    (tmp_path / "etc/systemd/system" / UNIT).write_text(UNIT_FILE.read_text())
    assert "/usr/local/bin/hatun is not executable" in verify().stderr


# ---------------------------------------------------------------- kernel WireGuard: in the test VM
#
# Only the test VM (tests/vm/harness.py) has a kernel with WireGuard. A systemd container boots
# there too (cgroup v2, about 15 s under software emulation), so (a) and (d) run for real on the
# kernel backend: the unit's sandbox lets its rtnetlink and genetlink operations through
# (CAP_NET_ADMIN, AF_NETLINK; ProtectKernelModules= does not stop the kernel's own module
# autoloading). One pytest process in one VM: each interpreter start costs 20-30 s there.

VM_SLOW = 30.0  # the emulated CPU is 20-30x slower than the host


@pytest.mark.vm_inside
@pytest.mark.skipif(os.environ.get("HATUN_IN_VM") != "1", reason="runs inside the test VM (the next test boots it)")
@pytest.mark.timeout(1200)
def test_inside_vm_kernel_backend_starts_carries_traffic_and_stops_clean(on_lab):
    svc = on_lab(2, backend="kernel", boot_timeout=10 * VM_SLOW)
    assert svc.lab.backend == "kernel"
    # Python starts 20-30x slower here: room for `hatun check` and `hatun run` to reach READY.
    dropin = svc.c.root / f"etc/systemd/system/{UNIT}.d"
    dropin.mkdir()
    (dropin / "slow-cpu.conf").write_text("[Service]\nTimeoutStartSec=600\nTimeoutStopSec=300\n")
    svc.c.run("systemctl", "daemon-reload")
    res = svc.start(timeout=700)
    assert res.returncode == 0, svc.diagnose(res)
    timing("systemctl start -> READY (emulated CPU)", svc.start_seconds)
    s = svc.status(timeout=VM_SLOW)
    assert s["ready"] is True and s["backend"] == "kernel"
    s = svc.wait(lambda s: members(s) == ["gw1", "gw2"], 4 * VM_SLOW, "both in the route")
    kinds = subprocess.run(["ip", "-n", svc.lab.runner, "-d", "-o", "link", "show", "type", "wireguard"],
                           capture_output=True, text=True, timeout=VM_SLOW).stdout
    assert all(svc.lab.runner_ifname(i) in kinds for i in (1, 2)), kinds
    assert svc.runner_wireguard_go() == {}
    run = trio.run(lambda: traffic.udp_flows(svc.lab.runner, topology.SERVICE, flows=20, rate=40, duration=2.0))
    assert set(run.share()) == {"gw1", "gw2"}, run.share()
    assert hatun_leftovers_here(svc.lab)  # sanity
    res = svc.c.systemctl("stop", UNIT, timeout=400)
    assert res.returncode == 0, svc.diagnose(res)
    p = svc.props("ActiveState", "Result", "ExecMainStatus")
    assert p == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, p
    assert hatun_leftovers_here(svc.lab) == []
    assert svc.run_dir() == ["lock"]


def hatun_leftovers_here(lab) -> list[str]:
    # tests.test_lifecycle.hatun_leftovers lists /run/wireguard, which a kernel-only machine lacks.
    os.makedirs("/run/wireguard", exist_ok=True)
    return hatun_leftovers(lab)


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_kernel_backend_under_systemd_in_the_vm(installed):
    ok, why = vm_available()
    if not ok:
        pytest.skip(f"no test VM here: {why}")
    install, _ = installed
    cmd = f"{sys.executable} -m pytest -q -rs -s -m vm_inside tests/test_systemd.py"
    res = run_in_vm(cmd, timeout=1400, cwd=ROOT, memory="1200M", env={"HATUN_SYSTEMD_INSTALL": str(install.dir)},
                    stream=sys.stderr)
    out = res.output
    assert res.returncode == 0, out[-6000:]
    summary = [line for line in out.splitlines() if " passed" in line][-1]
    assert summary.startswith("1 passed") and "skipped" not in summary, summary
    print("\n".join(line for line in out.splitlines() if line.startswith("[systemd]")))

