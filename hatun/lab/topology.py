"""The built-in lab: a runner, N gateways and a private LAN, in network namespaces of this machine.

    hl-NAME-run ──ul1── hl-NAME-gw1 ──lan──┐
        │       ──ul2── hl-NAME-gw2 ──lan──┼── lanbr (hl-NAME-lan): service host 198.19.77.200
        │       ──ulN── hl-NAME-gwN ──lan──┘
        └─ hatun runs here (config written by `lab up`), tunnels hlNAMEr1..N over ul1..N

Each gateway runs WireGuard brought up by the real wg-quick from what `hatun gateway` prints for it
(the runner as its peer, the return route for the source, forwarding into the LAN and masquerading,
so replies return through the gateway that carried the request); every second tunnel has a
preshared key. Only addresses of
198.18.0.0/15 (and 2001:2::/48 with IPv6) are used; no namespace has a route to the outside.
wireguard-go's UAPI socket directory is global to the machine, so every interface name carries the
lab name and several labs can coexist.

The lab is made with `ip` (allowed for the lab; hatun itself uses netlink) and torn down by
namespace name, so `down` also cleans up after a crash.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import trio

from hatun.keys import PresharedKey, PrivateKey, load_private_key_file, write_private_key_file
from hatun.lab import faults
from hatun.wireguard.model import BackendUnavailable

log = logging.getLogger("hatun.lab")

LAB_ROOT = "/run/hatun/lab"
NAME_RE = re.compile(r"^[a-z0-9]{1,8}$")
WG_PORT = 51820
LAN = ipaddress.ip_network("198.19.77.0/24")
LAN6 = ipaddress.ip_network("2001:2:0:77::/64")
SERVICE = "198.19.77.200"
SERVICE6 = "2001:2:0:77::200"
SOURCE = "198.18.99.1"
SOURCE6 = "2001:2:0:99::1"
SERVICE_START_TIMEOUT = 120.0
NETNS_DIR = "/run/netns"
MAX_GATEWAYS = 199  # gateway I has LAN address 198.19.77.I; .200 is the service host


class LabError(Exception):
    """The lab cannot be built or changed; the message says why and what to do."""


@dataclass
class Lab:
    """A lab's layout and state, saved as LAB_ROOT/NAME/lab.json."""

    name: str
    gateways: int
    backend: str
    ipv6: bool = False
    pids: dict[str, int] = field(default_factory=dict)  # process label -> pid (service host...)
    failed: dict[str, str] = field(default_factory=dict)  # gateway -> failure mode
    enroll: bool = False  # keyless runners: gateways enroll the runner (hatun.lab.enroll)

    @property
    def dir(self) -> str:
        return os.path.join(LAB_ROOT, self.name)

    @property
    def config_path(self) -> str:
        return os.path.join(self.dir, "hatun.toml")

    @property
    def control_socket(self) -> str:
        return os.path.join(self.dir, "hatun.sock")

    @property
    def runner(self) -> str:
        return f"hl-{self.name}-run"

    @property
    def lan(self) -> str:
        return f"hl-{self.name}-lan"

    def gw_ns(self, i: int) -> str:
        return f"hl-{self.name}-gw{i}"

    def gw_ifname(self, i: int) -> str:
        return f"hl{self.name}g{i}"

    def runner_ifname(self, i: int) -> str:
        return f"hl{self.name}r{i}"

    def namespaces(self) -> list[str]:
        return [self.runner, self.lan] + [self.gw_ns(i) for i in range(1, self.gateways + 1)]

    def gateway_index(self, gw: str) -> int:
        m = re.fullmatch(r"(?:gw)?(\d+)", gw)
        if not m or not 1 <= int(m.group(1)) <= self.gateways:
            raise LabError(f"no gateway {gw!r} in lab {self.name!r} (it has gw1..gw{self.gateways})")
        return int(m.group(1))

    def save(self) -> None:
        tmp = os.path.join(self.dir, "lab.json.tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, os.path.join(self.dir, "lab.json"))

    @classmethod
    def load(cls, name: str) -> Lab:
        check_name(name)
        try:
            with open(os.path.join(LAB_ROOT, name, "lab.json")) as f:
                return cls(**json.load(f))
        except FileNotFoundError:
            raise LabError(f"no lab named {name!r} is up (start one with: hatun lab up --name {name})") from None


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise LabError(f"lab name {name!r}: use 1-8 lowercase letters or digits (it goes into interface names)")


# Gateways 1..98 get the readable plan (underlay 198.18.I.0/30, tunnel 198.18.(100+I).0/30); larger
# labs continue in /30 blocks of 198.19.192.0/22 and 198.19.208.0/22.
READABLE = 98


def tunnel_net(i: int, v6: bool = False):
    """Tunnel I's subnet: gateway .1, runner .2 (IPv6: 2001:2:0:(100+I)::/64, same roles)."""
    if v6:
        # Written in decimal digits (hextets are hex): 101, 102, ... never meet the LAN's 77 or 99.
        return ipaddress.ip_network(f"2001:2:0:{100 + i}::/64")
    if i <= READABLE:
        base = ipaddress.ip_address("198.18.100.0") + 256 * i
    else:
        base = ipaddress.ip_address("198.19.208.0") + 4 * (i - READABLE)
    return ipaddress.ip_network(f"{base}/30")


def underlay(i: int) -> tuple[str, str]:
    """(runner, gateway) addresses with prefix length of underlay link I: 198.18.I.1/30 and .2."""
    if i <= READABLE:
        base = ipaddress.ip_address("198.18.0.0") + 256 * i
    else:
        base = ipaddress.ip_address("198.19.192.0") + 4 * (i - READABLE)
    return f"{base + 1}/30", f"{base + 2}/30"


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root: it creates network namespaces, links and WireGuard devices")
    if shutil.which("ip") is None:
        raise LabError("the lab needs iproute2 (apt-get install iproute2)")


async def run(cmd: list[str], *, input: str | None = None, check: bool = True,
              timeout: float = 60) -> subprocess.CompletedProcess:
    """Run CMD (text in and out) without blocking the scheduler, for at most TIMEOUT seconds. With
    CHECK, a failure raises LabError with the command's own message."""
    with trio.fail_after(timeout):
        res = await trio.run_process(cmd, stdin=(input or "").encode(), capture_stdout=True, capture_stderr=True,
                                     check=False)
    out = subprocess.CompletedProcess(cmd, res.returncode, res.stdout.decode(errors="replace"),
                                      res.stderr.decode(errors="replace"))
    if check and out.returncode != 0:
        raise LabError(f"{' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''}: {out.stderr.strip() or out.stdout.strip()}")
    return out


async def _batch(netns: str | None, commands: list[str]) -> None:
    """Run `ip` commands in one process (fast for large labs)."""
    if commands:
        await run(["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"], input="\n".join(commands) + "\n")


async def _sysctl(netns: str, settings: dict[str, str]) -> None:
    script = "; ".join(f"echo {v} > /proc/sys/{k.replace('.', '/')}" for k, v in settings.items())
    await run(["ip", "netns", "exec", netns, "sh", "-c", script])


def existing_namespaces(name: str | None = None) -> list[str]:
    """Lab namespaces on this machine (of lab NAME, or of every lab): what `ip netns list` lists."""
    try:
        found = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    prefix = f"hl-{name}-" if name else "hl-"
    return sorted(ns for ns in found if ns.startswith(prefix))


def namespace_pids(netns: str) -> list[int]:
    """Processes in network namespace NETNS (what `ip netns pids` prints), read from /proc."""
    try:
        want = os.stat(os.path.join(NETNS_DIR, netns))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                pids.append(int(entry))
    return pids


def gateway_config_path(lab: Lab, i: int) -> str:
    """Gateway I's wg-quick file (wg-quick names the interface after the file)."""
    return os.path.join(lab.dir, "gateways", f"{lab.gw_ifname(i)}.conf")


def psk_path(lab: Lab, i: int) -> str | None:
    """The preshared key of tunnel I: every second tunnel has one, so that each lab runs both kinds."""
    return os.path.join(lab.dir, f"psk{i}.key") if i % 2 == 0 else None


def gateway_config(lab: Lab, i: int) -> str:
    """Gateway I's side exactly as `hatun gateway gwI CONFIG` prints it for the lab's runner config,
    with the lab's key files: the gateways are configured from hatun's own output."""
    from hatun.config import parse_config
    from hatun.gateway import plan_gateway, render_wg_quick

    config = parse_config(config_text(lab))
    runner_public = load_private_key_file(os.path.join(lab.dir, f"runner{i}.key")).public_key
    plan = plan_gateway(config, f"gw{i}", runner_public)
    return render_wg_quick(plan, f"hatun gateway gw{i} {lab.config_path}",
                           key_file=os.path.join(lab.dir, f"gw{i}.key"), psk_file=psk_path(lab, i) or "")


async def _start_gateway_wireguard(lab: Lab, i: int) -> None:
    """Bring gateway I's WireGuard up with the real wg-quick from `gateway_config` (wireguard-go where
    the lab is userspace). A running one is left alone; one killed by a fault is started afresh."""
    ns, ifname = lab.gw_ns(i), lab.gw_ifname(i)
    if (await run(["ip", "-n", ns, "link", "show", ifname], check=False)).returncode == 0:
        if lab.backend != "userspace" or gateway_wireguard_pid(lab, i) is not None:
            return
        # A TUN device whose wireguard-go was killed goes away on its own, a moment later: not yet.
        await run(["ip", "-n", ns, "link", "del", ifname], check=False)
    path = gateway_config_path(lab, i)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if lab.enroll:
        from hatun.lab import enroll

        text = enroll.gateway_wg_quick(lab, i, os.path.join(lab.dir, f"gw{i}.key"), str(LAN))
    else:
        text = gateway_config(lab, i)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    # What a killed gateway left behind: its nftables table (PostDown never ran).
    await run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", f"hatun_{ifname}"], check=False)
    env = ["WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go"] if lab.backend == "userspace" else []
    try:
        await run(["ip", "netns", "exec", ns, "env", *env, "wg-quick", "up", path])
    except LabError as e:
        raise LabError(f"gateway gw{i}'s WireGuard (wg-quick up {path}): {e}") from None


def config_text(lab: Lab, health: dict[str, str] | None = None, extra_routing: dict[str, str] | None = None) -> str:
    prefixes = [str(LAN)] + ([str(LAN6)] if lab.ipv6 else [])
    sources = [SOURCE] + ([SOURCE6] if lab.ipv6 else [])
    routing = {"prefixes": json.dumps(prefixes), **({} if lab.enroll else {"source": json.dumps(sources)}),
               **(extra_routing or {})}
    health = {"profile": '"default"', **(health or {})}
    lines = [
        f"# hatun config for lab {lab.name!r}, written by `hatun lab up`.",
        f"# Run it in the runner namespace:  ip netns exec {lab.runner} hatun run {lab.config_path}",
        f'backend = "{lab.backend}"',
        f'run_dir = "{lab.dir}/run"',
        "",
        "[routing]",
        *(f"{k} = {v}" for k, v in routing.items()),
        "",
        "[health]",
        *(f"{k} = {v}" for k, v in health.items()),
        "",
        "[metrics]",
        'listen = "127.0.0.1:9469"  # inside the runner namespace',
        "",
        "[control]",
        f'socket = "{lab.control_socket}"',
        "",
    ]
    if lab.enroll:
        from hatun.lab import enroll

        pins = enroll.pins(lab)
        for i in range(1, lab.gateways + 1):
            lines += enroll.tunnel_lines(lab, i, pins[i], underlay(i)[1].split("/")[0])
        return "\n".join(lines)
    for i in range(1, lab.gateways + 1):
        net = tunnel_net(i)
        gw_public = load_private_key_file(os.path.join(lab.dir, f"gw{i}.key")).public_key
        address = [f"{net[2]}/30"] + ([f"{tunnel_net(i, True)[2]}/64"] if lab.ipv6 else [])
        lines += [
            "[[tunnels]]",
            f'name = "gw{i}"',
            f'interface = "{lab.runner_ifname(i)}"',
            f'private_key_file = "{lab.dir}/runner{i}.key"',
            *([f'preshared_key_file = "{psk_path(lab, i)}"'] if psk_path(lab, i) else []),
            f"address = {json.dumps(address)}",
            f'peer_public_key = "{gw_public.base64}"',
            f'endpoint = "{underlay(i)[1].split("/")[0]}:{WG_PORT}"',
            "keepalive = 25",
            "",
        ]
    return "\n".join(lines)


def write_config(lab: Lab, path: str | None = None, **kwargs) -> str:
    """Write a hatun config for the lab's runner (PATH, default the lab's own); return its path."""
    path = path or lab.config_path
    with open(path, "w") as f:
        f.write(config_text(lab, **kwargs))
    return path


async def lab_up(name: str = "lab", gateways: int = 3, backend: str = "auto", ipv6: bool = False,
                 enroll: bool = False) -> Lab:
    """Build lab NAME with GATEWAYS gateways (ENROLL: keyless, see hatun.lab.enroll). Raises
    LabError (with what to do) on any problem, after removing what was already built."""
    require_root()
    check_name(name)
    if not 1 <= gateways <= MAX_GATEWAYS:
        raise LabError(f"--gateways must be 1..{MAX_GATEWAYS}")
    if enroll:
        from hatun.lab.enroll import MAX_GATEWAYS as ENROLL_MAX

        if gateways > ENROLL_MAX or ipv6:
            raise LabError(f"--enroll: at most {ENROLL_MAX} gateways, IPv4 only")
    if existing_namespaces(name):
        raise LabError(f"lab {name!r} is already up (hatun lab down --name {name} removes it)")
    from hatun.wireguard import select_backend

    try:
        kind = await select_backend(backend)
    except BackendUnavailable as e:
        raise LabError(f"the lab needs WireGuard: {e}") from None
    if kind == "userspace":
        check_inotify(2 * gateways)
    lab = Lab(name, gateways, kind, ipv6, enroll=enroll)
    os.makedirs(lab.dir, mode=0o700, exist_ok=True)
    os.makedirs(os.path.join(lab.dir, "run"), mode=0o700, exist_ok=True)
    try:
        await _build(lab)
        if enroll:
            from hatun.lab import enroll as enrollment

            enrollment.prepare(lab, lambda i: underlay(i)[1].split("/")[0])
        for i in range(1, gateways + 1):
            await _start_gateway_wireguard(lab, i)
        await _start_services(lab)
        await _wait_lan(lab)
        if enroll:
            try:
                await enrollment.start(lab, run)
            except RuntimeError as e:
                raise LabError(str(e)) from None
        write_config(lab)
        lab.save()
    except BaseException:
        with trio.CancelScope(shield=True):
            await lab_down(name)
        raise
    return lab


def inotify_instances() -> tuple[int, int]:
    """(limit, in use) of inotify instances for this user: each wireguard-go holds one."""
    with open("/proc/sys/fs/inotify/max_user_instances") as f:
        limit = int(f.read())
    used = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                used += sum(1 for fd in os.listdir(f"/proc/{pid}/fd")
                            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify")
            except OSError:
                pass
    return limit, used


def check_inotify(needed: int) -> None:
    """Raise LabError when NEEDED more wireguard-go processes would exceed the inotify limit."""
    limit, used = inotify_instances()
    if used + needed > limit:
        raise LabError(f"this lab runs {needed} wireguard-go processes, each needs an inotify instance, and only"
                       f" {limit - used} of {limit} are free: raise fs.inotify.max_user_instances"
                       f" (sysctl -w fs.inotify.max_user_instances={max(1024, used + needed + 64)}) or use fewer gateways")


async def _build(lab: Lab) -> None:
    for i in range(1, lab.gateways + 1):
        for who in ("gw", "runner"):
            path = os.path.join(lab.dir, f"{who}{i}.key")
            if not os.path.exists(path):
                write_private_key_file(path, PrivateKey.generate())
        psk = psk_path(lab, i)
        if psk and not os.path.exists(psk):
            write_private_key_file(psk, PresharedKey.generate())
    for ns in lab.namespaces():
        await run(["ip", "netns", "add", ns])
    lan6 = [f"addr add {SERVICE6}/64 dev lanbr nodad"] if lab.ipv6 else []
    await _batch(lab.lan, ["link set lo up", "link add name lanbr type bridge", f"addr add {SERVICE}/24 dev lanbr", *lan6, "link set dev lanbr up"])
    runner_cmds = ["link set lo up"]
    root_cmds = []
    for i in range(1, lab.gateways + 1):
        # Each veth is created straight inside its two namespaces: nothing appears in ours.
        root_cmds.append(f"link add name ul{i} netns {lab.runner} type veth peer name ul netns {lab.gw_ns(i)}")
        root_cmds.append(f"link add name lan netns {lab.gw_ns(i)} type veth peer name gw{i} netns {lab.lan}")
    await _batch(None, root_cmds)
    lan_ports = []
    for i in range(1, lab.gateways + 1):
        runner_ul, gw_ul = underlay(i)
        runner_cmds += [f"addr add {runner_ul} dev ul{i}", f"link set ul{i} up"]
        lan_ports += [f"link set dev gw{i} master lanbr", f"link set gw{i} up"]
        gw6 = [f"addr add {LAN6[i]}/64 dev lan nodad"] if lab.ipv6 else []
        await _batch(lab.gw_ns(i), ["link set lo up", f"addr add {gw_ul} dev ul", "link set ul up",
                              f"addr add {LAN[i]}/24 dev lan", *gw6, "link set lan up"])
        # Forwarding and masquerading come from the gateway's wg-quick file (`hatun gateway`).
        await _sysctl(lab.gw_ns(i), {"net.ipv4.conf.all.rp_filter": "0"})
    await _batch(lab.runner, runner_cmds)
    await _batch(lab.lan, lan_ports)
    if lab.ipv6:
        await _sysctl(lab.lan, {"net.ipv6.conf.all.accept_dad": "0"})


async def _wait_lan(lab: Lab) -> None:
    """Bounded wait until the service host reaches every gateway: a new bridge port may drop the
    first packets until the kernel has processed its carrier (linkwatch runs up to a second late)."""
    for i in range(1, lab.gateways + 1):
        for _ in range(20):
            if (await run(["ip", "netns", "exec", lab.lan, "ping", "-c", "1", "-W", "0.3", str(LAN[i])],
                          check=False)).returncode == 0:
                break
        else:
            raise LabError(f"the service host cannot reach gw{i} in the LAN ({LAN[i]})")


async def _start_services(lab: Lab) -> None:
    log_path = os.path.join(lab.dir, "services.log")
    addresses = [SERVICE] + ([SERVICE6] if lab.ipv6 else [])
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", lab.lan, sys.executable, "-m", "hatun.lab.services", *addresses],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    lab.pids["services"] = proc.pid
    # Bounded wait until the UDP echo listens: a few hundred ms here, far more on an emulated CPU.
    with trio.move_on_after(SERVICE_START_TIMEOUT):
        while True:
            res = await run(["ip", "netns", "exec", lab.lan, "ss", "-lun"], check=False)
            if ":9000" in res.stdout:
                return
            if proc.poll() is not None:
                raise LabError(f"the lab's service host exited: see {log_path}")
            await trio.sleep(0.05)
    raise LabError(f"the lab's service host did not start within {SERVICE_START_TIMEOUT:.0f} s: see {log_path}")


async def kill_pids(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after GRACE seconds, the processes PIDS; bounded."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        with trio.move_on_after(grace):
            while True:
                pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _is_zombie(p)]
                if not pids:
                    return
                await trio.sleep(0.05)


async def _reap(pid: int, timeout: float = 2.0) -> None:
    """Wait (bounded) until PID is gone; reap it when it is our child (the lab may run in-process)."""
    with trio.move_on_after(timeout):
        while True:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                if not os.path.exists(f"/proc/{pid}") or _is_zombie(pid):
                    return
            await trio.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def lab_down(name: str = "lab") -> list[str]:
    """Remove lab NAME: its processes (every process inside its namespaces was started by the lab or
    by hatun for it), namespaces, stale wireguard-go sockets and files. Idempotent."""
    require_root()
    check_name(name)
    removed = []
    namespaces = existing_namespaces(name)
    pids = []
    for ns in namespaces:
        pids += namespace_pids(ns)
    if pids:
        await kill_pids(pids)
        removed.append(f"{len(pids)} processes")
    for ns in namespaces:
        await run(["ip", "netns", "del", ns], check=False)
    removed += namespaces
    for sock in stale_sockets(name):
        try:
            os.unlink(sock)
            removed.append(sock)
        except OSError:
            pass
    lab_dir = os.path.join(LAB_ROOT, name)
    if os.path.isdir(lab_dir):
        shutil.rmtree(lab_dir, ignore_errors=True)
        removed.append(lab_dir)
    return removed


def stale_sockets(name: str) -> list[str]:
    """wireguard-go UAPI sockets of lab NAME's interfaces."""
    from hatun.wireguard.uapi import SOCKET_DIR as d
    pattern = re.compile(rf"^hl{name}[gr]\d+\.sock$")
    try:
        return [os.path.join(d, f) for f in os.listdir(d) if pattern.match(f)]
    except FileNotFoundError:
        return []


def gateway_wireguard_pid(lab: Lab, i: int) -> int | None:
    """PID of gateway I's wireguard-go (None: none, or a kernel device)."""
    ifname = lab.gw_ifname(i)
    for pid in namespace_pids(lab.gw_ns(i)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"wireguard-go") for a in args) and ifname.encode() in args:
            return int(pid)
    return None


async def lab_fail(name: str, gw: str, mode: str = "blackhole") -> str:
    """Break gateway GW's path in MODE (hatun.lab.faults has the details):

    - "blackhole": drop everything on its underlay link (a silent failure, as a dead path looks from afar)
    - "kill": kill its WireGuard peer (wireguard-go, or delete the kernel device)
    - "oneway": drop what the runner sends it; its own packets still reach the runner
    - "loss:N": drop N % at random on each direction of the link: a probe's round trip is lost with
      probability 1-(1-N/100)^2 (loss:30 loses 51 % of the round trips)
    - "delay:D" (delay:80ms, delay:0.08s): the round trip through the link grows by D, half each way

    A gateway that already has a fault is healed first. Returns a description. Raises LabError for
    an unknown mode or gateway, or when the fault cannot be installed.
    """
    try:
        fault = faults.parse_fault(mode)
    except ValueError as e:
        raise LabError(str(e)) from None
    require_root()
    lab = Lab.load(name)
    i = lab.gateway_index(gw)
    if f"gw{i}" in lab.failed or _delay_label(i) in lab.pids:
        await _heal(lab, i)
    ruleset = faults.nft_ruleset(fault)
    if ruleset is not None:
        await run(["ip", "netns", "exec", lab.gw_ns(i), "nft", "-f", "-"], input=ruleset)
    elif fault.kind == "kill":
        await _kill_wireguard(lab, i)
    else:
        await _start_delay(lab, i, fault.delay)
    lab.failed[f"gw{i}"] = str(fault)
    lab.save()
    return faults.describe(fault, f"gw{i}")


async def lab_heal(name: str, gw: str) -> str:
    """Repair what `lab_fail` broke on gateway GW, whatever the mode. Idempotent."""
    require_root()
    lab = Lab.load(name)
    i = lab.gateway_index(gw)
    await _heal(lab, i)
    return f"gw{i}: healed"


async def _heal(lab: Lab, i: int) -> None:
    """Remove every fault of gateway I (each step is harmless where that fault is absent, so a fault
    left half-installed by a crash goes too) and bring its WireGuard peer back; saves the lab."""
    await run(["ip", "netns", "exec", lab.gw_ns(i), "nft", "delete", "table", "inet", faults.TABLE], check=False)
    await _stop_delay(lab, i)
    await _start_gateway_wireguard(lab, i)  # idempotent: restarts a killed peer, else changes nothing
    lab.failed.pop(f"gw{i}", None)
    lab.save()


async def _kill_wireguard(lab: Lab, i: int) -> None:
    pid = gateway_wireguard_pid(lab, i)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        await _reap(pid)
    else:
        await run(["ip", "-n", lab.gw_ns(i), "link", "del", lab.gw_ifname(i)], check=False)


def _delay_label(i: int) -> str:
    return f"delay-gw{i}"


async def _start_delay(lab: Lab, i: int, delay: float) -> None:
    """Start gateway I's delay line (lab/delay.py) and send its underlay's packets through it, both
    ways, each way waiting DELAY/2: the round trip grows by DELAY whichever side starts it."""
    if shutil.which("iptables") is None:
        raise LabError("the delay fault needs iptables for its NFQUEUE rules (apt-get install iptables)")
    log_path = os.path.join(lab.dir, f"delay-gw{i}.log")
    with open(log_path, "ab") as out:
        log_start = out.tell()  # the log is appended to: what this run writes starts here
        proc = subprocess.Popen(["ip", "netns", "exec", lab.gw_ns(i), sys.executable, "-m", "hatun.lab.delay",
                                 "--queue", str(faults.DELAY_QUEUE), "--delay", f"{delay / 2:.6f}"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    # Recorded before any packet goes through it: heal and down find it whatever happens next.
    lab.pids[_delay_label(i)] = proc.pid
    lab.save()
    try:
        await _wait_delay_bound(proc, log_path, log_start)
        for rule in faults.DELAY_RULES:
            await run(["ip", "netns", "exec", lab.gw_ns(i), "iptables", "-w", "-t", "mangle", "-A", *rule])
    except BaseException:
        with trio.CancelScope(shield=True):
            await _stop_delay(lab, i)
        raise


async def _wait_delay_bound(proc: subprocess.Popen, log_path: str, log_start: int = 0) -> None:
    """Bounded wait until the delay line PROC holds its queue; without that, the rules'
    --queue-bypass would let the packets pass undelayed. The queue being listed is not enough: a
    leftover line of an earlier run may hold it while PROC exits refused. So the kernel must list
    it, in PROC's own namespace, as bound to the netlink port PROC logged (after LOG_START in
    LOG_PATH), and PROC must still run once it does."""
    from hatun.lab import delay

    def this_run() -> str:
        try:
            with open(log_path, "rb") as f:
                f.seek(log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def failed(why: str) -> LabError:
        tail = " | ".join(line.strip() for line in this_run().strip().splitlines()[-5:]) or "nothing logged"
        return LabError(f"the delay line {why}: {tail} (log: {log_path})")

    with trio.move_on_after(SERVICE_START_TIMEOUT):  # Python starts slowly on an emulated CPU
        while proc.poll() is None:
            port = delay.bound_port(this_run(), faults.DELAY_QUEUE)
            try:
                held = delay.read_kernel_queue(faults.DELAY_QUEUE, proc.pid) if port is not None else None
            except OSError:  # gone meanwhile
                held = None
            if held is not None and held.portid != port:
                raise failed(f"logged netlink port {port}, but the kernel lists queue {faults.DELAY_QUEUE} "
                             f"as bound to port {held.portid}")
            if held is not None and proc.poll() is None:
                return
            await trio.sleep(0.02)
        raise failed(f"exited with status {proc.returncode}")
    raise failed(f"did not bind its queue within {SERVICE_START_TIMEOUT:.0f} s")


async def _stop_delay(lab: Lab, i: int) -> None:
    """Remove gateway I's NFQUEUE rules, then end its delay line by its recorded PID and wait for
    it: in this order, no packet is queued to a line that is going away (it accepts what it holds)."""
    pid = lab.pids.get(_delay_label(i))
    if pid is None:
        return  # the rules are only ever added after the PID is recorded
    for rule in faults.DELAY_RULES:
        await run(["ip", "netns", "exec", lab.gw_ns(i), "iptables", "-w", "-t", "mangle", "-D", *rule], check=False)
    if _is_delay_line(pid):
        await kill_pids([pid])
        await _reap(pid)
    del lab.pids[_delay_label(i)]
    lab.save()


def _is_delay_line(pid: int) -> bool:
    """PID is still a delay line (not a reused PID; a zombie has no command line)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"hatun.lab.delay" in f.read().split(b"\0")
    except OSError:
        return False
