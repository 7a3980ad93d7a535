"""Kernel settings under /proc/sys, for the network namespace hatun runs in."""

from __future__ import annotations

import os


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
