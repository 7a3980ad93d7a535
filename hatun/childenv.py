"""The environment hatun gives the programs it starts (wireguard-go, nft).

hatun's own environment may hold secrets: `private_key_env` names variables that carry private keys,
and a unit file or a CI job may set more. A child gets only what it needs, listed here, never a copy
of ours; and a value shaped like a WireGuard key is dropped even from that list, so a key pasted
into the wrong variable does not travel either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

_PASSED = frozenset({"PATH", "LANG", "LANGUAGE"})  # plus LC_*: messages in the admin's language
# 32 bytes as base64 (44 characters with '=', 43 without it) or as hex (64 digits), in a value or
# any part of it (a "KEY=..." pasted into a variable, a quoted key).
_KEY_SHAPED = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=?(?![A-Za-z0-9+/])"
                         r"|(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])")


def looks_like_key(value: str) -> bool:
    """True when VALUE contains something shaped like a WireGuard key (base64 or hex)."""
    return _KEY_SHAPED.search(value) is not None


def child_environment(extra: Mapping[str, str] | None = None, *, environ: Mapping[str, str] | None = None
                      ) -> dict[str, str]:
    """A minimal environment for a child process: PATH (the default path when unset), LANG,
    LANGUAGE and LC_* from ENVIRON (default: ours) when set, then EXTRA. Any inherited value that
    looks like a key is left out."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items()
           if (k in _PASSED or k.startswith("LC_")) and not looks_like_key(v)}
    env.setdefault("PATH", os.defpath)
    env.update(extra or {})
    return env
