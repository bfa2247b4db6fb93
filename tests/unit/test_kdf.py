"""The SEV KDF (PROTOCOL.md §4.3) against upstream known answers and an independent computation."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevlaunch.sev.kdf import aes128_ctr, derive_kek, derive_kik, derive_master_secret, hmac_sha256, kdf

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def _case(case_id: str) -> dict[str, Any]:
    cases = json.loads((VECTORS / "kat.json").read_text())["cases"]
    return next(c for c in cases if c["id"] == case_id)


def _reference_kdf(key: bytes, label: bytes, context: bytes, length: int) -> bytes:
    # Written straight from PROTOCOL.md §4.3 with the standard library's hmac, independent of sevlaunch.
    out = b""
    i = 1
    while len(out) < length:
        msg = i.to_bytes(4, "little") + label + b"\0" + context + (length * 8).to_bytes(4, "little")
        out += hmac.new(key, msg, hashlib.sha256).digest()
        i += 1
    return out[:length]


def test_kat_kdf_master_secret_zero_key() -> None:
    # kat.json kdf-master-secret-zero-key (virtee/sev src/session/key.rs test "derive").
    case = _case("kdf-master-secret-zero-key")
    inputs = case["inputs"]
    out = kdf(
        bytes.fromhex(inputs["key_hex"]),
        inputs["label"].encode(),
        bytes.fromhex(inputs["context_hex"]),
        inputs["out_len"],
    )
    assert out.hex() == case["expected"]["out_hex"]


def test_protocol_known_answer_master_kek_kik() -> None:
    # PROTOCOL.md §4 known answer; KEK/KIK from kat.json launch-session-all-zero "derived" (computed there
    # by the vector collector's independent implementation).
    derived = _case("launch-session-all-zero")["derived"]
    master = derive_master_secret(bytes(16), bytes(16))
    assert master.hex() == "ab4d269fcc62bedb4511d56c386ce706" == derived["master_hex"]
    assert derive_kek(master).hex() == derived["kek_hex"]
    assert derive_kik(master).hex() == derived["kik_hex"]


def test_kdf_known_answer_48_byte_z_multi_block() -> None:
    # Extra vector: computed inside this test by _reference_kdf (stdlib hmac), with a 48-byte Z as real
    # ECDH gives and an output that needs two PRF blocks.
    z = bytes(range(48))
    nonce = bytes(range(100, 116))
    assert derive_master_secret(z, nonce) == _reference_kdf(z, b"sev-master-secret", nonce, 16)
    assert kdf(z, b"label", b"ctx", 40) == _reference_kdf(z, b"label", b"ctx", 40)


def test_counter_and_length_are_little_endian() -> None:
    # A big-endian SP 800-108 (the NIST examples) would give other bytes: pin the first block by hand.
    key = b"k" * 16
    msg = struct.pack("<I", 1) + b"sev-kek" + b"\0" + struct.pack("<I", 128)
    assert kdf(key, b"sev-kek") == hmac.new(key, msg, hashlib.sha256).digest()[:16]
    big_endian = struct.pack(">I", 1) + b"sev-kek" + b"\0" + struct.pack(">I", 128)
    assert kdf(key, b"sev-kek") != hmac.new(key, big_endian, hashlib.sha256).digest()[:16]


@settings(deadline=None, max_examples=50)
@given(
    key=st.binary(min_size=1, max_size=64),
    label=st.binary(max_size=32),
    context=st.binary(max_size=32),
    length=st.integers(min_value=1, max_value=100),
)
def test_kdf_matches_reference(key: bytes, label: bytes, context: bytes, length: int) -> None:
    assert kdf(key, label, context, length) == _reference_kdf(key, label, context, length)


@pytest.mark.parametrize("length", [0, -1])
def test_kdf_rejects_bad_length(length: int) -> None:
    with pytest.raises(ValueError):
        kdf(b"key", b"label", length=length)


def test_master_secret_needs_16_byte_nonce() -> None:
    with pytest.raises(ValueError):
        derive_master_secret(bytes(48), bytes(15))


def test_kat_hmac_zero_key_zero_policy() -> None:
    # kat.json hmac-sha256-zero-key-zero-policy (virtee/sev src/session/key.rs test "mac").
    case = _case("hmac-sha256-zero-key-zero-policy")
    key = bytes.fromhex(case["inputs"]["key_hex"])
    data = bytes.fromhex(case["inputs"]["data_hex"])
    assert hmac_sha256(key, data).hex() == case["expected"]["mac_hex"]
    assert hmac_sha256(key, data[:1], data[1:]).hex() == case["expected"]["mac_hex"]


def test_aes128_ctr_matches_nist_sp800_38a() -> None:
    # NIST SP 800-38A, F.5.1 CTR-AES128.Encrypt, block #1 (key, initial counter block, plaintext, ciphertext).
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    iv = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plain = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
    assert aes128_ctr(key, iv, plain).hex() == "874d6191b620e3261bef6864990db6ce"
    assert aes128_ctr(key, iv, aes128_ctr(key, iv, plain)) == plain
    with pytest.raises(ValueError):
        aes128_ctr(key, iv[:15], plain)
