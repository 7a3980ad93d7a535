"""Netlink for hatun, driven by Trio; pyroute2 only encodes and decodes messages.

- `core`: `open_netlink` / `NetlinkSocket` (requests, dumps, events, other namespaces) and errors.
- `messages`: message classes pyroute2 lacks (nexthop objects, RTA_NH_ID, capped ext-ack errors).
- `rtnl`: typed links, addresses, routes, rules, nexthops; `open_rtnl`, `open_rtnl_events`.
- `genl`: generic netlink family lookup (`resolve_family`).
"""

from hatun.netlink.core import (
    EventsOverflow,
    NetlinkError,
    NetlinkSocket,
    NetlinkTimeout,
    open_netlink,
)
from hatun.netlink.genl import FamilyNotFound, resolve_family
from hatun.netns import NetnsNotFound
from hatun.netlink.rtnl import (
    Address,
    EventFilter,
    Hop,
    Link,
    Nexthop,
    Resilient,
    Route,
    Rtnl,
    RtnlEvent,
    RtnlEvents,
    Rule,
    open_rtnl,
    open_rtnl_events,
)

__all__ = [
    "Address", "EventFilter", "EventsOverflow", "FamilyNotFound", "Hop", "Link", "NetlinkError", "NetlinkSocket",
    "NetlinkTimeout", "NetnsNotFound", "Nexthop", "Resilient", "Route", "Rtnl", "RtnlEvent",
    "RtnlEvents", "Rule", "open_netlink", "open_rtnl", "open_rtnl_events", "resolve_family",
]
