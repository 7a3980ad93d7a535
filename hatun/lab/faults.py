"""The failure modes of `hatun lab fail` (pure): their syntax, and the nftables or iptables rules each
installs in the gateway's namespace. topology.py applies and removes them.

    blackhole   everything on the gateway's underlay link "ul" dropped, both ways (a dead path: silent)
    kill        the gateway's WireGuard peer killed
    oneway      only what the runner sends to the gateway dropped; the gateway's packets still leave
    loss:N      N % of the packets dropped at random on EACH direction of the link (a lossy link, N in
                (0, 100], up to two decimals): a probe's round trip is lost with probability
                1 - (1 - N/100)^2, so loss:30 loses 51 % of the round trips
    delay:D     the round trip of everything crossing the link grows by D, half on the way in and half
                on the way out (a longer link): delay:80ms or delay:0.08s, 1ms..10s, the unit required

The delay goes through an NFQUEUE rule and a userspace delay line (lab/delay.py): this kernel has no
netem, and its nftables no queue expression, but the xtables NFQUEUE target works through nft_compat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from hatun.durations import format_duration

SYNTAX = "blackhole, kill, oneway, loss:N (percent, e.g. loss:30) or delay:D (e.g. delay:80ms)"
TABLE = "hatunfail"  # nftables table (family inet) of the blackhole, oneway and loss faults
DELAY_QUEUE = 7  # NFQUEUE number of the delay fault; queues are per network namespace
MIN_DELAY, MAX_DELAY = 0.001, 10.0
_LOSS_RE = re.compile(r"^([0-9]{1,3})(?:\.([0-9]+))?$")
_DELAY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Fault:
    """One parsed failure mode. LOSS is in percent (each direction), DELAY in seconds (round trip)."""

    kind: str
    loss: Decimal | None = None
    delay: float | None = None

    def __str__(self) -> str:
        if self.kind == "loss":
            return f"loss:{self.loss}"
        if self.kind == "delay":
            return f"delay:{format_duration(self.delay)}"
        return self.kind

    @property
    def round_trip_loss(self) -> float:
        """The share of round trips lost when each direction drops LOSS percent."""
        return 1 - (1 - float(self.loss) / 100) ** 2


def parse_fault(text: str) -> Fault:
    """The Fault that TEXT names (see the module docstring). Raises ValueError naming the bad value
    and what is accepted."""
    kind, sep, arg = text.partition(":")
    if kind in ("blackhole", "kill", "oneway") and not sep:
        return Fault(kind)
    if kind == "loss" and sep:
        return Fault("loss", loss=_parse_loss(arg))
    if kind == "delay" and sep:
        return Fault("delay", delay=_parse_delay(arg))
    if kind in ("loss", "delay"):
        example = "loss:30" if kind == "loss" else "delay:80ms"
        raise ValueError(f"failure mode {text!r} needs a value, e.g. {example}")
    raise ValueError(f"unknown failure mode {text!r}: use {SYNTAX}")


def _parse_loss(arg: str) -> Decimal:
    m = _LOSS_RE.match(arg)
    if not m:
        raise ValueError(f"loss:{arg}: N must be a percentage, 0 < N <= 100 (e.g. loss:30 or loss:2.5)")
    if m.group(2) is not None and len(m.group(2)) > 2:
        raise ValueError(f"loss:{arg}: use at most two decimals (e.g. loss:2.25)")
    value = Decimal(arg)
    if not 0 < value <= 100:
        raise ValueError(f"loss:{arg}: N must be more than 0 and at most 100 (percent)")
    # A canonical spelling for the lab's state and messages: 30.0 -> 30, 2.50 -> 2.5.
    return Decimal(int(value)) if value == value.to_integral_value() else value.normalize()


def _parse_delay(arg: str) -> float:
    m = _DELAY_RE.match(arg)
    if not m:
        raise ValueError(f"delay:{arg}: expected a duration with a unit, {format_duration(MIN_DELAY)}.."
                         f"{format_duration(MAX_DELAY)} (e.g. delay:80ms or delay:0.08s)")
    if m.group(2) is None:
        raise ValueError(f"delay:{arg}: give a unit, e.g. delay:{arg}ms or delay:{arg}s")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not MIN_DELAY <= seconds <= MAX_DELAY:
        raise ValueError(f"delay:{arg}: out of range, use {format_duration(MIN_DELAY)}..{format_duration(MAX_DELAY)}")
    return seconds


def nft_ruleset(fault: Fault) -> str | None:
    """The nftables table that FAULT installs in the gateway's namespace (None: it needs none).
    Priority -300 (raw) runs before anything else of the gateway's, conntrack included."""
    if fault.kind == "blackhole":
        rules = {"in": "drop", "out": "drop"}
    elif fault.kind == "oneway":
        rules = {"in": "drop"}
    elif fault.kind == "loss":
        # numgen draws an integer: a decimal N scales the modulus (2.5 % = 25 of 1000).
        exponent = max(0, -fault.loss.as_tuple().exponent)
        scale = 10 ** exponent
        drop = f"numgen random mod {100 * scale} < {int(fault.loss * scale)} drop"
        rules = {"in": drop, "out": drop}
    else:
        return None
    chains = {"in": ("input", "iifname"), "out": ("output", "oifname")}
    lines = [f"table inet {TABLE} {{"]
    for chain, verdict in rules.items():
        hook, match = chains[chain]
        lines.append(f'  chain {chain} {{ type filter hook {hook} priority -300; {match} "ul" {verdict}; }}')
    return "\n".join(lines + ["}", ""])


# The delay fault's two rules (iptables -t mangle): packets coming in from the runner, and leaving for it.
DELAY_RULES = (
    ["PREROUTING", "-i", "ul", "-j", "NFQUEUE", "--queue-num", str(DELAY_QUEUE), "--queue-bypass"],
    ["POSTROUTING", "-o", "ul", "-j", "NFQUEUE", "--queue-num", str(DELAY_QUEUE), "--queue-bypass"],
)


def describe(fault: Fault, gw: str) -> str:
    """What `hatun lab fail` says it did."""
    if fault.kind == "blackhole":
        return f"{gw}: underlay blackholed (all packets dropped on its link)"
    if fault.kind == "kill":
        return f"{gw}: WireGuard peer killed"
    if fault.kind == "oneway":
        return f"{gw}: packets from the runner dropped on its underlay (its own packets still leave)"
    if fault.kind == "loss":
        return (f"{gw}: {fault.loss} % random loss on each direction of its underlay"
                f" (about {100 * fault.round_trip_loss:.0f} % of round trips lost)")
    return f"{gw}: round trip through its underlay {format_duration(fault.delay)} longer"
