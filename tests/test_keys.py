"""X25519 keys: known vectors, round trips, interoperability with `wg`, redaction."""

import os
import shutil
import stat
import subprocess

import pytest

from hatun.keys import InvalidKey, PrivateKey, PublicKey, load_private_key_env, load_private_key_file, write_private_key_file

# RFC 7748 section 6.1 (Alice and Bob).
VECTORS = [
    ("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
     "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"),
    ("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
     "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"),
]


@pytest.mark.parametrize("private_hex, public_hex", VECTORS)
def test_rfc7748_vectors(private_hex, public_hex):
    key = PrivateKey(bytes.fromhex(private_hex))
    assert key.public_key.hex == public_hex
    assert PrivateKey.from_base64(key.base64) == key


def test_private_key_never_shows_itself():
    key = PrivateKey.generate()
    for text in (repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key})):
        assert key.base64 not in text and key.hex not in text
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(key)


def test_public_key_round_trip():
    pub = PrivateKey.generate().public_key
    assert PublicKey.from_base64(pub.base64) == pub
    assert str(pub) == pub.base64


@pytest.mark.parametrize("text", ["", "abc", "A" * 44, "A" * 43 + "!", "A" * 42 + "==", "A" * 43 + "=" + "A"])
def test_malformed_keys(text):
    with pytest.raises(InvalidKey) as info:
        PrivateKey.from_base64(text)
    assert text not in str(info.value) or not text


def test_key_file_modes(tmp_path):
    key = PrivateKey.generate()
    path = tmp_path / "k"
    write_private_key_file(str(path), key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_private_key_file(str(path)) == key
    with pytest.raises(FileExistsError):
        write_private_key_file(str(path), key)
    os.chmod(path, 0o640)
    with pytest.raises(InvalidKey, match="accessible by group or others"):
        load_private_key_file(str(path))
    assert load_private_key_file(str(path), check_mode=False) == key


def test_env_keys():
    key = PrivateKey.generate()
    assert load_private_key_env("K", {"K": key.base64 + "\n"}) == key
    with pytest.raises(InvalidKey, match="not set"):
        load_private_key_env("K", {})
    with pytest.raises(InvalidKey, match="empty"):
        load_private_key_env("K", {"K": " "})


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools (wg) not installed")
def test_interoperates_with_wg():
    # wg's private key -> our public key, and ours -> wg's public key.
    wg_private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    wg_public = subprocess.run(["wg", "pubkey"], input=wg_private, capture_output=True, text=True, check=True).stdout.strip()
    assert PrivateKey.from_base64(wg_private).public_key.base64 == wg_public
    ours = PrivateKey.generate()
    theirs = subprocess.run(["wg", "pubkey"], input=ours.base64, capture_output=True, text=True, check=True).stdout.strip()
    assert theirs == ours.public_key.base64


def test_key_sources_never_show_a_key_given_as_their_name(tmp_path):
    """A key pasted as a file name or variable name is redacted in every message (43 or 44 characters,
    hex too); a NUL in a path is an InvalidKey, not a ValueError that escapes."""
    key = PrivateKey.generate()
    for shape in (key.base64, key.base64[:43], f" {key.base64[:43]}\n", key.hex):
        for path in (shape, f"{tmp_path}/{shape.strip()}", f"/etc/hatun/{shape.strip()}"):
            with pytest.raises(InvalidKey) as info:
                load_private_key_file(path)
            assert key.base64[:43] not in str(info.value) and key.hex not in str(info.value)
        with pytest.raises(InvalidKey) as info:
            load_private_key_env(shape.strip(), {})
        assert str(info.value) == "environment variable <redacted> is not set"
    with pytest.raises(InvalidKey, match="not a valid path"):
        load_private_key_file("/etc/hatun/a\x00b.key")
