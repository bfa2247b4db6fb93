"""The owner's attestation challenge and how a report's REPORT_DATA binds it to the guest's key.

Before it asks for a report, the guest gets a challenge from the owner (32 random bytes, single use and
short-lived: the owner's store keeps that bookkeeping) and makes an ephemeral key pair to receive its
secret (`secret_wrap`). It asks the firmware for a report whose REPORT_DATA is

    REPORT_DATA = SHA-512(challenge || guest public key)          (64 bytes, the field's size)

where the public key is the SEC1 uncompressed point of a P-384 key (0x04 || X || Y, 97 bytes: the HPKE
DHKEM(P-384) public key encoding of RFC 9180 section 7.1.1, so the bytes hashed are the bytes the owner
seals to). The fixed-size challenge first and the fixed-size key second leave no ambiguity in the
concatenation. A report with the right REPORT_DATA proves that the guest holding that key asked after the
owner issued the challenge (freshness, no replay of an older report) and that the secret sealed to that key
can only be opened inside that guest.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.sev.errors import MalformedInput, VerificationFailed

CHALLENGE_SIZE: Final = 32
REPORT_DATA_SIZE: Final = 64
GUEST_PUBLIC_KEY_SIZE: Final = 97  # 0x04 || X (48) || Y (48)
DEFAULT_CHALLENGE_TTL: Final = timedelta(seconds=60)


class ChallengeReason(StrEnum):
    BAD_CHALLENGE = "bad_challenge"
    BAD_GUEST_KEY = "bad_guest_key"
    REPORT_DATA_MISMATCH = "report_data_mismatch"
    CHALLENGE_EXPIRED = "challenge_expired"


def new_challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_SIZE)


def check_challenge(challenge: bytes) -> bytes:
    if not isinstance(challenge, bytes) or len(challenge) != CHALLENGE_SIZE:
        raise MalformedInput(ChallengeReason.BAD_CHALLENGE, f"a challenge is {CHALLENGE_SIZE} bytes")
    return challenge


def parse_guest_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """A guest's P-384 public key from its 97-byte uncompressed encoding; refuses any other form (a
    compressed point would hash differently from what the guest bound) and points off the curve."""
    if not isinstance(data, bytes) or len(data) != GUEST_PUBLIC_KEY_SIZE or data[0] != 0x04:
        raise MalformedInput(
            ChallengeReason.BAD_GUEST_KEY,
            f"guest public key: a {GUEST_PUBLIC_KEY_SIZE}-byte uncompressed P-384 point (0x04 || X || Y)",
        )
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), data)
    except ValueError:
        raise MalformedInput(
            ChallengeReason.BAD_GUEST_KEY, "guest public key: not a point on P-384"
        ) from None


def encode_guest_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    if not isinstance(key.curve, ec.SECP384R1):
        raise MalformedInput(ChallengeReason.BAD_GUEST_KEY, "guest public key: must be P-384")
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def report_data(challenge: bytes, guest_public_key: bytes) -> bytes:
    """REPORT_DATA = SHA-512(challenge || guest public key), both checked for form first."""
    check_challenge(challenge)
    parse_guest_public_key(guest_public_key)
    return hashlib.sha512(challenge + guest_public_key).digest()


def check_report_data(report_data_field: bytes, challenge: bytes, guest_public_key: bytes) -> None:
    """Raises VerificationFailed(REPORT_DATA_MISMATCH) unless the report's REPORT_DATA binds exactly this
    challenge and key. Constant time in the compared bytes."""
    if not isinstance(report_data_field, bytes) or len(report_data_field) != REPORT_DATA_SIZE:
        raise MalformedInput(ChallengeReason.BAD_CHALLENGE, f"REPORT_DATA is {REPORT_DATA_SIZE} bytes")
    expected = report_data(challenge, guest_public_key)
    if not hmac.compare_digest(report_data_field, expected):
        raise VerificationFailed(
            ChallengeReason.REPORT_DATA_MISMATCH,
            "report_data: not SHA-512 of the issued challenge and the guest's public key",
        )


@dataclass(frozen=True)
class IssuedChallenge:
    """A challenge as the owner hands it out: the value and when it stops being accepted. The owner's store
    records it against the authorisation and spends it at the first Attest (single use)."""

    value: bytes
    issued_at: datetime
    expires_at: datetime

    def __post_init__(self) -> None:
        check_challenge(self.value)
        if self.issued_at.tzinfo is None or self.expires_at.tzinfo is None:
            raise ValueError("challenge times need a time zone")
        if self.expires_at <= self.issued_at:
            raise ValueError("a challenge expires after it is issued")

    @classmethod
    def issue(cls, now: datetime, ttl: timedelta = DEFAULT_CHALLENGE_TTL) -> IssuedChallenge:
        return cls(new_challenge(), now, now + ttl)

    def matches(self, value: bytes) -> bool:
        return isinstance(value, bytes) and hmac.compare_digest(self.value, value)

    def check_fresh(self, now: datetime) -> None:
        if not self.issued_at <= now < self.expires_at:
            raise VerificationFailed(ChallengeReason.CHALLENGE_EXPIRED, "challenge: expired or not yet valid")
