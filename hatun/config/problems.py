"""Problems found in a config, and how pydantic's errors become them.

A `Problem` is always one line, and never shows a key: its place, message and shown input pass
through `hatun.keys.redact` (anything shaped like a WireGuard key) and `hatun.logs.one_line` (control
characters escaped) when it is made, so no caller can forget to.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

import hatun.config.models as models
from hatun.keys import REDACTED, looks_like_key, redact
from hatun.logs import one_line

MAX_SHOWN = 120  # characters of a bad input shown in a problem; longer inputs are not repeated


def _clean(text: str) -> str:
    return one_line(redact(text))


# Kept for callers of the earlier name.
redact_keys = redact


@dataclass(frozen=True)
class Problem:
    """One mistake in a config: where (`tunnels[1].endpoint`), what, and what was given."""

    loc: str
    message: str
    got: str | None = None
    line: int | None = None
    column: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "loc", _clean(self.loc))
        object.__setattr__(self, "message", _clean(self.message))
        if self.got is not None:
            object.__setattr__(self, "got", _clean(self.got))

    def __str__(self) -> str:
        where = self.loc
        if self.line is not None:
            where = f"line {self.line}, column {self.column}" + (f" ({self.loc})" if self.loc else "")
        text = f"{where}: {self.message}" if where else self.message
        if self.got is not None:
            text += f" (got {self.got})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class ConfigError(Exception):
    """A config with problems. `problems` lists every one of them."""

    def __init__(self, problems: list[Problem], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(str(p) for p in problems))


class ConfigUnreadable(Exception):
    """The config file cannot be read at all (missing, permission denied, not a file)."""

    def __init__(self, message: str) -> None:
        super().__init__(_clean(message))


def loc_text(parts: tuple[Any, ...]) -> str:
    """('tunnels', 1, 'endpoint') -> 'tunnels[1].endpoint'."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _show_input(value: Any) -> str | None:
    """A short, safe rendering of a bad input; None when it should not be shown."""
    if isinstance(value, (dict, list)):
        return None
    if isinstance(value, str):
        if len(value) > MAX_SHOWN or looks_like_key(value):
            return REDACTED
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**30 else None
    if isinstance(value, float):
        return repr(value)
    return None


_MESSAGES = {
    "missing": "required key missing",
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "literal_error": None,  # rendered below
}


def problem_from_pydantic(err: dict[str, Any], raw: Any) -> Problem:
    """A Problem for one entry of `ValidationError.errors()`, over the RAW document validated."""
    loc = tuple(err["loc"])
    # Unions and Annotated validators add internal loc parts such as 'function-before[...]'.
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("list", "str", "int"))))
    etype = err["type"]
    # A single string given where a list is accepted ("address = ...") is reported without "[0]".
    if loc and isinstance(loc[-1], int) and isinstance(_lookup(raw, loc[:-1]), str):
        loc = loc[:-1]
    where = loc_text(loc)
    inp = err.get("input")
    if etype == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        parent = _model_for_loc(loc[:-1])
        if key in ("private_key", "preshared_key"):
            return Problem(where, f"inline {key.replace('_', ' ')}s are not accepted: put the key in a file"
                                  f" ({key}_file, mode 0600) or an environment variable ({key}_env)")
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(key, list(parent.model_fields), n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
            else:
                hint = f"; known keys: {', '.join(parent.model_fields)}"
        what = "section" if isinstance(inp, dict) else "key"
        return Problem(where, f"unknown {what} '{key}'{hint}")
    if etype == "literal_error":
        msg = "expected one of " + err["ctx"]["expected"]
    elif etype in _MESSAGES:
        msg = _MESSAGES[etype]
    elif etype == "value_error":
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
    elif etype in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        op = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}[etype]
        bound = next(iter(err["ctx"].values()))
        msg = f"must be {op} {bound}"
    elif etype == "too_short":
        msg = "must not be empty" if err["ctx"].get("min_length") == 1 else err["msg"]
    elif etype == "string_pattern_mismatch":
        msg = "invalid value"
    else:
        msg = err["msg"]
    # Values of key fields are never echoed: a private key pasted in the wrong place must not leak.
    secret_field = bool(loc) and isinstance(loc[-1], str) and loc[-1].endswith("key")
    return Problem(where, msg, None if etype == "missing" or secret_field else _show_input(inp))


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw or isinstance(raw, list) and isinstance(part, int) and 0 <= part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


_SECTIONS = {"routing": models.Routing, "health": models.Health, "metrics": models.Metrics,
             "control": models.Control, "tunnels": models.Tunnel}


def _model_for_loc(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that validates the table at LOC (for suggestions of key names), or None."""
    model: type[BaseModel] | None = models.Config
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        if model is models.Tunnel and part == "health":
            model = models.HealthOverrides
        else:
            model = _SECTIONS.get(part) if model is models.Config else None
    return model
