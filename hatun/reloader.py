"""Reloads at run time: read the file, plan (reload.plan_reload), check, apply the plan.

Reloads run one at a time as tasks of the supervisor's own (`Reloader.start`): nobody who asked for
one (a control client that gives up, a signal) can cancel it halfway, and once it changes anything
it runs to its end (each step is bounded). An invalid file, a refused plan or a config that names
what is not hatun's changes nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from hatun.adoption import ownership_problems
from hatun.config import Config, ConfigError, ConfigUnreadable, Secrets, Tunnel, load_config
from hatun.enrollment import EnrollError
from hatun.keys import redact
from hatun.netlink.core import NetlinkError, NetlinkTimeout
from hatun.reload import ReloadPlan, RunningTunnel, plan_reload
from hatun.tunnel import TunnelRunner
from hatun.wireguard.model import WireGuardError

if TYPE_CHECKING:
    from hatun.supervisor import Supervisor

log = logging.getLogger("hatun")

RELOAD_TIMEOUT = 120.0  # one reload, at most (DNS endpoints, slow backends); it is never cut short by a client
TEARDOWN_GRACE = 10.0  # a removed tunnel's tasks have this long to end before its device goes


@dataclass
class ReloadResult:
    """The outcome of one reload, once `done` is set."""

    done: trio.Event = field(default_factory=trio.Event)
    ok: bool = False
    message: str = ""

    def finish(self, ok: bool, message: str) -> None:
        self.ok, self.message = ok, message
        self.done.set()


class Reloader:
    """The reloads of one supervisor, and what they did (for status and metrics)."""

    def __init__(self, sup: Supervisor, read_config=None) -> None:
        self.sup = sup
        # READ_CONFIG(path) -> (config, secrets): in a thread by default, so that a large or slow
        # file never stalls the probes (tests read in place, on a mock clock).
        self._read_config = read_config or (lambda path: trio.to_thread.run_sync(load_config, path))
        self.counts: Counter = Counter()  # success / failure
        self.last_ok = True
        self.last_message: str | None = None
        self._lock = trio.Lock()
        self._pending: ReloadResult | None = None

    def start(self) -> ReloadResult:
        """Start re-reading the config file (see the module docstring); wait on the result's `done`."""
        sup = self.sup
        if self._pending is not None:
            return self._pending  # one not yet started: it will read the file as it is now
        result = ReloadResult()
        if sup.config_path is None:
            result.finish(False, "no config file to reload")
        elif sup.stop_requested.is_set():
            result.finish(False, "hatun is stopping: no reload")
        elif sup.nursery is None:
            result.finish(False, "hatun is still starting: reload again in a moment")
        else:
            self._pending = result
            sup.nursery.start_soon(self._run, result, name="reload")
        return result

    async def _run(self, result: ReloadResult) -> None:
        ok, message = False, "hatun stopped before the reload finished"
        try:
            with trio.move_on_after(RELOAD_TIMEOUT) as scope:
                ok, message = await self._reload(result)
            if scope.cancelled_caught:
                ok, message = self._done(False, f"reload did not finish within {RELOAD_TIMEOUT:.0f} s;"
                                                " `hatun status` shows what runs now")
        except Exception as e:  # noqa: BLE001 - a failed reload must not end the supervisor
            log.debug("reload failed", exc_info=True)
            ok, message = self._done(False, f"reload failed: {type(e).__name__}: {e}")
        finally:
            if self._pending is result:
                self._pending = None
            result.finish(ok, message)

    async def _reload(self, result: ReloadResult) -> tuple[bool, str]:
        sup = self.sup
        async with self._lock:
            if self._pending is result:
                self._pending = None  # from now on, a new request needs a new reload
            try:
                new, secrets = await self._read_config(sup.config_path)
            except ConfigUnreadable as e:
                return self._done(False, f"reload refused, still running the previous config: {e}")
            except ConfigError as e:
                problems = "; ".join(str(p) for p in e.problems[:5]) + (
                    f" (+{len(e.problems) - 5} more)" if len(e.problems) > 5 else "")
                return self._done(False, f"reload refused, still running the previous config: {problems}")
            try:
                new, secrets = await sup.resolve(new, secrets)  # enrolled tunnels filled in
            except EnrollError as e:
                return self._done(False, f"reload refused, still running the previous config: {e}")
            running = [RunningTunnel(t.name, t.ifname, t.slot, t.key) for t in sup.tunnels.values()]
            running += [RunningTunnel(t.name, t.ifname, t.slot, t.key, draining=True) for t in sup.draining]
            plan = plan_reload(sup.config, new, secrets.keys, running, sup.layout.max_slot)
            if plan.refused:
                return self._done(False, f"reload refused: {plan.refused}")
            # What the new config names must not be someone else's (as at start).
            try:
                problems = ownership_problems(
                    new, await sup.rtnl.links(), await sup.rtnl.addresses(), backend=sup.backend_name,
                    lo_index=sup.lo_index, our_ifnames={t.ifname for t in sup.runtimes()},
                    our_sources=set(sup.state.sources) | {str(a) for a in sup.config.routing.source},
                    state_path=sup.rundir.state_path)
            except (NetlinkError, NetlinkTimeout) as e:
                return self._done(False, f"reload refused: cannot read the host's devices: {e}")
            if problems:
                return self._done(False, "reload refused, still running the previous config: " + "; ".join(problems))
            with trio.CancelScope(shield=True):
                await self._apply(plan, new, secrets)
                return self._done(True, plan.summary)

    async def _apply(self, plan: ReloadPlan, new: Config, secrets: Secrets) -> None:
        """Move to NEW as PLAN says: drain removed tunnels, revive, start and update the others."""
        sup = self.sup
        sup.use_config(new, secrets)
        wanted = {t.name: t for t in new.tunnels}
        for name in plan.remove:
            t = sup.tunnels.pop(name)
            sup.draining.append(t)
            t.begin_removal()  # before any revive below (a rename that keeps the interface)
            sup.spawn(f"{t.name}: removal", self._remove, t)
        updates = list(plan.update)
        for revive in plan.revive:
            t = next(d for d in sup.draining if d.ifname == revive.ifname)
            sup.draining.remove(t)
            t.revive()
            sup.tunnels[revive.name] = t
            updates.append(revive.name)
        for name in plan.add:
            sup.start_tunnel(sup.new_runner(wanted[name], plan.slots[name]))
        for name in plan.keep:
            sup.tunnels[name].config = new
        async with trio.open_nursery() as nursery:  # concurrently: each may resolve a DNS name or wait for a device
            for name in updates:
                nursery.start_soon(self._update, sup.tunnels[name], new, wanted[name], secrets.keys[name])
        sup.save_state()
        sup.poke()

    @staticmethod
    async def _update(t: TunnelRunner, config: Config, cfg: Tunnel, key) -> None:
        try:
            await t.update(config, cfg, key)
        except Exception as e:  # noqa: BLE001 - one tunnel's trouble must not cut the others' updates short
            t.last_error = f"{type(e).__name__}: {e}"
            log.error("%s: the new settings could not be applied: %s", t.name, t.last_error)

    def _done(self, ok: bool, message: str) -> tuple[bool, str]:
        message = redact(message)  # it goes to clients and status: no key-shaped text, whatever failed
        self.counts["success" if ok else "failure"] += 1
        self.last_ok, self.last_message = ok, message
        (log.info if ok else log.error)("%s", message)
        return ok, message

    async def _remove(self, t: TunnelRunner) -> None:
        """Drain a removed tunnel (no new flows, existing flows keep it) then tear it down. A reload that
        brings it back before that (`TunnelRunner.revive`) keeps it."""
        sup = self.sup
        log.info("%s: removed from the config: draining for up to %s", t.name, sup.config.routing.drain_timeout)
        if not await t.drain_for_removal(sup.config.routing.drain_timeout):
            return  # back in the config
        # Torn down under the reload lock: a reload sees it either draining (and may revive it) or
        # gone, never half deleted; and it stays listed as draining (a stop deletes it then) until
        # its device is gone.
        async with self._lock:
            if not t.removing:
                return  # revived while we waited for the lock
            t.stop()
            with trio.move_on_after(TEARDOWN_GRACE):
                await t.done.wait()
            sup.poke()
            with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_GRACE):
                try:
                    await sup.backend.delete(t.ifname)
                except WireGuardError as e:
                    log.error("%s: %s", t.name, e)
            if t in sup.draining:
                sup.draining.remove(t)
        sup.poke()
        log.info("%s: torn down", t.name)
