"""Hostile config input: any value of any type in any field gives problem lines (exit 1), never a crash;
key-shaped values are never echoed (check, import, logs); log lines cannot be forged; ownership
markers that would point at what hatun does not own are refused; exposed metrics are warned about.

Mutants are built from the valid configs of the repository (tests/configs/valid, config/*.toml),
rendered back to TOML by the small emitter below (the standard library only reads TOML).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math
import os
import pathlib
import re
import socket
import sys
import tomllib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hatun.cli import main
from hatun.config import ConfigError, config_warnings, load_config, parse_config
from hatun.keys import PrivateKey, redact, write_private_key_file

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
BASE_FILES = sorted((HERE / "configs" / "valid").glob("*.toml")) + sorted((ROOT / "config").glob("*.toml"))
# C0, DEL, C1 and the Unicode line/paragraph separators: none may reach a line of output raw.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# ---------------------------------------------------------------- a tiny TOML emitter


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\t" or (ord(ch) >= 0x20 and ord(ch) != 0x7F):
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}")
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def toml_value(v: Any) -> str:
    """An inline TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _array_of_tables(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(doc: dict[str, Any]) -> str:
    """DOC as a TOML document: top-level values, then [tables] and [[arrays of tables]]."""
    lines = [f"{_toml_key(k)} = {toml_value(v)}" for k, v in doc.items()
             if not isinstance(v, dict) and not _array_of_tables(v)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{_toml_key(k)}]")
            lines += [f"{_toml_key(k2)} = {toml_value(v2)}" for k2, v2 in v.items()]
        elif _array_of_tables(v):
            for table in v:
                lines.append(f"[[{_toml_key(k)}]]")
                lines += [f"{_toml_key(k2)} = {toml_value(v2)}" for k2, v2 in table.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the environment of the bases


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Key files and variables that the base configs refer to; yields (directory, base documents)."""
    d = tmp_path_factory.mktemp("hostile")
    good = PrivateKey.generate()
    write_private_key_file(str(d / "good.key"), good)
    subst = {"@KEYDIR@": str(d), "@PEER@": PrivateKey.generate().public_key.base64}
    bases = []
    for path in BASE_FILES:
        text = path.read_text()
        for k, v in subst.items():
            text = text.replace(k, v)
        bases.append((path.name, tomllib.loads(text)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HATUN_TEST_GOOD", PrivateKey.generate().base64)
        for name in ("HATUN_GW1_KEY", "HATUN_GW2_KEY"):
            mp.setenv(name, PrivateKey.generate().base64)
        yield d, bases


def test_emitter_round_trips_the_bases(env):
    _, bases = env
    assert len(bases) >= 4
    for name, doc in bases:
        assert tomllib.loads(to_toml(doc)) == doc, name


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in DOC (tables, values, list elements), as key/index paths."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out += paths(v, prefix + (k,))
    return out


def _parent(doc: Any, path: tuple) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


def _copy(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _copy(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_copy(v) for v in doc]
    return doc


def assert_clean(text: str, tmp: pathlib.Path, pure_too: bool = False) -> None:
    """The contract for any input: a Config, or a ConfigError of one-line problems (from
    load_config, and from the pure parse_config too when PURE_TOO)."""
    parsers = [parse_config] if pure_too else []
    path = tmp / "mutant.toml"
    path.write_text(text)
    parsers.append(lambda _: load_config(str(path)))
    for parse in parsers:
        try:
            parse(text)
        except ConfigError as e:
            assert e.problems
            for p in e.problems:
                assert not CONTROL.search(str(p)), repr(str(p))


def run_check(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main(["check", *argv])
    finally:
        sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- item 13: wrong types everywhere


WRONG = [
    True, False, 0, -1, 1, 2**31, 2**63 - 1, -(2**63), 1.5, -0.0, float("inf"), float("-inf"), float("nan"),
    "", " ", "x" * 5000, "\x00\n2026-01-01T00:00:00 WARNING forged\x1b[31m\x7f\x85\u2028", "é☃𝄞", "-1", "0x",
    [], [1, "a", True], [[]], {}, {"a": 1}, {"x": {"y": []}},
    dt.datetime(2026, 1, 1, 0, 0, 0), dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), dt.date(2026, 1, 1),
    dt.time(12, 30),
]


def test_every_type_in_every_field_is_a_problem_not_a_crash(env, tmp_path):
    """Item 13: each place of each base config, replaced by each wrong type, gives clean problems."""
    _, bases = env
    seen = 0
    for _, base in bases:
        for path in paths(base):
            for value in WRONG:
                doc = _copy(base)
                _parent(doc, path)[path[-1]] = value
                assert_clean(to_toml(doc), tmp_path)
                seen += 1
    assert seen > 1000


def test_address_true_exits_1(env, tmp_path):
    """The reported case: `address = true` made `hatun check` end with `internal error` (exit 70)."""
    d, bases = env
    doc = _copy(dict(bases)["minimal.toml"])
    for value in (True, 7, 1.5, dt.date(2026, 1, 1), {"a": 1}, [True]):
        doc["tunnels"][0]["address"] = value
        (tmp_path / "a.toml").write_text(to_toml(doc))
        for argv in ((str(tmp_path / "a.toml"),), (str(tmp_path / "a.toml"), "--json")):
            code, out, err = run_check(*argv)
            assert code == 1 and "internal error" not in err, (value, err)
            assert "tunnels[0].address" in out


SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, -1, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**32, 2**32 + 1, 2**63 - 1, -(2**63)]),
    st.floats(),
    st.text(max_size=40),
    st.sampled_from(["", " ", "x" * 3000, "\n", "\x00", "\u2028", "../../etc/passwd", "/", "lo", "all",
                     "127.0.0.1", "::", "0.0.0.0:0", "[::]:9469", "icmp://", "tcp://[::1]:0", "1e999s",
                     "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk", "A" * 64]),
    st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)),
    st.dates(),
    st.times(),
)
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=6)


def _typo(key: str, n: int) -> str:
    if not key:
        return "x"
    i = n % len(key)
    return [key[:i] + key[i + 1:], key[:i] + key[i] * 2 + key[i:], key.upper(), key + "s", key.replace("_", "-")][n % 5] or "x"


@st.composite
def mutants(draw, bases):
    name, doc = draw(st.sampled_from(bases))
    doc = _copy(doc)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "replace", "delete", "typo", "extra", "duplicate", "many"]))
        places = paths(doc)
        if op == "many":
            tunnels = doc.get("tunnels")
            if _array_of_tables(tunnels):
                n = draw(st.integers(2, 300))
                unique = draw(st.booleans())
                doc["tunnels"] = [dict(tunnels[i % len(tunnels)], **({"name": f"t{i}"} if unique else {}))
                                  for i in range(n)]
            continue
        if op == "extra" or not places:
            tables = [p for p in places if isinstance(_parent(doc, p + ("",)), dict)] if places else []
            target = doc if not tables or draw(st.booleans()) else _parent(doc, draw(st.sampled_from(tables)) + ("",))
            target[draw(st.text(max_size=12))] = draw(VALUES)
            continue
        path = draw(st.sampled_from(places))
        parent = _parent(doc, path)
        if op == "replace":
            parent[path[-1]] = draw(VALUES)
        elif op == "delete":
            del parent[path[-1]]
        elif op == "typo" and isinstance(parent, dict):
            parent[_typo(path[-1], draw(st.integers(0, 99)))] = parent.pop(path[-1])
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(_copy(parent[path[-1]]))
    text = to_toml(doc)
    if draw(st.integers(0, 9)) == 0:  # a duplicated line: a duplicate key or table (TOML syntax error)
        lines = text.splitlines()
        i = draw(st.integers(0, len(lines) - 1))
        text = "\n".join(lines[: i + 1] + lines[i:]) + "\n"
    return name, text


@settings(max_examples=int(os.environ.get("HATUN_FUZZ_EXAMPLES", 150)), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_configs_never_crash_check(env, data):
    """Item 13, structured fuzzing: every mutant of a valid config gives a Config or clean problems, and
    `hatun check` (text and --json, with and without secrets) exits 0 or 1, never 70."""
    d, bases = env
    _, text = data.draw(mutants(bases))
    assert_clean(text, d, pure_too=True)
    path = d / "mutant.toml"
    path.write_text(text)
    flags = data.draw(st.sampled_from([(), ("--json",), ("--skip-secrets",), ("--json", "--skip-secrets")]))
    code, out, err = run_check(str(path), *flags)
    assert code in (0, 1), err
    assert "internal error" not in err and "Traceback" not in out + err
    if "--json" in flags:
        doc = json.loads(out)
        assert doc["valid"] is (code == 0)
    else:
        assert all(not CONTROL.search(line) for line in out.splitlines())


def test_toml_the_reader_chokes_on(env, tmp_path):
    """Inputs on which tomllib itself raises other exceptions than TOMLDecodeError."""
    for text in ("a = " + "9" * 5000, "a = " + "[" * 100000, "a = " + "{b=" * 5000,
                 '[routing]\nprefixes = ["198.19.77.0/24"]\n[[tunnels]]\naddress = ' + "[" * 300 + "]" * 300):
        with pytest.raises(ConfigError) as info:
            parse_config(text)
        assert all(not CONTROL.search(str(p)) for p in info.value.problems)
        (tmp_path / "t.toml").write_text(text)
        assert run_check(str(tmp_path / "t.toml"))[0] == 1


def test_many_tunnels_stay_fast(env, tmp_path):
    """Thousands of tunnels with the same address: the overlap check is a sweep with a bounded report,
    not pairs of every tunnel with every other (which took minutes for a 4 MiB file)."""
    tunnels = [{"name": f"t{i}", "private_key_env": "HATUN_TEST_GOOD", "address": "198.18.101.2/30",
                "peer_public_key": "Qjlu3Ov4Zsu3nc1mZEFoxptcJzxMyfaIxCoKuWeWEmI=", "endpoint": "198.18.1.2:51820"}
               for i in range(5000)]
    doc = {"routing": {"prefixes": ["198.19.77.0/24"], "fwmark_mask": "0xffff0000"}, "tunnels": tunnels}
    with pytest.raises(ConfigError) as info:
        parse_config(to_toml(doc))
    overlaps = [p for p in info.value.problems if "overlaps" in p.message]
    assert 0 < len(overlaps) <= 1000
    assert str(overlaps[0]) == ("tunnels[1].address: 198.18.101.2/30 overlaps tunnels[0].address 198.18.101.2/30"
                                " (tunnel 't0')")


# ---------------------------------------------------------------- item 6: keys are never echoed


def _alnum_key() -> PrivateKey:
    """A key whose base64 has no '+' or '/' and starts with a letter: it passes as a DNS label, an
    environment variable name or a file name, so only redaction keeps it out of messages."""
    for n in range(100000):
        raw = n.to_bytes(4, "big") + bytes(28)
        key = PrivateKey(bytes(a ^ b for a, b in zip(raw, b"hatun-redaction-test-key-32bytes")))
        if key.base64[0].isalpha() and key.base64[:43].isalnum():
            return key
    raise AssertionError("no such key found")


KEYS = [PrivateKey(bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")), _alnum_key()]


def key_shapes(key: PrivateKey) -> list[str]:
    b64, hexa = key.base64, key.hex
    return [b64, b64[:43], f" {b64} ", f"\t{b64[:43]}\n", f"\n{b64}\t", hexa, f" {hexa}\n", hexa.upper()]


def pasted(shape: str) -> list[str]:
    """SHAPE as it may be pasted: alone, into a path, before a port, into a probe."""
    bare = shape.strip()
    return [shape, f"/etc/hatun/{bare}", f"{bare}:51820", f"icmp://{bare}", f"hat-{bare}"]


def leaked(key: PrivateKey, text: str) -> bool:
    return any(s in text for s in (key.base64, key.base64[:43], key.hex, key.hex.upper(), key.hex[:43]))


STRING_FIELDS = [
    ("run_dir",), ("backend",), ("routing", "prefixes", 0), ("routing", "source"), ("routing", "nft_table"),
    ("routing", "mode"), ("routing", "when_all_down"), ("routing", "hash_policy"), ("routing", "fwmark_mask"),
    ("routing", "idle_timer"), ("health", "interval"), ("metrics", "listen"), ("control", "socket"),
    ("tunnels", 0, "name"), ("tunnels", 0, "private_key_file"), ("tunnels", 0, "private_key_env"),
    ("tunnels", 0, "address"), ("tunnels", 0, "peer_public_key"), ("tunnels", 0, "endpoint"),
    ("tunnels", 0, "probe"), ("tunnels", 0, "interface"), ("tunnels", 0, "allowed_ips"),
    ("tunnels", 0, "health", "timeout"), ("tunnels", 0, "private_key"),
]


def _key_base(d: pathlib.Path) -> dict[str, Any]:
    return {"routing": {"prefixes": ["198.19.77.0/24"]}, "health": {}, "metrics": {}, "control": {},
            "tunnels": [{"name": "gw1", "private_key_file": str(d / "good.key"), "address": "198.18.101.2/30",
                         "peer_public_key": "Qjlu3Ov4Zsu3nc1mZEFoxptcJzxMyfaIxCoKuWeWEmI=",
                         "endpoint": "198.18.1.2:51820", "health": {}}]}


def _set(doc: dict[str, Any], path: tuple, value: Any) -> None:
    target = doc
    for part in path[:-1]:
        target = target[part]
    if isinstance(path[-1], int):
        target[path[-1]] = value
    else:
        target[path[-1]] = value


def _check_outputs(path: pathlib.Path, flag_sets) -> str:
    outs = []
    for flags in flag_sets:
        code, out, err = run_check(str(path), *flags)
        assert code in (0, 1), err
        if "--json" in flags:
            json.loads(out)
        outs.append(out + err)
    return "".join(outs)


def test_keys_pasted_into_every_field_at_once(env, tmp_path):
    """Item 6: a key (43 or 44 base64 characters, with whitespace around, or 64 hex digits), alone or
    glued to a path, port or scheme, in every string field: no output of `check` shows it."""
    d, _ = env
    path = tmp_path / "k.toml"
    for key in KEYS:
        for shape in key_shapes(key):
            for value in pasted(shape):
                doc = _key_base(d)
                for field in STRING_FIELDS:
                    _set(doc, field, value)
                path.write_text(to_toml(doc))
                text = _check_outputs(path, ((), ("--json",), ("--skip-secrets",), ("--json", "--skip-secrets")))
                assert not leaked(key, text), (value, text)


@pytest.mark.parametrize("field", STRING_FIELDS, ids=lambda f: ".".join(map(str, f)))
def test_keys_pasted_into_one_field(env, tmp_path, field):
    """The same, one field at a time: the rest of the config valid, so a value that passes (a socket
    path, a key file path with --skip-secrets) reaches the summary of a valid config."""
    d, _ = env
    path = tmp_path / "k.toml"
    key = KEYS[1]
    for shape in (key.base64[:43], f" {key.base64}\n", key.hex):
        for value in pasted(shape):
            doc = _key_base(d)
            _set(doc, field, value)
            path.write_text(to_toml(doc))
            text = _check_outputs(path, ((), ("--json", "--skip-secrets")))
            assert not leaked(key, text), (field, value, text)


def test_keys_as_table_keys_and_file_names_are_never_echoed(env, tmp_path):
    d, _ = env
    for key in KEYS:
        for shape in (key.base64, key.base64[:43], key.hex):
            for where in ((), ("routing",), ("tunnels", 0)):
                doc = _key_base(d)
                target = doc
                for part in where:
                    target = target[part]
                target[shape] = "x"
                (tmp_path / "k.toml").write_text(to_toml(doc))
                for flags in ((), ("--json",)):
                    code, out, err = run_check(str(tmp_path / "k.toml"), *flags)
                    assert code == 1 and "unknown key" in out and not leaked(key, out + err)
        # The config file itself named after a key.
        code, out, err = run_check(str(tmp_path / key.base64[:43]))
        assert code == 2 and not leaked(key, out + err)
        (tmp_path / key.base64[:43]).write_text("[routing\n")
        for flags in ((), ("--json",)):
            code, out, err = run_check(str(tmp_path / key.base64[:43]), *flags)
            assert code == 1 and not leaked(key, out + err)


def test_private_key_pasted_as_peer_key(env, tmp_path):
    """The tunnel's own private key in peer_public_key is a valid key: it is refused, and not shown."""
    d, _ = env
    key = PrivateKey.from_base64((d / "good.key").read_text())
    doc = _key_base(d)
    doc["tunnels"][0]["peer_public_key"] = key.base64
    (tmp_path / "p.toml").write_text(to_toml(doc))
    code, out, err = run_check(str(tmp_path / "p.toml"))
    assert code == 1 and "tunnels[0].peer_public_key: is this tunnel's own private key" in out
    assert not leaked(key, out + err)


def test_environment_variable_named_like_a_key(env, tmp_path, monkeypatch):
    d, _ = env
    key = KEYS[1]  # passes as a variable name
    doc = _key_base(d)
    del doc["tunnels"][0]["private_key_file"]
    doc["tunnels"][0]["private_key_env"] = key.base64[:43]
    (tmp_path / "e.toml").write_text(to_toml(doc))
    code, out, err = run_check(str(tmp_path / "e.toml"))
    assert code == 1 and "environment variable <redacted> is not set" in out and not leaked(key, out + err)
    monkeypatch.setenv(key.base64[:43], "nonsense")
    code, out, err = run_check(str(tmp_path / "e.toml"))
    assert code == 1 and "environment variable <redacted>: not a WireGuard key" in out and not leaked(key, out + err)


@pytest.mark.parametrize("text", [
    "[Interface]\nPrivateKey = {priv}\nAddress = {k}\n[Peer]\nPublicKey = {pub}\nAllowedIPs = 198.19.77.0/24\n",
    "[Interface]\nPrivateKey = {priv}\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {pub}\nAllowedIPs = {k}\n",
    "[Interface]\nPrivateKey = {priv}\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {pub}\nAllowedIPs = 198.19.77.0/24\nEndpoint = {k}:51820\n",
    "[Interface]\nPrivateKey = {priv}\nAddress = 198.18.1.2/30\nMTU = {k}\n[Peer]\nPublicKey = {pub}\nAllowedIPs = 198.19.77.0/24\n",
    "[Interface]\nPrivateKey = {priv}\nAddress = 198.18.1.2/30\n{k} = 1\n[Peer]\nPublicKey = {pub}\nAllowedIPs = 198.19.77.0/24\n",
    "[{k}]\n",
    "[Interface]\nPrivateKey = {k}\n",
    "[Interface]\nPrivateKey = {priv}\nAddress = 198.18.1.2/30\n[Peer]\nPublicKey = {k}\nAllowedIPs = 198.19.77.0/24\n",
])
def test_import_problems_never_echo_keys(tmp_path, capsys, text):
    """Item 6 for `hatun import`: a key anywhere in a wg-quick file appears in no problem."""
    priv, pub = PrivateKey.generate(), PrivateKey.generate().public_key
    for key in KEYS:
        for shape in (key.base64[:43], key.hex, key.base64 + "x"):
            (tmp_path / "wg0.conf").write_text(text.format(priv=priv.base64, pub=pub.base64, k=shape))
            code = main(["import", str(tmp_path / "wg0.conf"), "--key-dir", str(tmp_path / "keys")])
            out, err = capsys.readouterr()
            assert code == 1, (text, shape, out, err)
            assert not leaked(key, out + err) and priv.base64 not in out + err
    code = main(["import", str(tmp_path / KEYS[0].base64[:43])])
    out, err = capsys.readouterr()
    assert code == 2 and not leaked(KEYS[0], out + err)


def test_redact_shapes():
    key = KEYS[0]
    for shape in key_shapes(key):
        for text in (shape, f"key file {shape} does not exist", f"/etc/hatun/{shape.strip()}", f"x={shape}y"):
            assert not leaked(key, redact(text)), text
    # What is not a key stays: paths with separators, public-key-length runs broken by other characters.
    for text in ("/run/hatun/hatun.sock", "/tmp/pytest-of-root/pytest-3/test_x0/good.key", "gw2.example.net:51820",
                 "Qjlu3Ov4Zsu3nc1mZEFoxptcJzxMyfaIx!oKuWeWEmI=", "a" * 42):
        assert redact(text) == text


# ---------------------------------------------------------------- items 6 and 12a: log lines


def _log(formatter: logging.Formatter, msg: str, *args: Any, exc: BaseException | None = None, **extra: Any) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"hatun.test.hostile.{id(formatter)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        if exc is not None:
            try:
                raise exc
            except BaseException:
                logger.exception(msg, *args, extra=extra)
        else:
            logger.warning(msg, *args, extra=extra)
    finally:
        logger.handlers[:] = []
    return stream.getvalue()


FORGED = "gw1\n2026-01-01T00:00:00.000 WARNING forged\r\x1b[2K\x00\x7f\x85\u2028tail"


def test_log_lines_cannot_be_forged():
    """Item 12a: control characters in interpolated values (interface names, endpoints, DNS names,
    error texts) are escaped; a value cannot start a line of its own, in either format."""
    from hatun.logs import HumanFormatter, JsonFormatter

    out = _log(HumanFormatter(), "%s: endpoint %s did not resolve: %s", FORGED, "gw.example.net\n:1", OSError(FORGED))
    assert out.count("\n") == 1 and not CONTROL.search(out[:-1]), repr(out)
    assert "gw1\\n2026-01-01T00:00:00.000 WARNING forged\\r\\x1b[2K\\x00\\x7f\\x85\\u2028tail" in out
    # A traceback keeps its lines, each indented under its record, the hostile text escaped.
    out = _log(HumanFormatter(), "tunnel %s failed", FORGED, exc=ValueError(FORGED))
    lines = out.splitlines()
    assert re.match(r"\d{4}-\d\d-\d\dT", lines[0]) and len(lines) > 2
    assert all(line.startswith("    ") for line in lines[1:]), lines
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert not CONTROL.search(out.replace("\n", ""))
    for exc in (None, ValueError(FORGED)):
        out = _log(JsonFormatter(), "tunnel %s", FORGED, exc=exc, endpoint=FORGED, nested={"k\n": [FORGED]})
        assert out.count("\n") == 1
        doc = json.loads(out)
        for value in (doc["message"], doc["endpoint"], doc["nested"]["k\\n"][0]):
            assert not CONTROL.search(value) and "forged" in value
        if exc is not None:  # the traceback keeps its own newlines (JSON escapes them), nothing else
            assert doc["exception"].startswith("Traceback") and "\n" in doc["exception"]
            assert not CONTROL.search(doc["exception"].replace("\n", ""))


def test_log_lines_never_show_keys():
    """Item 6 in logs: keys in the message, in its arguments, in extra fields and in exception text
    are redacted by both formatters."""
    from hatun.logs import HumanFormatter, JsonFormatter

    for key in KEYS:
        for shape in key_shapes(key):
            for fmt in (HumanFormatter(), JsonFormatter()):
                outs = [
                    _log(fmt, "key file %s does not exist", f"/etc/hatun/{shape}"),
                    _log(fmt, f"inline {shape} text"),
                    _log(fmt, "set %s", {"private_key": shape}, peer=shape, more=[shape, {"x": shape}]),
                    _log(fmt, "failed", exc=RuntimeError(f"uapi said private_key={shape.strip()}")),
                ]
                for out in outs:
                    assert not leaked(key, out), out
                    if isinstance(fmt, JsonFormatter):
                        json.loads(out)


# ---------------------------------------------------------------- item 12b: exposed metrics


@pytest.mark.parametrize("listen, warned", [
    ("127.0.0.1:9469", False), ("127.0.0.53:1", False), ("[::1]:9469", False), ("localhost:9469", False),
    ("", False), ("[::ffff:127.0.0.1]:9469", False),
    ("0.0.0.0:9469", True), ("[::]:9469", True), ("198.18.0.1:9469", True), ("[2001:2::1]:9469", True),
])
def test_metrics_listen_warning(env, tmp_path, listen, warned):
    d, _ = env
    doc = _key_base(d)
    doc["metrics"]["listen"] = listen
    text = to_toml(doc)
    warnings = config_warnings(parse_config(text))
    assert len(warnings) == int(warned)
    if warned:
        assert warnings[0].startswith(f"metrics.listen: {listen} listens on ")
    (tmp_path / "m.toml").write_text(text)
    code, out, _ = run_check(str(tmp_path / "m.toml"))
    assert code == 0 and ("warning: metrics.listen: " in out) == warned
    code, out, _ = run_check(str(tmp_path / "m.toml"), "--json")
    assert code == 0 and json.loads(out)["warnings"] == warnings


# ---------------------------------------------------------------- item 5: ownership markers


def _problems(text: str) -> list[str]:
    try:
        parse_config(text)
    except ConfigError as e:
        return [str(p) for p in e.problems]
    return []


def _routing(d: pathlib.Path, **routing: Any) -> str:
    doc = _key_base(d)
    doc["routing"].update(routing)
    return to_toml(doc)


@pytest.mark.parametrize("name, ok", [
    ("hatun", True), ("hatun_ci", True), ("hatun2", True), ("filter", False), ("nat", False), ("firewalld", False),
    ("docker", False), ("mangle", False), ("Hatun", False), ("hatun-x", False), ("hatun" + "x" * 27, False),
])
def test_nft_table_must_be_hatuns(env, name, ok):
    problems = _problems(_routing(env[0], nft_table=name))
    assert (problems == []) == ok, problems
    if not ok and not name.startswith("hatun"):
        assert problems == [f"routing.nft_table: nftables table names must start with 'hatun' so that hatun never"
                            f" deletes another program's table (e.g. \"hatun\" or \"hatun_ci\") (got '{name}')"]


@pytest.mark.parametrize("table, mask, ok", [
    (51820, None, True), (256, None, True), (1, None, False), (252, None, False), (254, "0x7", False),
    (1, "0x7", True), (244, "0x7", True), (245, "0x7", False), (255, "0x7", False),
    (0xFFFFFFFF - 255, None, True), (0xFFFFFFFF - 254, None, False), (51820, "0xffffffff", False),
])
def test_tables_avoid_the_kernels(env, table, mask, ok):
    routing = {"table": table} | ({"fwmark_mask": mask} if mask else {})
    problems = [p for p in _problems(_routing(env[0], **routing)) if p.startswith("routing.table")]
    assert (problems == []) == ok, problems
    if not ok:
        last = table + (255 if mask is None else int(mask, 16) >> (int(mask, 16) & -int(mask, 16)).bit_length() - 1)
        assert f"hatun uses routing tables {table}..{last}" in problems[0]


@pytest.mark.parametrize("priority, ok", [
    (1, True), (5200, True), (32763, True), (0, False), (32764, False), (32765, False), (32766, False),
    (32767, False), (32768, False), (40000, False), (0xFFFFFFFF, False),
])
def test_rule_priorities_avoid_the_kernels(env, priority, ok):
    problems = _problems(_routing(env[0], rule_priority=priority))
    assert (problems == []) == ok, problems
    if not ok:
        assert problems[0].startswith("routing.rule_priority: ") and "choose 1..32763" in problems[0]


def test_route_protocols_of_the_kernel_and_daemons_are_refused(env):
    names = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated", 9: "ra", 10: "mrt",
             11: "zebra", 12: "bird", 13: "dnrouted", 14: "xorp", 15: "ntk", 16: "dhcp", 17: "mrouted",
             18: "keepalived", 42: "babel", 99: "openr", 186: "bgp", 187: "isis", 188: "ospf", 189: "rip", 192: "eigrp"}
    for proto, name in names.items():
        problems = _problems(_routing(env[0], protocol=proto))
        assert len(problems) == 1 and problems[0].startswith(f"routing.protocol: {proto} is the route protocol of ")
        assert f"('{name}' in iproute2's rt_protos)" in problems[0]
    for proto in (5, 100, 147, 254, 255):
        assert _problems(_routing(env[0], protocol=proto)) == []
    assert _problems(_routing(env[0], protocol=256)) == ["routing.protocol: must be <= 255 (got 256)"]


@pytest.mark.parametrize("source, what", [
    ("127.0.0.1", "a loopback address"), ("127.1.2.3", "a loopback address"), ("::1", "a loopback address"),
    ("0.0.0.0", "the unspecified address"), ("::", "the unspecified address"), ("224.0.0.1", "a multicast address"),
    ("ff02::1", "a multicast address"), ("169.254.1.1", "a link-local address"), ("fe80::1", "a link-local address"),
    ("255.255.255.255", "the broadcast address"), ("::ffff:127.0.0.1", "an IPv4-mapped IPv6 address"),
])
def test_source_must_be_a_unicast_host_address(env, source, what):
    problems = _problems(_routing(env[0], source=source))
    assert len(problems) == 1 and problems[0].startswith("routing.source: ") and f" is {what}" in problems[0], problems
    assert _problems(_routing(env[0], source=["198.18.99.1", source]))[0].startswith("routing.source[1]: ")
    assert _problems(_routing(env[0], source=["198.18.99.1", "2001:2::99"])) == []


@pytest.mark.parametrize("name", ["lo", "all", "default"])
def test_interface_names_the_kernel_reserves(env, name):
    doc = _key_base(env[0])
    doc["tunnels"][0]["interface"] = name
    problems = _problems(to_toml(doc))
    assert len(problems) == 1 and problems[0].startswith(f"tunnels[0].interface: '{name}' is ")
    doc["tunnels"][0]["interface"] = "lo0"
    assert _problems(to_toml(doc)) == []


def test_paths_must_be_absolute(env):
    doc = _key_base(env[0])
    doc["run_dir"] = "run/hatun"
    doc["control"]["socket"] = "hatun.sock"
    assert _problems(to_toml(doc)) == [
        "run_dir: must be an absolute path (starting with '/') (got 'run/hatun')",
        "control.socket: must be an absolute path (starting with '/') (got 'hatun.sock')",
    ]
    doc["run_dir"], doc["control"]["socket"] = "/run/hatun", "/run/" + "s" * 120
    assert _problems(to_toml(doc))[0].startswith("control.socket: is 125 bytes, longer than the 107")


def test_control_socket_path_taken_by_something_else(env, tmp_path):
    """`check` stats the socket path: hatun would remove a file, directory or symlink found there."""
    d, _ = env
    (tmp_path / "file").write_text("precious")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "file")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        for name, kind in (("file", "a regular file"), ("dir", "a directory"), ("link", "a symbolic link"),
                           ("sock", None), ("missing", None), ("file/sub", "parent")):
            doc = _key_base(d)
            doc["control"]["socket"] = str(tmp_path / name)
            (tmp_path / "c.toml").write_text(to_toml(doc))
            code, out, _ = run_check(str(tmp_path / "c.toml"))
            if kind is None:
                assert code == 0, out
            elif kind == "parent":
                assert code == 1 and f"control.socket: a parent of {tmp_path / name} is not a directory" in out
            else:
                assert code == 1 and f"control.socket: {tmp_path / name} exists and is {kind}, not a socket" in out
    finally:
        sock.close()
    assert (tmp_path / "file").read_text() == "precious"
