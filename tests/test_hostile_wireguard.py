"""Issue 12, the WireGuard side: a hung wireguard-go in the lab (item 3), children's environments
(item 6), planted log files (item 8), no descriptor to spare (item 2)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time

import pytest
import trio

from hatun.childenv import child_environment, looks_like_key
from hatun.keys import PrivateKey
from hatun.pinning import Pinning
from hatun.wireguard import uapi
from hatun.wireguard.model import WireGuardError
from hatun.wireguard.goprocess import wait_exit
from tests.nsutil import freeze
from tests.test_userspace_backend import Pair, alive, backend, wait_for, wireguard_go_pids

KEY = PrivateKey.generate()
# The shapes a key takes when pasted: base64 with and without its '=', hex.
KEY_SHAPES = [KEY.base64, KEY.base64.rstrip("="), KEY.hex]


@pytest.fixture
def pair(namespaces, tmp_path):
    p = Pair(namespaces, str(tmp_path / "run"))
    try:
        yield p
    finally:
        p.cleanup()


def peer_pid(ifname: str) -> int | None:
    """PID serving IFNAME's UAPI socket (SO_PEERCRED; a stopped process still accepts), None if nothing does."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(uapi.socket_path(ifname))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        return struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]


# --- item 3: a SIGSTOPped wireguard-go of a running hatun ---

@pytest.mark.netns
def test_sigstopped_wireguard_go_is_replaced_and_the_tunnel_comes_back(lab_factory, hatun_factory):
    lab = lab_factory(2)
    hatun = hatun_factory(lab)
    hatun.wait(lambda s: set(s["route"]["members"]) == {"gw1", "gw2"}, 15, "both in route")
    ifname = lab.runner_ifname(1)
    old = peer_pid(ifname)
    # hatun's child, for this tunnel, in the runner namespace: the one to freeze.
    assert old in wireguard_go_pids(ifname)
    assert os.stat(f"/proc/{old}/ns/net").st_ino == os.stat(f"/run/netns/{lab.runner}").st_ino
    t0 = time.monotonic()
    freeze(old)
    try:
        def back(s) -> bool:
            gw1 = next(t for t in s["tunnels"] if t["name"] == "gw1")
            return gw1["state"] == "up" and "gw1" in s["route"]["members"] and peer_pid(ifname) not in (None, old)
        # Target: back in service within ~10 s; 20 s is the generous bound of this test.
        hatun.wait(back, 20, "gw1 up again on a new wireguard-go")
        elapsed = time.monotonic() - t0
        new = peer_pid(ifname)
        assert new in wireguard_go_pids(ifname) and not alive(old)  # ours, so killed (and reaped)
        assert "gw2" in hatun.members()
        log = hatun.log()
        assert "it is hung" in log and "killed it (SIGKILL)" in log, log[-3000:]
        print(f"gw1 back in service {elapsed:.1f} s after SIGSTOP of wireguard-go {old} (new pid {new})")
    finally:
        if alive(old) and old in wireguard_go_pids(ifname):
            os.kill(old, signal.SIGKILL)


# --- item 6: children's environments ---

def test_looks_like_key():
    for shape in KEY_SHAPES:
        assert looks_like_key(shape) and looks_like_key(f" {shape}\n") and looks_like_key(f"key={shape}")
    for harmless in ("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "C.UTF-8", "en_US:en",
                     KEY.base64[:40], KEY.hex[:60], KEY.base64[:-1] + "AAAA", KEY.hex + "0"):
        assert not looks_like_key(harmless)


def test_child_environment_is_minimal():
    environ = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "HOME": "/root",
               "HATUN_GW1_KEY": KEY.base64, "SOME_TOKEN": "x", "LC_SMUGGLED": KEY.hex, "WG_TUN_FD": "3"}
    assert child_environment({"WG_PROCESS_FOREGROUND": "1"}, environ=environ) == {
        "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "WG_PROCESS_FOREGROUND": "1"}
    assert child_environment(environ={"PATH": KEY.base64})["PATH"] == os.defpath


@pytest.mark.netns
async def test_wireguard_go_inherits_no_keys(pair, monkeypatch):
    monkeypatch.setenv("HATUN_GW1_KEY", KEY.base64)  # as a private_key_env variable
    monkeypatch.setenv("HATUN_PSK", KEY.base64.rstrip("="))
    monkeypatch.setenv("LC_SMUGGLED", KEY.hex)  # a passed-on name, with a key in it
    monkeypatch.setenv("LANG", "C.UTF-8")
    async with backend(pair, pair.ns_a) as ba:
        await ba.apply(pair.a)
        with open(f"/proc/{ba.pid(pair.if_a)}/environ", "rb") as f:
            raw = f.read()
    env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if item)
    assert env[b"WG_PROCESS_FOREGROUND"] == b"1" and env[b"LANG"] == b"C.UTF-8" and b"PATH" in env
    assert set(env) <= {b"PATH", b"LANG", b"LANGUAGE", b"WG_PROCESS_FOREGROUND"} | {k for k in env if k.startswith(b"LC_")}
    for name in (b"HATUN_GW1_KEY", b"HATUN_PSK", b"LC_SMUGGLED"):
        assert name not in env
    for shape in KEY_SHAPES:
        assert shape.encode() not in raw


async def test_nft_inherits_no_keys(tmp_path, monkeypatch):
    # A stand-in for nft that records the environment it was given (the real one would change
    # this host's firewall) and answers as nft does for an empty table.
    seen = tmp_path / "environ"
    fake = tmp_path / "nft"
    fake.write_text(f"#!{sys.executable}\nimport os\nopen({str(seen)!r}, 'ab').write(repr(dict(os.environ)).encode() + b'\\n')\n"
                    "print('{\"nftables\": []}')\n")
    fake.chmod(0o700)
    monkeypatch.setenv("HATUN_GW1_KEY", KEY.base64)
    monkeypatch.setenv("LC_SMUGGLED", KEY.hex)
    assert await Pinning("hatun_test", 0xFF000000, nft=str(fake)).apply({"hl0r1": 0x01000000})
    text = seen.read_text()
    envs = [eval(line) for line in text.splitlines()]  # noqa: S307 (our own repr of a dict)
    assert len(envs) == 2  # read, then apply
    for env in envs:
        assert set(env) <= {"PATH", "LANG", "LANGUAGE"} | {k for k in env if k.startswith("LC_")}, env.keys()
    for shape in KEY_SHAPES:
        assert shape not in text


# --- item 8: what may be planted at run_dir/wg-IFNAME.log ---

@pytest.mark.netns
async def test_planted_log_files_are_not_followed(pair, caplog):
    os.makedirs(pair.run_dir)
    log_path = os.path.join(pair.run_dir, f"wg-{pair.if_a}.log")
    victim = os.path.join(os.path.dirname(pair.run_dir), "shadow")
    with open(victim, "w") as f:
        f.write("root:$y$secret-hash:19000:0:99999:7:::\n")
    before = os.stat(victim)

    async with backend(pair, pair.ns_a) as ba:
        # A symlink (to "/etc/shadow") or a hard link: refused, the target untouched, nothing started.
        for plant in (os.symlink, os.link):
            plant(victim, log_path)
            with pytest.raises(WireGuardError, match="log file .*: it (is a symbolic link|has other names)"):
                await ba.apply(pair.a)
            os.unlink(log_path)
            assert wireguard_go_pids(pair.if_a) == []
        after = os.stat(victim)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

        # The reader: a symlink put in place of a running device's log is not read through.
        await ba.apply(pair.a)
        os.unlink(log_path)
        os.symlink(victim, log_path)
        await wait_for(lambda: _true_if("symbolic link" in caplog.text), 6.0)  # one look every LOG_POLL
        assert "secret-hash" not in caplog.text
        assert stat.S_ISLNK(os.lstat(log_path).st_mode)
        await ba.delete(pair.if_a)
    assert not os.path.lexists(log_path) and os.path.exists(victim)  # the link removed, never its target


# --- item 2: waiting for a process without a descriptor to spare ---

async def test_wait_exit_without_pidfd(monkeypatch):
    proc = subprocess.Popen(["sleep", "0.3"])
    try:
        def emfile(pid, flags=0):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        monkeypatch.setattr(os, "pidfd_open", emfile)
        with trio.fail_after(10):
            assert await wait_exit(proc.pid, 5.0)
        assert not alive(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def _true_if(value: bool) -> bool:
    return value
