"""Typed rtnetlink: links, addresses, routes, rules and nexthop objects as frozen dataclasses.

`Rtnl` wraps one `NetlinkSocket` (NETLINK_ROUTE). Reads dump and filter in Python (the kernel's
`RTM_GETROUTE` without NLM_F_DUMP is a FIB lookup, not a filter; dump filters are only honoured
under strict checking, so they are treated as an optimisation). Values read back compare equal to
the values written, so a reconciler can diff wanted against actual state with `==`:

- `protocol` 0 (unspecified) reads back as None, and None is written as 0.
- Multipath hops and nexthop group members carry the real weight 1..256 (the kernel stores weight-1).
- A route that uses a nexthop object (`nh_id`) reads back without `oif`/`multipath`: the kernel also
  reports the expanded nexthops (sysctl net.ipv4.nexthop_compat_mode=1, the default), dropped here.
- IPv6 routes without `priority` get 1024 from the kernel (IP6_RT_PRIO_USER) and read back so.
- IPv6 reject routes (unreachable, blackhole) point at `lo` in the kernel; they read back with oif None.

Kernel rules met (6.x) that callers must design for:
- IPv6 refuses device-only hops in a classic multipath route ("Device only routes can not be added
  for IPv6 using the multipath API"): give each hop a gateway, or use nexthop objects.
- A nexthop object needs its device up with carrier ("Nexthop device is not up", ENETDOWN).
- The kernel removes a device nexthop when its device goes down, loses carrier or is deleted, and
  drops it from every group; a group whose last member goes is deleted, with the routes using it.
  Nothing comes back on link up: re-create them.
- Nexthop groups have family AF_UNSPEC. A resilient group's bucket count and the group type cannot
  change once created (EINVAL): delete and re-create instead.

Notifications (`open_rtnl_events`) are hints to re-read, not a complete log:
- When the kernel flushes nexthops (device down, carrier lost, deleted) it sends no RTM_DELNEXTHOP,
  no update of the groups, and no RTM_DELROUTE for routes that went with a group. Connected routes
  of a link going down also go silently. Re-dump on link events.
- An IPv6 multipath route is added and dumped as one route, but when a device goes, the loss of its
  hop is notified as RTM_DELROUTE of a single-path route (the rest of the route stays).
- After EventsOverflow the state must be re-read (the kernel reports one overflow, then drops
  silently until the queue is emptied; the socket layer empties it at once).
- An `EventFilter` drops routes, rules and nexthops that are not the caller's on their fixed
  header fields, before pyroute2 decodes anything: a flood in other tables costs ~1 us a message.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import KW_ONLY, dataclass, field
from typing import NamedTuple

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink import rtnl as C
from pyroute2.netlink.rtnl.fibmsg import FR_ACT_TO_TBL, fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD, ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg

from hatun import bpf
from hatun.netlink.core import EventsOverflow, NetlinkError, NetlinkSocket, open_netlink
from hatun.netlink.messages import (
    NEXTHOP_GRP_TYPE_MPATH,
    NEXTHOP_GRP_TYPE_RES,
    RTM_DELNEXTHOP,
    RTM_GETNEXTHOP,
    RTM_NEWNEXTHOP,
    RTNLGRP_NEXTHOP,
    USER_HZ,
    nhmsg,
    rtmsg,
)

log = logging.getLogger("hatun.netlink")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

RT_TABLE_COMPAT = 252  # rtm_table when the real id (> 255) is in RTA_TABLE
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
FIB_RULE_INVERT = 0x2
_CREATE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
_REPLACE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
_ACK = NLM_F_REQUEST | NLM_F_ACK

ROUTE_TYPES = {"unicast": 1, "local": 2, "broadcast": 3, "anycast": 4, "multicast": 5,
               "blackhole": 6, "unreachable": 7, "prohibit": 8, "throw": 9}
_ROUTE_TYPE_NAMES = {v: k for k, v in ROUTE_TYPES.items()}

RTA_TABLE = 15
FRA_PROTOCOL = 21
NHA_ID = 1
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

EVENT_GROUPS = (C.RTNLGRP_LINK, C.RTNLGRP_IPV4_IFADDR, C.RTNLGRP_IPV6_IFADDR, C.RTNLGRP_IPV4_ROUTE,
                C.RTNLGRP_IPV6_ROUTE, C.RTNLGRP_IPV4_RULE, C.RTNLGRP_IPV6_RULE, RTNLGRP_NEXTHOP)


# -- data -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None  # IFLA_INFO_KIND ("bridge", "wireguard", "tun", ...); None for lo and NICs
    up: bool  # administratively up (IFF_UP)
    carrier: bool
    mtu: int
    # Traffic counters (IFLA_STATS64), not part of the link's identity. On a WireGuard device (kernel
    # or wireguard-go's TUN) rx counts the decrypted packets that arrived from the peer.
    rx_bytes: int | None = field(default=None, compare=False)
    tx_bytes: int | None = field(default=None, compare=False)


class Address(NamedTuple):
    """An interface address; a plain (index, interface) tuple compares equal."""

    index: int
    interface: IPInterface


class Hop(NamedTuple):
    """One path of a classic multipath route. IPv6 needs a gateway on every hop."""

    oif: int
    weight: int = 1  # 1..256
    gateway: IPAddress | None = None


@dataclass(frozen=True)
class Route:
    """A route. `multipath` items may be given as (oif, weight) or (oif, weight, gateway) tuples."""

    family: int  # socket.AF_INET / AF_INET6
    table: int
    dst: IPNetwork
    _: KW_ONLY
    type: str = "unicast"  # "unicast" | "unreachable" | "blackhole" | ... (ROUTE_TYPES)
    protocol: int | None = None
    oif: int | None = None
    gateway: IPAddress | None = None
    prefsrc: IPAddress | None = None
    nh_id: int | None = None
    multipath: tuple[Hop, ...] = ()
    priority: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dst", ipaddress.ip_network(self.dst))
        object.__setattr__(self, "family", int(self.family))
        object.__setattr__(self, "multipath", tuple(_hop(*h) for h in self.multipath))
        for name in ("gateway", "prefsrc"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, ipaddress.ip_address(getattr(self, name)))
        if self.type not in ROUTE_TYPES:
            raise ValueError(f"route {self.dst}: unknown type {self.type!r}")
        if _family_of(self.dst) != self.family:
            raise ValueError(f"route {self.dst}: does not belong to address family {self.family}")
        for hop in self.multipath:
            if not 1 <= hop.weight <= 256:
                raise ValueError(f"route {self.dst}: weight {hop.weight} of hop via {hop.oif} is outside 1..256")


@dataclass(frozen=True)
class Rule:
    """A policy rule that looks up TABLE. A `fwmark` without `fwmask` means mask 0xffffffff."""

    family: int
    priority: int
    table: int
    fwmark: int | None = None
    fwmask: int | None = None
    invert: bool = False  # "not fwmark ..."
    protocol: int | None = None
    suppress_prefixlength: int | None = None  # "suppress_prefixlength N": ignore results this wide or wider

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", int(self.family))
        if self.fwmark is not None and self.fwmask is None:
            object.__setattr__(self, "fwmask", 0xFFFFFFFF)  # what the kernel stores and reports


@dataclass(frozen=True)
class Resilient:
    """Parameters of a resilient nexthop group. Timers in seconds (kernel unit: 1/100 s)."""

    buckets: int = 128
    idle_timer: float = 120.0
    unbalanced_timer: float = 0.0


@dataclass(frozen=True)
class Nexthop:
    """A nexthop object: a device (`oif`, optional `gateway`), a blackhole, or a group of others.

    Groups: family must be AF_UNSPEC (0); `group` holds (member id, weight 1..256) pairs;
    `resilient` makes it a resilient group (else hash-threshold multipath).
    """

    id: int
    family: int
    _: KW_ONLY
    oif: int | None = None
    gateway: IPAddress | None = None
    blackhole: bool = False
    protocol: int | None = None
    group: tuple[tuple[int, int], ...] = ()
    resilient: Resilient | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", int(self.family))
        object.__setattr__(self, "group", tuple((int(i), int(w)) for i, w in self.group))
        if self.gateway is not None:
            object.__setattr__(self, "gateway", ipaddress.ip_address(self.gateway))
        if self.group and self.family != socket.AF_UNSPEC:
            raise ValueError(f"nexthop group {self.id}: family must be AF_UNSPEC (0), the kernel insists")
        if self.resilient is not None and not self.group:
            raise ValueError(f"nexthop {self.id}: resilient parameters given but no group members")


@dataclass(frozen=True)
class RtnlEvent:
    """A notification: action "new" or "del" and the object (Link, Address, Route, Rule, Nexthop)."""

    action: str
    obj: Link | Address | Route | Rule | Nexthop


def _hop(oif: int, weight: int = 1, gateway=None) -> Hop:
    return Hop(oif, weight, _ip_or_none(gateway))


def _family_of(net) -> int:
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


# -- filtering before decoding --------------------------------------------------------------------

_NLMSGHDR = 16
# struct rtmsg {u8 family, dst_len, src_len, tos, table, protocol, scope, type; u32 flags}
_RTM_TABLE, _RTM_PROTOCOL, _RTMSG = _NLMSGHDR + 4, _NLMSGHDR + 5, 12
# struct fib_rule_hdr {u8 family, dst_len, src_len, tos, table, res1, res2, action; u32 flags}
_FIB_RULE_HDR = 12
_NHMSG = 8  # struct nhmsg {u8 family, scope, protocol, resvd; u32 flags}
_RTA = struct.Struct("=HH")  # struct rtattr / nlattr {u16 len; u16 type}
_U32 = struct.Struct("=I")


def _attr(data: bytes, start: int, end: int, wanted: int) -> tuple[int, int]:
    """(offset, length) of the payload of attribute WANTED among those in DATA[START:END]; (0, 0) if absent."""
    while start + 4 <= end:
        length, kind = _RTA.unpack_from(data, start)
        if length < 4 or start + length > end:
            break
        if kind & NLA_TYPE_MASK == wanted:
            return start + 4, length - 4
        start += (length + 3) & ~3
    return 0, 0


def _attr_u32(data: bytes, start: int, end: int, wanted: int) -> int | None:
    at, size = _attr(data, start, end, wanted)
    return _U32.unpack_from(data, at)[0] if size >= 4 else None


def _attr_u8(data: bytes, start: int, end: int, wanted: int) -> int | None:
    at, size = _attr(data, start, end, wanted)
    return data[at] if size >= 1 else None


@dataclass(frozen=True)
class EventFilter:
    """Which route, rule and nexthop notifications are decoded at all (links and addresses always are).

    tables: a route is kept only in one of these tables (None: any).
    protocol: routes and rules are kept only with this protocol (None: any; 0 stands for unset).
    nexthop_ids: a nexthop object is kept only with an id in this range (None: any).

    `keep` reads only fixed header fields and walks the raw attribute list for the few values that
    live there (RTA_TABLE for tables above 255, FRA_PROTOCOL, NHA_ID): a message it cannot make
    sense of is kept, for the decoder to judge.
    """

    tables: range | None = None
    protocol: int | None = None
    nexthop_ids: range | None = None

    def keep(self, data: bytes, offset: int, length: int, msg_type: int) -> bool:
        """False when the notification at DATA[OFFSET:OFFSET+LENGTH] of MSG_TYPE is not wanted."""
        end = offset + length
        if msg_type in (C.RTM_NEWROUTE, C.RTM_DELROUTE):
            if length < _NLMSGHDR + _RTMSG:
                return True
            if self.protocol is not None and data[offset + _RTM_PROTOCOL] != self.protocol:
                return False
            if self.tables is not None:
                table = data[offset + _RTM_TABLE]
                if table == RT_TABLE_COMPAT:  # the real id (> 255) is in RTA_TABLE
                    table = _attr_u32(data, offset + _NLMSGHDR + _RTMSG, end, RTA_TABLE) or table
                return table in self.tables
            return True
        if msg_type in (C.RTM_NEWRULE, C.RTM_DELRULE):
            if self.protocol is None or length < _NLMSGHDR + _FIB_RULE_HDR:
                return True
            return (_attr_u8(data, offset + _NLMSGHDR + _FIB_RULE_HDR, end, FRA_PROTOCOL) or 0) == self.protocol
        if msg_type in (RTM_NEWNEXTHOP, RTM_DELNEXTHOP):
            if self.nexthop_ids is None or length < _NLMSGHDR + _NHMSG:
                return True
            nh_id = _attr_u32(data, offset + _NLMSGHDR + _NHMSG, end, NHA_ID)
            return nh_id is None or nh_id in self.nexthop_ids
        return True

    def bpf(self, portid: int) -> bytes:
        """The same filter for the kernel (a classic BPF socket filter), so that what it drops
        never wakes the reader nor fills its buffer. Messages addressed to PORTID (replies) pass.

        BPF cannot loop, so attributes are looked at only where the kernel puts them first
        (RTA_TABLE of routes, NHA_ID of nexthops); otherwise, and for rules, it lets the message
        through to `keep`.
        """
        p = bpf.Program()
        p.op(bpf.LD_W_ABS, 12)  # nlmsg_pid
        p.jump(bpf.JEQ, bpf.host32(portid), bpf.ACCEPT, None)
        p.op(bpf.LD_H_ABS, 4)  # nlmsg_type
        for t in (C.RTM_NEWROUTE, C.RTM_DELROUTE):
            p.jump(bpf.JEQ, bpf.host16(t), "route", None)
        for t in (RTM_NEWNEXTHOP, RTM_DELNEXTHOP):
            p.jump(bpf.JEQ, bpf.host16(t), "nexthop", None)
        p.goto(bpf.ACCEPT)

        first = _NLMSGHDR + _RTMSG  # the first attribute of a route
        p.label("route")
        p.op(bpf.LD_LEN)
        p.jump(bpf.JGE, first + 8, None, bpf.ACCEPT)
        if self.protocol is not None:
            p.op(bpf.LD_B_ABS, _RTM_PROTOCOL)
            p.jump(bpf.JEQ, self.protocol, None, bpf.DROP)
        if self.tables is not None:
            p.op(bpf.LD_B_ABS, _RTM_TABLE)
            p.jump(bpf.JEQ, RT_TABLE_COMPAT, "compat", None)
            p.jump_unless_in(self.tables, bpf.DROP, bpf.ACCEPT)
            p.label("compat")
            self._first_attr_u32(p, first, RTA_TABLE)
            p.jump_unless_in(self.tables, bpf.DROP, bpf.ACCEPT)
        p.goto(bpf.ACCEPT)

        p.label("nexthop")
        if self.nexthop_ids is not None:
            first = _NLMSGHDR + _NHMSG
            p.op(bpf.LD_LEN)
            p.jump(bpf.JGE, first + 8, None, bpf.ACCEPT)
            self._first_attr_u32(p, first, NHA_ID)
            p.jump_unless_in(self.nexthop_ids, bpf.DROP, bpf.ACCEPT)
        return p.assemble()

    @staticmethod
    def _first_attr_u32(p: bpf.Program, at: int, kind: int) -> None:
        # A = the value when the attribute at AT is a u32 of KIND; otherwise the message passes.
        p.op(bpf.LD_H_ABS, at + 2)
        p.jump(bpf.JEQ, bpf.host16(kind), None, bpf.ACCEPT)
        p.op(bpf.LD_H_ABS, at)
        p.jump(bpf.JEQ, bpf.host16(8), None, bpf.ACCEPT)
        p.load_u32_host(at + 4)


# -- decoding -------------------------------------------------------------------------------------

def _link(msg) -> Link:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
    carrier = msg.get_attr("IFLA_CARRIER")
    stats = msg.get_attr("IFLA_STATS64")
    return Link(index=msg["index"], name=msg.get_attr("IFLA_IFNAME"), kind=kind,
                up=bool(msg["flags"] & IFF_UP),
                carrier=bool(carrier) if carrier is not None else bool(msg["flags"] & 0x10000),
                mtu=msg.get_attr("IFLA_MTU") or 0,
                rx_bytes=stats["rx_bytes"] if stats is not None else None,
                tx_bytes=stats["tx_bytes"] if stats is not None else None)


def _address(msg) -> Address:
    # For IPv4 IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on point-to-point links.
    addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
    return Address(msg["index"], ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}"))


def _route(msg) -> Route:
    family = msg["family"]
    zero = "0.0.0.0" if family == socket.AF_INET else "::"
    type_ = _ROUTE_TYPE_NAMES.get(msg["type"], "unicast")
    nh_id = msg.get_attr("RTA_NH_ID")
    oif = msg.get_attr("RTA_OIF")
    gateway = msg.get_attr("RTA_GATEWAY")
    hops = tuple(
        Hop(nh["oif"], nh["hops"] + 1, _ip_or_none(nh.get_attr("RTA_GATEWAY")))
        for nh in msg.get_attr("RTA_MULTIPATH") or ()
    )
    if nh_id is not None or type_ != "unicast":
        oif, gateway, hops = None, None, ()  # expanded nexthop object / the kernel's `lo` for rejects
    return Route(
        family, msg.get_attr("RTA_TABLE") or msg["table"],
        ipaddress.ip_network(f"{msg.get_attr('RTA_DST') or zero}/{msg['dst_len']}"),
        type=type_, protocol=msg["proto"] or None, oif=oif, gateway=_ip_or_none(gateway),
        prefsrc=_ip_or_none(msg.get_attr("RTA_PREFSRC")), nh_id=nh_id, multipath=hops,
        priority=msg.get_attr("RTA_PRIORITY"),
    )


def _rule(msg) -> Rule:
    mark, mask = msg.get_attr("FRA_FWMARK"), msg.get_attr("FRA_FWMASK")
    if mark is None and mask is not None:
        mark = 0  # "fwmark 0/MASK": the kernel omits a zero mark but keeps the mask
    return Rule(msg["family"], msg.get_attr("FRA_PRIORITY") or 0, msg.get_attr("FRA_TABLE") or msg["table"],
                fwmark=mark, fwmask=mask, invert=bool(msg["flags"] & FIB_RULE_INVERT),
                protocol=msg.get_attr("FRA_PROTOCOL") or None,
                suppress_prefixlength=_suppress(msg.get_attr("FRA_SUPPRESS_PREFIXLEN")))


def _suppress(value) -> int | None:
    # The kernel stores "unset" as -1 (0xffffffff) and omits it from dumps; be lenient either way.
    return None if value is None or value == 0xFFFFFFFF else value


def _nexthop(msg) -> Nexthop:
    resilient = None
    if msg.get_attr("NHA_GROUP_TYPE") == NEXTHOP_GRP_TYPE_RES:
        res = msg.get_attr("NHA_RES_GROUP")
        resilient = Resilient(buckets=res.get_attr("NHA_RES_GROUP_BUCKETS"),
                              idle_timer=res.get_attr("NHA_RES_GROUP_IDLE_TIMER") / USER_HZ,
                              unbalanced_timer=res.get_attr("NHA_RES_GROUP_UNBALANCED_TIMER") / USER_HZ)
    return Nexthop(msg.get_attr("NHA_ID"), msg["family"], oif=msg.get_attr("NHA_OIF"),
                   gateway=_ip_or_none(msg.get_attr("NHA_GATEWAY")),
                   blackhole=bool(msg.get_attr("NHA_BLACKHOLE")), protocol=msg["protocol"] or None,
                   group=tuple(msg.get_attr("NHA_GROUP") or ()), resilient=resilient)


def _ip_or_none(value) -> IPAddress | None:
    return ipaddress.ip_address(value) if value else None


_DECODERS = {
    C.RTM_NEWLINK: ("new", _link), C.RTM_DELLINK: ("del", _link),
    C.RTM_NEWADDR: ("new", _address), C.RTM_DELADDR: ("del", _address),
    C.RTM_NEWROUTE: ("new", _route), C.RTM_DELROUTE: ("del", _route),
    C.RTM_NEWRULE: ("new", _rule), C.RTM_DELRULE: ("del", _rule),
    RTM_NEWNEXTHOP: ("new", _nexthop), RTM_DELNEXTHOP: ("del", _nexthop),
}


def decode_event(msg) -> RtnlEvent | None:
    """Turn one decoded rtnetlink notification into an RtnlEvent (None for types not handled)."""
    entry = _DECODERS.get(msg["header"]["type"])
    if entry is None:
        return None
    action, decode = entry
    return RtnlEvent(action, decode(msg))


# -- the API --------------------------------------------------------------------------------------

class Rtnl:
    """Typed rtnetlink operations over one NetlinkSocket. Every method may raise NetlinkError
    (with the kernel's reason) or NetlinkTimeout; deletes of missing objects are not errors."""

    def __init__(self, sock: NetlinkSocket) -> None:
        self.sock = sock

    # links

    async def links(self) -> list[Link]:
        """All links of the namespace."""
        return [_link(m) for m in await self.sock.dump(ifinfmsg(), C.RTM_GETLINK, what="dump links")]

    async def link(self, name_or_index: str | int) -> Link | None:
        """The link with that name (or index), or None when there is none."""
        msg = ifinfmsg()
        if isinstance(name_or_index, int):
            msg["index"] = name_or_index
        else:
            msg["attrs"] = [("IFLA_IFNAME", name_or_index)]
        try:
            replies = await self.sock.request(msg, C.RTM_GETLINK, NLM_F_REQUEST, what=f"get link {name_or_index}")
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return _link(replies[0])

    async def add_link(self, name: str, kind: str) -> Link:
        """Create link NAME of KIND (e.g. "wireguard", "bridge"); it starts down. Raises NetlinkError
        (EEXIST when the name is taken, EOPNOTSUPP when the kernel lacks the kind)."""
        msg = ifinfmsg()
        msg["attrs"] = [("IFLA_IFNAME", name), ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", kind)]})]
        await self.sock.request(msg, C.RTM_NEWLINK, _CREATE, what=f"add {kind} link {name}")
        link = await self.link(name)
        if link is None:  # deleted in between by someone else
            raise NetlinkError(errno.ENODEV, "link vanished right after creation", f"add {kind} link {name}")
        return link

    async def set_link(self, index: int, *, up: bool | None = None, mtu: int | None = None) -> None:
        """Set the administrative state and/or MTU of link INDEX (only what is given)."""
        msg = ifinfmsg()
        msg["index"] = index
        if up is not None:
            msg["flags"], msg["change"] = (IFF_UP if up else 0), IFF_UP
        if mtu is not None:
            msg["attrs"] = [("IFLA_MTU", mtu)]
        await self.sock.request(msg, C.RTM_NEWLINK, _ACK, what=f"set link {index}")

    async def delete_link(self, index_or_name: int | str) -> bool:
        """Delete a link; False when it did not exist."""
        msg = ifinfmsg()
        if isinstance(index_or_name, int):
            msg["index"] = index_or_name
        else:
            msg["attrs"] = [("IFLA_IFNAME", index_or_name)]
        return await self._delete(msg, C.RTM_DELLINK, f"delete link {index_or_name}", errno.ENODEV)

    # addresses

    async def addresses(self, index: int | None = None) -> list[Address]:
        """Addresses (IPv4 and IPv6) of link INDEX, or of all links: (index, ip_interface) pairs."""
        msg = ifaddrmsg()
        if index is not None:
            msg["index"] = index  # a kernel-side filter under strict checking; filtered again below
        found = [_address(m) for m in await self.sock.dump(msg, C.RTM_GETADDR, what="dump addresses")]
        return [a for a in found if index is None or a.index == index]

    async def add_address(self, index: int, interface: IPInterface) -> None:
        """Add (or refresh) an address on link INDEX. IPv6 addresses skip DAD, usable at once."""
        interface = ipaddress.ip_interface(interface)
        await self.sock.request(self._addr_msg(index, interface), C.RTM_NEWADDR, _REPLACE,
                                what=f"add address {interface} to link {index}")

    async def delete_address(self, index: int, interface: IPInterface) -> bool:
        """Remove an address from link INDEX; False when it was not there."""
        interface = ipaddress.ip_interface(interface)
        return await self._delete(self._addr_msg(index, interface), C.RTM_DELADDR,
                                  f"delete address {interface} from link {index}", errno.EADDRNOTAVAIL)

    @staticmethod
    def _addr_msg(index: int, interface: IPInterface):
        msg = ifaddrmsg()
        msg["family"] = _family_of(interface)
        msg["prefixlen"] = interface.network.prefixlen
        msg["index"] = index
        addr = str(interface.ip)
        msg["attrs"] = [("IFA_LOCAL", addr), ("IFA_ADDRESS", addr)]
        if interface.version == 6:
            msg["flags"] = IFA_F_NODAD
            msg["attrs"].append(("IFA_FLAGS", IFA_F_NODAD))
        return msg

    # routes

    async def routes(self, family: int, *, table: int | None = None, protocol: int | None = None) -> list[Route]:
        """Routes of FAMILY, optionally only those of TABLE and/or PROTOCOL (cached clones excluded)."""
        msg = rtmsg()
        msg["family"] = family
        if table is not None:
            msg["table"] = table if table < 256 else RT_TABLE_COMPAT
            msg["attrs"] = [("RTA_TABLE", table)]
        if protocol is not None:
            msg["proto"] = protocol
        try:
            found = await self.sock.dump(msg, C.RTM_GETROUTE, what=f"dump routes (family {family}, table {table})")
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:  # "FIB table does not exist" (some kernels, filtered dumps)
                return []
            raise
        routes = [_route(m) for m in found if not m["flags"] & 0x200]  # RTM_F_CLONED: cache entries
        return [r for r in routes if (table is None or r.table == table)
                and (protocol is None or (r.protocol or 0) == protocol)]

    async def add_route(self, route: Route) -> None:
        """Add ROUTE; NetlinkError EEXIST if a route with that key exists."""
        await self.sock.request(self._route_msg(route), C.RTM_NEWROUTE, _CREATE, what=f"add route {_describe(route)}")

    async def replace_route(self, route: Route) -> None:
        """Add ROUTE or replace the route with the same table, dst and priority."""
        await self.sock.request(self._route_msg(route), C.RTM_NEWROUTE, _REPLACE,
                                what=f"replace route {_describe(route)}")

    async def delete_route(self, route: Route) -> bool:
        """Delete the route with ROUTE's table, dst, type, protocol and priority (its paths are not
        compared; an IPv6 multipath route goes as a whole). False when there was none."""
        msg = rtmsg()
        msg["family"] = route.family
        msg["dst_len"] = route.dst.prefixlen
        msg["table"] = route.table if route.table < 256 else RT_TABLE_COMPAT
        msg["type"] = ROUTE_TYPES[route.type]
        msg["proto"] = route.protocol or 0
        msg["scope"] = RT_SCOPE_NOWHERE  # IPv4: "any scope"
        msg["attrs"] = [("RTA_TABLE", route.table), ("RTA_DST", str(route.dst.network_address))]
        if route.priority is not None:
            msg["attrs"].append(("RTA_PRIORITY", route.priority))
        return await self._delete(msg, C.RTM_DELROUTE, f"delete route {_describe(route)}", errno.ESRCH)

    @staticmethod
    def _route_msg(route: Route):
        msg = rtmsg()
        msg["family"] = route.family
        msg["dst_len"] = route.dst.prefixlen
        msg["table"] = route.table if route.table < 256 else RT_TABLE_COMPAT
        msg["proto"] = route.protocol or 0
        msg["type"] = ROUTE_TYPES[route.type]
        # `ip route add PREFIX dev X` semantics: a gateway-less single device route is on-link.
        direct = route.type == "unicast" and route.oif and not (route.gateway or route.nh_id or route.multipath)
        msg["scope"] = RT_SCOPE_LINK if direct else RT_SCOPE_UNIVERSE
        attrs = [("RTA_TABLE", route.table), ("RTA_DST", str(route.dst.network_address))]
        if route.priority is not None:
            attrs.append(("RTA_PRIORITY", route.priority))
        if route.prefsrc is not None:
            attrs.append(("RTA_PREFSRC", str(route.prefsrc)))
        if route.nh_id is not None:
            attrs.append(("RTA_NH_ID", route.nh_id))
        if route.oif is not None:
            attrs.append(("RTA_OIF", route.oif))
        if route.gateway is not None:
            attrs.append(("RTA_GATEWAY", str(route.gateway)))
        if route.multipath:
            attrs.append(("RTA_MULTIPATH", [
                {"oif": hop.oif, "hops": hop.weight - 1,  # rtnh_hops holds weight-1
                 "attrs": [("RTA_GATEWAY", str(hop.gateway))] if hop.gateway is not None else []}
                for hop in route.multipath]))
        msg["attrs"] = attrs
        return msg

    # rules

    async def rules(self, family: int) -> list[Rule]:
        """The policy rules of FAMILY (only table lookups are represented; other actions are skipped)."""
        msg = fibmsg()
        msg["family"] = family
        found = await self.sock.dump(msg, C.RTM_GETRULE, what=f"dump rules (family {family})")
        return [_rule(m) for m in found if m["action"] == FR_ACT_TO_TBL]

    async def add_rule(self, rule: Rule) -> None:
        """Add RULE; NetlinkError EEXIST if an identical one exists."""
        await self.sock.request(self._rule_msg(rule), C.RTM_NEWRULE, _CREATE, what=f"add rule {_describe_rule(rule)}")

    async def delete_rule(self, rule: Rule) -> bool:
        """Delete the rule matching RULE; False when there was none."""
        what = f"delete rule {_describe_rule(rule)}"
        return await self._delete(self._rule_msg(rule), C.RTM_DELRULE, what, errno.ENOENT)

    @staticmethod
    def _rule_msg(rule: Rule):
        msg = fibmsg()
        msg["family"] = rule.family
        msg["action"] = FR_ACT_TO_TBL
        msg["table"] = rule.table if rule.table < 256 else RT_TABLE_COMPAT
        msg["flags"] = FIB_RULE_INVERT if rule.invert else 0
        attrs = [("FRA_PRIORITY", rule.priority), ("FRA_TABLE", rule.table)]
        if rule.fwmark is not None:
            attrs.append(("FRA_FWMARK", rule.fwmark))
        if rule.fwmask is not None:
            attrs.append(("FRA_FWMASK", rule.fwmask))
        if rule.protocol is not None:
            attrs.append(("FRA_PROTOCOL", rule.protocol))
        if rule.suppress_prefixlength is not None:
            attrs.append(("FRA_SUPPRESS_PREFIXLEN", rule.suppress_prefixlength))
        msg["attrs"] = attrs
        return msg

    # nexthops

    async def nexthops(self) -> list[Nexthop]:
        """All nexthop objects (devices and groups) of the namespace."""
        found = await self.sock.dump(nhmsg(), RTM_GETNEXTHOP, what="dump nexthops")
        return [_nexthop(m) for m in found]

    async def add_nexthop(self, nh: Nexthop) -> None:
        """Create NH. Raises NetlinkError: EEXIST (id taken), ENETDOWN (device down / no carrier),
        EINVAL (e.g. a group member that does not exist)."""
        await self.sock.request(self._nexthop_msg(nh), RTM_NEWNEXTHOP, _CREATE, what=f"add nexthop {nh.id}")

    async def replace_nexthop(self, nh: Nexthop) -> None:
        """Create NH or replace the nexthop with its id in place (routes using it follow at once).

        A group's members and weights may change; its type and a resilient group's bucket count
        may not (NetlinkError EINVAL): delete and re-create for that.
        """
        await self.sock.request(self._nexthop_msg(nh), RTM_NEWNEXTHOP, _REPLACE, what=f"replace nexthop {nh.id}")

    async def delete_nexthop(self, nh_id: int) -> bool:
        """Delete nexthop NH_ID (a group also takes its routes with it); False when there was none."""
        msg = nhmsg()
        msg["attrs"] = [("NHA_ID", nh_id)]
        return await self._delete(msg, RTM_DELNEXTHOP, f"delete nexthop {nh_id}", errno.ENOENT)

    @staticmethod
    def _nexthop_msg(nh: Nexthop):
        msg = nhmsg()
        msg["family"] = nh.family
        msg["protocol"] = nh.protocol or 0
        attrs: list = [("NHA_ID", nh.id)]
        if nh.group:
            attrs.append(("NHA_GROUP", list(nh.group)))
            if nh.resilient is not None:
                res = nh.resilient
                attrs.append(("NHA_GROUP_TYPE", NEXTHOP_GRP_TYPE_RES))
                attrs.append(("NHA_RES_GROUP", {"attrs": [
                    ("NHA_RES_GROUP_BUCKETS", res.buckets),
                    ("NHA_RES_GROUP_IDLE_TIMER", round(res.idle_timer * USER_HZ)),
                    ("NHA_RES_GROUP_UNBALANCED_TIMER", round(res.unbalanced_timer * USER_HZ)),
                ]}))
            else:
                attrs.append(("NHA_GROUP_TYPE", NEXTHOP_GRP_TYPE_MPATH))
        elif nh.blackhole:
            attrs.append(("NHA_BLACKHOLE", True))
        else:
            if nh.oif is not None:
                attrs.append(("NHA_OIF", nh.oif))
            if nh.gateway is not None:
                attrs.append(("NHA_GATEWAY", str(nh.gateway)))
        msg["attrs"] = attrs
        return msg

    # shared

    async def _delete(self, msg, msg_type: int, what: str, missing: int) -> bool:
        try:
            await self.sock.request(msg, msg_type, _ACK, what=what)
        except NetlinkError as exc:
            if exc.errno in (missing, errno.ENOENT, errno.ESRCH, errno.ENODEV):
                return False
            raise
        return True


def _describe_rule(rule: Rule) -> str:
    mark = ""
    if rule.fwmark is not None:
        mark = f" {'not ' if rule.invert else ''}fwmark {rule.fwmark:#x}/{rule.fwmask:#x}"
    return f"{rule.priority}{mark} lookup {rule.table} (family {rule.family})"


def _describe(route: Route) -> str:
    return f"{route.dst} table {route.table}" + (f" metric {route.priority}" if route.priority is not None else "")


@asynccontextmanager
async def open_rtnl(netns: str | None = None) -> AsyncIterator[Rtnl]:
    """An `Rtnl` on a fresh NETLINK_ROUTE socket in NETNS (a name under /run/netns; None: ours).
    Raises NetnsNotFound when the namespace does not exist."""
    async with open_netlink(netns=netns) as sock:
        yield Rtnl(sock)


class RtnlEvents:
    """Async iterator of `RtnlEvent`s. Raises EventsOverflow when notifications were lost; it stays
    usable afterwards: re-read the state, then iterate again."""

    def __init__(self, sock: NetlinkSocket) -> None:
        self.sock = sock
        self._ready: list[RtnlEvent] = []

    def __aiter__(self) -> RtnlEvents:
        return self

    async def __anext__(self) -> RtnlEvent:
        while not self._ready:
            if self.sock.closed:
                raise StopAsyncIteration
            try:
                batch = await self.sock.receive_events()
            except EventsOverflow:
                self._ready.clear()
                raise
            self._ready = [e for e in map(_decode_or_none, batch) if e is not None][::-1]
        return self._ready.pop()


def _decode_or_none(msg) -> RtnlEvent | None:
    # A notification this code cannot represent is logged and skipped: it must not end the reader.
    try:
        return decode_event(msg)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("netlink notification type %s not understood (%s); skipped", msg["header"]["type"], e)
        return None


@asynccontextmanager
async def open_rtnl_events(netns: str | None = None, *, groups=EVENT_GROUPS, rcvbuf: int = 4 << 20,
                           filter: EventFilter | None = None) -> AsyncIterator[RtnlEvents]:
    """Subscribe to link, address, route, rule and nexthop notifications in NETNS.

    Open it before the initial dump so that nothing falls between the two. RCVBUF is generous
    because bursts (a link going down with many routes) overflow small buffers; an overflow is
    reported as EventsOverflow, never silently. FILTER drops, undecoded, the routes, rules and
    nexthops the caller does not care about (see `EventFilter`). Raises NetnsNotFound, NetlinkError.
    """
    async with open_netlink(netns=netns, groups=groups, rcvbuf=rcvbuf,
                            event_filter=filter.keep if filter is not None else None,
                            kernel_filter=filter.bpf if filter is not None else None) as sock:
        yield RtnlEvents(sock)
