"""Kernel settings under /proc/sys, for the network namespace hatun runs in."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("hatun")


class SysctlError(OSError):
    """A setting could not be read or written; the message names it."""


def _path(*parts: str) -> str:
    # Components are joined with "/" (not dotted): interface names may contain dots.
    return os.path.join("/proc/sys", *parts)


def read(*parts: str) -> str | None:
    """The value of a setting, or None when it does not exist (e.g. no IPv6)."""
    try:
        with open(_path(*parts)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SysctlError(f"cannot read {'.'.join(parts)}: {e.strerror}") from None


def write(value: str | int, *parts: str) -> bool:
    """Set a setting when it differs; returns True when it was changed. Raises SysctlError."""
    current = read(*parts)
    if current is None:
        raise SysctlError(f"{'.'.join(parts)} does not exist on this kernel")
    if current == str(value):
        return False
    try:
        with open(_path(*parts), "w") as f:
            f.write(str(value))
    except OSError as e:
        raise SysctlError(f"cannot set {'.'.join(parts)} = {value}: {e.strerror}") from None
    return True


def wanted_for(routing) -> list[tuple[str, tuple[str, ...]]]:
    """The (value, key parts) hatun sets for the `[routing]` settings ROUTING (pure)."""
    wanted: list[tuple[str, tuple[str, ...]]] = []
    if routing.hash_policy != "keep":
        value = "1" if routing.hash_policy == "l4" else "0"
        wanted += [(value, ("net", "ipv4", "fib_multipath_hash_policy")),
                   (value, ("net", "ipv6", "fib_multipath_hash_policy"))]
    if routing.pin_flows:
        # Reverse-path checks must see the mark that pins a flow to its tunnel.
        wanted.append(("1", ("net", "ipv4", "conf", "all", "src_valid_mark")))
    return wanted


def apply(wanted: list[tuple[str, tuple[str, ...]]], saved: dict[str, str]) -> dict[str, str]:
    """Set WANTED; returns SAVED plus the values they had before (what a stop restores), for the keys
    hatun changed and had not saved yet. Failures are logged, never raised."""
    saved = dict(saved)
    for value, parts in wanted:
        key = ".".join(parts)
        try:
            before = read(*parts)
            if before is None:
                continue
            if write(value, *parts):
                saved.setdefault(key, before)
                log.info("set %s = %s (was %s)", key, value, before)
        except SysctlError as e:
            log.warning("%s", e)
    return saved
