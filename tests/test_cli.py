"""The `hatun` command for config work: golden output, exit codes, --json, and fuzzing that no input
ever produces a traceback or shows a private key."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatun.cli import main
from hatun.keys import PrivateKey, write_private_key_file

HERE = pathlib.Path(__file__).parent
GOLDEN = HERE / "golden"
# Fixed keys so that golden output is stable (RFC 7748 vectors; never use them for real tunnels).
ALICE = PrivateKey(bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
BOB = PrivateKey(bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"))


def run(capsys, *argv: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HATUN_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"output differs from {path} (HATUN_UPDATE_GOLDEN=1 rewrites it)"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_private_key_file("gw1.key", ALICE)
    write_private_key_file("gw2.key", BOB)
    return tmp_path


GOOD = f"""
[routing]
prefixes = ["198.19.77.0/24"]
source = "198.18.99.1"

[[tunnels]]
name = "gw1"
private_key_file = "gw1.key"
address = "198.18.101.2/30"
peer_public_key = "{BOB.public_key.base64}"
endpoint = "198.18.1.2:51820"
weight = 2

[[tunnels]]
name = "gw2"
private_key_file = "gw2.key"
address = "198.18.102.2/30"
peer_public_key = "{ALICE.public_key.base64}"
endpoint = "gw2.example.net:51820"
probe = "tcp://198.19.77.10:443"
"""

BAD = f"""
[routing]
prefixes = ["198.19.77.0/24"]

[[tunnels]]
name = "gw1"
private_key_file = "gw1.key"
address = "198.18.101.2/30"
peer_public_key = "{BOB.public_key.base64}"
endpoint = "198.18.1.2:51820"

[[tunnels]]
name = "gw2"
private_key_file = "gw1.key"
address = "198.18.102.2/30"
peer_public_key = "{ALICE.public_key.base64}"
endpoint = "gw2.example.net"
weight = 0
"""


def test_check_valid_golden(capsys, workdir):
    (workdir / "hatun.toml").write_text(GOOD)
    code, out, err = run(capsys, "check", "hatun.toml")
    assert code == 0 and err == ""
    golden("check-valid.txt", out)
    assert ALICE.public_key.base64 in out and BOB.public_key.base64 in out
    assert ALICE.base64 not in out and BOB.base64 not in out


def test_check_invalid_golden(capsys, workdir):
    (workdir / "hatun.toml").write_text(BAD)
    code, out, err = run(capsys, "check", "hatun.toml")
    assert code == 1
    golden("check-invalid.txt", out)
    assert err == "hatun.toml: 3 problems\n"


def test_check_json(capsys, workdir):
    (workdir / "good.toml").write_text(GOOD)
    (workdir / "bad.toml").write_text(BAD)
    code, out, _ = run(capsys, "check", "good.toml", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["valid"] is True
    assert [t["public_key"] for t in doc["tunnels"]] == [ALICE.public_key.base64, BOB.public_key.base64]
    code, out, _ = run(capsys, "check", "bad.toml", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["valid"] is False
    assert {"loc": "tunnels[1].endpoint", "message": "port missing", "got": "'gw2.example.net'"} in doc["problems"]


def test_check_skip_secrets(capsys, workdir, monkeypatch):
    monkeypatch.delenv("HATUN_GW1_KEY", raising=False)
    text = GOOD.replace('private_key_file = "gw1.key"', 'private_key_env = "HATUN_GW1_KEY"')
    (workdir / "ci.toml").write_text(text)
    code, out, _ = run(capsys, "check", "ci.toml")
    assert code == 1 and "HATUN_GW1_KEY is not set" in out
    code, out, _ = run(capsys, "check", "--skip-secrets", "ci.toml")
    assert code == 0 and "not checked" in out


def test_check_unreadable_and_usage(capsys, workdir):
    code, _, err = run(capsys, "check", "missing.toml")
    assert code == 2 and err == "hatun: missing.toml: no such file\n"
    code, _, err = run(capsys, "check", str(workdir))
    assert code == 2 and "is a directory" in err
    (workdir / "bin.toml").write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run(capsys, "check", "bin.toml")
    assert code == 2 and "not UTF-8" in err
    code, _, _ = run(capsys, "check")
    assert code == 2
    code, _, _ = run(capsys, "frobnicate")
    assert code == 2


def test_keygen_and_pubkey(capsys, workdir, monkeypatch):
    code, out, _ = run(capsys, "keygen", "--out", "new.key")
    assert code == 0
    assert oct(os.stat("new.key").st_mode & 0o777) == "0o600"
    key = PrivateKey.from_base64(pathlib.Path("new.key").read_text())
    assert out.strip() == key.public_key.base64
    code, _, err = run(capsys, "keygen", "--out", "new.key")
    assert code == 2 and "not overwritten" in err
    code, out, _ = run(capsys, "pubkey", stdin=key.base64 + "\n", monkeypatch=monkeypatch)
    assert code == 0 and out.strip() == key.public_key.base64
    code, out, err = run(capsys, "pubkey", stdin="nope", monkeypatch=monkeypatch)
    assert code == 1 and out == "" and "does not hold a private key" in err


def test_python_dash_m_works(workdir):
    res = subprocess.run([sys.executable, "-m", "hatun", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("hatun ")


TOML_VALUES = st.recursive(
    st.one_of(st.integers(-10**6, 10**6), st.text(max_size=30), st.booleans(), st.floats(allow_nan=False)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(
    ["routing", "health", "metrics", "tunnels", "prefixes", "source", "name", "address", "endpoint", "weight",
     "probe", "interval", "rise", "private_key_file", "private_key_env", "peer_public_key", "listen", "x"]
)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not isinstance(v, float) or v == v and abs(v) != float("inf") else "0"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(KEYS, st.one_of(TOML_VALUES, st.dictionaries(KEYS, TOML_VALUES, max_size=6),
                                            st.lists(st.dictionaries(KEYS, TOML_VALUES, max_size=8), max_size=3)),
                           max_size=6))
def test_fuzz_random_toml_never_tracebacks(capsys, workdir, doc):
    text = "\n".join(f"{k} = {_toml_value(v)}" for k, v in doc.items())
    (workdir / "f.toml").write_text(text)
    code, out, err = run(capsys, "check", "f.toml")
    assert code in (0, 1, 2), err
    assert "Traceback" not in out + err and "internal error" not in err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes_never_traceback(capsys, workdir, data):
    (workdir / "b.toml").write_bytes(data)
    for argv in (("check", "b.toml"), ("check", "b.toml", "--json")):
        code, out, err = run(capsys, *argv)
        assert code in (0, 1, 2), err
        assert "Traceback" not in out + err and "internal error" not in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key_field=st.sampled_from(["private_key", "peer_public_key", "pk", "endpoint", "name", "prefixes",
                                   "private_key_file", "private_key_env", "interface", "address"]))
def test_private_key_in_wrong_place_never_echoed(capsys, workdir, key_field):
    secret = ALICE.base64
    text = f'[routing]\nprefixes = ["198.19.77.0/24"]\n[[tunnels]]\n{key_field} = "{secret}"\n'
    (workdir / "s.toml").write_text(text)
    for argv in (("check", "s.toml"), ("check", "s.toml", "--json")):
        _, out, err = run(capsys, *argv)
        assert secret not in out + err


def _parsers(parser, path=("hatun",)):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_help_is_written_for_a_newcomer(capsys):
    """No internal marker in any --help (a hidden command once showed as `schema ==SUPPRESS==`), and
    every argument and option of every command says what it is."""
    from hatun.cli import build_parser

    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert "SUPPRESS" not in text, path
        for action in parser._actions:
            if action.dest in ("help", "version") or action.help == "==SUPPRESS==":
                continue
            if action.__class__.__name__ == "_SubParsersAction":
                continue
            assert action.help, f"{' '.join(path)}: {action.option_strings or action.dest} has no help"
    assert "schema" not in build_parser().format_help()


def test_journal_lines_carry_their_priority_and_no_time_stamp():
    """Under systemd ($JOURNAL_STREAM names stderr) each line starts with its syslog priority, so
    `journalctl -p warning` finds hatun's warnings; a key in the message is still redacted."""
    import logging

    from hatun.logs import JournalFormatter, journal_stream

    key = ALICE.public_key.base64
    rec = logging.LogRecord("hatun", logging.WARNING, __file__, 1, "gw2 down %s", (key,), None)
    assert JournalFormatter().format(rec) == "<4>WARNING gw2 down <redacted>"
    try:
        raise ValueError("boom\nforged line")
    except ValueError:
        import sys

        rec = logging.LogRecord("hatun", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = JournalFormatter().format(rec).split("\n")
    assert all(line.startswith("<3>") for line in lines) and len(lines) > 2
    assert not journal_stream()  # pytest's stderr is not the journal
