"""Flow pinning with conntrack marks: nftables table `inet hatun` (name configurable).

A new flow follows the nexthop group. When its first packet leaves through a tunnel, postrouting
stores that tunnel's mark in the flow's conntrack entry; from then on the output (and, for
forwarded traffic, prerouting) hook copies it to every packet of the flow, and a policy rule per
tunnel sends marked packets to that tunnel's own table. So established flows stay on their tunnel
when the group changes (failback, a new tunnel, a weight change), and a drained tunnel keeps its
flows while taking no new ones. When a tunnel goes down its table is emptied: its flows fall through
to the group, land on another tunnel and get that tunnel's mark.

Only hatun's bits (`fwmark_mask`) are used: packets that already carry a mark, and flows whose
conntrack mark has other bits set, are left alone.

nftables is driven through its JSON interface (`nft -j -f -`), the supported programmatic API.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import trio

from hatun.childenv import child_environment

log = logging.getLogger("hatun.pinning")

NFT_TIMEOUT = 10.0
MAP = "tunnel_mark"
CHAINS = ("output", "prerouting", "postrouting", "snat")
TAG_PREFIX = "hatun-"  # every rule hatun writes carries a comment "hatun-<hash of the rules>"


class PinningError(Exception):
    """nftables could not be read or changed; the message has nft's own words."""


def _rules_json(table: str, mask: int, snat: bool = False) -> list[dict]:
    fam = "inet"
    not_mask = ~mask & 0xFFFFFFFF

    def restore(chain: str) -> dict:
        # A packet without a mark, of a flow pinned by hatun, gets the flow's tunnel mark.
        return {"rule": {"family": fam, "table": table, "chain": chain, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 0}},
            {"match": {"op": "!=", "left": {"&": [{"ct": {"key": "mark"}}, mask]}, "right": 0}},
            {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"&": [{"ct": {"key": "mark"}}, mask]}}},
        ]}}

    # Leaving through a tunnel: the flow is pinned to it (unless someone else uses its ct mark). With
    # masquerading, only its first packet pins it: the flow carries that tunnel's address for good,
    # so while that tunnel is out its packets are lost elsewhere, and it resumes when the tunnel returns
    # (re-pinned to another tunnel, it would stay broken there).
    first_only = [{"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, mask]}, "right": 0}}] if snat else []
    save = {"rule": {"family": fam, "table": table, "chain": "postrouting", "expr": [
        {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, not_mask]}, "right": 0}},
        *first_only,
        {"mangle": {"key": {"ct": {"key": "mark"}},
                    "value": {"map": {"key": {"meta": {"key": "oifname"}}, "data": f"@{MAP}"}}}},
    ]}}
    rules = [restore("output"), restore("prerouting"), save]
    if snat:
        # No shared source address: a new flow leaving through a tunnel (its conntrack mark, set just
        # before, says which) takes that tunnel's own address, the one its gateway accepts and routes
        # back (enrolled tunnels: the address the gateway handed out).
        rules.append({"rule": {"family": fam, "table": table, "chain": "snat", "expr": [
            {"match": {"op": "!=", "left": {"&": [{"ct": {"key": "mark"}}, mask]}, "right": 0}},
            {"masquerade": None},
        ]}})
    return rules


def _structure(table: str, mask: int, snat: bool = False) -> tuple[list[dict], str]:
    """The commands that (re)create table, map, chains and rules, and a tag naming this version."""
    fam = "inet"
    rules = _rules_json(table, mask, snat)
    tag = TAG_PREFIX + hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()[:12]
    chains = [
        ("output", "route", "output", -150),
        ("prerouting", "filter", "prerouting", -150),
        ("postrouting", "filter", "postrouting", -150),
    ] + ([("snat", "nat", "postrouting", 100)] if snat else [])
    cmds: list[dict] = [{"add": {"table": {"family": fam, "name": table}}},
                        {"add": {"map": {"family": fam, "table": table, "name": MAP, "type": "ifname", "map": "mark"}}}]
    for name, ctype, hook, prio in chains:
        cmds.append({"add": {"chain": {"family": fam, "table": table, "name": name, "type": ctype, "hook": hook,
                                       "prio": prio, "policy": "accept"}}})
        cmds.append({"flush": {"chain": {"family": fam, "table": table, "name": name}}})
    for r in rules:
        r["rule"]["comment"] = tag
        cmds.append({"add": r})
    return cmds, tag


class Pinning:
    """The nftables side of flow pinning. `apply(marks)` is idempotent; `read()` reads it back."""

    def __init__(self, table: str, mask: int, nft: str | None = None, *, snat: bool = False) -> None:
        self.table = table
        self.mask = mask
        self.snat = snat  # masquerade new flows to their tunnel's address (no shared source address)
        self.nft = nft or shutil.which("nft") or "nft"

    @staticmethod
    def available() -> bool:
        return shutil.which("nft") is not None

    async def _run(self, args: list[str], payload: dict | None = None) -> str:
        data = json.dumps(payload).encode() if payload is not None else None
        try:
            with trio.fail_after(NFT_TIMEOUT):
                # A minimal environment: ours may hold keys (private_key_env variables).
                res = await trio.run_process([self.nft, *args], stdin=data, capture_stdout=True,
                                             capture_stderr=True, check=False, env=child_environment())
        except trio.TooSlowError:
            raise PinningError(f"nft {' '.join(args)} took longer than {NFT_TIMEOUT:.0f} s") from None
        except FileNotFoundError:
            raise PinningError("nft not found: install nftables, or set routing.pin_flows = false") from None
        except OSError as e:
            raise PinningError(f"cannot run nft: {e.strerror or e}") from None
        if res.returncode != 0:
            msg = res.stderr.decode(errors="replace").strip().splitlines()
            raise PinningError(f"nft {' '.join(args[:2])}: {msg[0] if msg else 'exit ' + str(res.returncode)}")
        return res.stdout.decode(errors="replace")

    async def read(self) -> tuple[dict[str, int], str | None] | None:
        """(ifname -> mark, rules tag) as in the kernel, or None when the table does not exist."""
        try:
            out = await self._run(["-j", "list", "table", "inet", self.table])
        except PinningError as e:
            if "No such file" in str(e) or "does not exist" in str(e):
                return None
            raise
        marks: dict[str, int] = {}
        tags = set()
        foreign: list[str] = []  # objects hatun never makes: the table is someone else's
        try:
            for obj in json.loads(out).get("nftables", []):
                kind = next(iter(obj), None) if isinstance(obj, dict) else None
                body = obj.get(kind) if kind else None
                if kind in ("metainfo", "table"):
                    continue
                if kind == "map" and body.get("name") == MAP:
                    for key, value in body.get("elem", []):
                        marks[key] = value
                elif kind == "chain" and body.get("name") in CHAINS:
                    continue
                elif kind == "rule" and str(body.get("comment", "")).startswith(TAG_PREFIX):
                    tags.add(body.get("comment"))
                else:
                    name = body.get("name") or body.get("comment") if isinstance(body, dict) else None
                    foreign.append(f"{kind} {name}" if name else str(kind))
        except (ValueError, TypeError, AttributeError) as e:
            raise PinningError(f"nft list table inet {self.table}: unexpected output ({e})") from None
        if foreign:
            raise PinningError(
                f"nftables table inet {self.table} exists but was not made by hatun (it holds"
                f" {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}): hatun neither changes nor"
                " deletes it; set routing.nft_table to a name of hatun's own")
        tag = tags.pop() if len(tags) == 1 else None
        return marks, tag

    async def apply(self, marks: dict[str, int], current: tuple[dict[str, int], str | None] | None = None) -> bool:
        """Make the table hold the rules and exactly MARKS (ifname -> mark). Returns True when it
        changed anything. CURRENT is what `read()` returned, if the caller has it."""
        if current is None:
            current = await self.read()
        cmds: list[dict] = []
        _, tag = _structure(self.table, self.mask, self.snat)
        have_marks, have_tag = current if current is not None else ({}, None)
        if have_tag != tag:
            cmds, _ = _structure(self.table, self.mask, self.snat)
            if have_tag is not None and not self.snat:  # a snat chain of an earlier config must go
                cmds.insert(0, {"delete": {"table": {"family": "inet", "name": self.table}}})
                have_marks = {}
        stale = [[k, v] for k, v in have_marks.items() if marks.get(k) != v]
        new = [[k, v] for k, v in marks.items() if have_marks.get(k) != v]
        if stale:
            cmds.append({"delete": {"element": {"family": "inet", "table": self.table, "name": MAP, "elem": stale}}})
        if new:
            cmds.append({"add": {"element": {"family": "inet", "table": self.table, "name": MAP, "elem": new}}})
        if not cmds:
            return False
        await self._run(["-j", "-f", "-"], {"nftables": cmds})
        log.debug("nftables table inet %s updated (%d commands)", self.table, len(cmds))
        return True

    async def remove(self) -> bool:
        """Delete the table. Returns False when it was not there. Raises PinningError (and deletes
        nothing) when the table holds anything hatun does not make."""
        if await self.read() is None:
            return False
        await self._run(["-j", "-f", "-"], {"nftables": [{"delete": {"table": {"family": "inet", "name": self.table}}}]})
        return True
