"""`hatun gateway`: what a gateway needs for one tunnel of this host, in wg-quick, wg and nft shapes.

The lab's gateways are brought up by the real wg-quick from exactly this output (hatun/lab/topology.py),
so every lab test proves that it carries traffic; here: its content, its validity for wg-quick, wg
and nft, that it never prints a secret, and that the lab's files are what the CLI prints.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from hatun.cli import main
from hatun.config import parse_config
from hatun.gateway import GatewayError, plan_gateway, render_nft, render_wg, render_wg_quick
from hatun.keys import PresharedKey, PrivateKey, write_private_key_file

HOST = PrivateKey.generate()
GW = PrivateKey.generate()
PSK = PresharedKey.generate()


def config_text(keyfile: str = "/k", psk: str | None = None, address: str = '["198.18.101.2/30", "2001:2:0:101::2/64"]',
                prefixes: str = '["198.19.77.0/24", "2001:2:0:77::/64"]', source: str = '["198.18.99.1", "2001:2:0:99::1"]',
                probe: str = "") -> str:
    return f"""
[routing]
prefixes = {prefixes}
source = {source}
[[tunnels]]
name = "office-1"
private_key_file = "{keyfile}"
{f'preshared_key_file = "{psk}"' if psk else ''}
address = {address}
peer_public_key = "{GW.public_key.base64}"
endpoint = "198.18.1.2:51999"
mtu = 1380
{probe}
"""


def plan(**kw):
    return plan_gateway(parse_config(config_text(**kw)), "office-1", HOST.public_key)


def test_wg_quick_file_has_the_peer_return_route_forwarding_and_masquerading():
    text = render_wg_quick(plan(psk="/p"), "hatun gateway office-1 c.toml")
    assert "Address = 198.18.101.1/30, 2001:2:0:101::1/64" in text
    assert "ListenPort = 51999" in text and "MTU = 1380" in text
    assert f"PublicKey = {HOST.public_key.base64}" in text
    # The host's tunnel addresses and its source: wg-quick routes them into the tunnel (the return route).
    assert "AllowedIPs = 198.18.101.2/32, 2001:2:0:101::2/128, 198.18.99.1/32, 2001:2:0:99::1/128" in text
    assert "PostUp = wg set %i private-key /etc/wireguard/%i.key" in text
    assert f"PostUp = wg set %i peer {HOST.public_key.base64} preshared-key /etc/wireguard/%i.psk" in text
    assert "sysctl -q -w net.ipv4.ip_forward=1" in text and "net.ipv6.conf.all.forwarding=1" in text
    assert 'iifname "%i" ip daddr { 198.19.77.0/24 } masquerade' in text
    assert 'iifname "%i" ip6 daddr { 2001:2:0:77::/64 } masquerade' in text
    assert "PostDown = nft delete table inet hatun_%i" in text


def test_ipv4_only_host_gets_no_ipv6_forwarding_and_no_psk_line():
    p = plan(address='"198.18.101.2/30"', prefixes='["198.19.77.0/24"]', source='"198.18.99.1"')
    text = render_wg_quick(p, "x")
    assert "ipv6" not in text and "ip6 " not in text and "preshared" not in text


def test_single_host_tunnel_address_has_no_gateway_address():
    p = plan(address='"198.18.101.2/32"', prefixes='["198.19.77.0/24"]', source='"198.18.99.1"',
             probe='probe = "icmp://198.19.77.1"')
    assert p.gateway_addresses == ()
    assert "\nAddress =" not in render_wg_quick(p, "x")


def test_wg_and_nft_shapes():
    p = plan()
    wg = render_wg(p, "x")
    assert wg.count("[Peer]") == 1 and "[Interface]" not in wg
    assert "ip route replace 198.18.99.1/32 dev IFNAME" in wg
    nft = render_nft(p, "x", "wg-office")
    assert "table inet hatun_wg-office {" in nft and 'iifname "wg-office" ip daddr { 198.19.77.0/24 }' in nft
    with pytest.raises(GatewayError):
        render_nft(p, "x", "bad name; drop")


def test_unknown_tunnel_is_a_clear_error():
    with pytest.raises(GatewayError, match="no tunnel named 'gw9'.*office-1"):
        plan_gateway(parse_config(config_text()), "gw9", HOST.public_key)


def test_cli_prints_no_secret(tmp_path, capsys):
    key, psk = tmp_path / "host.key", tmp_path / "host.psk"
    write_private_key_file(str(key), HOST)
    write_private_key_file(str(psk), PSK)
    cfg = tmp_path / "hatun.toml"
    cfg.write_text(config_text(str(key), str(psk)))
    for fmt in ("wg-quick", "wg", "nft"):
        assert main(["gateway", "office-1", str(cfg), "--format", fmt]) == 0
        out, err = capsys.readouterr()
        for secret in (HOST.base64, HOST.hex, PSK.base64, PSK.hex):
            assert secret not in out + err
    assert main(["gateway", "nope", str(cfg)]) == 2
    assert "no tunnel named 'nope'" in capsys.readouterr().err


def test_wg_quick_and_wg_accept_the_output(tmp_path):
    """`wg-quick strip` reads the wg-quick file (and keeps only the peer for wg); the wg shape is valid
    for `wg` too (checked by stripping it as a file of its own)."""
    if not shutil.which("wg-quick"):
        pytest.skip("needs wireguard-tools")
    p = plan(psk="/p")
    for text in (render_wg_quick(p, "x"), "[Interface]\nListenPort = 1\n" + render_wg(p, "x")):
        f = tmp_path / "wg0.conf"
        f.write_text(text)
        f.chmod(0o600)
        r = subprocess.run(["wg-quick", "strip", str(f)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert f"PublicKey = {HOST.public_key.base64}" in r.stdout and "PostUp" not in r.stdout


@pytest.mark.netns
def test_nft_accepts_the_masquerading(namespaces, tmp_path):
    from tests.nsutil import ns_exec

    ns = namespaces.new("gwnft")
    f = tmp_path / "gw.nft"
    f.write_text(render_nft(plan(), "x", "wg0"))
    ns_exec(ns, "nft", "-f", str(f))
    ns_exec(ns, "nft", "-f", str(f))  # again: replaces itself, no duplicate rules
    listed = ns_exec(ns, "nft", "list", "table", "inet", "hatun_wg0").stdout
    assert listed.count("masquerade") == 2


@pytest.mark.netns
@pytest.mark.slow
def test_lab_gateways_run_exactly_what_the_cli_prints(lab_factory, capsys):
    """The lab's gateways came up through wg-quick from these files, and every lab test sends its
    traffic through them; here: the files are byte for byte what `hatun gateway` prints."""
    from hatun.lab.topology import gateway_config_path, psk_path

    lab = lab_factory(gateways=2, ipv6=True)
    for i in (1, 2):
        args = ["gateway", f"gw{i}", lab.config_path, "--key-file", f"{lab.dir}/gw{i}.key"]
        if psk_path(lab, i):
            args += ["--psk-file", psk_path(lab, i)]
        assert main(args) == 0
        printed = capsys.readouterr().out
        with open(gateway_config_path(lab, i)) as f:
            assert f.read() == printed
    assert "preshared-key" in printed  # gw2 has a preshared key


@pytest.mark.parametrize("path", ["/k; touch /tmp/pwned", "/k\n[Peer]", "/k # x", "/k\x00"])
def test_paths_cannot_inject_into_postup(path):
    p = plan(psk="/p")
    text = None
    try:
        text = render_wg_quick(p, "x", key_file=path)
    except GatewayError:
        return
    # Accepted only when quoted: one PostUp line, the path a single shell word.
    import shlex

    line = next(line for line in text.splitlines() if "private-key" in line)
    assert shlex.split(line.split("=", 1)[1])[-1] == path


def test_a_path_with_a_space_is_quoted_and_the_rules_survive_a_re_up():
    text = render_wg_quick(plan(), "x", key_file="/etc/wire guard/%i.key")
    assert "PostUp = wg set %i private-key '/etc/wire guard/%i.key'" in text
    assert "flush chain inet hatun_%i postrouting" in text


def test_a_probe_target_outside_the_prefixes_is_masqueraded_too():
    p = plan(address='"198.18.101.2/30"', prefixes='["198.19.77.0/24"]', source='"198.18.99.1"',
             probe='probe = "icmp://198.20.0.5"')
    assert 'ip daddr { 198.19.77.0/24, 198.20.0.5/32 } masquerade' in render_wg_quick(p, "x")


def test_wg_shape_names_the_gateway_address():
    assert "needs the gateway's tunnel address(es), which the host probes by default: 198.18.101.1/30" in render_wg(plan(), "x")


def test_two_tunnels_on_one_listen_port_are_a_problem():
    from hatun.config import ConfigError

    text = config_text() + config_text().split("[[tunnels]]")[1].replace('"office-1"', '"office-2"').replace(
        "198.18.101.2/30", "198.18.102.2/30").replace("2001:2:0:101::2", "2001:2:0:102::2")
    text = text.replace("mtu = 1380", "mtu = 1380\nlisten_port = 51999")
    text = text.replace("\nname = \"office-2\"", "\n[[tunnels]]\nname = \"office-2\"", 1) if "[[tunnels]]\nname = \"office-2\"" not in text else text
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert any("each tunnel needs a UDP port of its own" in str(p) for p in info.value.problems)
