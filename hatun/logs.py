"""Logging to stderr: one line per event, for people (default) or as JSON for log collectors.

Log messages interpolate values from outside (config values, interface names, endpoints, DNS
names, error texts), so the formatters make every line safe, whatever the caller passed:
- anything shaped like a WireGuard key is redacted (`hatun.keys.redact`), in the message, in
  `extra` fields and in exception text;
- control characters are escaped, so a value cannot end the line and forge another record
  (`one_line`). In human output a traceback follows on indented lines: every line that starts
  with a timestamp is a record of its own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from typing import Any

from hatun.keys import redact

# Attributes every LogRecord has; anything else was passed with `extra=` and goes into JSON lines.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# C0 controls, DEL, C1 controls (NEL among them), and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTINUATION = "    "
_MAX_DEPTH = 6  # of nested `extra` values rendered as JSON structure; deeper ones become text


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def one_line(text: str) -> str:
    """TEXT with control characters escaped (\\n, \\t, \\x1b, \\u2028, ...): it stays on one line and
    cannot move a terminal's cursor."""
    return _CONTROL.sub(_escape, text)


def safe_text(text: str) -> str:
    """TEXT as it may appear in a line of output: keys redacted, control characters escaped."""
    return one_line(redact(text))


def _block(text: str) -> list[str]:
    """A multi-line text (a traceback) as safe lines: split at its newlines only, so that every other
    control character (\r, \x85, \u2028, ...) is escaped, not taken for a line break."""
    return [safe_text(line) for line in text.rstrip("\n").split("\n")]


class HumanFormatter(logging.Formatter):
    """One line per record (plus escaped continuation lines for a traceback), time stamp first."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        return "\n".join(f"{ts} {line}" if i == 0 else line for i, line in enumerate(self.lines(record)))

    def lines(self, record: logging.LogRecord) -> list[str]:
        lines = [f"{record.levelname:<7} {safe_text(record.getMessage())}"]
        if record.exc_info:
            lines += [_CONTINUATION + line for line in _block(self.formatException(record.exc_info))]
        if record.stack_info:
            lines += [_CONTINUATION + line for line in _block(self.formatStack(record.stack_info))]
        return lines


# journald reads a "<N>" prefix on a line of a service's stdout/stderr as that line's syslog priority
# (SyslogLevelPrefix=, on by default); without one every line is stored as info.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (debug and below: 7)."""
    return next((p for level, p in _PRIORITIES if levelno >= level), 7)


class JournalFormatter(HumanFormatter):
    """The human lines for a stderr that is systemd's journal: each line (a traceback's too) starts
    with the record's syslog priority, and none carries a time stamp (the journal has its own)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.lines(record))


def journal_stream(stream: Any = None) -> bool:
    """Whether STREAM (default: stderr) is systemd's journal: $JOURNAL_STREAM names its device and inode."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _json_value(value: Any, depth: int = 0) -> Any:
    """VALUE made safe for a JSON log line: strings redacted and escaped, structure kept (bounded)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 1024 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return safe_text(value)
    if depth < _MAX_DEPTH and isinstance(value, dict):
        return {safe_text(str(k)): _json_value(v, depth + 1) for k, v in value.items()}
    if depth < _MAX_DEPTH and isinstance(value, (list, tuple)):
        return [_json_value(v, depth + 1) for v in value]
    try:
        text = str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the record
        text = f"<{type(value).__name__}>"
    return safe_text(text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": safe_text(record.name),
            "message": safe_text(record.getMessage()),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                doc[safe_text(k)] = _json_value(v)
        # JSON escapes the newlines of a traceback itself: it keeps them, and the record stays one line.
        if record.exc_info:
            doc["exception"] = "\n".join(_block(self.formatException(record.exc_info)))
        if record.stack_info:
            doc["stack"] = "\n".join(_block(self.formatStack(record.stack_info)))
        return json.dumps(doc)


def setup(fmt: str = "human", level: str = "info") -> None:
    """Send hatun's logs to stderr in FMT ("human" or "json") at LEVEL."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:  # under systemd, human lines carry their priority instead of a time stamp
        formatter = JournalFormatter() if journal_stream() else HumanFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("hatun").setLevel(getattr(logging, level.upper()))
