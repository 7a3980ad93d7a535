"""Network namespaces by name (/run/netns/NAME): run a bit of code inside one, without ever moving
the main thread.

setns() switches only the calling thread, so a short-lived thread of our own enters the namespace,
does its work (typically: create a socket, which then belongs to that namespace for life) and
ends. Child processes enter one through `setns_preexec`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class NetnsNotFound(FileNotFoundError):
    """The named network namespace does not exist (it is never created implicitly)."""

    def __str__(self) -> str:
        return f"{self.strerror} ({self.filename})"


def netns_path(netns: str) -> str:
    """/run/netns/NAME for a name; a path (containing "/") as it is."""
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


def open_netns(netns: str) -> int:
    """An O_RDONLY descriptor of the namespace, for setns(). Raises NetnsNotFound."""
    path = netns_path(netns)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsNotFound(errno.ENOENT, f"network namespace {netns!r} does not exist", path) from None


def _setns(fd: int, path: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            raise NetnsNotFound(err, f"{path} is not a network namespace", path)
        raise OSError(err, f"setns({path}): {os.strerror(err)}")


def run_in_netns(netns: str | None, fn: Callable[[], T], timeout: float = 5.0) -> T:
    """FN() run inside NETNS (None: right here) and its result. Meant for sub-millisecond work such
    as creating a socket. Raises NetnsNotFound, TimeoutError, or whatever FN raises."""
    if netns is None:
        return fn()
    fd = open_netns(netns)
    result: dict = {}

    def enter_and_run() -> None:
        try:
            _setns(fd, netns_path(netns))
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    try:
        thread = threading.Thread(target=enter_and_run, name=f"hatun-netns-{netns}", daemon=True)
        thread.start()
        thread.join(timeout=timeout)
        if thread.is_alive():
            raise TimeoutError(f"entering network namespace {netns!r} took more than {timeout:.0f} s")
    finally:
        os.close(fd)
    if "error" in result:
        raise result["error"]
    return result["value"]


def setns_preexec(fd: int) -> Callable[[], None]:
    """A preexec_fn for subprocess that moves the child into the namespace FD (from `open_netns`)."""

    def enter() -> None:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    return enter
