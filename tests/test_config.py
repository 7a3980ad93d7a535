"""Config model and checks: a corpus of valid and invalid configs, each invalid one listing the
exact problems expected (`# expect:` lines), plus table tests of the value parsers."""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib

import pytest

from hatun.config import (
    ConfigError,
    Endpoint,
    default_peer_address,
    json_schema,
    load_config,
    parse_config,
    parse_endpoint,
    parse_probe,
)
from hatun.durations import format_duration, parse_duration
from hatun.keys import PresharedKey, PrivateKey, write_private_key_file

HERE = pathlib.Path(__file__).parent
CORPUS = HERE / "configs"
ROOT = HERE.parent


@pytest.fixture
def keydir(tmp_path, monkeypatch):
    """Key files and environment the corpus refers to, and the substitutions for its placeholders."""
    good = PrivateKey.generate()
    write_private_key_file(str(tmp_path / "good.key"), good)
    write_private_key_file(str(tmp_path / "open.key"), PrivateKey.generate())
    os.chmod(tmp_path / "open.key", 0o644)
    (tmp_path / "garbage.key").write_text("not-a-key!!\n")
    os.chmod(tmp_path / "garbage.key", 0o600)
    monkeypatch.setenv("HATUN_TEST_GOOD", PrivateKey.generate().base64)
    monkeypatch.setenv("HATUN_TEST_BAD", "#" * 43 + "=")
    monkeypatch.delenv("HATUN_TEST_UNSET", raising=False)
    peer = PrivateKey.generate().public_key
    write_private_key_file(str(tmp_path / "good.psk"), PresharedKey.generate())
    write_private_key_file(str(tmp_path / "open.psk"), PresharedKey.generate())
    os.chmod(tmp_path / "open.psk", 0o644)
    (tmp_path / "peer.psk").write_text(peer.base64 + "\n")
    os.chmod(tmp_path / "peer.psk", 0o600)
    monkeypatch.setenv("HATUN_TEST_PSK", PresharedKey.generate().base64)
    return {
        "@KEYDIR@": str(tmp_path),
        "@PEER@": peer.base64,
        "@OWNPUB@": good.public_key.base64,
        "@PRIVATE@": good.base64,
        "_good": good,
    }


def materialise(src: pathlib.Path, subst: dict, dest_dir: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
    text = src.read_text()
    for k, v in subst.items():
        if k.startswith("@"):
            text = text.replace(k, v)
    dest = dest_dir / src.name
    dest.write_text(text)
    expected = [line[len("# expect: "):] for line in text.splitlines() if line.startswith("# expect: ")]
    return dest, expected


@pytest.mark.parametrize("name", sorted(p.name for p in (CORPUS / "valid").glob("*.toml")))
def test_valid_corpus(name, keydir, tmp_path):
    path, _ = materialise(CORPUS / "valid" / name, keydir, tmp_path)
    config, secrets = load_config(str(path))
    assert set(secrets.keys) == {t.name for t in config.tunnels}


@pytest.mark.parametrize("name", sorted(p.name for p in (CORPUS / "invalid").glob("*.toml")))
def test_invalid_corpus_reports_every_problem(name, keydir, tmp_path):
    path, expected = materialise(CORPUS / "invalid" / name, keydir, tmp_path)
    assert expected, f"{name} lists no '# expect:' lines"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    got = [str(p) for p in info.value.problems]
    assert sorted(got) == sorted(expected)
    # No private key, in any form, in any message.
    good = keydir["_good"]
    for line in got:
        assert good.base64 not in line and good.hex not in line


def test_issue_example_validates(keydir, tmp_path):
    """The example in the foundation issue is a contract: it validates and keeps its meaning."""
    text = f"""
[routing]
prefixes = ["198.19.77.0/24"]
source = "198.18.99.1"

[health]
interval = "100ms"
timeout = "250ms"
rise = 3
fall = 2

[metrics]
listen = "127.0.0.1:9469"

[[tunnels]]
name = "gw1"
private_key_file = "{keydir['@KEYDIR@']}/good.key"
address = "198.18.101.2/30"
peer_public_key = "{keydir['@PEER@']}"
endpoint = "198.18.1.2:51820"
weight = 2
priority = 0
keepalive = 25
probe = "icmp://198.18.101.1"
"""
    c = parse_config(text)
    t = c.tunnels[0]
    assert c.routing.prefixes == [ipaddress.ip_network("198.19.77.0/24")]
    assert c.routing.source == [ipaddress.ip_address("198.18.99.1")]
    assert (c.health.interval, c.health.timeout, c.health.rise, c.health.fall) == (0.1, 0.25, 3, 2)
    assert c.metrics.address == ("127.0.0.1", 9469)
    assert (t.name, t.ifname, t.weight, t.priority, t.keepalive) == ("gw1", "hat-gw1", 2, 0, 25)
    assert t.endpoint == Endpoint("198.18.1.2", 51820)
    assert str(t.probe_target) == "icmp://198.18.101.1"


@pytest.mark.parametrize("path", ["config/hatun.example.toml", "config/runner.example.toml",
                                  "config/runner-enroll.example.toml"])
def test_shipped_examples_validate(path):
    config, _ = load_config(str(ROOT / path), skip_secrets=True)
    assert config.tunnels


def test_the_gateway_example_validates():
    from hatun.config import load_gateway_config

    assert load_gateway_config(str(ROOT / "config" / "gateway-enroll.example.toml")).enroll.audience == "hatun-gw1"


def test_tunnel_health_overrides_merge(keydir):
    text = f"""
[routing]
prefixes = ["198.19.77.0/24"]
[health]
interval = "200ms"
fall = 4
[[tunnels]]
name = "a"
private_key_env = "HATUN_TEST_GOOD"
address = "198.18.101.2/30"
peer_public_key = "{keydir['@PEER@']}"
endpoint = "198.18.1.2:51820"
[tunnels.health]
fall = 7
"""
    c = parse_config(text)
    h = c.health_for(c.tunnels[0])
    assert (h.interval, h.fall, h.rise) == (0.2, 7, 10)


def test_skip_secrets_validates_without_keys(keydir, tmp_path):
    path, expected = materialise(CORPUS / "invalid" / "key-sources.toml", keydir, tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), skip_secrets=True)
    got = {str(p) for p in info.value.problems}
    # Structural key problems remain; problems of reading secrets are skipped.
    assert any("exactly one of" in p for p in got)
    assert not any("does not exist" in p or "is not set" in p for p in got)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("198.18.1.2:51820", ("198.18.1.2", 51820)),
        ("[2001:2::1]:1", ("2001:2::1", 1)),
        ("gw.example.net:65535", ("gw.example.net", 65535)),
        ("gw:51820", ("gw", 51820)),
    ],
)
def test_endpoint_parses(text, expected):
    ep = parse_endpoint(text)
    assert (ep.host, ep.port) == expected
    assert str(ep) == text


@pytest.mark.parametrize(
    "text, message",
    [
        ("gw2.example.net", "port missing"),
        ("198.18.1.2:", "port missing"),
        (":51820", "host missing"),
        ("[2001:2::1]", "port missing"),
        ("2001:2::1", "port missing (an IPv6 endpoint is written [2001:2::1]:51820)"),
        ("[198.18.1.2]:1", "'198.18.1.2' in brackets is not an IPv6 address"),
        ("-bad-.net:1", "'-bad-.net' is neither an IP address nor a valid DNS name"),
    ],
)
def test_endpoint_errors(text, message):
    with pytest.raises(ValueError) as info:
        parse_endpoint(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "text, kind, host, port",
    [("icmp://198.18.101.1", "icmp", "198.18.101.1", None), ("tcp://198.19.77.10:443", "tcp", "198.19.77.10", 443),
     ("icmp://[2001:2::1]", "icmp", "2001:2::1", None), ("tcp://[2001:2::1]:22", "tcp", "2001:2::1", 22)],
)
def test_probe_parses(text, kind, host, port):
    p = parse_probe(text)
    assert (p.kind, str(p.host), p.port) == (kind, host, port)
    assert str(p) == text


@pytest.mark.parametrize("text", ["icmp://gw.example.net", "tcp://198.18.1.1", "udp://198.18.1.1:1", "198.18.1.1"])
def test_probe_errors(text):
    with pytest.raises(ValueError):
        parse_probe(text)


@pytest.mark.parametrize(
    "value, seconds",
    [("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("1.5s", 1.5), ("1h", 3600.0), (3, 3.0), (0.1, 0.1), (" 10 ms ", 0.01)],
)
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "1", "1 sec", "-1s", "1e3s", True, None, [], "nan", float("inf")])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("seconds, text", [(0.1, "100ms"), (0.25, "250ms"), (2, "2s"), (90, "90s"), (120, "2m"), (7200, "2h"), (0, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    "address, peer",
    [("198.18.101.2/30", "198.18.101.1"), ("198.18.101.1/30", "198.18.101.2"), ("198.18.101.1/31", "198.18.101.0"),
     ("198.18.101.5/24", "198.18.101.1"), ("2001:2::2/64", "2001:2::1"), ("2001:2::1/127", "2001:2::")],
)
def test_default_probe_target(address, peer):
    assert str(default_peer_address(ipaddress.ip_interface(address))) == peer


def test_schema_file_is_current():
    """config/hatun.schema.json is generated from the models: regenerate with `hatun schema`."""
    on_disk = json.loads((ROOT / "config" / "hatun.schema.json").read_text())
    assert on_disk == json_schema(), "config/hatun.schema.json is stale: run `hatun schema > config/hatun.schema.json`"


def _tunnel(keydir, name: str, n: int) -> str:
    """A [[tunnels]] table for the config texts below."""
    return (f'[[tunnels]]\nname = "{name}"\nprivate_key_env = "HATUN_TEST_GOOD"\naddress = "198.18.{100 + n}.2/30"\n'
            f'peer_public_key = "{keydir["@PEER@"]}"\nendpoint = "198.18.1.{1 + n}:51820"\n')


def test_tunnel_health_overrides_keep_their_types_and_a_tunnel_profile_keeps_the_given_keys(keydir):
    """A tunnel's interval or max_rtt is a number of seconds / an RttLimit, never the written string;
    a tunnel's own profile replaces [health]'s profile but not the keys [health] gave."""
    from hatun.health import RttLimit

    text = f"""
[routing]
prefixes = ["198.19.77.0/24"]
[health]
max_rtt = "100ms"
handshake_timeout = "30s"
{_tunnel(keydir, 'a', 1)}health = {{ interval = "200ms", recover_rtt = "2x" }}
{_tunnel(keydir, 'b', 2)}health = {{ profile = "wan", rise = 2 }}
"""
    c = parse_config(text)
    a, b = (c.health_for(t) for t in c.tunnels)
    assert a.interval == 0.2 and a.recover_rtt == RttLimit(2.0, relative=True) and a.max_rtt == RttLimit(0.1)
    assert (b.profile, b.interval, b.rise, b.fall, b.handshake_timeout, b.max_rtt) == ("wan", 0.5, 2, 4, 30.0, RttLimit(0.1))


@pytest.mark.parametrize("health, where", [
    ('min_timeout = "1s"\ntimeout = "100ms"', "health.min_timeout"),
    ("max_loss = 0.1\nrecover_loss = 0.5", "health.recover_loss"),
    ('max_rtt = "50ms"\nrecover_rtt = "80ms"', "health.recover_rtt"),
    ('profile = "fast"\nmin_timeout = "300ms"', "health.min_timeout"),  # fast's ceiling is 200 ms
])
def test_contradicting_health_limits_are_problems(keydir, health, where):
    text = f"""
[routing]
prefixes = ["198.19.77.0/24"]
[health]
{health}
{_tunnel(keydir, 'a', 1)}"""
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert where in str(e.value), str(e.value)
