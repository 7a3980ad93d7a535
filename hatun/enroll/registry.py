"""Enrolled peers, their addresses from the pool, their expiry, and the token ids already used.

Pure bookkeeping (no I/O but `load`/`save` of the state file): the service decides with it, then
applies to the WireGuard device. The state file is written atomically (mode 0600) after every change
and read at start; whatever in it is malformed is skipped and reported, never trusted.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from hatun.keys import InvalidKey, PublicKey

log = logging.getLogger("hatun.enroll")

STATE_VERSION = 1
MAX_STATE = 16 * 1024 * 1024


class PoolFull(Exception):
    """No address left in the pool."""


@dataclass(frozen=True)
class Peer:
    public_key: str  # base64
    address: str  # the tunnel address handed out (no prefix)
    expires: float  # wall clock, seconds since the epoch
    repository: str
    run_id: str
    actor: str = ""
    owner: str = ""  # who may renew or withdraw it: the job (sub, run id, attempt), see service.owner_of


@dataclass
class Registry:
    """Peers by public key, and used token ids (jti -> when they can be forgotten)."""

    hosts: list  # the pool's addresses that may be handed out, in order
    peers: dict[str, Peer] = field(default_factory=dict)
    used_jtis: dict[str, float] = field(default_factory=dict)

    def address_for(self, public_key: str, foreign: tuple = ()) -> str:
        """The address of PUBLIC_KEY's peer if enrolled, else the first free one outside FOREIGN (the
        networks of the device's other peers, never taken over). Raises PoolFull."""
        if public_key in self.peers:
            return self.peers[public_key].address
        taken = {p.address for p in self.peers.values()}
        for host in self.hosts:
            if str(host) not in taken and not any(host in net for net in foreign if net.version == host.version):
                return str(host)
        raise PoolFull("the address pool is full")

    def use_jti(self, jti: str, until: float, now: float) -> bool:
        """Remember JTI until UNTIL; False when it was used before (a replay)."""
        self.forget_jtis(now)
        if jti in self.used_jtis:
            return False
        self.used_jtis[jti] = until
        return True

    def forget_jtis(self, now: float) -> None:
        for jti in [j for j, until in self.used_jtis.items() if until < now]:
            del self.used_jtis[jti]

    def expired(self, now: float) -> list[Peer]:
        return [p for p in self.peers.values() if p.expires <= now]

    # --- the state file ---

    def save(self, path: str) -> None:
        doc = {"version": STATE_VERSION, "peers": [asdict(p) for p in self.peers.values()],
               "used_jtis": self.used_jtis}
        tmp = f"{path}.tmp"
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, path: str, now: float | None = None, max_ttl: float = 7 * 86400.0) -> list[str]:
        """Read the peers and used token ids of PATH (missing: none). Returns what was skipped and why;
        a peer expiring later than MAX_TTL from NOW is not believed."""
        now = time.time() if now is None else now
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_STATE + 1)
        except FileNotFoundError:
            return []
        if len(data) > MAX_STATE:
            return [f"{path}: larger than {MAX_STATE} bytes, ignored"]
        try:
            doc = json.loads(data)
        except ValueError:
            return [f"{path}: not JSON, ignored"]
        if not isinstance(doc, dict) or type(doc.get("version")) is not int or doc["version"] != STATE_VERSION:
            return [f"{path}: not a state file of this version, ignored"]
        peers = doc.get("peers", [])
        if not isinstance(peers, list):
            return [f"{path}: peers is not a list, ignored"]
        skipped = []
        allowed = {str(h) for h in self.hosts}
        for i, entry in enumerate(peers[:100000]):
            try:
                peer = _peer(entry)
            except (TypeError, ValueError, InvalidKey) as e:
                skipped.append(f"peers[{i}]: {e}")
                continue
            if peer.expires > now + max_ttl:
                skipped.append(f"peers[{i}]: expires later than max_ttl allows")
            elif peer.address not in allowed:
                skipped.append(f"peers[{i}]: address {peer.address} is not in the pool")
            elif any(p.address == peer.address for p in self.peers.values()):
                skipped.append(f"peers[{i}]: address {peer.address} given twice")
            else:
                self.peers[peer.public_key] = peer
        jtis = doc.get("used_jtis")
        if isinstance(jtis, dict):
            self.used_jtis = {str(k)[:512]: float(v) for k, v in list(jtis.items())[:100000]
                              if isinstance(v, (int, float)) and not isinstance(v, bool) and now < v < now + 86400}
        return skipped


def _peer(entry: Any) -> Peer:
    if not isinstance(entry, dict):
        raise TypeError("not an object")
    key = PublicKey.from_base64(str(entry.get("public_key", ""))).base64
    address = str(ipaddress.ip_address(str(entry.get("address", ""))))
    expires = entry.get("expires")
    if not isinstance(expires, (int, float)) or isinstance(expires, bool) or not math.isfinite(expires):
        raise ValueError("no expiry")
    strings = {k: str(entry.get(k, ""))[:500] for k in ("repository", "run_id", "actor", "owner")}
    return Peer(key, address, float(expires), **strings)
