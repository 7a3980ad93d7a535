"""WireGuard keys: X25519 private/public keys and preshared keys in WireGuard's base64 form.

A private key lives in a `PrivateKey` and a preshared key in a `PresharedKey`, whose repr and str
never show their value, so that they cannot leak into a log line, an error message or status output
by accident. Text that may hold a key someone
pasted in the wrong place (config values, paths, names) goes through `redact` before it is shown.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KEY_LEN = 32
REDACTED = "<redacted>"
# 32 bytes take 43 base64 characters (plus one '=' of padding) or 64 hex digits, which are base64
# characters too. Any run of 43 or more of them may hold a key: a key with its '=' dropped, a key
# glued to a path ("/etc/hatun/KEY"), a hex key. Such runs are rare in anything else shown (paths
# and names have '.', '-', '_'), and redacting one too many is cheaper than showing one key.
_KEY_RUN = re.compile(r"[A-Za-z0-9+/]{43,}={0,2}")


class InvalidKey(ValueError):
    """A key that is not base64 of 32 bytes, or a key source that cannot be read."""


def decode_key(text: str) -> bytes:
    """Decode WireGuard's base64 form of a 32-byte key.

    Raises InvalidKey with a message that describes the problem but never contains the input
    (it may be a private key).
    """
    text = text.strip()
    if len(text) != 44 or not text.endswith("="):
        raise InvalidKey(f"not a WireGuard key: expected 44 base64 characters ending in '=', got {len(text)} characters")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey("not a WireGuard key: invalid base64") from None
    if len(raw) != KEY_LEN:
        raise InvalidKey(f"not a WireGuard key: decodes to {len(raw)} bytes, expected {KEY_LEN}")
    return raw


def encode_key(raw: bytes) -> str:
    """WireGuard's base64 form of a 32-byte key."""
    if len(raw) != KEY_LEN:
        raise InvalidKey(f"a key is {KEY_LEN} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


class _Key:
    """32 bytes of key material with WireGuard's encodings; equal only to a key of the same kind."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise InvalidKey(f"a key is {KEY_LEN} bytes, got {len(raw)}")
        self.raw = bytes(raw)

    @classmethod
    def from_base64(cls, text: str):
        return cls(decode_key(text))

    @property
    def base64(self) -> str:
        return encode_key(self.raw)

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)


class PublicKey(_Key):
    """A WireGuard public key (32 bytes). Shown as base64: it is not a secret."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"PublicKey({self.base64!r})"

    def __str__(self) -> str:
        return self.base64


class PrivateKey(_Key):
    """A WireGuard private key. Its repr/str are redacted; use `.raw`, `.base64` or `.hex` on purpose."""

    __slots__ = ("_public",)

    def __init__(self, raw: bytes) -> None:
        super().__init__(raw)
        self._public: PublicKey | None = None

    @classmethod
    def generate(cls) -> PrivateKey:
        key = X25519PrivateKey.generate()
        return cls(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    @property
    def public_key(self) -> PublicKey:
        # X25519 clamps the scalar itself, so any 32 bytes give the same public key as `wg pubkey`.
        if self._public is None:
            pub = X25519PrivateKey.from_private_bytes(self.raw).public_key()
            self._public = PublicKey(pub.public_bytes(Encoding.Raw, PublicFormat.Raw))
        return self._public

    def __repr__(self) -> str:
        return "PrivateKey(<redacted>)"

    def __str__(self) -> str:
        return "<redacted>"

    def __reduce__(self):  # pickling would carry the secret somewhere unexpected
        raise TypeError("PrivateKey cannot be pickled")


class PresharedKey(_Key):
    """A WireGuard preshared key (32 random bytes, `wg genpsk`), mixed into the handshake of one peer
    as a post-quantum safeguard. Secret: repr/str are redacted; compare devices by `fingerprint`."""

    __slots__ = ()

    @classmethod
    def generate(cls) -> PresharedKey:
        return cls(os.urandom(KEY_LEN))

    @property
    def fingerprint(self) -> bytes:
        return key_fingerprint(self.raw)

    def __repr__(self) -> str:
        return "PresharedKey(<redacted>)"

    def __str__(self) -> str:
        return REDACTED

    def __reduce__(self):
        raise TypeError("PresharedKey cannot be pickled")


# Per process: a fingerprint compares a device's preshared key with the configured one without
# keeping the key itself, and is worthless outside this process (no table of known keys fits it).
_FINGERPRINT_SALT = os.urandom(16)


def key_fingerprint(raw: bytes) -> bytes:
    """A one-way digest of secret key bytes RAW, comparable within this process only."""
    return hashlib.blake2s(raw, key=_FINGERPRINT_SALT, digest_size=16).digest()


class TunnelKeys:
    """The secrets of one tunnel: this host's private key and the peer's preshared key (or None).

    Equal when both keys are; never shown (repr redacted), never pickled."""

    __slots__ = ("private", "preshared")

    def __init__(self, private: PrivateKey, preshared: PresharedKey | None = None) -> None:
        self.private = private
        self.preshared = preshared

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TunnelKeys) and other.private == self.private
                and other.preshared == self.preshared)

    def __hash__(self) -> int:
        return hash((self.private, self.preshared))

    def __repr__(self) -> str:
        return f"TunnelKeys(<redacted>{', preshared' if self.preshared else ''})"

    def __reduce__(self):
        raise TypeError("TunnelKeys cannot be pickled")


def redact(text: str) -> str:
    """TEXT with everything that may be a WireGuard key (base64 with or without its '=', or hex)
    replaced by "<redacted>". The one redaction of hatun: problems, errors and log lines use it."""
    return _KEY_RUN.sub(REDACTED, text)


def looks_like_key(text: str) -> bool:
    """Whether TEXT, without surrounding whitespace, is one key-shaped run."""
    return _KEY_RUN.fullmatch(text.strip()) is not None


def _shown_path(path: str) -> str:
    """PATH for a message, without any key pasted where a file name belongs."""
    if looks_like_key(path):
        return "<redacted: that looks like a key, not a file name>"
    return redact(path)


def load_private_key_file(path: str, *, check_mode: bool = True) -> PrivateKey:
    """Read a private key file (one base64 key, like `wg genkey` writes).

    Raises InvalidKey when the file is missing, unreadable, readable by group or others
    (when `check_mode`), or does not hold a valid key. Messages never contain the key (and never a
    "path" that is a key pasted in the wrong place).
    """
    return _load_key_file(PrivateKey, path, check_mode)


def load_preshared_key_file(path: str, *, check_mode: bool = True) -> PresharedKey:
    """Read a preshared key file (one base64 key, like `wg genpsk` writes); raises as `load_private_key_file`."""
    return _load_key_file(PresharedKey, path, check_mode)


def _load_key_file(kind, path: str, check_mode: bool):
    shown = _shown_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidKey(f"key file {shown} does not exist") from None
    except OSError as e:
        raise InvalidKey(f"key file {shown}: {e.strerror}") from None
    except ValueError:  # a NUL in the path
        raise InvalidKey(f"key file {shown}: not a valid path") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidKey(f"key file {shown} is not a regular file")
    if check_mode and st.st_mode & 0o077:
        raise InvalidKey(
            f"key file {shown} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run: chmod 600 {shown}"
        )
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(1024)
    except OSError as e:
        raise InvalidKey(f"key file {shown}: {e.strerror}") from None
    try:
        return kind.from_base64(text)
    except InvalidKey as e:
        raise InvalidKey(f"key file {shown}: {e}") from None


def load_private_key_env(name: str, environ: dict[str, str] | None = None) -> PrivateKey:
    """Read a private key from environment variable NAME. Raises InvalidKey (never showing the value)."""
    return _load_key_env(PrivateKey, name, environ)


def load_preshared_key_env(name: str, environ: dict[str, str] | None = None) -> PresharedKey:
    """Read a preshared key from environment variable NAME. Raises InvalidKey (never showing the value)."""
    return _load_key_env(PresharedKey, name, environ)


def _load_key_env(kind, name: str, environ: dict[str, str] | None):
    env = os.environ if environ is None else environ
    shown = redact(name)
    value = env.get(name)
    if value is None:
        raise InvalidKey(f"environment variable {shown} is not set")
    if not value.strip():
        raise InvalidKey(f"environment variable {shown} is empty")
    try:
        return kind.from_base64(value)
    except InvalidKey as e:
        raise InvalidKey(f"environment variable {shown}: {e}") from None


def write_private_key_file(path: str, key: PrivateKey | PresharedKey) -> None:
    """Write KEY (private or preshared) to PATH with mode 0600, created exclusively (never overwrites an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.base64 + "\n")
