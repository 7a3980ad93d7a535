"""`hatun import`: wg-quick files become a hatun config that passes `hatun check`, keys in files."""

from __future__ import annotations

import os
import stat

import pytest

from hatun.cli import main
from hatun.config import load_config
from hatun.keys import PresharedKey, PrivateKey
from hatun.wgquick import ImportProblem, parse_wgquick, tunnel_name_from_path

KEY1, KEY2 = PrivateKey.generate(), PrivateKey.generate()
PEER1, PEER2 = PrivateKey.generate().public_key, PrivateKey.generate().public_key

WG0 = f"""
# office gateway
[Interface]
PrivateKey = {KEY1.base64}
Address = 198.18.101.2/30
DNS = 198.19.77.53
MTU = 1380
PostUp = echo up

[Peer]
PublicKey = {PEER1.base64}
AllowedIPs = 198.19.77.0/24, 198.18.101.0/30
Endpoint = 198.18.1.2:51820
PersistentKeepalive = 25
"""

WG1 = f"""
[Interface]
PrivateKey = {KEY2.base64}
Address = 198.18.102.2/32

[Peer]
PublicKey = {PEER2.base64}
AllowedIPs = 198.19.77.0/24
AllowedIPs = 198.19.78.0/24
Endpoint = gw2.example.net:51820
"""


def test_import_two_files(tmp_path, capsys):
    (tmp_path / "wg0.conf").write_text(WG0)
    (tmp_path / "wg1.conf").write_text(WG1)
    keys = tmp_path / "keys"
    code = main(["import", str(tmp_path / "wg0.conf"), str(tmp_path / "wg1.conf"), "--key-dir", str(keys)])
    out, err = capsys.readouterr()
    assert code == 0
    for key in (KEY1, KEY2):
        assert key.base64 not in out + err and key.hex not in out + err
    for name in ("wg0", "wg1"):
        assert stat.S_IMODE(os.stat(keys / f"{name}.key").st_mode) == 0o600
    (tmp_path / "hatun.toml").write_text(out)
    config, secrets = load_config(str(tmp_path / "hatun.toml"))
    assert [str(p) for p in config.routing.prefixes] == ["198.19.77.0/24", "198.19.78.0/24"]
    wg0, wg1 = config.tunnels
    assert (wg0.name, wg0.mtu, wg0.keepalive, str(wg0.probe_target)) == ("wg0", 1380, 25, "icmp://198.18.101.1")
    assert wg1.endpoint.host == "gw2.example.net"
    # A /32 tunnel address has no gateway address: the probe is guessed behind the gateway.
    assert str(wg1.probe_target) == "icmp://198.19.77.1"
    assert secrets.keys["wg0"].private == KEY1 and secrets.keys["wg1"].private == KEY2
    assert secrets.keys["wg0"].preshared is None
    assert "not imported (no meaning for hatun): dns, postup" in out
    # Importing again reuses the same key files.
    assert main(["import", str(tmp_path / "wg0.conf"), "--key-dir", str(keys)]) == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("[Interface]\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {p}\nAllowedIPs = 198.19.77.0/24\n", "[Interface] has no PrivateKey"),
        ("[Interface]\nPrivateKey = {k}\nAddress = 198.18.1.2/30\n", "has 0 [Peer] sections"),
        ("[Interface]\nPrivateKey = {k}\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {p}\nAllowedIPs = 198.19.77.0/24\n[Peer]\nPublicKey = {p}\nAllowedIPs = 198.19.78.0/24\n", "has 2 [Peer] sections"),
        ("[Interface]\nPrivateKey = {k}\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {p}\nPresharedKey = {p}\nAllowedIPs = 198.19.77.0/24\nEndpoint = 198.18.1.1:51820\n", "PresharedKey is one of the tunnel's own keys"),
        ("[Interface]\nPrivateKey = {k}\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {p}\nPresharedKey = short\nAllowedIPs = 198.19.77.0/24\nEndpoint = 198.18.1.1:51820\n", "PresharedKey: not a WireGuard key"),
        ("[Interface]\nPrivateKey = {k}\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {p}\nAllowedIPs = 198.19.77.0/24\n", "[Peer] has no Endpoint"),
        ("\ufeff[Interface]\nPrivateKey = {k}\n", "byte order mark"),
        ("[Interface]\nPrivateKey = nope\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {p}\nAllowedIPs = 198.19.77.0/24\n", "PrivateKey: not a WireGuard key"),
        ("[Interfaces]\n", "unknown section"),
        ("Address = 1.2.3.4/32\n", "outside of [Interface]"),
    ],
)
def test_import_problems(text, message):
    with pytest.raises(ImportProblem) as info:
        parse_wgquick(text.format(k=KEY1.base64, p=PEER1.base64), "x", "x.conf")
    assert message in str(info.value)
    assert KEY1.base64 not in str(info.value)


def test_tunnel_names_from_paths():
    assert tunnel_name_from_path("/etc/wireguard/wg0.conf") == "wg0"
    assert tunnel_name_from_path("Office GW.conf") == "office-gw"
    assert tunnel_name_from_path("a-very-long-name-indeed.conf") == "a-very-long"


def test_hostile_wgquick_files(tmp_path, capsys):
    """Not UTF-8, control characters, a key pasted into a value: exit 1 with one clean line, never an
    internal error, never the key."""
    cases = [
        b"\xff\xfe[Interface]\n",
        f"[Interface]\nPrivateKey = {KEY1.base64}\nAddress = 198.18.1.2/30\x1b[2J\x85forged\n[Peer]\n"
        f"PublicKey = {PEER1.base64}\nAllowedIPs = 198.19.77.0/24\n".encode(),
        f"[Interface]\nPrivateKey = {KEY1.base64}\nAddress = {KEY2.base64[:43]}\n[Peer]\nPublicKey = {PEER1.base64}\n"
        "AllowedIPs = 198.19.77.0/24\n".encode(),
    ]
    for data in cases:
        (tmp_path / "wg0.conf").write_bytes(data)
        code = main(["import", str(tmp_path / "wg0.conf"), "--key-dir", str(tmp_path / "keys")])
        out, err = capsys.readouterr()
        assert code == 1 and out == "" and err.count("\n") == 1 and "\x1b" not in err, err
        assert KEY1.base64 not in err and KEY2.base64[:43] not in err


PSK = PresharedKey.generate()


def test_preshared_key_is_imported_into_a_file_of_its_own(tmp_path, capsys):
    text = WG0.replace("PersistentKeepalive = 25", f"PersistentKeepalive = 25\nPresharedKey = {PSK.base64}")
    (tmp_path / "wg0.conf").write_text(text)
    keys = tmp_path / "keys"
    assert main(["import", str(tmp_path / "wg0.conf"), "--key-dir", str(keys)]) == 0
    out, err = capsys.readouterr()
    for secret in (PSK.base64, PSK.hex, KEY1.base64):
        assert secret not in out + err
    assert stat.S_IMODE(os.stat(keys / "wg0.psk").st_mode) == 0o600
    assert f'preshared_key_file = "{keys}/wg0.psk"' in out
    (tmp_path / "hatun.toml").write_text(out)
    _, secrets = load_config(str(tmp_path / "hatun.toml"))
    assert secrets.keys["wg0"].preshared == PSK and secrets.keys["wg0"].private == KEY1


# wg-quick files as people have them, and whether `hatun import` must accept them.
def _shape(**over: str) -> str:
    lines = {
        "head": "[Interface]",
        "key": f"PrivateKey = {KEY1.base64}",
        "addr": "Address = 198.18.101.2/30",
        "extra": "",
        "peer": "[Peer]",
        "pub": f"PublicKey = {PEER1.base64}",
        "psk": "",
        "allowed": "AllowedIPs = 198.19.77.0/24",
        "endpoint": "Endpoint = 198.18.1.2:51820",
        "keepalive": "",
    }
    lines.update(over)
    return "\n".join(v for v in lines.values() if v) + "\n"


SHAPES = {
    "plain": _shape(),
    "crlf": _shape().replace("\n", "\r\n"),
    "tabs and comments after values": _shape(key=f"PrivateKey\t=\t{KEY1.base64}\t# laptop",
                                             allowed="AllowedIPs = 198.19.77.0/24 # office, 198.19.78.0/24"),
    "lower-case keys and sections": _shape(head="[interface]", key=f"privatekey = {KEY1.base64}", peer="[peer]",
                                           pub=f"publickey={PEER1.base64}", endpoint="endpoint=198.18.1.2:51820"),
    "wg-quick keys": _shape(extra="DNS = 198.19.77.53, corp.example\nTable = off\nPostUp = iptables -A x\n"
                                  "PreDown = true\nSaveConfig = true\nMTU = 1380\nListenPort = 51999"),
    "pivpn with preshared key": _shape(psk=f"PresharedKey = {PSK.base64}", keepalive="PersistentKeepalive = 25",
                                       allowed="AllowedIPs = 0.0.0.0/0, ::/0",
                                       addr="Address = 198.18.101.2/24, 2001:2::2/64"),
    "ipv6 endpoint": _shape(endpoint="Endpoint = [2001:2::1]:51820", allowed="AllowedIPs = 2001:2:1::/48",
                            addr="Address = 2001:2::2/64"),
    "keepalive off": _shape(keepalive="PersistentKeepalive = off"),
    "several allowed lines": _shape(allowed="AllowedIPs = 198.19.77.0/24\nAllowedIPs = 198.19.78.0/24"),
    # Refused by wg (and so by hatun):
    "byte order mark": "\ufeff" + _shape(),
    "unknown key": _shape(extra="Colour = blue"),
    "bad key": _shape(key="PrivateKey = c2hvcnQ="),
    "bad allowed": _shape(allowed="AllowedIPs = 198.19.77.0/33"),
    "no equals sign": _shape(extra="MTU 1380"),
    "bad endpoint": _shape(endpoint="Endpoint = 198.18.1.2"),
    "bad keepalive": _shape(keepalive="PersistentKeepalive = soon"),
}


def _dump(netns: str, ifname: str) -> dict:
    """What `wg show IFNAME dump` says the device holds, keyed like our parse."""
    from tests.nsutil import ns_exec

    lines = ns_exec(netns, "wg", "show", ifname, "dump").stdout.strip().split("\n")
    priv, _pub, port, _fwmark = lines[0].split("\t")
    pub, psk, endpoint, allowed, _hs, _rx, _tx, keepalive = lines[1].split("\t")
    return {
        "private_key": priv, "listen_port": int(port), "peer": pub,
        "preshared_key": None if psk == "(none)" else psk, "endpoint": endpoint,
        "allowed_ips": sorted(allowed.split(",")) if allowed != "(none)" else [],
        "keepalive": 0 if keepalive == "off" else int(keepalive),
    }


@pytest.mark.netns
def test_import_reads_wg_quick_files_as_wg_quick_and_wg_do(namespaces, tmp_path):
    """Reference: `wg-quick strip` then `wg setconf` on a real (wireguard-go) device and `wg show dump`.
    Where they refuse a file, import refuses it too; where both accept it, they read the same keys,
    endpoint, allowed IPs and keepalive."""
    import shutil
    import subprocess

    from tests.nsutil import RUN_ID, ns_exec

    for tool in ("wg", "wg-quick", "wireguard-go"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool}")
    ns = namespaces.new("wgq")
    ifname = f"wgq{RUN_ID}"[:15]
    go = subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", ifname],
                          env={"PATH": os.environ["PATH"], "WG_PROCESS_FOREGROUND": "1"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if ns_exec(ns, "wg", "show", ifname, check=False).returncode == 0:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        else:
            pytest.fail("wireguard-go did not come up")
        for label, text in SHAPES.items():
            path = tmp_path / f"{ifname}.conf"
            path.write_bytes(text.encode())
            path.chmod(0o600)
            strip = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, timeout=30)
            reference_ok = strip.returncode == 0
            if reference_ok:
                (tmp_path / "stripped").write_bytes(strip.stdout)
                ns_exec(ns, "ip", "link", "set", ifname, "down", check=False)
                ns_exec(ns, "wg", "set", ifname, "listen-port", "0", check=False)
                for peer in ns_exec(ns, "wg", "show", ifname, "peers").stdout.split():
                    ns_exec(ns, "wg", "set", ifname, "peer", peer, "remove")
                reference_ok = ns_exec(ns, "wg", "setconf", ifname, str(tmp_path / "stripped"),
                                       check=False).returncode == 0
            print(label, "wg accepts" if reference_ok else "wg refuses")
            try:
                ours = parse_wgquick(text, "x", label)
            except ImportProblem as e:
                assert not reference_ok, f"{label}: wg accepts it, import refused: {e}"
                continue
            assert reference_ok, f"{label}: wg refuses it, import accepted it"
            ref = _dump(ns, ifname)
            assert ref["private_key"] == ours.private_key.base64, label
            assert ref["peer"] == ours.peer_public_key.base64, label
            assert ref["preshared_key"] == (ours.preshared_key.base64 if ours.preshared_key else None), label
            assert ref["endpoint"] == ours.endpoint, label
            assert ref["allowed_ips"] == sorted(str(n) for n in ours.allowed_ips), label
            assert ref["keepalive"] == (ours.keepalive or 0), label
            if ours.listen_port:
                assert ref["listen_port"] == ours.listen_port, label
    finally:
        go.terminate()
        go.wait(timeout=10)


@pytest.mark.parametrize("label", sorted(SHAPES))
def test_import_exits_0_only_with_a_config_that_check_accepts(label, tmp_path, capsys):
    (tmp_path / "wg0.conf").write_bytes(SHAPES[label].encode())
    code = main(["import", str(tmp_path / "wg0.conf"), "--key-dir", str(tmp_path / "keys")])
    out, err = capsys.readouterr()
    assert KEY1.base64 not in out + err and PSK.base64 not in out + err
    if code != 0:
        assert out == "" and not (tmp_path / "keys").exists(), "a refused import writes nothing"
        return
    (tmp_path / "hatun.toml").write_text(out)
    assert main(["check", str(tmp_path / "hatun.toml")]) == 0, capsys.readouterr()


@pytest.mark.parametrize(
    "allowed, endpoint, message",
    [
        ("AllowedIPs = 198.18.101.0/30", "Endpoint = 198.18.1.2:51820", "nothing to steer"),
        ("AllowedIPs = 198.18.101.2/32", "Endpoint = 198.18.1.2:51820", "nothing to steer"),
        ("AllowedIPs = 198.19.77.0/24", "", "[Peer] has no Endpoint"),
    ],
)
def test_import_says_what_is_missing(tmp_path, capsys, allowed, endpoint, message):
    (tmp_path / "wg0.conf").write_text(_shape(allowed=allowed, endpoint=endpoint))
    assert main(["import", str(tmp_path / "wg0.conf"), "--key-dir", str(tmp_path / "keys")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and message in err and "nothing written" in err or message in err
    assert not (tmp_path / "keys").exists()


@pytest.mark.parametrize("peer, message", [
    (lambda: KEY1.base64, "PublicKey is this file's own PrivateKey"),
    (lambda: KEY1.public_key.base64, "PublicKey is this host's own public key"),
])
def test_own_keys_as_the_peer_key_are_refused_never_printed(tmp_path, capsys, peer, message):
    (tmp_path / "wg0.conf").write_text(_shape(pub=f"PublicKey = {peer()}"))
    assert main(["import", str(tmp_path / "wg0.conf"), "--key-dir", str(tmp_path / "keys")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and message in err and KEY1.base64 not in err


def test_oversized_files_stray_commas_and_open_key_files_are_refused(tmp_path, capsys):
    big = tmp_path / "wg0.conf"
    big.write_text(_shape() + "# " + "x" * (1024 * 1024) + "\n")
    assert main(["import", str(big)]) == 1
    assert "larger than 1 MiB" in capsys.readouterr().err
    big.write_text(_shape(allowed="AllowedIPs = 198.19.77.0/24 ,"))
    assert main(["import", str(big), "--key-dir", str(tmp_path / "k")]) == 1
    assert "an empty entry" in capsys.readouterr().err
    # A key file already there with the same key, but readable by others: refused, not "reused".
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "wg0.key").write_text(KEY1.base64 + "\n")
    os.chmod(keys / "wg0.key", 0o644)
    big.write_text(_shape())
    assert main(["import", str(big), "--key-dir", str(keys)]) == 2
    assert "accessible by group or others" in capsys.readouterr().err
