"""The userspace backend with real wireguard-go processes, one in each of two namespaces.

Topology: namespace A (veth 198.18.0.1/29, tunnel 198.18.101.1/30) <-> namespace B (veth 198.18.0.2/29,
tunnel 198.18.101.2/30). Interface names carry the run id: wireguard-go's socket directory is global.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import trio

from hatun.keys import PrivateKey
from hatun.wireguard import uapi
from hatun.wireguard.model import DeviceSettings, PeerSettings, WireGuardError
from hatun.wireguard.userspace import open_userspace_backend
from tests.nsutil import RUN_ID, freeze, ip

pytestmark = [pytest.mark.netns]
PORT_A, PORT_B = 51820, 51821


def wireguard_go_pids(ifname: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")[:-1]
            except OSError:
                continue
            if len(argv) >= 2 and argv[0].endswith(b"wireguard-go") and argv[-1] == ifname.encode():
                pids.append(int(entry))
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Pair:
    """Two namespaces joined by a veth, and the settings of one tunnel device in each."""

    def __init__(self, namespaces, run_dir: str) -> None:
        self.ns_a, self.ns_b = namespaces.new("wga"), namespaces.new("wgb")
        namespaces.veth(self.ns_a, "ua", self.ns_b, "ub")
        ip("addr", "add", "198.18.0.1/29", "dev", "ua", netns=self.ns_a)
        ip("addr", "add", "198.18.0.2/29", "dev", "ub", netns=self.ns_b)
        self.run_dir = run_dir
        self.key_a, self.key_b = PrivateKey.generate(), PrivateKey.generate()
        self.if_a, self.if_b = f"hw{RUN_ID}a", f"hw{RUN_ID}b"
        self.a = DeviceSettings(
            ifname=self.if_a, private_key=self.key_a, listen_port=PORT_A,
            addresses=(ipaddress.ip_interface("198.18.101.1/30"),),
            peer=PeerSettings(public_key=self.key_b.public_key, endpoint=("198.18.0.2", PORT_B),
                              allowed_ips=(ipaddress.ip_network("198.18.101.0/30"),)))
        self.b = DeviceSettings(
            ifname=self.if_b, private_key=self.key_b, listen_port=PORT_B,
            addresses=(ipaddress.ip_interface("198.18.101.2/30"),),
            peer=PeerSettings(public_key=self.key_a.public_key, endpoint=("198.18.0.1", PORT_A),
                              allowed_ips=(ipaddress.ip_network("198.18.101.0/30"),)))

    def secrets(self) -> list[str]:
        return [self.key_a.base64, self.key_a.hex, self.key_b.base64, self.key_b.hex]

    def cleanup(self) -> None:
        # Only what this test started (processes by PID), even when it failed half-way.
        for ifname in (self.if_a, self.if_b, self.if_b + "x"):
            for pid in wireguard_go_pids(ifname):
                os.kill(pid, signal.SIGKILL)
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            try:
                os.unlink(uapi.socket_path(ifname))
            except FileNotFoundError:
                pass


@pytest.fixture
def pair(namespaces, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="hatun.wireguard")
    p = Pair(namespaces, str(tmp_path / "run"))
    try:
        yield p
    finally:
        p.cleanup()
    # Secrets never reach a log line.
    for secret in p.secrets():
        assert secret not in caplog.text


@asynccontextmanager
async def backend(pair: Pair, ns: str, **kw):
    async with open_userspace_backend(run_dir=pair.run_dir, netns=ns, **kw) as b:
        yield b


async def ping(ns: str, dst: str, count: int = 3, size: int = 56) -> bool:
    res = await trio.run_process(["ip", "netns", "exec", ns, "ping", "-c", str(count), "-W", "1", "-i", "0.2",
                                  "-s", str(size), dst], capture_stdout=True, capture_stderr=True, check=False)
    return res.returncode == 0


async def wait_for(predicate, timeout: float, step: float = 0.02):
    """Poll async PREDICATE until it returns something true; return it, or fail after TIMEOUT."""
    with trio.fail_after(timeout):
        while not (result := await predicate()):
            await trio.sleep(step)
        return result


async def test_tunnel_apply_is_idempotent_and_moves_traffic(pair, caplog):
    async with backend(pair, pair.ns_a) as ba, backend(pair, pair.ns_b) as bb:
        t0 = time.monotonic()
        ca = await ba.apply(pair.a)
        spawn_to_ready = time.monotonic() - t0
        cb = await bb.apply(pair.b)
        assert ca.created and cb.created
        assert {"private_key", "peer", "endpoint", "allowed_ips", "listen_port"} <= ca.changed
        print(f"wireguard-go started and configured in {spawn_to_ready:.2f} s")

        pid = ba.pid(pair.if_a)
        assert alive(pid) and os.getsid(pid) == pid  # own session: a Ctrl-C on hatun does not reach it
        assert await ping(pair.ns_a, "198.18.101.2")

        st = await ba.get(pair.if_a)
        assert st.public_key == pair.key_a.public_key and st.listen_port == PORT_A and st.up and st.mtu == 1420
        assert st.addresses == (ipaddress.ip_interface("198.18.101.1/30"),) and st.ifindex > 0
        assert st.peer.public_key == pair.key_b.public_key and st.peer.endpoint == ("198.18.0.2", PORT_B)
        handshake = st.peer.last_handshake
        assert handshake is not None and abs(time.time() - handshake) < 30

        # Counters move by about what was sent: 10 echo requests of 1028 IP bytes each way,
        # each carried with 32 bytes of WireGuard header plus padding (to 16) and UDP/IP headers.
        await ping(pair.ns_a, "198.18.101.2", count=10, size=1000)
        after = (await ba.get(pair.if_a)).peer
        tx, rx = after.tx_bytes - st.peer.tx_bytes, after.rx_bytes - st.peer.rx_bytes
        assert 10 * 1028 <= tx <= 10 * (1028 + 80) + 200, tx
        assert 10 * 1028 <= rx <= 10 * (1028 + 80) + 200, rx

        # Applying the same settings again changes nothing and keeps the handshake.
        assert not await ba.apply(pair.a)
        assert not await bb.apply(pair.b)
        assert (await ba.get(pair.if_a)).peer.last_handshake == handshake

        # One setting changed: only that one is reported (and sent).
        changes = await ba.apply(replace(pair.a, peer=replace(pair.a.peer, keepalive=25)))
        assert not changes.created and changes.changed == {"keepalive"}
        ip("addr", "add", "198.18.0.3/29", "dev", "ub", netns=pair.ns_b)
        moved = replace(pair.a, peer=replace(pair.a.peer, endpoint=("198.18.0.3", PORT_B), keepalive=25))
        changes = await ba.apply(moved)
        assert changes.changed == {"endpoint"}
        assert (await ba.get(pair.if_a)).peer.endpoint == ("198.18.0.3", PORT_B)
        assert await ping(pair.ns_a, "198.18.101.2")
        assert (await ba.get(pair.if_a)).peer.last_handshake == handshake  # no new handshake needed
        last = replace(moved, mtu=1380)
        assert (await ba.apply(last)).changed == {"mtu"}

        # reset_peer: the peer is made afresh (its session and counters gone: with a keepalive set it
        # handshakes again at once), configured as it was, and traffic flows.
        before = (await ba.get(pair.if_a)).peer
        await ba.reset_peer(last)
        peer = (await ba.get(pair.if_a)).peer
        assert peer.tx_bytes < before.tx_bytes and peer.last_handshake != before.last_handshake
        assert peer.endpoint == ("198.18.0.3", PORT_B) and peer.keepalive == 25
        assert set(peer.allowed_ips) == set(last.peer.allowed_ips)
        assert await ping(pair.ns_a, "198.18.101.2")

    # Leaving the backend does not stop the devices (crash-only).
    assert alive(pid) and await ping(pair.ns_a, "198.18.101.2")
    with open(os.path.join(pair.run_dir, f"wg-{pair.if_a}.log")) as f:
        text = f.read()
    assert all(secret not in text for secret in pair.secrets())


async def test_kill9_restarts_and_reconfigures_within_2s(pair, caplog):
    recreated = []
    async with backend(pair, pair.ns_a, on_recreated=recreated.append) as ba, backend(pair, pair.ns_b) as bb:
        await ba.apply(pair.a)
        await bb.apply(pair.b)
        assert await ping(pair.ns_a, "198.18.101.2")
        assert ba.generation(pair.if_a) == 1

        for how in ("kill -9", "link deleted"):
            old_pid, old_index = ba.pid(pair.if_a), (await ba.get(pair.if_a)).ifindex
            t0 = time.monotonic()
            if how == "kill -9":
                os.kill(old_pid, signal.SIGKILL)
            else:
                ip("link", "del", pair.if_a, netns=pair.ns_a)

            async def back():
                if ba.pid(pair.if_a) == old_pid:
                    return None
                st = await ba.get(pair.if_a)
                ok = st and st.up and st.addresses and st.peer and st.peer.endpoint == ("198.18.0.2", PORT_B)
                return st if ok else None
            st = await wait_for(back, 15.0)
            print(f"back after {how} in {time.monotonic() - t0:.2f} s")
            assert st.ifindex != old_index and st.listen_port == PORT_A and st.public_key == pair.key_a.public_key
            assert not alive(old_pid)
            assert await ping(pair.ns_a, "198.18.101.2")
        assert recreated == [pair.if_a, pair.if_a] and ba.generation(pair.if_a) == 3
        assert "wireguard-go (pid" in caplog.text and "killed by SIGKILL" in caplog.text


async def test_adopt_running_wireguard_go_then_delete_leaves_nothing(pair, caplog):
    async with backend(pair, pair.ns_b) as bb:
        await bb.apply(pair.b)
        async with backend(pair, pair.ns_a) as ba:
            await ba.apply(pair.a)
            pid = ba.pid(pair.if_a)
        assert await ping(pair.ns_a, "198.18.101.2")
        handshake = (await bb.get(pair.if_b)).peer.last_handshake

        # A second backend (as after a restart of hatun) adopts the running process.
        recreated = []
        async with backend(pair, pair.ns_a, on_recreated=recreated.append) as ba2:
            assert not await ba2.apply(pair.a)
            assert ba2.pid(pair.if_a) == pid and ba2.generation(pair.if_a) == 0
            assert f"adopted running wireguard-go (pid {pid})" in caplog.text
            assert await ba2.list() == [pair.if_a]
            assert (await bb.get(pair.if_b)).peer.last_handshake == handshake

            # It watches the adopted (not its child) process too.
            os.kill(pid, signal.SIGKILL)
            await wait_for(lambda: _true_if(recreated == [pair.if_a]), 2.0)  # called once reconfigured
            new_pid = ba2.pid(pair.if_a)
            assert new_pid != pid and (await ba2.get(pair.if_a)).peer.public_key == pair.key_b.public_key

            # The socket directory is global: a name served from another namespace is not ours.
            b_pid = bb.pid(pair.if_b)
            with pytest.raises(WireGuardError, match="not a wireguard-go for it in this network namespace"):
                await ba2.apply(pair.b)
            await ba2.delete(pair.if_b)
            assert alive(b_pid) and os.path.exists(uapi.socket_path(pair.if_b))

            # A refused configuration: the error carries wireguard-go's reason, and no secret.
            with pytest.raises(WireGuardError) as e:
                await ba2.apply(replace(pair.b, ifname=pair.if_b + "x", listen_port=PORT_A))
            assert "EADDRINUSE" in str(e.value) and "address already in use" in str(e.value)
            for secret in pair.secrets():
                assert secret not in str(e.value)
            await ba2.delete(pair.if_b + "x")

            # wireguard-go's own log lines reach our logger, prefixed with the interface name.
            with pytest.raises(WireGuardError):
                await uapi.set(pair.if_a, ["no_such_key=1"])
            await wait_for(lambda: _true_if(f"{pair.if_a}: wireguard-go: IPC error -22: invalid UAPI" in caplog.text), 2.0)

            await ba2.delete(pair.if_a)
            assert not alive(new_pid)
            assert not os.path.exists(uapi.socket_path(pair.if_a))
            assert not os.path.exists(os.path.join(pair.run_dir, f"wg-{pair.if_a}.log"))
            assert ip("link", "show", pair.if_a, netns=pair.ns_a, check=False).returncode != 0
            assert wireguard_go_pids(pair.if_a) == [] and await ba2.list() == []
            assert await ba2.get(pair.if_a) is None
            await ba2.delete(pair.if_a)  # deleting a missing device is not an error
            await trio.sleep(0.6)
            assert wireguard_go_pids(pair.if_a) == []  # and nothing restarted it

        await bb.delete(pair.if_b)
        assert wireguard_go_pids(pair.if_b) == []


async def test_start_failure_says_why(pair):
    # A veth already holds the name: wireguard-go cannot create its TUN device and exits.
    ip("link", "add", pair.if_a, "type", "veth", "peer", "name", "uz", netns=pair.ns_a)
    async with backend(pair, pair.ns_a) as ba:
        with pytest.raises(WireGuardError, match="exited at start with status 1: Failed to create TUN device"):
            await ba.apply(pair.a)
        assert wireguard_go_pids(pair.if_a) == []
        with pytest.raises(WireGuardError, match="bad interface name '-f'"):
            await ba.apply(replace(pair.a, ifname="-f"))


async def _true_if(value: bool) -> bool:
    return value


# --- issue 12: hung processes, exhausted descriptors ---

def stop_and_later_kill(pid: int, ifname: str):
    """SIGSTOP PID (a wireguard-go for IFNAME) and return a cleanup that SIGKILLs it if it is still
    that process (the test's own doing: a stopped process must not outlive a failed test)."""
    freeze(pid)

    def cleanup() -> None:
        if alive(pid) and pid in wireguard_go_pids(ifname):
            os.kill(pid, signal.SIGKILL)
    return cleanup


async def test_sigstopped_wireguard_go_is_replaced(pair, caplog):
    recreated = []
    async with backend(pair, pair.ns_a, on_recreated=recreated.append) as ba, backend(pair, pair.ns_b) as bb:
        await ba.apply(pair.a)
        await bb.apply(pair.b)
        assert await ping(pair.ns_a, "198.18.101.2")
        old_pid, old_index = ba.pid(pair.if_a), (await ba.get(pair.if_a)).ifindex
        cleanup = stop_and_later_kill(old_pid, pair.if_a)
        try:
            # Frozen: it still accepts connections and names itself, but never answers.
            assert await uapi.server_pid(pair.if_a) == old_pid
            with pytest.raises(uapi.UapiTimeout):
                await ba.get(pair.if_a, timeout=0.2)

            async def back():
                if ba.pid(pair.if_a) == old_pid:  # (asking the frozen one would only wait)
                    return None
                st = await ba.get(pair.if_a)
                ok = st and st.up and st.addresses and st.peer and st.peer.endpoint == ("198.18.0.2", PORT_B)
                return st if ok else None
            st = await wait_for(back, 15.0)
            assert st.ifindex != old_index and st.public_key == pair.key_a.public_key
            await wait_for(lambda: _true_if(not alive(old_pid)), 5.0)  # killed, and reaped: it was ours
            assert recreated == [pair.if_a]
            assert await ping(pair.ns_a, "198.18.101.2")
            assert "it is hung" in caplog.text and "killed it (SIGKILL)" in caplog.text
        finally:
            cleanup()


async def test_silent_wireguard_go_is_not_adopted_and_a_stopped_one_is_deleted_at_once(pair, caplog):
    async with backend(pair, pair.ns_a) as ba:
        await ba.apply(pair.a)
        old_pid = ba.pid(pair.if_a)
    cleanup = stop_and_later_kill(old_pid, pair.if_a)
    try:
        # A restarted hatun finds a wireguard-go that accepts connections but does not answer:
        # it is replaced, not adopted (adopted, every configure would time out forever).
        async with backend(pair, pair.ns_a) as ba2:
            with trio.fail_after(10):
                changes = await ba2.apply(pair.a)
            new_pid = ba2.pid(pair.if_a)
            assert changes.created and new_pid != old_pid and not alive(old_pid)
            assert f"running wireguard-go (pid {old_pid}) accepts UAPI connections but does not answer" in caplog.text
            assert f"adopted running wireguard-go (pid {old_pid})" not in caplog.text

            # Deleting a stopped one: SIGKILL at once after the link removal, no SIGTERM it could not act on.
            cleanup2 = stop_and_later_kill(new_pid, pair.if_a)
            try:
                caplog.clear()
                await ba2.delete(pair.if_a)
                assert not alive(new_pid)
                assert "sending SIGKILL" in caplog.text and "sending SIGTERM" not in caplog.text
            finally:
                cleanup2()
    finally:
        cleanup()


async def test_exhausted_descriptors_at_the_uapi_socket_are_errors_not_hangs(pair, monkeypatch):
    async with backend(pair, pair.ns_a) as ba:
        await ba.apply(pair.a)
        pid = ba.pid(pair.if_a)

        def emfile(*args, **kw):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        with monkeypatch.context() as m:
            m.setattr(trio.socket, "socket", emfile)
            for call in (lambda: ba.get(pair.if_a), lambda: ba.apply(pair.a), lambda: ba.reset_peer(pair.a)):
                with pytest.raises(WireGuardError, match="Too many open files") as e:
                    await call()
                assert not isinstance(e.value, uapi.UapiTimeout)
            await trio.sleep(1.5)  # the liveness check meets EMFILE too, meanwhile
        # Not a hang: the process is still the same, and the backend still works.
        assert ba.pid(pair.if_a) == pid and alive(pid)
        assert (await ba.get(pair.if_a)).public_key == pair.key_a.public_key
        assert not await ba.apply(pair.a)
