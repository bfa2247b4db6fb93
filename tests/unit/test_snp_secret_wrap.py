"""Challenge, REPORT_DATA binding and the HPKE secret release."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.sev.errors import MalformedInput, VerificationFailed
from sevlaunch.snp.challenge import (
    CHALLENGE_SIZE,
    ChallengeReason,
    IssuedChallenge,
    check_report_data,
    new_challenge,
    parse_guest_public_key,
    report_data,
)
from sevlaunch.snp.secret_wrap import (
    ENC_SIZE,
    GuestKeyPair,
    SecretUnwrapFailed,
    WrappedSecret,
    WrapReason,
    open_secret,
    release_info,
    seal,
)

SECRET = b"disk-key: 0123456789abcdef0123456789abcdef"


def test_report_data_is_sha512_of_challenge_and_key() -> None:
    challenge = new_challenge()
    pair = GuestKeyPair.generate()
    assert len(challenge) == CHALLENGE_SIZE and challenge != new_challenge()
    rd = report_data(challenge, pair.public_bytes)
    assert rd == hashlib.sha512(challenge + pair.public_bytes).digest()
    check_report_data(rd, challenge, pair.public_bytes)


@pytest.mark.parametrize("what", ["challenge", "key", "report_data"])
def test_report_data_mismatch(what: str) -> None:
    challenge, pair = new_challenge(), GuestKeyPair.generate()
    rd = report_data(challenge, pair.public_bytes)
    if what == "challenge":
        challenge = new_challenge()
    elif what == "key":
        pair = GuestKeyPair.generate()
    else:
        rd = rd[:-1] + bytes([rd[-1] ^ 1])
    with pytest.raises(VerificationFailed) as err:
        check_report_data(rd, challenge, pair.public_bytes)
    assert err.value.reason is ChallengeReason.REPORT_DATA_MISMATCH


def test_guest_key_forms() -> None:
    pair = GuestKeyPair.generate()
    assert parse_guest_public_key(pair.public_bytes).public_numbers().curve.name == "secp384r1"
    compressed = bytes([2 + (pair.public_bytes[-1] & 1)]) + pair.public_bytes[1:49]
    bad = [b"", compressed, b"\x04" + bytes(96), pair.public_bytes[:-1], b"\x05" + pair.public_bytes[1:]]
    for key in bad:
        with pytest.raises(MalformedInput) as err:
            parse_guest_public_key(key)
        assert err.value.reason is ChallengeReason.BAD_GUEST_KEY
    with pytest.raises(MalformedInput):
        report_data(b"short", pair.public_bytes)


def test_issued_challenge_lifetime() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    issued = IssuedChallenge.issue(now, dt.timedelta(seconds=30))
    issued.check_fresh(now + dt.timedelta(seconds=29))
    assert issued.matches(issued.value) and not issued.matches(new_challenge())
    for t in (now - dt.timedelta(seconds=1), now + dt.timedelta(seconds=30)):
        with pytest.raises(VerificationFailed) as err:
            issued.check_fresh(t)
        assert err.value.reason is ChallengeReason.CHALLENGE_EXPIRED


def test_seal_and_open_round_trip() -> None:
    challenge, pair = new_challenge(), GuestKeyPair.generate()
    wrapped = seal(SECRET, pair.public_bytes, authorization_id="auth-1", challenge=challenge)
    assert len(wrapped.enc) == ENC_SIZE and len(wrapped.ciphertext) == len(SECRET) + 16
    assert SECRET not in wrapped.ciphertext
    assert pair.open(wrapped, authorization_id="auth-1", challenge=challenge) == SECRET
    # HPKE is randomised: a second seal of the same secret differs and opens just as well.
    again = seal(SECRET, pair.public_bytes, authorization_id="auth-1", challenge=challenge)
    assert again.enc != wrapped.enc
    assert open_secret(again, pair, authorization_id="auth-1", challenge=challenge) == SECRET


def _tampered(wrapped: WrappedSecret, field: str, index: int) -> WrappedSecret:
    raw = bytearray(getattr(wrapped, field))
    raw[index] ^= 0x01
    if field == "enc":
        return WrappedSecret(bytes(raw), wrapped.ciphertext)
    return WrappedSecret(wrapped.enc, bytes(raw))


@pytest.mark.parametrize(
    "case", ["wrong_key", "wrong_authorization", "wrong_challenge", "ciphertext", "tag", "enc_x", "enc_y"]
)
def test_every_change_fails_typed(case: str) -> None:
    challenge, pair = new_challenge(), GuestKeyPair.generate()
    wrapped = seal(SECRET, pair.public_bytes, authorization_id="auth-1", challenge=challenge)
    key, aid, ch = pair, "auth-1", challenge
    if case == "wrong_key":
        key = GuestKeyPair.generate()
    elif case == "wrong_authorization":
        aid = "auth-2"
    elif case == "wrong_challenge":
        ch = new_challenge()
    elif case == "ciphertext":
        wrapped = _tampered(wrapped, "ciphertext", 0)
    elif case == "tag":
        wrapped = _tampered(wrapped, "ciphertext", len(wrapped.ciphertext) - 1)
    elif case == "enc_x":
        wrapped = _tampered(wrapped, "enc", 5)  # almost certainly off the curve
    else:
        wrapped = _tampered(wrapped, "enc", ENC_SIZE - 1)
    with pytest.raises(SecretUnwrapFailed) as err:
        key.open(wrapped, authorization_id=aid, challenge=ch)
    assert err.value.reason is WrapReason.SECRET_UNWRAP_FAILED


def test_bad_inputs() -> None:
    pair, challenge = GuestKeyPair.generate(), new_challenge()
    with pytest.raises(MalformedInput) as err:
        seal(b"", pair.public_bytes, authorization_id="a", challenge=challenge)
    assert err.value.reason is WrapReason.SECRET_TOO_LARGE
    with pytest.raises(MalformedInput):
        seal(bytes(64 * 1024 + 1), pair.public_bytes, authorization_id="a", challenge=challenge)
    with pytest.raises(MalformedInput):
        seal(SECRET, pair.public_bytes, authorization_id="", challenge=challenge)
    with pytest.raises(MalformedInput):
        WrappedSecret(b"\x04" + bytes(95), bytes(32))
    with pytest.raises(MalformedInput):
        WrappedSecret(b"\x04" + bytes(96), bytes(16))
    with pytest.raises(TypeError):
        GuestKeyPair(ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]


def test_info_binds_its_parts_unambiguously() -> None:
    challenge = new_challenge()
    assert release_info("ab", challenge) != release_info("a", challenge)
    assert release_info("auth", challenge).endswith(challenge)


def test_no_key_bytes_in_repr() -> None:
    pair = GuestKeyPair.generate()
    private = pair._private.private_numbers().private_value
    secret_hex = f"{private:096x}"
    wrapped = seal(SECRET, pair.public_bytes, authorization_id="a", challenge=new_challenge())
    for text in (repr(pair), str(pair), repr(wrapped), str(wrapped)):
        assert secret_hex not in text and secret_hex[:16] not in text
        assert wrapped.ciphertext.hex()[:16] not in text
        assert SECRET.decode() not in text
    assert "GuestKeyPair(public=" in repr(pair)
