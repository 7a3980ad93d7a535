"""Removing what hatun made: one code path for a clean stop (`Supervisor`) and for `hatun down`
(`cleanup`, which also works when no hatun runs: after a crash, keep_on_exit, or a fail-closed stop).

Order matters: routes, rules and nexthops go before the devices (no packet finds a gap), and with
a fail-closed GATE the prefixes' unreachable stubs and the steering rules stay throughout.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence

import trio

from hatun import sysctl
from hatun.config import Config
from hatun.netlink.core import NetlinkError, NetlinkTimeout
from hatun.netlink.rtnl import open_rtnl
from hatun.layout import Layout
from hatun.pinning import Pinning
from hatun.plan import Wanted
from hatun.router import Router
from hatun.rundir import RunDir, RunDirError, State as RunState
from hatun.wireguard import uapi
from hatun.wireguard.model import WireGuardError

log = logging.getLogger("hatun")

SOCKET_CHECK_TIMEOUT = 1.0  # a hung wireguard-go with a full backlog must not hold `hatun down`


async def remove_owned(router: Router, *, gate: Wanted | None, devices: Sequence[str],
                       delete_device: Callable[[str], Awaitable[bool]], sysctls: Mapping[str, str],
                       rundir: RunDir) -> list[str]:
    """Remove hatun's routes, rules, nexthops, source addresses and nftables table (all but GATE),
    the DEVICES (each through DELETE_DEVICE, in parallel: each may wait for a process to end; it
    returns whether it removed one), restore SYSCTLS and remove the state file. Failures are logged
    and the rest goes on. Returns what was removed."""
    res = await router.remove_all(gate)
    removed = [what for _, what in res.changes]
    for err in res.errors:
        log.warning("clean-up: %s", err)

    async def delete(ifname: str) -> None:
        try:
            if await delete_device(ifname):
                removed.append(f"device {ifname}")
        except (WireGuardError, NetlinkError, NetlinkTimeout) as e:
            log.error("clean-up of %s: %s", ifname, e)

    async with trio.open_nursery() as nursery:
        for ifname in devices:
            nursery.start_soon(delete, ifname)
    # Only the sysctls hatun sets, with integer values (RunDir.load_state validates what the file says).
    for key, value in sysctls.items():
        try:
            sysctl.write(value, *key.split("."))
        except sysctl.SysctlError as e:
            log.warning("%s", e)
    rundir.remove_state()
    return removed


async def cleanup(config: Config) -> list[str]:
    """Remove what a hatun with CONFIG left in the kernel, whether or not it runs: routes (the
    fail-closed stubs too: this opens the gate, the prefixes follow the main table again), rules,
    nexthops, nftables table, the source addresses it recorded, tunnel devices (their wireguard-go
    processes exit with them) and stale UAPI sockets. Returns what was removed."""
    layout = Layout.from_routing(config.routing)
    rundir = RunDir(config.run_dir)
    try:
        rundir.check()
        state = rundir.load_state()
    except RunDirError as e:
        log.warning("%s: not trusting its state file (no sysctl restored, no source address removed)", e)
        state = RunState()
    async with open_rtnl() as rtnl:
        links = await rtnl.links()
        lo = next((l.index for l in links if l.name == "lo"), 1)
        pinning = Pinning(config.routing.nft_table, config.routing.fwmark_mask) if Pinning.available() else None
        router = Router(rtnl, layout, lo, pinning)
        # Only the source addresses a hatun recorded as its own (an address the host had is not).
        router.owned_addresses.update(a for a in await rtnl.addresses(lo)
                                      if a.interface.ip in config.routing.source and str(a.interface.ip) in state.sources)
        kinds = {l.name: l.kind for l in links}

        async def delete_device(ifname: str) -> bool:
            # Only devices that can be hatun's: a bridge or a NIC of the same name is left alone.
            if kinds[ifname] not in ("wireguard", "tun"):
                log.warning("not removing %s: it is a %s device, not a WireGuard device of hatun's", ifname,
                            kinds[ifname] or "network")
                return False
            await rtnl.delete_link(ifname)
            return True

        removed = await remove_owned(router, gate=None, devices=[t.ifname for t in config.tunnels if t.ifname in kinds],
                                     delete_device=delete_device, sysctls=state.sysctls, rundir=rundir)
    # A wireguard-go left by a crash exits once its device is gone; its stale socket may remain.
    for t in config.tunnels:
        await _remove_stale_socket(os.path.join(uapi.SOCKET_DIR, f"{t.ifname}.sock"))
    return removed


async def _remove_stale_socket(path: str) -> None:
    """Unlink PATH when it is a UAPI socket nobody listens on (connection refused)."""
    sock = trio.socket.socket(socket.AF_UNIX)
    try:
        with trio.move_on_after(SOCKET_CHECK_TIMEOUT):
            await sock.connect(path)
    except ConnectionRefusedError:
        try:
            os.unlink(path)
        except OSError:
            pass
    except OSError:
        pass
    finally:
        sock.close()
