"""Configs and stand-ins for unit tests of the core (no root, no namespaces): configs built from
TOML text through the real parser, and a TunnelEnv whose backend is a fake."""

from __future__ import annotations

import logging
from collections import Counter

from hatun.config import Config, parse_config
from hatun.keys import PrivateKey, TunnelKeys
from hatun.netlink.rtnl import Link
from hatun.serving import RateLimitedLog
from hatun.tunnel import TunnelEnv, TunnelRunner

PEER = PrivateKey.generate().public_key.base64


def tunnel_toml(name: str, n: int, **keys: str) -> str:
    """One [[tunnels]] table: tunnel number N (addresses 198.18.10N.2/30, endpoint 198.18.N.2)."""
    fields = {
        "name": f'"{name}"', "private_key_env": '"HATUN_TEST_KEY"', "address": f'"198.18.{100 + n}.2/30"',
        "peer_public_key": f'"{PEER}"', "endpoint": f'"198.18.{n}.2:51820"', "probe": f'"icmp://198.18.{100 + n}.1"',
    }
    fields.update(keys)
    return "[[tunnels]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items())


def make_config(tunnels: list[str] | dict[str, dict[str, str]] = ("gw1", "gw2"), *, routing: str = "",
                health: str = "", top: str = "") -> Config:
    """A valid config with TUNNELS (names, or names -> extra TOML keys of that tunnel, values as TOML);
    ROUTING, HEALTH: lines of those tables (ROUTING without `prefixes` gets 198.19.77.0/24)."""
    return parse_config(config_text(tunnels, routing=routing, health=health, top=top))


def config_text(tunnels: list[str] | dict[str, dict[str, str]] = ("gw1", "gw2"), *, routing: str = "",
                health: str = "", top: str = "") -> str:
    """The TOML text of `make_config` (keys from the environment variable HATUN_TEST_KEY)."""
    items = tunnels.items() if isinstance(tunnels, dict) else ((n, {}) for n in tunnels)
    if "prefixes" not in routing:
        routing = 'prefixes = ["198.19.77.0/24"]\n' + routing
    text = top + "\n[routing]\n" + routing + "\n"
    if health:
        text += "[health]\n" + health + "\n"
    for n, (name, keys) in enumerate(items, start=1):
        text += tunnel_toml(name, n, **keys)
    return text


class NullBackend:
    """A backend that answers every read with nothing and applies nothing."""

    def pid(self, ifname: str) -> None:
        return None

    async def get(self, ifname: str, *, with_link: bool = True, timeout=None):
        return None

    async def apply(self, settings):
        return None

    async def reset_peer(self, settings) -> None:
        pass

    async def delete(self, ifname: str) -> None:
        pass


def make_env(backend=None, pokes: list | None = None, rtnl=None, probes=None) -> TunnelEnv:
    """A TunnelEnv around fakes (`serve` needs RTNL and PROBES: FakeRtnl, FakeProbes)."""
    return TunnelEnv(backend=backend or NullBackend(), backend_name="userspace", rtnl=rtnl, probes=probes,
                     bypass_mark=0x1000, poke=(lambda: pokes.append(1)) if pokes is not None else (lambda: None),
                     repairs=Counter(), errors=RateLimitedLog(logging.getLogger("hatun")))


def make_runner(name: str = "gw1", backend=None, *, config: Config | None = None, slot: int = 2,
                now: float = 0.0, env: TunnelEnv | None = None) -> TunnelRunner:
    config = config or make_config([name])
    cfg = next(t for t in config.tunnels if t.name == name)
    return TunnelRunner(env or make_env(backend), config, cfg, TunnelKeys(PrivateKey.generate()), slot, now)


class FakeRtnl:
    """Links by name, with an rx counter a test can move; `link()` takes a name or an index."""

    def __init__(self) -> None:
        self.links: dict[str, Link] = {}

    def add(self, name: str, index: int, *, up: bool = True, rx: int = 0, tx: int = 0) -> None:
        self.links[name] = Link(index, name, "tun", up, up, 1420, rx_bytes=rx, tx_bytes=tx)

    async def link(self, which):
        for link in self.links.values():
            if which in (link.name, link.index):
                return link
        return None


class FakeProbes:
    """A probe engine that sends nothing: tests call the streams' `on_result` themselves."""

    def __init__(self) -> None:
        self.streams: list = []

    def add_icmp(self, stream, host, ifindex) -> None:
        self.streams.append(stream)

    def add_tcp(self, stream, host, port, ifname) -> None:
        self.streams.append(stream)

    def remove(self, stream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)


class RecordingBackend(NullBackend):
    """Counts what the runner asks of its device (applies, session resets); reads answer nothing."""

    def __init__(self, rtnl: FakeRtnl | None = None) -> None:
        self.applied: list = []
        self.resets = 0
        self.rtnl = rtnl

    async def apply(self, settings):
        self.applied.append(settings)
        if self.rtnl is not None and settings.ifname not in self.rtnl.links:
            self.rtnl.add(settings.ifname, 10 + len(self.rtnl.links))
        return None

    async def reset_peer(self, settings) -> None:
        self.resets += 1
