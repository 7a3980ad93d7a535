"""Netlink message classes that pyroute2 (0.9) lacks, built on pyroute2's codecs.

- `nhmsg`: nexthop objects (RTM_NEWNEXTHOP / RTM_DELNEXTHOP / RTM_GETNEXTHOP), including resilient
  groups. Numbering follows the kernel's `include/uapi/linux/nexthop.h`.
- `rtmsg`: pyroute2's route message plus the attributes after RTA_EXPIRES, above all RTA_NH_ID.
- `nlmsgerr`: an error/ack message as the kernel sends it with NETLINK_CAP_ACK (the original request is
  not echoed, only its header), so that the extended-ack attributes decode.

Weights are given and returned as the real weight (1..256): the kernel's `nexthop_grp.weight` byte
holds weight-1, like `rtnexthop.rtnh_hops` in a classic multipath route.
"""

from __future__ import annotations

import struct

from pyroute2.netlink import NLA_F_NESTED, nla, nla_base_string, nlmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg as _pyroute2_rtmsg

RTM_NEWNEXTHOP = 104
RTM_DELNEXTHOP = 105
RTM_GETNEXTHOP = 106

RTNLGRP_NEXTHOP = 32

NEXTHOP_GRP_TYPE_MPATH = 0
NEXTHOP_GRP_TYPE_RES = 1

RTA_NH_ID = 30

# Resilient-group timers travel in clock_t units of USER_HZ, which is 100 on every Linux ABI.
USER_HZ = 100

MAX_WEIGHT = 256  # one byte holding weight-1 (the kernel's weight_high byte is left at 0)

_NEXTHOP_GRP = struct.Struct("=IBBH")  # struct nexthop_grp {u32 id; u8 weight; u8 weight_high; u16 resvd}


def _reset_compiled_nla(cls: type) -> type:
    """Give CLS its own attribute table.

    pyroute2 compiles `nla_map` lazily on the first instance and stores the result in name-mangled
    class attributes (`_nlmsg_base__compiled_nla`, ...). A subclass looks those up through the MRO,
    so once the parent has been instantiated the subclass would silently use the parent's table and
    decode its new attributes as UNKNOWN. Setting them on the subclass itself prevents that.
    """
    cls._nlmsg_base__compiled_nla = False
    cls._nlmsg_base__t_nla_map = None
    cls._nlmsg_base__r_nla_map = None
    return cls


class nexthop_group(nla_base_string):
    """NHA_GROUP: an array of `struct nexthop_grp`; the value is a list of (id, weight) pairs."""

    __slots__ = ()

    def encode(self):
        packed = bytearray()
        for nh_id, weight in self.value:
            if not 1 <= weight <= MAX_WEIGHT:
                raise ValueError(f"nexthop {nh_id}: weight {weight} is outside 1..{MAX_WEIGHT}")
            packed += _NEXTHOP_GRP.pack(nh_id, weight - 1, 0, 0)
        self["value"] = bytes(packed)
        nla_base_string.encode(self)

    def decode(self):
        nla_base_string.decode(self)
        raw = self["value"]
        entries = []
        for off in range(0, len(raw) - len(raw) % _NEXTHOP_GRP.size, _NEXTHOP_GRP.size):
            nh_id, low, high, _ = _NEXTHOP_GRP.unpack_from(raw, off)
            entries.append((nh_id, ((high << 8) | low) + 1))
        self.value = entries


@_reset_compiled_nla
class nhmsg(nlmsg):
    """struct nhmsg {u8 family; u8 scope; u8 protocol; u8 resvd; u32 flags} + NHA_* attributes."""

    __slots__ = ()

    prefix = "NHA_"
    fields = (
        ("family", "B"),
        ("scope", "B"),
        ("protocol", "B"),
        ("resvd", "B"),
        ("flags", "I"),
    )
    nla_map = (
        ("NHA_UNSPEC", "none"),
        ("NHA_ID", "uint32"),
        ("NHA_GROUP", "nexthop_group"),
        ("NHA_GROUP_TYPE", "uint16"),
        ("NHA_BLACKHOLE", "flag"),
        ("NHA_OIF", "uint32"),
        ("NHA_GATEWAY", "target"),
        ("NHA_ENCAP_TYPE", "uint16"),
        ("NHA_ENCAP", "hex"),
        ("NHA_GROUPS", "flag"),
        ("NHA_MASTER", "uint32"),
        ("NHA_FDB", "flag"),
        # The kernel rejects this nest without NLA_F_NESTED (its policy is strict here).
        ("NHA_RES_GROUP", "res_group", NLA_F_NESTED),
        ("NHA_RES_BUCKET", "res_bucket", NLA_F_NESTED),
        ("NHA_OP_FLAGS", "uint32"),
        ("NHA_GROUP_STATS", "hex"),
        ("NHA_HW_STATS_ENABLE", "uint32"),
        ("NHA_HW_STATS_USED", "uint32"),
    )

    nexthop_group = nexthop_group

    class res_group(nla):
        __slots__ = ()
        prefix = "NHA_RES_GROUP_"
        nla_map = (
            ("NHA_RES_GROUP_PAD", "none"),
            ("NHA_RES_GROUP_BUCKETS", "uint16"),
            ("NHA_RES_GROUP_IDLE_TIMER", "uint32"),  # clock_t
            ("NHA_RES_GROUP_UNBALANCED_TIMER", "uint32"),  # clock_t
            ("NHA_RES_GROUP_UNBALANCED_TIME", "uint64"),  # clock_t, read only
        )

    class res_bucket(nla):
        __slots__ = ()
        prefix = "NHA_RES_BUCKET_"
        nla_map = (
            ("NHA_RES_BUCKET_PAD", "none"),
            ("NHA_RES_BUCKET_INDEX", "uint16"),
            ("NHA_RES_BUCKET_IDLE_TIME", "uint64"),
            ("NHA_RES_BUCKET_NH_ID", "uint32"),
        )


@_reset_compiled_nla
class rtmsg(_pyroute2_rtmsg):
    """pyroute2's rtmsg with the attributes the kernel added after RTA_EXPIRES (RTA_NH_ID above all)."""

    __slots__ = ()

    nla_map = _pyroute2_rtmsg.nla_map + (
        ("RTA_PAD", "hex"),
        ("RTA_UID", "uint32"),
        ("RTA_TTL_PROPAGATE", "uint8"),
        ("RTA_IP_PROTO", "uint8"),
        ("RTA_SPORT", "be16"),
        ("RTA_DPORT", "be16"),
        ("RTA_NH_ID", "uint32"),
        ("RTA_FLOWLABEL", "be32"),
    )


# pyroute2 numbers attributes by position: RTA_NH_ID must land on 30.
assert [n for n, *_ in rtmsg.nla_map].index("RTA_NH_ID") == RTA_NH_ID


@_reset_compiled_nla
class nlmsgerr(nlmsg):
    """NLMSG_ERROR as sent to a socket with NETLINK_CAP_ACK: error, the request's header, then TLVs.

    pyroute2's own `nlmsgerr` starts the TLVs right after the error code, which only works when the
    request is echoed in full; with CAP_ACK only its 16-byte header is, so it is decoded as fields.
    """

    __slots__ = ()

    prefix = "NLMSGERR_ATTR_"
    fields = (
        ("error", "i"),
        ("orig_length", "I"),
        ("orig_type", "H"),
        ("orig_flags", "H"),
        ("orig_seq", "I"),
        ("orig_pid", "I"),
    )
    nla_map = (
        ("NLMSGERR_ATTR_UNUSED", "none"),
        ("NLMSGERR_ATTR_MSG", "asciiz"),
        ("NLMSGERR_ATTR_OFFS", "uint32"),
        ("NLMSGERR_ATTR_COOKIE", "hex"),
        ("NLMSGERR_ATTR_POLICY", "hex"),
        ("NLMSGERR_ATTR_MISS_TYPE", "uint32"),
        ("NLMSGERR_ATTR_MISS_NEST", "uint32"),
    )


@_reset_compiled_nla
class nlmsgdone(nlmsg):
    """NLMSG_DONE that ends a dump: an error code (0 or -errno) and, with NLM_F_ACK_TLVS, ext-ack TLVs."""

    __slots__ = ()

    prefix = "NLMSGERR_ATTR_"
    fields = (("error", "i"),)
    nla_map = nlmsgerr.nla_map
