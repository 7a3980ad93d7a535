"""hatun's configuration: pydantic models, pure parsing, loading, and the checks `hatun check` runs.

`parse_config(text)` is pure (no file or network access); `load_config(path)` reads the file, the
private keys, and what the host has at the config's paths. Every problem found is reported, not only
the first: a `ConfigError` carries a list of `Problem`s, each naming where it is
(`tunnels[1].endpoint`), what is wrong and what was given. Any value of any type in any field gives a
problem, never an exception of another kind. Private keys never appear in a problem: anything shaped
like a key is redacted.

The parts, by concern:
- `values`: value types and their parsers (durations, networks, endpoints, probes, ownership markers)
- `models`: the pydantic models of the file's sections
- `problems`: `Problem`, `ConfigError`, rendering of pydantic's errors
- `checks`: cross-field, secrets and host checks, and `config_warnings`
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from pydantic import ValidationError

from hatun.config.checks import Secrets, config_warnings, host_problems, secret_problems, semantic_problems
from hatun.config.models import Config, Control, Health, HealthOverrides, Metrics, Routing, Tunnel, default_peer_address
from hatun.config.problems import ConfigError, ConfigUnreadable, Problem, problem_from_pydantic, redact_keys
from hatun.config.values import (
    DEFAULT_INTERFACE_PREFIX,
    DNS_LABEL_RE,
    IFNAME_RE,
    IFNAMSIZ,
    NAME_RE,
    Endpoint,
    Probe,
    interface_name_problem,
    parse_endpoint,
    parse_probe,
    source_address_problem,
)

MAX_CONFIG_BYTES = 4 * 1024 * 1024


def _toml_problem(e: tomllib.TOMLDecodeError, source: str) -> Problem:
    text = str(e)
    m = re.search(r"\(at line (\d+), column (\d+)\)$", text)
    if m:
        return Problem("", "TOML syntax: " + text[: m.start()].strip(), line=int(m.group(1)), column=int(m.group(2)))
    m = re.search(r"\(at end of document\)$", text)
    if m:
        lines = source.split("\n")
        return Problem("", "TOML syntax: " + text[: m.start()].strip() + " at end of file",
                       line=len(lines), column=len(lines[-1]) + 1)
    return Problem("", "TOML syntax: " + text)


def _read_toml(text: str) -> dict[str, Any]:
    """The TOML document TEXT. Raises ConfigError for anything tomllib cannot read."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_toml_problem(e, text)]) from None
    # tomllib lets these through: an integer of more than 4300 digits, arrays nested too deep.
    except ValueError:
        raise ConfigError([Problem("", "TOML: a number with too many digits")]) from None
    except RecursionError:
        raise ConfigError([Problem("", "TOML: arrays or tables nested too deeply")]) from None


def _pydantic_problems(e: ValidationError, raw: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    for err in e.errors(include_url=False):
        p = problem_from_pydantic(err, raw)
        if p not in problems:
            problems.append(p)
    return problems


def _structural_problems(raw: dict[str, Any]) -> tuple[Config | None, list[Problem]]:
    try:
        return Config.model_validate(raw), semantic_problems(raw)
    except ValidationError as e:
        return None, _pydantic_problems(e, raw) + semantic_problems(raw)


def parse_config(text: str) -> Config:
    """Validate config TEXT (TOML) structurally and semantically, without touching files or secrets.

    Raises ConfigError listing every problem found.
    """
    raw = _read_toml(text)
    config, problems = _structural_problems(raw)
    if problems:
        raise ConfigError(_in_file_order(problems, raw))
    assert config is not None
    return config


def _in_file_order(problems: list[Problem], raw: dict[str, Any]) -> list[Problem]:
    """Sort problems as their places appear in the file: sections in order, tunnels by index."""
    order = {key: n for n, key in enumerate(raw)}

    def key(p: Problem) -> tuple[int, int]:
        m = re.match(r"([A-Za-z_]+)(?:\[(\d+)\])?", p.loc)
        if not m:
            return (-1, 0)
        return (order.get(m.group(1), len(order)), int(m.group(2) or 0))

    return sorted(problems, key=key)


def load_secrets(config: Config, *, environ: dict[str, str] | None = None, check_mode: bool = True) -> Secrets:
    """Load every tunnel's private key (file or environment). Raises ConfigError listing all problems.

    Also checks that no peer key equals the tunnel's own public key (a copy-paste slip that makes the
    tunnel talk to itself), or its private key.
    """
    secrets = Secrets()
    problems = secret_problems(config.model_dump(mode="json"), secrets, environ, check_mode)
    if problems:
        raise ConfigError(problems)
    return secrets


def read_config_text(path: str) -> str:
    """Read a config file. Raises ConfigUnreadable with the reason."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigUnreadable(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigUnreadable(f"{path}: is a directory") from None
    except OSError as e:
        raise ConfigUnreadable(f"{path}: {e.strerror}") from None
    except ValueError:  # a NUL in the path
        raise ConfigUnreadable(f"{path}: not a valid path") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigUnreadable(f"{path}: larger than 4 MiB, not a hatun config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigUnreadable(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_document(path: str) -> dict[str, Any]:
    """The TOML document at PATH. Raises ConfigUnreadable or ConfigError (naming PATH)."""
    text = read_config_text(path)
    try:
        return _read_toml(text)
    except ConfigError as e:
        e.source = path
        raise


def load_config(path: str, *, skip_secrets: bool = False, environ: dict[str, str] | None = None) -> tuple[Config, Secrets]:
    """Read, parse and check PATH, load the private keys (unless SKIP_SECRETS) and check the host's
    files at the config's paths (a control socket path taken by a file).

    Raises ConfigUnreadable (file cannot be read) or ConfigError (every problem, structural,
    semantic, secrets and host, together).
    """
    raw = _read_document(path)
    secrets = Secrets()
    config, problems = _structural_problems(raw)
    if not skip_secrets:
        problems += secret_problems(raw, secrets, environ, True)
    problems += host_problems(raw)
    if problems:
        raise ConfigError(_in_file_order(problems, raw), path)
    assert config is not None
    return config, secrets


def is_gateway_file(raw: dict[str, Any]) -> bool:
    """A gateway's file (`[enroll]`, for `hatun enroll serve`) rather than a host's config."""
    return isinstance(raw, dict) and "enroll" in raw and "tunnels" not in raw


def load_gateway_config(path: str):
    """Read and check a gateway's file (`[enroll]` and its allow rules): a `GatewayConfig`.

    Raises ConfigUnreadable or ConfigError (every problem), as `load_config`.
    """
    from hatun.enroll.models import GatewayConfig

    raw = _read_document(path)
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_pydantic_problems(e, raw), path) from None


def json_schema() -> dict[str, Any]:
    """The JSON schema of a config file, for editors (config/hatun.schema.json)."""
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "hatun configuration"
    return schema


def environ_keys_used(config: Config) -> list[str]:
    """Environment variables the config reads private keys from."""
    return [t.private_key_env for t in config.tunnels if t.private_key_env]


__all__ = [
    "Config", "ConfigError", "ConfigUnreadable", "Control", "Endpoint", "Health", "HealthOverrides", "Metrics",
    "Problem", "Probe", "Routing", "Secrets", "Tunnel", "config_warnings", "default_peer_address",
    "environ_keys_used", "interface_name_problem", "is_gateway_file", "load_gateway_config", "json_schema", "load_config", "load_secrets", "parse_config",
    "parse_endpoint", "parse_probe", "read_config_text", "redact_keys", "source_address_problem",
    "DEFAULT_INTERFACE_PREFIX", "DNS_LABEL_RE", "IFNAME_RE", "IFNAMSIZ", "NAME_RE",
]
