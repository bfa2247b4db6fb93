"""LAUNCH_START session (PROTOCOL.md §4): known answers, the GODH format, and owner → firmware round trips."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevlaunch.sev.cert import Algorithm, SEVCertificate, Usage
from sevlaunch.sev.errors import MalformedInput, Reason, VerificationFailed
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.session import (
    SESSION_BLOB_SIZE,
    SessionBlob,
    TransportKeys,
    create_session,
    unwrap_blob,
    unwrap_session,
    wrap_session,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def _case(case_id: str) -> dict[str, Any]:
    cases = json.loads((VECTORS / "kat.json").read_text())["cases"]
    return next(c for c in cases if c["id"] == case_id)


def _ref_kdf(key: bytes, label: bytes, context: bytes = b"") -> bytes:
    msg = b"\x01\0\0\0" + label + b"\0" + context + struct.pack("<I", 128)
    return hmac.new(key, msg, hashlib.sha256).digest()[:16]


def _reference_blob(z: bytes, tek: bytes, tik: bytes, policy: int, nonce: bytes, iv: bytes) -> bytes:
    # PROTOCOL.md §4, written with stdlib hmac and a raw cryptography Cipher, independent of sevlaunch.
    master = _ref_kdf(z, b"sev-master-secret", nonce)
    enc = Cipher(algorithms.AES(_ref_kdf(master, b"sev-kek")), modes.CTR(iv)).encryptor()
    wrap_tk = enc.update(tek + tik) + enc.finalize()
    wrap_mac = hmac.new(_ref_kdf(master, b"sev-kik"), wrap_tk, hashlib.sha256).digest()
    policy_mac = hmac.new(tik, struct.pack("<I", policy), hashlib.sha256).digest()
    return nonce + wrap_tk + iv + wrap_mac + policy_mac


def _pdh() -> tuple[ec.EllipticCurvePrivateKey, SEVCertificate]:
    private = ec.generate_private_key(ec.SECP384R1())
    cert = SEVCertificate.for_ec_key(
        usage=Usage.PDH,
        algorithm=Algorithm.ECDH_SHA256,
        public_key=private.public_key(),
        api_major=0,
        api_minor=24,
    )
    return private, cert


def test_kat_launch_session_all_zero() -> None:
    # kat.json launch-session-all-zero (virtee/sev src/session/mod.rs initialized::session), a 16-byte Z.
    case = _case("launch-session-all-zero")
    i, e = case["inputs"], case["expected"]
    keys = TransportKeys(bytes.fromhex(i["tek_hex"]), bytes.fromhex(i["tik_hex"]))
    blob = wrap_session(
        bytes.fromhex(i["z_hex"]),
        keys,
        i["policy"],
        nonce=bytes.fromhex(i["nonce_hex"]),
        wrap_iv=bytes.fromhex(i["wrap_iv_hex"]),
    )
    assert blob.nonce.hex() == e["nonce_hex"] and blob.wrap_iv.hex() == e["wrap_iv_hex"]
    assert blob.wrap_tk.hex() == e["wrap_tk_hex"]
    assert blob.wrap_mac.hex() == e["wrap_mac_hex"]
    assert blob.policy_mac.hex() == e["policy_mac_hex"]
    # PROTOCOL.md §4 known answer for policy_mac.
    assert blob.policy_mac.hex() == "aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af"
    assert blob.to_bytes().hex() == case["derived"]["session_blob_hex"]
    assert SessionBlob.from_bytes(blob.to_bytes()) == blob
    assert unwrap_blob(bytes.fromhex(i["z_hex"]), blob, 0) == keys


def test_session_with_real_milan_pdh_matches_independent_computation() -> None:
    # Extra vector: the real Milan PDH (tests/vectors/chains/virtee-milan/pdh.cert) with a fixed GODH key;
    # Z and the blob are recomputed here with raw cryptography ECDH and _reference_blob.
    pdh = SEVCertificate.from_bytes((VECTORS / "chains/virtee-milan/pdh.cert").read_bytes())
    godh_key = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP384R1())
    tek, tik, nonce, iv = bytes(range(16)), bytes(range(16, 32)), b"N" * 16, b"I" * 16
    session = create_session(
        pdh, 0x3, keys=TransportKeys(tek, tik), godh_private_key=godh_key, nonce=nonce, wrap_iv=iv
    )
    pdh_public = pdh.public_key()
    assert isinstance(pdh_public, ec.EllipticCurvePublicKey)
    z = godh_key.exchange(ec.ECDH(), pdh_public)
    assert len(z) == 48
    assert session.blob.to_bytes() == _reference_blob(z, tek, tik, 3, nonce, iv)
    assert session.policy == GuestPolicy(3)


def test_godh_certificate_layout() -> None:
    _, pdh = _pdh()
    godh_key = ec.generate_private_key(ec.SECP384R1())
    raw = create_session(pdh, 3, godh_private_key=godh_key).godh.to_bytes()
    assert len(raw) == 0x824
    version, major, minor, usage, algo = struct.unpack_from("<IBBxxII", raw, 0)
    assert (version, major, minor, usage, algo) == (1, 0, 24, 0x1003, 0x3)
    curve = struct.unpack_from("<I", raw, 0x10)[0]
    numbers = godh_key.public_key().public_numbers()
    # EC coordinates are little-endian, 72-byte fields (PROTOCOL.md §3).
    assert curve == 2
    assert raw[0x14 : 0x14 + 72] == numbers.x.to_bytes(72, "little")
    assert raw[0x5C : 0x5C + 72] == numbers.y.to_bytes(72, "little")
    # No signatures: both slots usage 0x1000, algo 0, zero contents.
    for slot in (0x414, 0x61C):
        assert struct.unpack_from("<II", raw, slot) == (0x1000, 0)
        assert raw[slot + 8 : slot + 8 + 0x200] == bytes(0x200)


def test_owner_to_firmware_round_trip() -> None:
    pdh_private, pdh = _pdh()
    session = create_session(pdh, GuestPolicy(0x7))
    parsed_godh = SEVCertificate.from_bytes(session.godh.to_bytes())
    parsed_blob = SessionBlob.from_bytes(session.blob.to_bytes())
    keys = unwrap_session(pdh_private, parsed_godh, parsed_blob, 0x7)
    assert keys == session.keys
    assert keys.tek == session.keys.tek and keys.tik == session.keys.tik


def test_fresh_randomness_per_session() -> None:
    _, pdh = _pdh()
    a, b = create_session(pdh, 3), create_session(pdh, 3)
    assert a.keys != b.keys
    assert a.blob.nonce != b.blob.nonce and a.blob.wrap_iv != b.blob.wrap_iv
    assert a.godh.to_bytes() != b.godh.to_bytes()


@pytest.mark.parametrize("offset", [0x00, 0x10, 0x2F, 0x40, 0x5F])
def test_tampered_blob_fails_wrap_mac(offset: int) -> None:
    # nonce, wrap_tk (first/last byte) and wrap_mac: any change fails before decryption.
    pdh_private, pdh = _pdh()
    session = create_session(pdh, 3)
    raw = bytearray(session.blob.to_bytes())
    raw[offset] ^= 0x01
    with pytest.raises(VerificationFailed) as exc:
        unwrap_session(pdh_private, session.godh, SessionBlob.from_bytes(bytes(raw)), 3)
    assert exc.value.reason is Reason.BAD_WRAP_MAC


def test_wrong_pdh_or_godh_fails_wrap_mac() -> None:
    pdh_private, pdh = _pdh()
    other_private, other_pdh = _pdh()
    session = create_session(pdh, 3)
    with pytest.raises(VerificationFailed) as exc:
        unwrap_session(other_private, session.godh, session.blob, 3)
    assert exc.value.reason is Reason.BAD_WRAP_MAC
    with pytest.raises(VerificationFailed) as exc:
        unwrap_session(pdh_private, other_pdh, session.blob, 3)
    assert exc.value.reason is Reason.BAD_WRAP_MAC


def test_tampered_wrap_iv_gives_other_keys_and_policy_mac_fails() -> None:
    # wrap_iv is not under wrap_mac; a changed IV decrypts to other keys, which policy_mac then catches.
    pdh_private, pdh = _pdh()
    session = create_session(pdh, 3)
    raw = bytearray(session.blob.to_bytes())
    raw[0x30] ^= 0x80
    with pytest.raises(VerificationFailed) as exc:
        unwrap_session(pdh_private, session.godh, SessionBlob.from_bytes(bytes(raw)), 3)
    assert exc.value.reason is Reason.BAD_POLICY_MAC


@pytest.mark.parametrize("policy", [0x1, 0x7, 0x0001_0003])
def test_other_policy_fails_policy_mac(policy: int) -> None:
    pdh_private, pdh = _pdh()
    session = create_session(pdh, 0x3)
    with pytest.raises(VerificationFailed) as exc:
        unwrap_session(pdh_private, session.godh, session.blob, policy)
    assert exc.value.reason is Reason.BAD_POLICY_MAC


def test_create_session_rejects_a_non_pdh_certificate() -> None:
    pek = SEVCertificate.from_bytes((VECTORS / "chains/virtee-milan/pek.cert").read_bytes())
    with pytest.raises(VerificationFailed) as exc:
        create_session(pek, 3)
    assert exc.value.reason is Reason.WRONG_USAGE
    _, pdh = _pdh()
    with pytest.raises(MalformedInput):
        create_session(pdh, 3, godh_private_key=ec.generate_private_key(ec.SECP256R1()))


def test_transport_keys_never_show_values() -> None:
    keys = TransportKeys(b"TEK-VALUE-ABCDEF", b"TIK-VALUE-ABCDEF")
    for text in (repr(keys), str(keys), repr(create_session(_pdh()[1], 3, keys=keys))):
        for key in (keys.tek, keys.tik):
            assert key.hex() not in text and key.decode() not in text
    assert "hidden" in repr(keys)
    with pytest.raises(MalformedInput) as exc:
        TransportKeys(bytes(15), bytes(16))
    assert exc.value.reason is Reason.BAD_LENGTH
    assert len({TransportKeys.generate().tek for _ in range(8)}) == 8


def test_blob_field_sizes_checked() -> None:
    with pytest.raises(MalformedInput):
        SessionBlob(bytes(16), bytes(31), bytes(16), bytes(32), bytes(32))


@settings(deadline=None, max_examples=100)
@given(st.binary(max_size=200))
def test_blob_parser_raises_only_malformed_input(data: bytes) -> None:
    try:
        blob = SessionBlob.from_bytes(data)
    except MalformedInput as exc:
        assert exc.reason in (Reason.TRUNCATED, Reason.BAD_LENGTH)
        return
    assert len(data) == SESSION_BLOB_SIZE and blob.to_bytes() == data


@settings(deadline=None, max_examples=50)
@given(st.binary(min_size=128, max_size=128), st.integers(0, 127), st.binary(min_size=1, max_size=8))
def test_truncated_or_extended_blob(blob: bytes, cut: int, extra: bytes) -> None:
    assert SessionBlob.from_bytes(blob).to_bytes() == blob
    for data in (blob[:cut], blob + extra):
        with pytest.raises(MalformedInput):
            SessionBlob.from_bytes(data)
