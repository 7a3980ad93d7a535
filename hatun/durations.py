"""Durations in config files: "250ms", "2s", "1.5m", "1h", or a plain number of seconds."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)\s*$")


def parse_duration(value: object) -> float:
    """Seconds from a duration given as a number or a string with a unit.

    Raises ValueError with a message that says what is accepted.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"250ms\", \"2s\", \"1m\" or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _RE.match(value)
        if not m:
            raise ValueError("expected a duration such as \"250ms\", \"2s\", \"1m\" or a number of seconds")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as \"250ms\", \"2s\", \"1m\" or a number of seconds")
    if not math.isfinite(seconds):
        raise ValueError("duration must be finite")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest readable form: 0.1 -> "100ms", 2 -> "2s", 90 -> "90s", 120 -> "2m"."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:.0f}ms" if abs(ms - round(ms)) < 1e-6 else f"{ms:g}ms"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"
