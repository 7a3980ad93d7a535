"""The kernel backend: what it sends (encoded, decoded back with pyroute2), how it reads replies,
and its behaviour against a fake kernel. The dev kernel has no WireGuard module: real-kernel runs of
the same behaviour (`check_backend_behaviour`) are marked `vm`; the userspace backend runs it here.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import ipaddress
import logging
import os
import shutil
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import pytest
import trio
from pyroute2.netlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    wgmsg,
)

from hatun.keys import PrivateKey, key_fingerprint
from hatun.netlink.core import NetlinkError
from hatun.netlink.rtnl import Address, Link
from hatun.wireguard import BackendUnavailable, kernel_has_wireguard, uapi
from hatun.wireguard.kernel import (
    ALLOWEDIPS_PER_MESSAGE,
    KernelBackend,
    diff_messages,
    open_kernel_backend,
    parse_device,
    wgreply,
)
from hatun.wireguard.model import Backend, DeviceSettings, DeviceStatus, PeerSettings, PeerStatus, WireGuardError
from tests.nsutil import RUN_ID, ip

NET = ipaddress.ip_network
PRIV = PrivateKey(bytes(range(1, 33)))
PEER = PrivateKey(bytes(range(101, 133))).public_key
OTHER = PrivateKey(bytes(range(201, 233))).public_key
FAMILY = 0x1A  # any generic netlink family id will do for the fakes


def secret_free(text: str, *raws: bytes) -> bool:
    """No base64, hex or bytes-repr form of any of RAWS in TEXT."""
    forms = [form for raw in raws for form in (base64.b64encode(raw).decode(), raw.hex(), repr(raw)[2:-1])]
    return not any(form in text for form in forms)


def settings(**kw) -> DeviceSettings:
    peer = dict(public_key=PEER, endpoint=("198.18.0.2", 51820), keepalive=0, allowed_ips=(NET("198.18.101.0/30"),))
    peer.update(kw.pop("peer", {}))
    return DeviceSettings(ifname="hat0", private_key=PRIV, peer=PeerSettings(**peer), **kw)


def status_of(s: DeviceSettings, **kw) -> DeviceStatus:
    """What the kernel reports after S was applied (with KW changed)."""
    peer = dict(public_key=s.peer.public_key, endpoint=s.peer.endpoint, keepalive=s.peer.keepalive,
                allowed_ips=tuple(reversed(s.peer.allowed_ips)), rx_bytes=5, tx_bytes=6, last_handshake=1.0)
    peer.update(kw.pop("peer", {}))
    dev = dict(ifname=s.ifname, public_key=s.private_key.public_key, listen_port=s.listen_port or 40000,
               fwmark=s.fwmark, peers=(PeerStatus(**peer),))
    dev.update(kw)
    return DeviceStatus(**dev)


def wire(msg, flags: int = NLM_F_REQUEST | NLM_F_ACK) -> bytes:
    """MSG encoded as hatun.netlink.core sends it."""
    msg["header"]["type"], msg["header"]["flags"] = FAMILY, flags
    msg.encode()
    return bytes(msg.data)


def decoded(data: bytes, cls=wgmsg):
    msg = cls(data)
    msg.decode()
    return msg


def sent(wanted: DeviceSettings, current: DeviceStatus | None, **kw) -> tuple[list, set[str]]:
    """The SET messages for WANTED over CURRENT, decoded back by pyroute2 from their bytes."""
    messages, changed = diff_messages(wanted, current, **kw)
    return [decoded(wire(m)) for m in messages], changed


def key(value) -> bytes:
    return base64.b64decode(value)


def names(nla) -> list[str]:
    return [name for name, *_ in nla["attrs"]]


def peers_of(msg) -> list:
    return msg.get_attr("WGDEVICE_A_PEERS") or []


def allowed_of(peer) -> list:
    return [NET(a["addr"]) for a in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []]


# --- what apply sends --------------------------------------------------------------------------

def test_new_device_gets_everything_in_one_message():
    wanted = settings(listen_port=51820, fwmark=0x10000,
                      peer=dict(keepalive=25, allowed_ips=(NET("198.18.101.0/30"), NET("fd00::/64"))))
    (msg,), changed = sent(wanted, None)
    assert changed == {"private_key", "listen_port", "fwmark", "peer", "endpoint", "keepalive", "allowed_ips"}
    assert msg["cmd"] == WG_CMD_SET_DEVICE and msg["version"] == 1
    assert msg.get_attr("WGDEVICE_A_IFNAME") == "hat0"
    assert key(msg.get_attr("WGDEVICE_A_PRIVATE_KEY")) == PRIV.raw
    assert msg.get_attr("WGDEVICE_A_LISTEN_PORT") == 51820 and msg.get_attr("WGDEVICE_A_FWMARK") == 0x10000
    assert msg.get_attr("WGDEVICE_A_FLAGS") is None  # never WGDEVICE_F_REPLACE_PEERS: that drops sessions
    (peer,) = peers_of(msg)
    assert key(peer.get_attr("WGPEER_A_PUBLIC_KEY")) == PEER.raw
    ep = peer.get_attr("WGPEER_A_ENDPOINT")
    assert (ep["family"], ep["addr"], ep["port"]) == (2, "198.18.0.2", 51820)
    assert peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert allowed_of(peer) == [NET("198.18.101.0/30"), NET("fd00::/64")]
    assert peer.get_attr("WGPEER_A_PRESHARED_KEY") is None


def test_ipv6_endpoint_is_a_sockaddr_in6():
    (msg,), changed = sent(settings(peer=dict(endpoint=("fd00:0::2", 51821))), status_of(settings()))
    assert changed == {"endpoint"}
    (peer,) = peers_of(msg)
    ep = peer.get_attr("WGPEER_A_ENDPOINT")
    assert (ep["family"], ep["addr"], ep["port"], ep["flowinfo"], ep["scope_id"]) == (10, "fd00::2", 51821, 0, 0)


def walk(data: bytes, offset: int, end: int, path: tuple = ()):
    """(path of attribute types, NLA_F_NESTED set) for every attribute, nested ones included."""
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        here = path + (kind & 0x3FFF,)
        yield here, bool(kind & NLA_F_NESTED)
        if kind & NLA_F_NESTED:
            yield from walk(data, offset + 4, offset + length, here)
        offset += (length + 3) & ~3


def test_nested_attributes_carry_nla_f_nested():
    # The kernel parses peers and allowed IPs strictly (nla_parse_nested; NLA_POLICY_NESTED_ARRAY
    # since the YNL conversion): a nest without NLA_F_NESTED is refused with EINVAL.
    (msg,), _ = diff_messages(settings(peer=dict(keepalive=5)), status_of(settings(), peer=dict(public_key=OTHER)))
    data = wire(msg)
    attrs = dict(walk(data, 20, len(data)))  # after nlmsghdr (16) + genlmsghdr (4)
    nested = {path for path, flag in attrs.items() if flag}
    assert nested == {(8,), (8, 1), (8, 2), (8, 2, 9), (8, 2, 9, 1)}  # peers, 2 peers, allowed IPs, one IP
    assert (8, 2, 1) in attrs and (8, 2, 4) in attrs  # public key and endpoint inside, not nested


def test_the_same_settings_send_nothing():
    s = settings(listen_port=51820, fwmark=7,
                 peer=dict(keepalive=25, allowed_ips=(NET("198.18.101.0/30"), NET("fd00::/64"))))
    assert diff_messages(s, status_of(s)) == ([], set())
    # order of allowed IPs and spelling of the endpoint do not matter; no wanted port or endpoint: keep
    v6 = settings(peer=dict(endpoint=("fd00::2", 51820)))
    assert diff_messages(settings(peer=dict(endpoint=("fd00:0::2", 51820))), status_of(v6)) == ([], set())
    assert diff_messages(settings(peer=dict(endpoint=None)), status_of(settings())) == ([], set())
    assert diff_messages(settings(), status_of(settings(), listen_port=1234)) == ([], set())


# (what changes, wanted, device attributes sent, peer attributes sent)
ONE_CHANGE = [
    ("keepalive", settings(peer=dict(keepalive=25)), [],
     ["WGPEER_A_PUBLIC_KEY", "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"]),
    ("endpoint", settings(peer=dict(endpoint=("198.18.0.3", 51820))), [], ["WGPEER_A_PUBLIC_KEY", "WGPEER_A_ENDPOINT"]),
    ("allowed_ips", settings(peer=dict(allowed_ips=(NET("198.18.101.0/30"), NET("198.19.77.0/24")))), [],
     ["WGPEER_A_PUBLIC_KEY", "WGPEER_A_FLAGS", "WGPEER_A_ALLOWEDIPS"]),
    ("fwmark", settings(fwmark=0x10000), ["WGDEVICE_A_FWMARK"], None),
    ("listen_port", settings(listen_port=51999), ["WGDEVICE_A_LISTEN_PORT"], None),
    ("private_key", replace(settings(), private_key=PrivateKey(bytes(range(50, 82)))),
     ["WGDEVICE_A_PRIVATE_KEY"], None),
]


@pytest.mark.parametrize("name, wanted, device_attrs, peer_attrs", ONE_CHANGE, ids=[c[0] for c in ONE_CHANGE])
def test_one_change_sends_only_that(name, wanted, device_attrs, peer_attrs):
    (msg,), changed = sent(wanted, status_of(settings()))
    assert changed == {name}
    assert names(msg) == ["WGDEVICE_A_IFNAME", *device_attrs, *(["WGDEVICE_A_PEERS"] if peer_attrs else [])]
    if peer_attrs:
        (peer,) = peers_of(msg)
        assert names(peer) == peer_attrs
        assert key(peer.get_attr("WGPEER_A_PUBLIC_KEY")) == PEER.raw


def test_allowed_ips_replaced_as_a_whole_even_when_emptied():
    (msg,), changed = sent(settings(peer=dict(allowed_ips=())), status_of(settings()))
    assert changed == {"allowed_ips"}
    (peer,) = peers_of(msg)
    assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS and allowed_of(peer) == []


def test_other_peers_are_removed_and_ours_added():
    (msg,), changed = sent(settings(), status_of(settings(), peer=dict(public_key=OTHER)))
    assert changed == {"peer", "endpoint", "allowed_ips"}
    gone, ours = peers_of(msg)
    assert key(gone.get_attr("WGPEER_A_PUBLIC_KEY")) == OTHER.raw
    assert names(gone) == ["WGPEER_A_PUBLIC_KEY", "WGPEER_A_FLAGS"]
    assert gone.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert key(ours.get_attr("WGPEER_A_PUBLIC_KEY")) == PEER.raw and allowed_of(ours) == [NET("198.18.101.0/30")]
    # a bare new peer (nothing else to say) is still sent: its public key creates it
    bare = settings(peer=dict(endpoint=None, allowed_ips=()))
    (msg,), changed = sent(bare, DeviceStatus("hat0", PRIV.public_key, 1, 0))
    assert changed == {"peer"} and [names(p) for p in peers_of(msg)] == [["WGPEER_A_PUBLIC_KEY"]]


def test_reset_peer_removes_and_adds_it_in_one_message():
    s = settings(peer=dict(keepalive=25))
    (msg,), changed = sent(s, status_of(s), reset_peer=True)
    assert changed == {"peer", "endpoint", "keepalive", "allowed_ips"}
    assert names(msg) == ["WGDEVICE_A_IFNAME", "WGDEVICE_A_PEERS"]
    gone, back = peers_of(msg)
    assert key(gone.get_attr("WGPEER_A_PUBLIC_KEY")) == key(back.get_attr("WGPEER_A_PUBLIC_KEY")) == PEER.raw
    assert gone.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert names(back) == ["WGPEER_A_PUBLIC_KEY", "WGPEER_A_ENDPOINT", "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL",
                           "WGPEER_A_FLAGS", "WGPEER_A_ALLOWEDIPS"]


def test_many_allowed_ips_continue_in_further_messages():
    many = tuple(NET(f"198.19.{i // 256}.{i % 256}/32") for i in range(2 * ALLOWEDIPS_PER_MESSAGE + 3))
    msgs, changed = sent(settings(peer=dict(allowed_ips=many)), status_of(settings()))
    assert changed == {"allowed_ips"} and len(msgs) == 3
    (first,), *rest = [peers_of(m) for m in msgs]
    assert first.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    for (peer,) in rest:  # continuation: same peer, no flag (it would drop the first part)
        assert names(peer) == ["WGPEER_A_PUBLIC_KEY", "WGPEER_A_ALLOWEDIPS"]
        assert key(peer.get_attr("WGPEER_A_PUBLIC_KEY")) == PEER.raw
    assert allowed_of(first) + [n for (p,) in rest for n in allowed_of(p)] == list(many)
    assert all(len(wire(m)) < 65535 for m in diff_messages(settings(peer=dict(allowed_ips=many)), None)[0])


PARITY = [
    (settings(), None),
    (settings(), status_of(settings())),
    (settings(listen_port=51820, fwmark=1), status_of(settings(), listen_port=1)),
    (settings(peer=dict(keepalive=25, endpoint=("fd00::2", 1))), status_of(settings())),
    (settings(peer=dict(endpoint=None, allowed_ips=())), DeviceStatus("hat0", None, 41000, 0)),
    (settings(), status_of(settings(), public_key=OTHER, peer=dict(public_key=OTHER))),
    (settings(), replace(status_of(settings()),
                         peers=status_of(settings()).peers + status_of(settings(), peer=dict(public_key=OTHER)).peers)),
]


@pytest.mark.parametrize("wanted, current", PARITY)
def test_same_decisions_as_the_userspace_diff(wanted, current):
    lines, uapi_changed = uapi.diff_lines(wanted, current)
    messages, changed = diff_messages(wanted, current)
    assert changed == uapi_changed and bool(messages) == bool(lines)


# --- reading a device --------------------------------------------------------------------------

PSK = bytes(range(150, 182))


def reply(attrs: list) -> bytes:
    msg = wgmsg()
    msg["cmd"], msg["version"] = WG_CMD_GET_DEVICE, 1
    msg["attrs"] = attrs
    return wire(msg, NLM_F_MULTI)


def allowed(*nets: str) -> list[dict]:
    out = []
    for n in map(NET, nets):
        fam = 2 if n.version == 4 else 10
        out.append({"attrs": [("WGALLOWEDIP_A_CIDR_MASK", n.prefixlen), ("WGALLOWEDIP_A_FAMILY", fam),
                              ("WGALLOWEDIP_A_IPADDR", n.network_address.packed)]})
    return out


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# As the kernel sends it: device attributes and keys first, peer PEER split across two messages
# (its second part repeats only the public key), then OTHER, never in a handshake, no endpoint.
GET_REPLY = [
    reply([("WGDEVICE_A_LISTEN_PORT", 51820), ("WGDEVICE_A_FWMARK", 0x10000), ("WGDEVICE_A_IFINDEX", 7),
           ("WGDEVICE_A_IFNAME", "hat0"), ("WGDEVICE_A_PRIVATE_KEY", PRIV.base64),
           ("WGDEVICE_A_PUBLIC_KEY", PRIV.public_key.base64),
           ("WGDEVICE_A_PEERS", [{"attrs": [
               ("WGPEER_A_PUBLIC_KEY", PEER.base64), ("WGPEER_A_PRESHARED_KEY", b64(PSK)),
               ("WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 500000000}),
               ("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25), ("WGPEER_A_TX_BYTES", 100), ("WGPEER_A_RX_BYTES", 200),
               ("WGPEER_A_PROTOCOL_VERSION", 1), ("WGPEER_A_ENDPOINT", {"addr": "fd00::2", "port": 51821}),
               ("WGPEER_A_ALLOWEDIPS", allowed("198.18.101.0/30", "fd00::/64"))]}])]),
    reply([("WGDEVICE_A_PEERS", [
        {"attrs": [("WGPEER_A_PUBLIC_KEY", PEER.base64), ("WGPEER_A_ALLOWEDIPS", allowed("198.19.77.0/24"))]},
        {"attrs": [("WGPEER_A_PUBLIC_KEY", OTHER.base64), ("WGPEER_A_PRESHARED_KEY", b64(PSK)),
                   ("WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 0, "tv_nsec": 0}),
                   ("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 0), ("WGPEER_A_TX_BYTES", 0), ("WGPEER_A_RX_BYTES", 0),
                   ("WGPEER_A_PROTOCOL_VERSION", 1)]}])]),
]


def test_get_reply_is_merged_and_keeps_no_secret():
    messages = [decoded(data, wgreply) for data in GET_REPLY]  # as the socket hands them over
    status = parse_device("hat0", messages)
    assert status == DeviceStatus(
        ifname="hat0", public_key=PRIV.public_key, listen_port=51820, fwmark=0x10000, peers=(
            PeerStatus(public_key=PEER, endpoint=("fd00::2", 51821), keepalive=25,
                       allowed_ips=(NET("198.18.101.0/30"), NET("fd00::/64"), NET("198.19.77.0/24")),
                       rx_bytes=200, tx_bytes=100, last_handshake=1700000000.5,
                       preshared_key_fingerprint=key_fingerprint(PSK)),
            PeerStatus(public_key=OTHER, endpoint=None, keepalive=0, allowed_ips=(), rx_bytes=0, tx_bytes=0,
                       last_handshake=None, preshared_key_fingerprint=key_fingerprint(PSK))))
    assert PRIV.raw in GET_REPLY[0] and PSK in GET_REPLY[0]  # the kernel does send them...
    for thing in (status, *messages, *[getattr(status, f.name) for f in dataclasses.fields(status)]):
        # ...we never decode them
        assert secret_free(repr(thing), PRIV.raw, PSK) and secret_free(str(thing), PRIV.raw, PSK)
    assert messages[0].get_attr("WGDEVICE_A_PRIVATE_KEY") is None


def test_device_without_key_or_peers():
    status = parse_device("hat0", [decoded(reply([("WGDEVICE_A_LISTEN_PORT", 0), ("WGDEVICE_A_FWMARK", 0),
                                                  ("WGDEVICE_A_IFINDEX", 7), ("WGDEVICE_A_IFNAME", "hat0")]), wgreply)])
    assert status == DeviceStatus("hat0", None, 0, 0)
    assert diff_messages(settings(), status)[1] == {"private_key", "peer", "endpoint", "allowed_ips"}


# --- a fake kernel ------------------------------------------------------------------------------

@dataclass
class FakePeer:
    endpoint: dict | None = None
    keepalive: int = 0
    allowed: list = field(default_factory=list)
    psk: bytes = bytes(32)  # a new peer has none, as in the kernel


@dataclass
class FakeDevice:
    private: bytes | None = None
    port: int = 0
    fwmark: int = 0
    peers: dict = field(default_factory=dict)  # raw public key -> FakePeer


class FakeKernel:
    """rtnetlink and WireGuard generic netlink, as far as the backend uses them.

    One object stands for both sockets: `request`/`dump`/`message_classes` as a
    `hatun.netlink.core.NetlinkSocket` (requests are encoded to bytes and decoded back with
    pyroute2's `wgmsg`; dump replies are encoded and decoded with the class the backend registered,
    as the real socket does), and the `Rtnl` methods that the backend and `link.py` call.
    Dumps split like the kernel: at most SPLIT allowed IPs per peer part, two parts per message.
    """

    def __init__(self, split: int = 2) -> None:
        self.split = split
        self.message_classes: dict[int, type] = {}
        self.netdevs: dict[str, dict] = {}  # links by name
        self.devices: dict[str, FakeDevice] = {}
        self.sent: list = []  # decoded WG_CMD_SET_DEVICE messages
        self.link_writes: list[tuple] = []  # rtnetlink changes
        self.fail_set: NetlinkError | None = None
        self._index = 10

    # generic netlink

    async def request(self, msg, msg_type, flags=NLM_F_REQUEST | NLM_F_ACK, *, timeout=5.0, what=None):
        assert msg_type == FAMILY
        m = decoded(wire(msg, flags))
        assert m["cmd"] == WG_CMD_SET_DEVICE
        self.sent.append(m)
        if self.fail_set is not None:
            raise NetlinkError(self.fail_set.errno, self.fail_set.message, what or "")
        self._set(self._device(m.get_attr("WGDEVICE_A_IFNAME"), what), m)
        return []

    async def dump(self, msg, msg_type, *, timeout=5.0, what=None):
        m = decoded(wire(msg, NLM_F_REQUEST | NLM_F_DUMP))
        assert m["cmd"] == WG_CMD_GET_DEVICE and names(m) == ["WGDEVICE_A_IFNAME"]
        ifname = m.get_attr("WGDEVICE_A_IFNAME")
        cls = self.message_classes.get(msg_type, nlmsg)
        return [decoded(data, cls) for data in self._reply(ifname, self._device(ifname, what))]

    def _device(self, ifname: str, what) -> FakeDevice:
        if ifname not in self.netdevs:
            raise NetlinkError(errno.ENODEV, None, what or "")
        if ifname not in self.devices:
            raise NetlinkError(errno.EOPNOTSUPP, None, what or "")
        return self.devices[ifname]

    def _set(self, dev: FakeDevice, m) -> None:
        # The kernel's wg_set_device / set_peer, reduced to what matters here.
        if (mark := m.get_attr("WGDEVICE_A_FWMARK")) is not None:
            dev.fwmark = mark
        if (port := m.get_attr("WGDEVICE_A_LISTEN_PORT")) is not None:
            dev.port = port
        if (priv := m.get_attr("WGDEVICE_A_PRIVATE_KEY")) is not None:
            dev.private = key(priv)
        for p in peers_of(m):
            pub, flags = key(p.get_attr("WGPEER_A_PUBLIC_KEY")), p.get_attr("WGPEER_A_FLAGS") or 0
            peer = dev.peers.get(pub)
            if peer is None:
                if flags & (WGPEER_F_REMOVE_ME | WGPEER_F_UPDATE_ONLY):
                    continue
                peer = dev.peers[pub] = FakePeer()
            if flags & WGPEER_F_REMOVE_ME:
                del dev.peers[pub]
                continue
            if (ep := p.get_attr("WGPEER_A_ENDPOINT")) is not None:
                peer.endpoint = {"addr": ep["addr"], "port": ep["port"]}
            if (psk := p.get_attr("WGPEER_A_PRESHARED_KEY")) is not None:
                peer.psk = key(psk)
            if flags & WGPEER_F_REPLACE_ALLOWEDIPS:
                peer.allowed.clear()
            peer.allowed += [n for n in allowed_of(p) if n not in peer.allowed]
            peer.keepalive = p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", peer.keepalive)

    def _reply(self, ifname: str, dev: FakeDevice) -> list[bytes]:
        head = [("WGDEVICE_A_LISTEN_PORT", dev.port), ("WGDEVICE_A_FWMARK", dev.fwmark),
                ("WGDEVICE_A_IFINDEX", self.netdevs[ifname]["index"]), ("WGDEVICE_A_IFNAME", ifname)]
        if dev.private is not None:
            head += [("WGDEVICE_A_PRIVATE_KEY", b64(dev.private)),
                     ("WGDEVICE_A_PUBLIC_KEY", PrivateKey(dev.private).public_key.base64)]
        parts = []
        for pub, peer in dev.peers.items():
            chunks = [peer.allowed[i:i + self.split] for i in range(0, len(peer.allowed), self.split)] or [[]]
            for i, chunk in enumerate(chunks):
                attrs = [("WGPEER_A_PUBLIC_KEY", b64(pub))]
                if i == 0:
                    attrs += [("WGPEER_A_PRESHARED_KEY", b64(peer.psk)),
                              ("WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 0, "tv_nsec": 0}),
                              ("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", peer.keepalive),
                              ("WGPEER_A_TX_BYTES", 0), ("WGPEER_A_RX_BYTES", 0), ("WGPEER_A_PROTOCOL_VERSION", 1)]
                    if peer.endpoint:
                        attrs.append(("WGPEER_A_ENDPOINT", dict(peer.endpoint)))
                if chunk:
                    attrs.append(("WGPEER_A_ALLOWEDIPS", allowed(*map(str, chunk))))
                parts.append({"attrs": attrs})
        groups = [parts[i:i + 2] for i in range(0, len(parts), 2)] or [[]]
        return [reply((head if i == 0 else []) + ([("WGDEVICE_A_PEERS", g)] if g else []))
                for i, g in enumerate(groups)]

    # rtnetlink

    def _find(self, name_or_index) -> tuple[str, dict] | tuple[None, None]:
        for name, rec in self.netdevs.items():
            if name_or_index in (name, rec["index"]):
                return name, rec
        return None, None

    async def link(self, name_or_index):
        name, rec = self._find(name_or_index)
        return None if rec is None else Link(rec["index"], name, rec["kind"], rec["up"], rec["up"], rec["mtu"])

    async def links(self):
        return [await self.link(name) for name in self.netdevs]

    async def add_link(self, name, kind):
        if name in self.netdevs:
            raise NetlinkError(errno.EEXIST, None, f"add {kind} link {name}")
        self._index += 1
        mtu = 1420 if kind == "wireguard" else 1500
        self.netdevs[name] = dict(index=self._index, kind=kind, up=False, mtu=mtu, addrs=[])
        if kind == "wireguard":
            self.devices[name] = FakeDevice()
        self.link_writes.append(("add_link", name))
        return await self.link(name)

    async def set_link(self, index, *, up=None, mtu=None):
        _, rec = self._find(index)
        rec.update({k: v for k, v in (("up", up), ("mtu", mtu)) if v is not None})
        self.link_writes.append(("set_link", index, up, mtu))

    async def delete_link(self, name_or_index):
        name, rec = self._find(name_or_index)
        if rec is None:
            return False
        self.remove_link(name)
        self.link_writes.append(("delete_link", name))
        return True

    def remove_link(self, name: str) -> None:
        """What `ip link del NAME` does (behind the backend's back)."""
        del self.netdevs[name]
        self.devices.pop(name, None)

    async def addresses(self, index=None):
        return [Address(rec["index"], a) for rec in self.netdevs.values() if index in (None, rec["index"])
                for a in rec["addrs"]]

    async def add_address(self, index, interface):
        self._find(index)[1]["addrs"].append(interface)
        self.link_writes.append(("add_address", index, interface))

    async def delete_address(self, index, interface):
        self._find(index)[1]["addrs"].remove(interface)
        self.link_writes.append(("delete_address", index, interface))
        return True


# --- the same behaviour, against any backend -----------------------------------------------------

def scenario_settings(ifname: str) -> DeviceSettings:
    return DeviceSettings(
        ifname=ifname, private_key=PrivateKey.generate(), listen_port=51820,
        addresses=(ipaddress.ip_interface("198.18.101.1/30"),),
        peer=PeerSettings(public_key=PrivateKey.generate().public_key, endpoint=("198.18.0.2", 51821),
                          allowed_ips=(NET("198.18.101.0/30"),)))


def assert_matches(status: DeviceStatus, s: DeviceSettings) -> None:
    assert status.public_key == s.private_key.public_key
    assert status.listen_port == s.listen_port and status.fwmark == s.fwmark
    assert [p.public_key for p in status.peers] == [s.peer.public_key]
    assert status.peer.endpoint == s.peer.endpoint and status.peer.keepalive == s.peer.keepalive
    assert set(status.peer.allowed_ips) == set(s.peer.allowed_ips)
    assert status.mtu == s.mtu and set(status.addresses) == set(s.addresses) and status.up
    assert secret_free(repr(status), s.private_key.raw)


async def check_backend_behaviour(b: Backend, s: DeviceSettings, *, remove_link: Callable[[str], Awaitable[None]],
                                  many_allowed_ips: int = 1500) -> None:
    """What every backend must do with one device, whatever implements WireGuard underneath.

    REMOVE_LINK deletes the device behind the backend's back and returns once that took effect.
    MANY_ALLOWED_IPS: the big step; 1500 need several SET messages and, on a real kernel, a dump
    of more than one message (it sends at most 32 KiB per message, ~1150 IPv4 allowed IPs).
    """
    ifname = s.ifname
    first = await b.apply(s)
    assert first.created and {"private_key", "listen_port", "peer", "endpoint", "allowed_ips", "up"} <= first.changed
    assert b.generation(ifname) == 1
    assert not await b.apply(s), "the same settings again must change nothing"
    assert_matches(await b.get(ifname), s)
    assert ifname in await b.list()

    many = tuple(NET(f"198.19.{i // 256}.{i % 256}/32") for i in range(many_allowed_ips))
    steps = [
        ("keepalive", lambda s: replace(s, peer=replace(s.peer, keepalive=25))),
        ("endpoint", lambda s: replace(s, peer=replace(s.peer, endpoint=("198.18.0.3", 51822)))),
        ("allowed_ips",
         lambda s: replace(s, peer=replace(s.peer, allowed_ips=(*s.peer.allowed_ips, NET("198.19.77.0/24"))))),
        (None, lambda s: replace(s, peer=replace(s.peer, allowed_ips=tuple(reversed(s.peer.allowed_ips))))),
        ("fwmark", lambda s: replace(s, fwmark=0x10000)),
        ("listen_port", lambda s: replace(s, listen_port=51830)),
        ("private_key", lambda s: replace(s, private_key=PrivateKey.generate())),
        ("mtu", lambda s: replace(s, mtu=1380)),
        ("addresses", lambda s: replace(s, addresses=(ipaddress.ip_interface("198.18.102.1/30"),))),
        ("allowed_ips", lambda s: replace(s, peer=replace(s.peer, allowed_ips=many))),  # several messages
    ]
    for name, change in steps:
        s = change(s)
        changes = await b.apply(s)
        assert changes.changed == ({name} if name else set()) and not changes.created, (name, changes)
        assert not await b.apply(s), name
        assert_matches(await b.get(ifname), s)

    # Another peer: the old one goes, the new one comes.
    s = replace(s, peer=replace(s.peer, public_key=PrivateKey.generate().public_key))
    assert "peer" in (await b.apply(s)).changed
    assert_matches(await b.get(ifname), s)

    # A fresh session for the same peer: afterwards the device matches the settings as before.
    await b.reset_peer(s)
    assert_matches(await b.get(ifname), s)
    assert not await b.apply(s)

    # Deleted behind our back: the next apply makes it again (new ifindex, next generation).
    before = await b.get(ifname)
    await remove_link(ifname)
    await b.apply(s)
    after = await b.get(ifname)
    assert after.ifindex != before.ifindex and b.generation(ifname) == 2
    assert_matches(after, s)

    await b.delete(ifname)
    assert await b.get(ifname) is None and ifname not in await b.list()
    await b.delete(ifname)  # a missing device is not an error
    await b.reset_peer(s)  # nor is resetting its peer, which does not bring it back
    assert await b.get(ifname) is None


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG, logger="hatun")
    return caplog


async def test_behaviour_against_a_fake_kernel(logs):
    kernel = FakeKernel(split=64)  # pyroute2 decodes ~10000 allowed IPs/s: keep the fake's share small
    b = KernelBackend(kernel, FAMILY, kernel)
    assert b.name == "kernel" and b.pid("hat0") is None

    async def remove_link(ifname):
        kernel.remove_link(ifname)

    s = scenario_settings("hat0")
    await check_backend_behaviour(b, s, remove_link=remove_link, many_allowed_ips=ALLOWEDIPS_PER_MESSAGE + 100)
    assert "hat0: created; set " in logs.text
    assert len(kernel.sent) > 10 and all(m.get_attr("WGDEVICE_A_FLAGS") is None for m in kernel.sent)
    # reset_peer: remove and re-add in one message
    assert sum(len(peers_of(m)) == 2 and len({p.get_attr("WGPEER_A_PUBLIC_KEY") for p in peers_of(m)}) == 1
               for m in kernel.sent) == 1
    assert secret_free(logs.text, s.private_key.raw)


async def test_second_apply_sends_nothing_at_all():
    kernel = FakeKernel()
    b = KernelBackend(kernel, FAMILY, kernel)
    s = settings(listen_port=51820, addresses=(ipaddress.ip_interface("198.18.101.1/30"),))
    changes = await b.apply(s)
    assert changes.created and changes.changed == {"private_key", "listen_port", "peer", "endpoint", "allowed_ips",
                                                   "addresses", "up"}
    assert kernel.link_writes[0] == ("add_link", "hat0") and len(kernel.sent) == 1
    sent_before, writes_before = len(kernel.sent), len(kernel.link_writes)
    assert not await b.apply(s)
    assert len(kernel.sent) == sent_before and len(kernel.link_writes) == writes_before  # no message, no flap

    await b.apply(replace(s, peer=replace(s.peer, keepalive=25)))
    assert len(kernel.link_writes) == writes_before
    assert names(peers_of(kernel.sent[-1])[0]) == ["WGPEER_A_PUBLIC_KEY", "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"]


async def test_foreign_peer_is_removed():
    kernel = FakeKernel()
    b = KernelBackend(kernel, FAMILY, kernel)
    await b.apply(settings())
    kernel.devices["hat0"].peers[OTHER.raw] = FakePeer(allowed=[NET("198.18.200.0/24")])
    assert (await b.apply(settings())).changed == {"peer"}
    assert list(kernel.devices["hat0"].peers) == [PEER.raw]


async def test_kernel_refusal_names_device_and_reason_never_a_key():
    kernel = FakeKernel()
    b = KernelBackend(kernel, FAMILY, kernel)
    kernel.fail_set = NetlinkError(errno.EINVAL, "NLA_F_NESTED is missing")
    with pytest.raises(WireGuardError) as e:
        await b.apply(settings())
    text = str(e.value)
    assert text.startswith("hat0: set WireGuard allowed_ips, endpoint, peer, private_key: Invalid argument")
    assert "NLA_F_NESTED is missing" in text and secret_free(text, PRIV.raw)


async def test_a_link_of_another_kind_is_left_alone():
    kernel = FakeKernel()
    b = KernelBackend(kernel, FAMILY, kernel)
    await kernel.add_link("hat0", "bridge")
    await kernel.add_link("hat1", "wireguard")
    with pytest.raises(WireGuardError, match=r"hat0 exists but is not a WireGuard device \(kind bridge\)"):
        await b.apply(settings())
    with pytest.raises(WireGuardError, match="hat0 exists but is not a WireGuard device"):
        await b.get("hat0")
    with pytest.raises(WireGuardError, match="not a WireGuard device"):
        await b.delete("hat0")
    assert "hat0" in kernel.netdevs and kernel.sent == []
    assert await b.list() == ["hat1"]


# --- real ones -----------------------------------------------------------------------------------

@pytest.mark.netns
async def test_no_wireguard_family_means_backend_unavailable(namespaces):
    ns = namespaces.new("kwg")
    if await kernel_has_wireguard(ns):
        pytest.skip("this kernel has WireGuard")
    with pytest.raises(BackendUnavailable) as e:
        async with open_kernel_backend(netns=ns):
            pass
    assert "generic netlink family \"wireguard\" does not exist" in str(e.value)
    assert f"(network namespace {ns})" in str(e.value) and "wireguard-go" in str(e.value)


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go")
async def test_behaviour_against_wireguard_go(namespaces, tmp_path, logs):
    # The same behaviour check against the userspace backend: proof that it is backend-neutral.
    from hatun.wireguard.userspace import open_userspace_backend

    ns = namespaces.new("kwgu")
    s = scenario_settings(f"hk{RUN_ID}")
    try:
        async with open_userspace_backend(run_dir=str(tmp_path), netns=ns) as b:
            async def remove_link(ifname):
                pid = b.pid(ifname)
                ip("link", "del", ifname, netns=ns)
                with trio.fail_after(5):  # wireguard-go exits when its TUN goes
                    while os.path.exists(f"/proc/{pid}") and b.pid(ifname) == pid:
                        await trio.sleep(0.02)
            await check_backend_behaviour(b, s, remove_link=remove_link)
    finally:
        if os.path.exists(uapi.socket_path(s.ifname)):
            os.unlink(uapi.socket_path(s.ifname))
    assert secret_free(logs.text, s.private_key.raw)


@pytest.fixture
def wireguard_netns(namespaces) -> str:
    """A fresh namespace whose kernel has WireGuard; else the test is skipped. (A sync fixture: a
    pytest.skip() inside an async test loses its reason under pytest-trio 0.8.)"""
    ns = namespaces.new("kwgk")
    if not trio.run(kernel_has_wireguard, ns):
        pytest.skip("this kernel has no WireGuard: run the vm tests in the VM")
    return ns


# Run in a VM with a WireGuard kernel, e.g. (software emulation, ~1 min; -v: output on the console):
#   vng -v -r /var/lib/hatun-vm/kernel/6.1.0-56-amd64/boot/vmlinuz-6.1.0-56-amd64 --disable-kvm -- \
#     'modprobe -d /var/lib/hatun-vm/kernel/6.1.0-56-amd64 wireguard && cd /work/main &&
#      /tmp/venv/bin/python -m pytest -p no:cacheprovider -m vm tests/test_kernel_backend.py'
@pytest.mark.vm_inside
@pytest.mark.netns
async def test_behaviour_against_the_kernel(wireguard_netns, logs):
    ns = wireguard_netns
    s = scenario_settings("hatk0")
    async with open_kernel_backend(netns=ns) as b:
        async def remove_link(ifname):
            ip("link", "del", ifname, netns=ns)
        await check_backend_behaviour(b, s, remove_link=remove_link)
    assert secret_free(logs.text, s.private_key.raw)
