"""The UAPI client: pure parsing and diffing (tables), then a real wireguard-go in a namespace."""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import resource
import signal
import socket
import subprocess
import time
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio

from hatun.keys import PresharedKey, PrivateKey, key_fingerprint
from hatun.wireguard import BackendUnavailable, kernel_has_wireguard, select_backend, uapi
from hatun.wireguard.model import DeviceSettings, DeviceStatus, DeviceTimeout, PeerSettings, PeerStatus, WireGuardError
from hatun.wireguard.userspace import HANG_AFTER
from tests.nsutil import RUN_ID

PRIV = PrivateKey(bytes(range(1, 33)))
PEER = PrivateKey(bytes(range(101, 133))).public_key
OTHER = PrivateKey(bytes(range(201, 233))).public_key
NET = ipaddress.ip_network


def secret_free(text: str, key: PrivateKey = PRIV) -> bool:
    return key.hex not in text and key.base64 not in text


# --- split_reply ---

@pytest.mark.parametrize("data, lines, code", [
    (b"errno=0\n\n", [], 0),
    (b"listen_port=1\nerrno=0\n\n", ["listen_port=1"], 0),
    (b"errno=-22\n\n", [], -22),
])
def test_split_reply(data, lines, code):
    assert uapi.split_reply(data) == (lines, code)


@pytest.mark.parametrize("data, message", [
    (b"errno=0\n", "incomplete"),
    (b"listen_port=1\n\n", "does not end with errno"),
    (b"errno=x\n\n", "errno is not a number"),
    (b"\xff=1\nerrno=0\n\n", "not ASCII"),
])
def test_split_reply_errors(data, message):
    with pytest.raises(uapi.UapiProtocolError, match=message):
        uapi.split_reply(data)


# --- parse_get ---

FULL = [
    f"private_key={PRIV.hex}",
    "listen_port=51820",
    "fwmark=65536",
    f"public_key={PEER.hex}",
    f"preshared_key={'00' * 32}",
    "protocol_version=1",
    "endpoint=198.18.0.2:51821",
    "last_handshake_time_sec=1700000000",
    "last_handshake_time_nsec=500000000",
    "tx_bytes=100",
    "rx_bytes=200",
    "persistent_keepalive_interval=25",
    "allowed_ip=198.18.101.0/30",
    "allowed_ip=fd00::/64",
    "some_future_key=1",
]


def test_parse_full_reply():
    status = uapi.parse_get("hat0", FULL)
    assert status == DeviceStatus(
        ifname="hat0", public_key=PRIV.public_key, listen_port=51820, fwmark=65536,
        peers=(PeerStatus(public_key=PEER, endpoint=("198.18.0.2", 51821), keepalive=25,
                          allowed_ips=(NET("198.18.101.0/30"), NET("fd00::/64")), rx_bytes=200, tx_bytes=100,
                          last_handshake=1700000000.5),))
    assert secret_free(repr(status))


@pytest.mark.parametrize("lines, check", [
    ([], lambda s: s.public_key is None and s.listen_port == 0 and s.peers == ()),
    (["listen_port=41670"], lambda s: s.listen_port == 41670 and s.fwmark == 0),
    ([f"private_key={'00' * 32}"], lambda s: s.public_key is None),
    ([f"public_key={PEER.hex}", "last_handshake_time_sec=0", "last_handshake_time_nsec=0"],
     lambda s: s.peer.last_handshake is None and s.peer.endpoint is None and s.peer.allowed_ips == ()),
    ([f"public_key={PEER.hex}", "endpoint=[fd00::2]:51820"], lambda s: s.peer.endpoint == ("fd00::2", 51820)),
    ([f"public_key={PEER.hex}", f"public_key={OTHER.hex}", "allowed_ip=198.18.0.0/24"],
     lambda s: [p.public_key for p in s.peers] == [PEER, OTHER] and s.peers[1].allowed_ips == (NET("198.18.0.0/24"),)),
    # device keys are device keys only before the first peer
    ([f"public_key={PEER.hex}", "listen_port=7"], lambda s: s.listen_port == 0),
])
def test_parse_get_table(lines, check):
    assert check(uapi.parse_get("hat0", lines))


@pytest.mark.parametrize("lines, message", [
    (["nonsense"], "line 1: expected key=value"),
    (["listen_port=x"], "line 1: listen_port is not a number"),
    ([f"public_key={PEER.hex}", "endpoint=nowhere"], "line 2: bad endpoint"),
    ([f"public_key={PEER.hex}", "allowed_ip=300.0.0.0/8"], "line 2: bad allowed_ip"),
    ([f"public_key={PEER.hex}", "rx_bytes=-1"], "line 2: rx_bytes is negative"),
    (["public_key=abc"], "line 1: public_key is not 64 hex digits"),
])
def test_parse_get_errors_name_the_line(lines, message):
    with pytest.raises(uapi.UapiProtocolError, match=message):
        uapi.parse_get("hat0", lines)


@pytest.mark.parametrize("bad", [PRIV.hex[:-1] + "g", PRIV.hex[:-2], PRIV.hex + "00"])
def test_bad_private_key_never_shown(bad):
    with pytest.raises(uapi.UapiProtocolError) as e:
        uapi.parse_get("hat0", [f"private_key={bad}"])
    assert bad not in str(e.value) and PRIV.hex[:40] not in str(e.value)


# --- diff_lines ---

def settings(**kw) -> DeviceSettings:
    peer = dict(public_key=PEER, endpoint=("198.18.0.2", 51820), keepalive=0,
                allowed_ips=(NET("198.18.101.0/30"),))
    peer.update(kw.pop("peer", {}))
    return DeviceSettings(ifname="hat0", private_key=PRIV, peer=PeerSettings(**peer), **kw)


def status_of(s: DeviceSettings, **kw) -> DeviceStatus:
    """What wireguard-go reports after S was applied (with KW changed)."""
    peer = dict(public_key=s.peer.public_key, endpoint=s.peer.endpoint, keepalive=s.peer.keepalive,
                allowed_ips=tuple(reversed(s.peer.allowed_ips)), rx_bytes=5, tx_bytes=6, last_handshake=1.0)
    peer.update(kw.pop("peer", {}))
    dev = dict(ifname=s.ifname, public_key=s.private_key.public_key, listen_port=s.listen_port or 40000,
               fwmark=s.fwmark, peers=(PeerStatus(**peer),))
    dev.update(kw)
    return DeviceStatus(**dev)


S = settings(peer=dict(allowed_ips=(NET("198.18.101.0/30"), NET("fd00::/64"))))


@pytest.mark.parametrize("wanted, current, lines, changed", [
    (S, status_of(S), [], set()),
    # listen_port None: whatever the device has
    (S, status_of(S, listen_port=1234), [], set()),
    (settings(listen_port=51820), status_of(settings(), listen_port=1), ["listen_port=51820"], {"listen_port"}),
    (settings(fwmark=65536), status_of(settings()), ["fwmark=65536"], {"fwmark"}),
    (S, status_of(S, peer=dict(endpoint=("198.18.0.9", 51820))),
     [f"public_key={PEER.hex}", "endpoint=198.18.0.2:51820"], {"endpoint"}),
    (settings(peer=dict(endpoint=("fd00::2", 51820))), status_of(settings()),
     [f"public_key={PEER.hex}", "endpoint=[fd00::2]:51820"], {"endpoint"}),
    # same address spelled differently is the same endpoint
    (settings(peer=dict(endpoint=("fd00:0::2", 51820))), status_of(settings(peer=dict(endpoint=("fd00::2", 51820)))),
     [], set()),
    # no wanted endpoint: keep what the peer roamed to
    (settings(peer=dict(endpoint=None)), status_of(settings()), [], set()),
    (settings(peer=dict(keepalive=25)), status_of(settings()),
     [f"public_key={PEER.hex}", "persistent_keepalive_interval=25"], {"keepalive"}),
    (S, status_of(S, peer=dict(allowed_ips=(NET("198.18.101.0/30"),))),
     [f"public_key={PEER.hex}", "replace_allowed_ips=true", "allowed_ip=198.18.101.0/30", "allowed_ip=fd00::/64"],
     {"allowed_ips"}),
    (S, status_of(S, public_key=OTHER), [f"private_key={PRIV.hex}"], {"private_key"}),
    (S, status_of(S, peer=dict(public_key=OTHER)),
     [f"public_key={OTHER.hex}", "remove=true", f"public_key={PEER.hex}", "endpoint=198.18.0.2:51820",
      "replace_allowed_ips=true", "allowed_ip=198.18.101.0/30", "allowed_ip=fd00::/64"],
     {"peer", "endpoint", "allowed_ips"}),
    (settings(peer=dict(endpoint=None, allowed_ips=())), DeviceStatus("hat0", None, 41000, 0),
     [f"private_key={PRIV.hex}", f"public_key={PEER.hex}"], {"private_key", "peer"}),
    (settings(), None,
     [f"private_key={PRIV.hex}", f"public_key={PEER.hex}", "endpoint=198.18.0.2:51820",
      "replace_allowed_ips=true", "allowed_ip=198.18.101.0/30"],
     {"private_key", "peer", "endpoint", "allowed_ips"}),
])
def test_diff_lines(wanted, current, lines, changed):
    assert uapi.diff_lines(wanted, current) == (lines, changed)


PSK = PresharedKey.generate()


def test_preshared_key_is_set_compared_by_fingerprint_and_removed():
    with_psk = settings(peer=dict(preshared_key=PSK))
    lines, changed = uapi.diff_lines(with_psk, status_of(settings()))
    assert (lines, changed) == ([f"public_key={PEER.hex}", f"preshared_key={PSK.hex}"], {"preshared_key"})
    # As wireguard-go reads it back: a fingerprint, never the key.
    read = uapi.parse_get("hat0", [f"public_key={PEER.hex}", f"preshared_key={PSK.hex}"])
    assert read.peer.preshared_key_fingerprint == key_fingerprint(PSK.raw)
    assert PSK.hex not in repr(read) and PSK.base64 not in repr(read)
    assert uapi.diff_lines(with_psk, status_of(with_psk, peer=dict(preshared_key_fingerprint=PSK.fingerprint))) == ([], set())
    # Unset in the config: removed (all zeros), also read back as none.
    lines, changed = uapi.diff_lines(settings(), status_of(with_psk, peer=dict(preshared_key_fingerprint=PSK.fingerprint)))
    assert lines == [f"public_key={PEER.hex}", "preshared_key=" + "0" * 64] and changed == {"preshared_key"}
    assert uapi.parse_get("hat0", [f"public_key={PEER.hex}", "preshared_key=" + "0" * 64]).peer.preshared_key_fingerprint is None


def test_reset_peer_removes_and_adds_it_in_one_request():
    lines, changed = uapi.diff_lines(S, status_of(S), reset_peer=True)
    assert lines == [f"public_key={PEER.hex}", "remove=true", f"public_key={PEER.hex}", "endpoint=198.18.0.2:51820",
                     "replace_allowed_ips=true", "allowed_ip=198.18.101.0/30", "allowed_ip=fd00::/64"]
    assert changed == {"peer", "endpoint", "allowed_ips"}


def test_describe_errno():
    assert uapi.describe_errno(-22) == "errno=-22 (EINVAL: Invalid argument)"
    assert uapi.describe_errno(-99999) == "errno=-99999"


# --- select_backend ---

@pytest.mark.parametrize("kind, kernel, go, expected", [
    ("auto", True, True, "kernel"),
    ("auto", False, True, "userspace"),
    ("kernel", True, False, "kernel"),
    ("userspace", True, True, "userspace"),
    ("auto", False, False, "install the wireguard-go package"),
    ("userspace", True, False, "apt-get install wireguard-go"),
    ("kernel", False, True, "kernel has no WireGuard"),
])
async def test_select_backend(kind, kernel, go, expected):
    async def kernel_supported():
        return kernel
    which = lambda name: f"/usr/bin/{name}" if go else None  # noqa: E731
    if expected in ("kernel", "userspace"):
        assert await select_backend(kind, kernel_supported=kernel_supported, which=which) == expected
    else:
        with pytest.raises(BackendUnavailable, match=expected):
            await select_backend(kind, kernel_supported=kernel_supported, which=which)


async def test_select_backend_unknown_kind():
    with pytest.raises(ValueError, match="unknown WireGuard backend 'wg'"):
        await select_backend("wg")


async def test_kernel_probe_in_a_namespace(namespaces):
    # The real generic netlink probe; this host may or may not have the module, both are fine,
    # but the answer must agree with what select_backend("kernel") does.
    ns = namespaces.new("probe")
    has = await kernel_has_wireguard(ns)
    assert isinstance(has, bool)
    if not has:
        with pytest.raises(BackendUnavailable):
            await select_backend("kernel", kernel_supported=lambda: kernel_has_wireguard(ns))


# --- a real wireguard-go ---

@pytest.fixture
def wggo(namespaces):
    """A wireguard-go (started here, ended here by its PID) in a fresh namespace; yields (ifname, Popen)."""
    ns = namespaces.new("uapi")
    ifname = f"hu{RUN_ID}"
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", ifname], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while not os.path.exists(uapi.socket_path(ifname)):
            assert proc.poll() is None and time.monotonic() < deadline, "wireguard-go did not start"
            time.sleep(0.01)
        yield ifname, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.path.exists(uapi.socket_path(ifname)):
            os.unlink(uapi.socket_path(ifname))


async def test_real_get_set(wggo):
    ifname, proc = wggo
    assert await uapi.server_pid(ifname) == proc.pid  # `ip netns exec` execs: same PID
    fresh = await uapi.get(ifname)
    assert fresh.public_key is None and fresh.peers == () and fresh.listen_port > 0

    wanted = settings(listen_port=51999, fwmark=0x10000, peer=dict(keepalive=25))
    lines, _ = uapi.diff_lines(wanted, fresh)
    await uapi.set(ifname, lines)
    got = await uapi.get(ifname)
    assert got.public_key == PRIV.public_key and got.listen_port == 51999 and got.fwmark == 0x10000
    assert got.peer.public_key == PEER and got.peer.endpoint == ("198.18.0.2", 51820)
    assert got.peer.keepalive == 25 and got.peer.allowed_ips == (NET("198.18.101.0/30"),)
    assert uapi.diff_lines(wanted, got) == ([], set())


async def test_real_errors_carry_no_secret(wggo):
    ifname, _ = wggo
    with pytest.raises(WireGuardError) as e:
        await uapi.set(ifname, [f"private_key={PRIV.hex}", "no_such_key=1"])
    assert "errno=-22 (EINVAL" in str(e.value) and "keys sent: private_key, no_such_key" in str(e.value)
    assert secret_free(str(e.value))
    # a refused request does not poison later ones (one connection per request)
    assert (await uapi.get(ifname)).public_key == PRIV.public_key
    with pytest.raises(ValueError, match="not one key=value line"):
        await uapi.set(ifname, ["endpoint=1.2.3.4:5\nprivate_key=00"])


async def test_not_running_missing_and_stale(wggo):
    ifname, proc = wggo
    with pytest.raises(uapi.NotRunning):
        await uapi.get(f"hx{RUN_ID}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    assert os.path.exists(uapi.socket_path(ifname))  # SIGKILL leaves a stale socket file
    with pytest.raises(uapi.NotRunning, match="missing or stale"):
        await uapi.get(ifname)
    with pytest.raises(uapi.NotRunning):
        await uapi.server_pid(ifname)


async def test_timeout_when_nobody_answers(tmp_path):
    # A socket that accepts but never replies (as a SIGSTOPped wireguard-go does): the client gives
    # up within its timeout, with an error of its own kind, so that callers can tell a hang from a
    # missing device.
    import socket as stdsocket
    path = uapi.socket_path("mute", str(tmp_path))
    server = stdsocket.socket(stdsocket.AF_UNIX)
    server.bind(path)
    server.listen()
    with server, trio.fail_after(2):
        with pytest.raises(uapi.UapiTimeout, match="did not answer on its UAPI socket within 0.2s") as e:
            await uapi.get("mute", socket_dir=str(tmp_path), timeout=0.2)
        assert isinstance(e.value, DeviceTimeout) and not isinstance(e.value, uapi.NotRunning)
        with pytest.raises(uapi.UapiTimeout):
            await uapi.set("mute", ["listen_port=1"], socket_dir=str(tmp_path), timeout=0.2)


# --- resource exhaustion (issue 12, item 2) ---

@contextmanager
def no_free_descriptors():
    """Within: every new file descriptor fails with EMFILE (soft RLIMIT_NOFILE lowered to the
    descriptors in use, the holes below it filled); restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    filler: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        for _ in range(limit):  # bounded: at most one per slot below the limit
            try:
                filler.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as e:
                assert e.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_exhausted_descriptors_raise_wireguard_error(tmp_path, monkeypatch):
    # EMFILE (for real, through RLIMIT_NOFILE) and ENFILE (simulated) when making the UAPI socket:
    # a WireGuardError saying so, never a bare OSError that would end the caller's nursery, and
    # neither "not running" nor a timeout (nothing must be restarted or killed because of it).
    calls = [lambda: uapi.get("hat0", socket_dir=str(tmp_path)),
             lambda: uapi.set("hat0", ["listen_port=1"], socket_dir=str(tmp_path)),
             lambda: uapi.server_pid("hat0", socket_dir=str(tmp_path))]
    for call in calls:
        with no_free_descriptors(), pytest.raises(WireGuardError, match="Too many open files") as e:
            await call()
        assert not isinstance(e.value, (uapi.NotRunning, uapi.UapiTimeout))

    def enfile(*args, **kw):
        raise OSError(errno.ENFILE, os.strerror(errno.ENFILE))
    monkeypatch.setattr(trio.socket, "socket", enfile)
    for call in calls:
        with pytest.raises(WireGuardError, match="Too many open files in system"):
            await call()


# --- hang detection in the backend, against a fake wireguard-go (issue 12, item 3) ---

async def fake_wireguard_go(path: str, mute: list[bool], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve a UAPI socket at PATH: a `get` is answered while MUTE[0] is False; otherwise the
    connection is accepted and held without a word, as a stopped wireguard-go does."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen()

    async def handle(conn) -> None:
        with conn:
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = await conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            if mute[0]:
                await trio.sleep_forever()
            await conn.send(b"listen_port=1\nerrno=0\n\n")
            while await conn.recv(4096):
                pass

    with listener:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(handle, conn)


@asynccontextmanager
async def fake_backend(tmp_path, mute: list[bool]):
    """A UserspaceBackend whose device "fake0" (pid 4242, never signalled: not a wireguard-go)
    is served by `fake_wireguard_go`."""
    from hatun.wireguard.userspace import UserspaceBackend, _Device
    async with trio.open_nursery() as nursery:
        await nursery.start(fake_wireguard_go, uapi.socket_path("fake0", str(tmp_path)), mute)
        backend = UserspaceBackend(nursery, None, executable="wireguard-go", run_dir=str(tmp_path), netns=None,
                                   socket_dir=str(tmp_path), on_recreated=None)
        dev = backend._devices["fake0"] = _Device("fake0", pid=4242)
        yield backend, dev
        nursery.cancel_scope.cancel()


async def test_unanswered_requests_in_a_row_mark_the_device_hung(tmp_path, autojump_clock, caplog):
    mute = [True]
    async with fake_backend(tmp_path, mute) as (backend, dev):
        async def unanswered() -> None:
            with pytest.raises(uapi.UapiTimeout):
                await backend.get("fake0", with_link=False, timeout=1.0)

        # Three callers at the same moment meet the same silence: one timeout, not three.
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(unanswered)
        assert dev.timeouts == 1 and not dev.hung.is_set()
        await unanswered()
        assert dev.timeouts == 2
        # Any reply resets the count.
        mute[0] = False
        assert (await backend.get("fake0", with_link=False)).listen_port == 1
        assert dev.timeouts == 0
        mute[0] = True
        for n in range(1, 4):
            assert not dev.hung.is_set()
            await unanswered()
            assert dev.timeouts == n
        assert dev.hung.is_set()  # what the device's watcher waits for to replace the process
        assert "left 3 UAPI requests in a row unanswered: it is hung" in caplog.text

        # Callers with short timeouts: three are not enough, a silence of HANG_AFTER seconds is needed too.
        dev.pid, dev.timeouts, dev.hung = 4343, 0, trio.Event()  # as after a replacement
        start = trio.current_time()
        while not dev.hung.is_set():
            with pytest.raises(uapi.UapiTimeout):
                await backend.get("fake0", with_link=False, timeout=0.2)
            assert dev.timeouts < 20
        assert dev.timeouts > 3 and trio.current_time() - start >= HANG_AFTER


async def test_liveness_check_notices_a_hang_nobody_asked_about(tmp_path, autojump_clock):
    mute = [False]
    async with fake_backend(tmp_path, mute) as (backend, dev):
        dev.scope = trio.CancelScope()  # as if watched
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.serve_liveness)
            with trio.fail_after(5):
                while dev.answered_at == -math.inf:  # it asks an idle device on its own...
                    await trio.sleep(0.1)
            assert dev.timeouts == 0
            mute[0] = True
            start = trio.current_time()
            with trio.fail_after(30):
                await dev.hung.wait()  # ...and finds out when it stops answering
            # three timeouts of CHECK_TIMEOUT, asked again at once after each (virtual clock)
            assert trio.current_time() - start <= 6
            nursery.cancel_scope.cancel()
