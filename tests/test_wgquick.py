"""`hatun import`: wg-quick files become a hatun config that passes `hatun check`, keys in files."""

from __future__ import annotations

import os
import stat

import pytest

from hatun.cli import main
from hatun.config import load_config
from hatun.keys import PrivateKey
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
    assert secrets.keys["wg0"] == KEY1 and secrets.keys["wg1"] == KEY2
    assert "not imported (no meaning for hatun): dns, postup" in out
    # Importing again reuses the same key files.
    assert main(["import", str(tmp_path / "wg0.conf"), "--key-dir", str(keys)]) == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("[Interface]\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {p}\nAllowedIPs = 198.19.77.0/24\n", "[Interface] has no PrivateKey"),
        ("[Interface]\nPrivateKey = {k}\nAddress = 198.18.1.2/30\n", "has 0 [Peer] sections"),
        ("[Interface]\nPrivateKey = {k}\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {p}\nAllowedIPs = 198.19.77.0/24\n[Peer]\nPublicKey = {p}\nAllowedIPs = 198.19.78.0/24\n", "has 2 [Peer] sections"),
        ("[Interface]\nPrivateKey = {k}\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {p}\nPresharedKey = {p}\nAllowedIPs = 198.19.77.0/24\n", "PresharedKey is not supported"),
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
