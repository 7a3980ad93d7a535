"""The kernel backend: WireGuard devices of the Linux kernel module.

The device is an rtnetlink link of kind "wireguard" (created, addressed, brought up through
`hatun.netlink.rtnl` and `link.py`); its keys and peer are set through the "wireguard" generic
netlink family: `WG_CMD_SET_DEVICE` to change, `WG_CMD_GET_DEVICE` (a dump) to read. pyroute2's
`wgmsg` encodes and decodes; our Trio netlink socket carries the messages.

Like the userspace backend, `apply` sends only what differs (`diff_messages`), so applying the same
settings again sends nothing: no handshake reset (a private key write expires the session keys), no
socket rebind, no link flap. The kernel returns the device's PRIVATE key (and preshared keys) with
every read; the reply class here never decodes them, so they exist only in the raw datagram and
never in a decoded message, a `DeviceStatus`, a log line or an error.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import ipaddress
import logging
import socket
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import trio
from pyroute2.netlink import NETLINK_GENERIC, nla
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WG_GENL_NAME,
    WG_GENL_VERSION,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    wgmsg,
)

from hatun.keys import PublicKey, key_fingerprint
from hatun.netlink.core import NetlinkError, NetlinkSocket, NetlinkTimeout, open_netlink
from hatun.netlink.genl import FamilyNotFound, resolve_family
from hatun.netlink.rtnl import Rtnl
from hatun.netns import NetnsNotFound
from hatun.wireguard import USERSPACE_HINT, link
from hatun.wireguard.model import (
    BackendUnavailable,
    Changes,
    DeviceSettings,
    DeviceStatus,
    DeviceTimeout,
    IPNetwork,
    PeerStatus,
    WireGuardError,
)
from hatun.wireguard.diff import diff_device
from hatun.wireguard.model import check_ifname

log = logging.getLogger("hatun.wireguard")

KIND = "wireguard"  # the rtnetlink link kind
# An attribute's length is a u16, so one WGDEVICE_A_PEERS nest holds at most ~1600 IPv6 allowed IPs
# (40 bytes each); larger sets go in several messages, as wireguard-tools does.
ALLOWEDIPS_PER_MESSAGE = 512


# --- messages (pure) -----------------------------------------------------------------------------


def _own_nla_table(cls: type) -> type:
    # pyroute2 caches a class's compiled nla_map in name-mangled class attributes that subclasses
    # inherit: without this, a subclass created after its parent was used decodes with the
    # parent's table (the same trap as hatun/netlink/messages.py).
    cls._nlmsg_base__compiled_nla = False
    cls._nlmsg_base__t_nla_map = None
    cls._nlmsg_base__r_nla_map = None
    return cls


def _skip_secrets(nla_map: tuple, secrets: set[str], **renamed: str) -> tuple:
    return tuple((name, "none" if name in secrets else renamed.get(name, kind)) for name, kind in nla_map)


@_own_nla_table
class wgreply(wgmsg):
    """`wgmsg` for decoding replies: the private key decodes as None (pyroute2's "none") and a
    preshared key as its fingerprint, so no decoded object ever holds them."""

    nla_map = _skip_secrets(wgmsg.nla_map, {"WGDEVICE_A_PRIVATE_KEY"}, WGDEVICE_A_PEERS="*peer")

    @_own_nla_table
    class peer(wgmsg.wgdevice_peer):
        nla_map = _skip_secrets(wgmsg.wgdevice_peer.nla_map, set(), WGPEER_A_PRESHARED_KEY="psk_fingerprint")

        class psk_fingerprint(nla):
            """The preshared key, decoded straight into its fingerprint (None: no key)."""

            fields = (("key", "32s"),)

            def decode(self) -> None:
                nla.decode(self)
                raw, self["key"] = self["key"], b""
                self["value"] = key_fingerprint(raw) if any(raw) else None


def _message(cmd: int, ifname: str, attrs: Iterable = ()) -> wgmsg:
    msg = wgmsg()
    msg["cmd"] = cmd
    msg["version"] = WG_GENL_VERSION
    msg["attrs"] = [("WGDEVICE_A_IFNAME", ifname), *attrs]
    return msg


def get_message(ifname: str) -> wgmsg:
    """The WG_CMD_GET_DEVICE request for IFNAME (to be sent as a dump)."""
    return _message(WG_CMD_GET_DEVICE, ifname)


def _allowed_ips(networks: Sequence[IPNetwork]) -> list[dict]:
    return [{"attrs": [("WGALLOWEDIP_A_FAMILY", socket.AF_INET if n.version == 4 else socket.AF_INET6),
                       ("WGALLOWEDIP_A_IPADDR", n.network_address.packed),
                       ("WGALLOWEDIP_A_CIDR_MASK", n.prefixlen)]} for n in networks]


def diff_messages(wanted: DeviceSettings, current: DeviceStatus | None, *,
                  reset_peer: bool = False) -> tuple[list[wgmsg], set[str]]:
    """The WG_CMD_SET_DEVICE messages that make CURRENT match WANTED, and the names of what they
    change: `diff.diff_device`, encoded for the kernel (nothing differs: no message at all). Allowed
    IPs are replaced with WGPEER_F_REPLACE_ALLOWEDIPS; more than ALLOWEDIPS_PER_MESSAGE continue in
    further messages (without the flag). The kernel handles a message's peers in order, so a peer
    removed and added again in one message (RESET_PEER) is never missing."""
    d = diff_device(wanted, current, reset_peer=reset_peer)
    device: list = []
    if d.private_key is not None:
        device.append(("WGDEVICE_A_PRIVATE_KEY", d.private_key.base64))  # pyroute2 wants base64
    if d.listen_port is not None:
        device.append(("WGDEVICE_A_LISTEN_PORT", d.listen_port))
    if d.fwmark is not None:
        device.append(("WGDEVICE_A_FWMARK", d.fwmark))
    peers: list[dict] = [{"attrs": [("WGPEER_A_PUBLIC_KEY", key.base64), ("WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME)]}
                         for key in d.remove_peers]
    chunks: list[list[IPNetwork]] = []
    if d.peer is not None:
        attrs: list = [("WGPEER_A_PUBLIC_KEY", d.peer.base64)]
        if d.endpoint is not None:
            addr = str(ipaddress.ip_address(d.endpoint[0]))  # pyroute2 picks the family by a ':'
            attrs.append(("WGPEER_A_ENDPOINT", {"addr": addr, "port": d.endpoint[1]}))
        if d.keepalive is not None:
            attrs.append(("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", d.keepalive))
        if d.preshared_key is not None:
            attrs.append(("WGPEER_A_PRESHARED_KEY", d.preshared_key.base64))
        if d.allowed_ips is not None:
            ips = list(d.allowed_ips)
            chunks = [ips[i:i + ALLOWEDIPS_PER_MESSAGE] for i in range(0, len(ips), ALLOWEDIPS_PER_MESSAGE)]
            attrs.append(("WGPEER_A_FLAGS", WGPEER_F_REPLACE_ALLOWEDIPS))
            if chunks:
                attrs.append(("WGPEER_A_ALLOWEDIPS", _allowed_ips(chunks[0])))
        peers.append({"attrs": attrs})
    if peers:
        device.append(("WGDEVICE_A_PEERS", peers))
    ifname = wanted.ifname
    messages = [_message(WG_CMD_SET_DEVICE, ifname, device)] if device else []
    for chunk in chunks[1:]:
        peer = [("WGPEER_A_PUBLIC_KEY", d.peer.base64), ("WGPEER_A_ALLOWEDIPS", _allowed_ips(chunk))]
        messages.append(_message(WG_CMD_SET_DEVICE, ifname, [("WGDEVICE_A_PEERS", [{"attrs": peer}])]))
    return messages, set(d.changed)


def parse_device(ifname: str, replies: Sequence) -> DeviceStatus:
    """Merge the messages of a WG_CMD_GET_DEVICE dump (decoded as `wgreply`) into a DeviceStatus.

    The kernel puts the device's attributes in the first message and continues in further ones
    when the peers do not fit; a peer whose allowed IPs do not fit is repeated there (public key and
    the remaining allowed IPs only). The private key is not read (the device's public key is the
    kernel's own), a preshared key only as its fingerprint. A last handshake of 0 (never) becomes None.
    """
    public_key: PublicKey | None = None
    listen_port = fwmark = 0
    peers: dict[PublicKey, dict] = {}  # insertion-ordered, as the kernel lists them
    for msg in replies:
        if (raw := msg.get_attr("WGDEVICE_A_PUBLIC_KEY")) is not None:
            public_key = PublicKey(base64.b64decode(raw))
        listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT", listen_port)
        fwmark = msg.get_attr("WGDEVICE_A_FWMARK", fwmark)
        for p in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = PublicKey(base64.b64decode(p.get_attr("WGPEER_A_PUBLIC_KEY")))
            peer = peers.setdefault(key, dict(public_key=key, endpoint=None, keepalive=0, allowed_ips=[],
                                              rx_bytes=0, tx_bytes=0, last_handshake=None,
                                              preshared_key_fingerprint=None))
            if (ep := p.get_attr("WGPEER_A_ENDPOINT")) is not None:
                peer["endpoint"] = (str(ipaddress.ip_address(ep["addr"])), ep["port"])
            peer["keepalive"] = p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", peer["keepalive"])
            peer["rx_bytes"] = p.get_attr("WGPEER_A_RX_BYTES", peer["rx_bytes"])
            peer["tx_bytes"] = p.get_attr("WGPEER_A_TX_BYTES", peer["tx_bytes"])
            if (hs := p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")) is not None:
                sec, nsec = hs["tv_sec"], hs["tv_nsec"]
                peer["last_handshake"] = sec + nsec / 1e9 if sec or nsec else None
            if (fp := p.get_attr("WGPEER_A_PRESHARED_KEY")) is not None:
                peer["preshared_key_fingerprint"] = fp
            peer["allowed_ips"] += [ipaddress.ip_network(a["addr"], strict=False)
                                    for a in p.get_attr("WGPEER_A_ALLOWEDIPS") or () if "addr" in a]
    return DeviceStatus(ifname=ifname, public_key=public_key, listen_port=listen_port, fwmark=fwmark,
                        peers=tuple(PeerStatus(**dict(p, allowed_ips=tuple(p["allowed_ips"]))) for p in peers.values()))


# --- the backend ---------------------------------------------------------------------------------


class KernelBackend:
    """Kernel WireGuard devices in one network namespace. Implements `Backend`.

    Make one with `open_kernel_backend`. `genl` is a NETLINK_GENERIC socket (or anything with its
    `request` / `dump` / `message_classes`), `family` the id of the "wireguard" family on it.
    Nothing runs in the background: a device deleted behind our back is made again by the next
    `apply` (the supervisor calls it on link deletion), with a new `generation`.
    """

    name = "kernel"

    def __init__(self, genl: NetlinkSocket, family: int, rtnl: Rtnl) -> None:
        self._genl = genl
        self._family = family
        self._rtnl = rtnl
        genl.message_classes[family] = wgreply
        self._generations: dict[str, int] = {}
        self._locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)  # per device: one change at a time

    async def apply(self, settings: DeviceSettings) -> Changes:
        """Create IFNAME if missing and make it match SETTINGS, sending only what differs: the
        WireGuard settings, then addresses, MTU and link up. Returns what changed (see `Changes`).

        Raises WireGuardError when the kernel refuses (the message names the device, the settings
        sent and the kernel's reason, never a key) or when IFNAME exists but is not a WireGuard device.
        """
        ifname = settings.ifname
        check_ifname(ifname)
        async with self._locks[ifname]:
            created = await self._ensure_link(ifname)
            changed = await self._configure(settings)
        if created or changed:
            log.info("%s: %s%s", ifname, "created; " if created else "", "set " + ", ".join(sorted(changed)))
        return Changes(created=created, changed=changed)

    async def reset_peer(self, settings: DeviceSettings) -> None:
        """Drop the peer's session and configure it afresh, so that the next packet starts a new
        handshake at once (instead of WireGuard's own retry after 15 s without replies, e.g. when
        the gateway restarted and lost the session). A missing device is left missing.

        Raises WireGuardError as `apply`.
        """
        ifname = settings.ifname
        check_ifname(ifname)
        async with self._locks[ifname]:
            if await self._exists(ifname):
                await self._configure(settings, reset_peer=True)
                log.info("%s: peer session reset", ifname)

    async def get(self, ifname: str, *, with_link: bool = True, timeout: float | None = None) -> DeviceStatus | None:
        """IFNAME's configuration, counters and link state (never its private key); None if missing.
        WITH_LINK=False skips the link state (index, addresses, MTU): counters only, cheaper.
        TIMEOUT: seconds for the kernel's answer to the WireGuard read (None: the socket's default).

        Raises DeviceTimeout when the kernel does not answer in time, WireGuardError when IFNAME is
        not a WireGuard device or cannot be read.
        """
        check_ifname(ifname)
        status = await self._read(ifname, timeout)
        if status is None or not with_link:
            return status
        state = await link.link_state(self._rtnl, ifname)
        if state is None:  # deleted in between
            return None
        return dataclasses.replace(status, ifindex=state.ifindex, addresses=state.addresses, mtu=state.mtu,
                                   up=state.up)

    async def list(self) -> list[str]:
        """Names of the namespace's WireGuard links (the kernel has no "list devices" command).

        Raises WireGuardError when the links cannot be read.
        """
        try:
            links = await self._rtnl.links()
        except link.NETLINK_FAILURES as exc:
            raise WireGuardError(f"cannot list links: {link.describe(exc)}") from exc
        return sorted(ln.name for ln in links if ln.kind == KIND)

    async def delete(self, ifname: str) -> None:
        """Delete device IFNAME; a missing device is not an error.

        Raises WireGuardError when IFNAME is not a WireGuard device (left alone) or the kernel refuses.
        """
        check_ifname(ifname)
        async with self._locks[ifname]:
            if await self._exists(ifname) and await link.delete_link(self._rtnl, ifname):
                log.info("%s: deleted", ifname)
            self._generations.pop(ifname, None)

    def generation(self, ifname: str) -> int:
        """How many times this backend has created IFNAME (0: never, or only adopted)."""
        return self._generations.get(ifname, 0)

    async def set_peer(self, ifname: str, key: PublicKey, allowed_ips: Sequence[IPNetwork] = (), *,
                       remove: bool = False) -> None:
        """Add (or update) peer KEY of a device that has several, with exactly ALLOWED_IPS, or REMOVE
        it; the device's other peers are not touched (a gateway's device, not one of hatun's own).
        Raises WireGuardError as `apply`."""
        check_ifname(ifname)
        attrs: list = [("WGPEER_A_PUBLIC_KEY", key.base64)]
        if remove:
            attrs.append(("WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME))
        else:
            attrs += [("WGPEER_A_FLAGS", WGPEER_F_REPLACE_ALLOWEDIPS), ("WGPEER_A_ALLOWEDIPS", _allowed_ips(allowed_ips))]
        msg = _message(WG_CMD_SET_DEVICE, ifname, [("WGDEVICE_A_PEERS", [{"attrs": attrs}])])
        what = f"{ifname}: {'remove' if remove else 'set'} peer {key.base64}"
        async with self._locks[ifname]:
            await self._send(msg, what)

    async def _send(self, msg: wgmsg, what: str) -> None:
        """One WG_CMD_SET_DEVICE request; the kernel's refusal as WireGuardError (DeviceTimeout)."""
        try:
            await self._genl.request(msg, self._family, what=what)
        except NetlinkTimeout as exc:
            raise DeviceTimeout(str(exc)) from exc
        except link.NETLINK_FAILURES as exc:
            raise WireGuardError(str(exc) if isinstance(exc, NetlinkError) else f"{what}: {link.describe(exc)}") from exc

    def pid(self, ifname: str) -> int | None:
        """Always None: no process runs a kernel device (for symmetry with the userspace backend)."""
        return None

    # --- helpers ---

    async def _configure(self, settings: DeviceSettings, *, reset_peer: bool = False) -> set[str]:
        ifname = settings.ifname
        messages, changed = diff_messages(settings, await self._read(ifname), reset_peer=reset_peer)
        what = f"{ifname}: set WireGuard {', '.join(sorted(changed))}"
        for msg in messages:
            await self._send(msg, what)
        # After the WireGuard part, so that the device has its key and peer when it comes up.
        return changed | await link.configure_link(self._rtnl, ifname, addresses=settings.addresses,
                                                   mtu=settings.mtu, up=True)

    async def _exists(self, ifname: str) -> bool:
        """True when IFNAME is a WireGuard link (ours, or left by an earlier hatun: adopted), False when
        there is none; WireGuardError for a link of another kind (a name clash: never touch it)."""
        try:
            found = await self._rtnl.link(ifname)
        except link.NETLINK_FAILURES as exc:
            raise WireGuardError(f"{ifname}: cannot read the device: {link.describe(exc)}") from exc
        if found is None:
            return False
        if found.kind != KIND:
            raise WireGuardError(f"{ifname} exists but is not a WireGuard device (kind {found.kind or 'none'}):"
                                 " leaving it alone; use another interface name")
        return True

    async def _ensure_link(self, ifname: str) -> bool:
        if await self._exists(ifname):
            return False
        try:
            await self._rtnl.add_link(ifname, KIND)
        except link.NETLINK_FAILURES as exc:
            raise WireGuardError(f"{ifname}: cannot create the WireGuard device: {link.describe(exc)}") from exc
        self._generations[ifname] = self._generations.get(ifname, 0) + 1
        return True

    async def _read(self, ifname: str, timeout: float | None = None) -> DeviceStatus | None:
        """The WireGuard half of IFNAME's state, or None when there is no such device."""
        what = f"{ifname}: read WireGuard device"
        try:
            replies = await self._genl.dump(get_message(ifname), self._family, what=what,
                                            **({} if timeout is None else {"timeout": timeout}))
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return None
            if exc.errno == errno.EOPNOTSUPP:
                raise WireGuardError(f"{ifname} exists but is not a WireGuard device") from exc
            raise WireGuardError(str(exc)) from exc
        except NetlinkTimeout as exc:
            raise DeviceTimeout(str(exc)) from exc
        except OSError as exc:  # from the socket itself (ENOBUFS...)
            raise WireGuardError(f"{what}: {link.describe(exc)}") from exc
        return parse_device(ifname, replies)


@asynccontextmanager
async def open_kernel_backend(*, rtnl: Rtnl | None = None, netns: str | None = None) -> AsyncIterator[KernelBackend]:
    """A KernelBackend on its own generic netlink socket, closed on exit (devices stay: crash-only).

    Args:
        rtnl: an rtnetlink socket from `hatun.netlink.rtnl.open_rtnl` (opened here when None).
        netns: network namespace (name under /run/netns, or a path) of the devices; None: ours.

    Raises BackendUnavailable when the kernel has no "wireguard" generic netlink family (asking
    for it makes the kernel load the module if it can), NetnsNotFound, WireGuardError when netlink
    itself fails.
    """
    async with AsyncExitStack() as stack:
        try:
            genl = await stack.enter_async_context(open_netlink(NETLINK_GENERIC, netns=netns))
        except NetnsNotFound:
            raise
        except OSError as exc:  # EMFILE, ENOBUFS...
            raise WireGuardError(f"cannot open a generic netlink socket: {exc.strerror or exc}") from None
        try:
            family = await resolve_family(genl, WG_GENL_NAME)
        except FamilyNotFound:
            where = f" (network namespace {netns})" if netns else ""
            raise BackendUnavailable(
                f"this kernel has no WireGuard{where}: the generic netlink family \"wireguard\" does not exist"
                f" (module not built, not installed or cannot be loaded); use a kernel with WireGuard, or"
                f" backend \"userspace\" and {USERSPACE_HINT}") from None
        except link.NETLINK_FAILURES as exc:
            raise WireGuardError(f"cannot look up the WireGuard generic netlink family: {link.describe(exc)}") from exc
        if rtnl is None:
            rtnl = await link.enter_rtnl(stack, netns)
        yield KernelBackend(genl, family, rtnl)
