"""Pure tests of the message classes and the typed values: no kernel needed."""

import ipaddress
import socket
import struct

import pytest
from pyroute2.netlink import NLA_F_NESTED
from pyroute2.netlink.rtnl.rtmsg import rtmsg as pyroute2_rtmsg

from hatun.netlink import Hop, Nexthop, Resilient, Route, Rule
from hatun.netlink.core import NetlinkError
from hatun.netlink.messages import RTA_NH_ID, nhmsg, nlmsgerr, rtmsg


def test_nexthop_group_weights_travel_as_weight_minus_one():
    msg = nhmsg()
    msg["attrs"] = [("NHA_ID", 7), ("NHA_GROUP", [(1, 1), (2, 256), (3, 17)])]
    msg.encode()
    raw = bytes(msg.data)
    # The NHA_GROUP payload: three struct nexthop_grp {u32 id; u8 weight-1; u8 weight_high; u16}.
    assert struct.pack("=IBBH", 2, 255, 0, 0) in raw
    back = nhmsg(raw)
    back.decode()
    assert back.get_attr("NHA_GROUP") == [(1, 1), (2, 256), (3, 17)]


@pytest.mark.parametrize("weight", [0, 257])
def test_nexthop_group_weight_out_of_range_is_refused(weight):
    msg = nhmsg()
    msg["attrs"] = [("NHA_ID", 7), ("NHA_GROUP", [(1, weight)])]
    with pytest.raises(ValueError, match="outside 1..256"):
        msg.encode()


def test_resilient_group_attribute_is_marked_nested():
    msg = nhmsg()
    msg["attrs"] = [("NHA_ID", 9), ("NHA_RES_GROUP", {"attrs": [("NHA_RES_GROUP_BUCKETS", 32),
                                                               ("NHA_RES_GROUP_IDLE_TIMER", 250)]})]
    msg.encode()
    raw = bytes(msg.data)
    # header 16 + nhmsg 8 + NHA_ID 8, then the nest's header: type 12 with NLA_F_NESTED.
    (nla_type,) = struct.unpack_from("=H", raw, 16 + 8 + 8 + 2)
    assert nla_type == 12 | NLA_F_NESTED
    back = nhmsg(raw)
    back.decode()
    res = back.get_attr("NHA_RES_GROUP")
    assert (res.get_attr("NHA_RES_GROUP_BUCKETS"), res.get_attr("NHA_RES_GROUP_IDLE_TIMER")) == (32, 250)


def test_route_nh_id_decodes_even_after_pyroute2s_rtmsg_compiled_its_table():
    pyroute2_rtmsg()  # the parent compiles its attribute table first: the subclass must not inherit it
    msg = rtmsg()
    msg["family"] = socket.AF_INET
    msg["attrs"] = [("RTA_TABLE", 51820), ("RTA_NH_ID", 518201000)]
    msg.encode()
    (nla_type,) = struct.unpack_from("=H", bytes(msg.data), 16 + 12 + 8 + 2)
    assert nla_type == RTA_NH_ID
    back = rtmsg(bytes(msg.data))
    back.decode()
    assert back.get_attr("RTA_NH_ID") == 518201000


def test_capped_error_message_carries_the_kernels_text():
    text = b"Nexthop device is not up\0"
    tlv = struct.pack("=HH", 4 + len(text), 1) + text + b"\0" * (-len(text) % 4)
    body = struct.pack("=i", -100) + struct.pack("=IHHII", 40, 104, 0x605, 9, 0) + tlv
    raw = struct.pack("=IHHII", 16 + len(body), 2, 0x300, 9, 4242) + body
    msg = nlmsgerr(raw)
    msg.decode()
    assert (msg["error"], msg["orig_type"]) == (-100, 104)
    assert msg.get_attr("NLMSGERR_ATTR_MSG") == "Nexthop device is not up"


def test_netlink_error_reads_well():
    err = NetlinkError(100, "Nexthop device is not up", "add nexthop 518200004")
    assert str(err) == "add nexthop 518200004: Network is down (Nexthop device is not up)"
    assert err.errno == 100 and isinstance(err, OSError)
    assert str(NetlinkError(17, None, "add route")) == "add route: File exists"


def test_values_normalise_so_that_read_back_compares_equal():
    route = Route(socket.AF_INET, 51820, "198.18.0.0/24", protocol=147, multipath=[(3, 2), (4, 5, None)])
    assert route.multipath == (Hop(3, 2), Hop(4, 5))
    assert route.dst == ipaddress.ip_network("198.18.0.0/24")
    assert Rule(socket.AF_INET, 5200, 51821, fwmark=0x20000).fwmask == 0xFFFFFFFF
    assert Nexthop(1000, 0, group=[[1, 2]], resilient=Resilient()).group == ((1, 2),)


@pytest.mark.parametrize("make, message", [
    (lambda: Route(socket.AF_INET6, 1, "198.18.0.0/24"), "address family"),
    (lambda: Route(socket.AF_INET, 1, "198.18.0.0/24", multipath=[(3, 300)]), "outside 1..256"),
    (lambda: Route(socket.AF_INET, 1, "198.18.0.0/24", type="bogus"), "unknown type"),
    (lambda: Nexthop(1000, socket.AF_INET, group=[(1, 1)]), "AF_UNSPEC"),
    (lambda: Nexthop(1000, 0, resilient=Resilient()), "no group members"),
])
def test_invalid_values_are_refused_with_a_precise_message(make, message):
    with pytest.raises(ValueError, match=message):
        make()
