"""The reload executor against fakes (no root): a config file is re-read, the plan applied to
runners, and what a refused reload leaves is exactly what ran before. The lab tests reload for real."""

from __future__ import annotations

import trio

from hatun.config import load_config
from hatun.keys import PrivateKey
from hatun.layout import Layout
from hatun.reloader import Reloader
from hatun.rundir import State as RunState
from tests.fakekernel import FakeKernel
from tests.fakes import FakeProbes, NullBackend, config_text, make_env


class DeletingBackend(NullBackend):
    def __init__(self) -> None:
        self.deleted: list[str] = []

    async def delete(self, ifname: str) -> None:
        self.deleted.append(ifname)


async def _as_read(config, secrets):
    return config, secrets


class FakeSupervisor:
    """What the reloader uses of a supervisor, around runners that are not started."""

    def __init__(self, path: str, nursery: trio.Nursery) -> None:
        from hatun.tunnel import TunnelRunner

        self.config_path = path
        self.config, self.secrets = load_config(path)
        self.resolve = _as_read
        self.layout = Layout.from_routing(self.config.routing)
        self.rtnl = FakeKernel()
        self.backend = DeletingBackend()
        self.backend_name = "userspace"
        self.lo_index = 1
        self.state = RunState()
        self.rundir = type("RunDir", (), {"state_path": "/run/hatun-test/state.json"})()
        self.nursery = nursery
        self.stop_requested = trio.Event()
        self.env = make_env(self.backend, rtnl=self.rtnl, probes=FakeProbes())
        self.tunnels: dict[str, TunnelRunner] = {}
        self.draining: list[TunnelRunner] = []
        self.started: list[str] = []
        self.saved = 0
        for slot, t in enumerate(self.config.tunnels, start=2):
            self.new_runner(t, slot)

    def new_runner(self, t, slot: int):
        from hatun.tunnel import TunnelRunner

        r = self.tunnels[t.name] = TunnelRunner(self.env, self.config, t, self.secrets.keys[t.name], slot, 0.0)
        return r

    def start_tunnel(self, t) -> None:
        self.started.append(t.name)

    def runtimes(self):
        return [*self.tunnels.values(), *self.draining]

    def use_config(self, config, secrets) -> None:
        self.config, self.secrets = config, secrets

    def spawn(self, name: str, fn, *args) -> None:
        self.nursery.start_soon(fn, *args)

    def save_state(self) -> None:
        self.saved += 1

    def poke(self) -> None:
        pass


def config_file(tmp_path, monkeypatch, text: str):
    """A config file with TEXT (its tunnels' key from HATUN_TEST_KEY, set here)."""
    monkeypatch.setenv("HATUN_TEST_KEY", PrivateKey.generate().base64)
    path = tmp_path / "hatun.toml"
    path.write_text(text)
    return path


def start(path, nursery: trio.Nursery) -> tuple[FakeSupervisor, Reloader]:
    sup = FakeSupervisor(str(path), nursery)
    return sup, Reloader(sup, read_in_place)


async def read_in_place(path: str):
    return load_config(path)


async def reload(reloader: Reloader) -> tuple[bool, str]:
    result = reloader.start()
    with trio.fail_after(30):
        await result.done.wait()
    return result.ok, result.message


async def test_reload_adds_updates_drains_and_tears_down(tmp_path, monkeypatch, autojump_clock):
    path = config_file(tmp_path, monkeypatch, config_text(["gw1", "gw2"], routing='drain_timeout = "5s"'))
    async with trio.open_nursery() as nursery:
        sup, reloader = start(path, nursery)
        gw1, gw2 = sup.tunnels["gw1"], sup.tunnels["gw2"]
        path.write_text(config_text({"gw1": {"weight": "3"}, "gw3": {}}, routing='drain_timeout = "5s"'))
        ok, message = await reload(reloader)
        assert ok and message == "reloaded: -gw2 +gw3 ~gw1", message
        assert sup.tunnels["gw1"] is gw1 and gw1.cfg.weight == 3 and gw1.config is sup.config
        assert sup.started == ["gw3"] and sup.tunnels["gw3"].slot == 4  # gw2's slot 3 is still reserved
        assert sup.draining == [gw2] and gw2.removing and sup.saved == 1
        await trio.sleep(10)  # past drain_timeout: torn down
        assert sup.draining == [] and sup.backend.deleted == ["hat-gw2"]
        assert reloader.counts == {"success": 1} and reloader.last_ok


async def test_removed_then_back_before_its_drain_ends_stays(tmp_path, monkeypatch, autojump_clock):
    path = config_file(tmp_path, monkeypatch, config_text(["gw1", "gw2"], routing='drain_timeout = "60s"'))
    async with trio.open_nursery() as nursery:
        sup, reloader = start(path, nursery)
        gw2 = sup.tunnels["gw2"]
        path.write_text(config_text(["gw1"], routing='drain_timeout = "60s"'))
        assert (await reload(reloader))[0]
        await trio.sleep(1)
        path.write_text(config_text(["gw1", "gw2"], routing='drain_timeout = "60s"'))
        ok, message = await reload(reloader)
        assert ok and message == "reloaded: +gw2"
        assert sup.tunnels["gw2"] is gw2 and not gw2.removing and sup.draining == []
        await trio.sleep(120)
        assert sup.backend.deleted == [] and sup.started == []


async def test_a_refused_reload_changes_nothing(tmp_path, monkeypatch, autojump_clock):
    path = config_file(tmp_path, monkeypatch, config_text(["gw1", "gw2"]))
    async with trio.open_nursery() as nursery:
        sup, reloader = start(path, nursery)
        before = (dict(sup.tunnels), sup.config)
        for text, words in [
            ("[routing\n", "reload refused, still running the previous config"),  # not TOML
            (config_text(["gw1"], routing="table = 7000"), "routing.table cannot change while hatun runs"),
            (config_text({"gw1": {"interface": '"lo"'}, "gw2": {}}), "reload refused"),
        ]:
            sup.rtnl.add_device("lo2")
            path.write_text(text)
            ok, message = await reload(reloader)
            assert not ok and words in message, message
            assert (dict(sup.tunnels), sup.config) == before and sup.draining == [] and sup.started == []
        assert reloader.counts == {"failure": 3} and not reloader.last_ok


async def test_a_rename_that_keeps_the_interface_keeps_the_device(tmp_path, monkeypatch, autojump_clock):
    path = config_file(tmp_path, monkeypatch, config_text(["gw1", "gw2"], routing='drain_timeout = "5s"'))
    async with trio.open_nursery() as nursery:
        sup, reloader = start(path, nursery)
        gw2 = sup.tunnels["gw2"]
        path.write_text(config_text({"gw1": {}, "gw9": {"interface": '"hat-gw2"'}}, routing='drain_timeout = "5s"'))
        ok, message = await reload(reloader)
        assert ok and message == "reloaded: -gw2 +gw9", message
        await trio.sleep(60)
        assert sup.tunnels["gw9"] is gw2 and gw2.cfg.name == "gw9" and not gw2.removing
        assert sup.backend.deleted == [] and sup.draining == [] and not gw2.done.is_set()
