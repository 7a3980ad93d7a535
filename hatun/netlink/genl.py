"""Generic netlink: resolve a family name (e.g. "wireguard") to its message type id."""

from __future__ import annotations

import errno

from pyroute2.netlink import CTRL_CMD_GETFAMILY, GENL_ID_CTRL, NLM_F_REQUEST, ctrlmsg

from hatun.netlink.core import NetlinkError, NetlinkSocket


class FamilyNotFound(NetlinkError):
    """The kernel has no generic netlink family of that name (module not loaded or not built)."""

    def __init__(self, family: str) -> None:
        super().__init__(errno.ENOENT, None, f"look up generic netlink family {family!r}")
        self.family = family

    def __str__(self) -> str:
        return f"the kernel has no generic netlink family {self.family!r} (module not loaded or not built in)"


async def resolve_family(sock: NetlinkSocket, name: str, *, timeout: float = 5.0) -> int:
    """Return the id of generic netlink family NAME, to use as message type on SOCK.

    SOCK must be a NETLINK_GENERIC socket (`open_netlink(NETLINK_GENERIC, netns=...)`); the answer
    holds for that socket's namespace. Raises FamilyNotFound when the kernel lacks the family,
    NetlinkError / NetlinkTimeout otherwise.
    """
    msg = ctrlmsg()
    msg["cmd"] = CTRL_CMD_GETFAMILY
    msg["version"] = 2
    msg["attrs"] = [("CTRL_ATTR_FAMILY_NAME", name)]
    what = f"look up generic netlink family {name!r}"
    try:
        (reply,) = await sock.request(msg, GENL_ID_CTRL, NLM_F_REQUEST, timeout=timeout, what=what)
    except NetlinkError as exc:
        if exc.errno == errno.ENOENT:
            raise FamilyNotFound(name) from None
        raise
    return reply.get_attr("CTRL_ATTR_FAMILY_ID")
