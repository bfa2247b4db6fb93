"""Releasing a secret to an attested SEV-SNP guest, wrapped to the guest's ephemeral key with HPKE.

Suite (RFC 9180, base mode, single shot): KEM DHKEM(P-384, HKDF-SHA384) (0x0011), KDF HKDF-SHA384
(0x0002), AEAD AES-256-GCM (0x0002); `cryptography.hazmat.primitives.hpke`. P-384 because the rest of
SNP is P-384 (VCEK, ID keys) and it gives the 192-bit level of AES-256.

* The guest makes a `GuestKeyPair` inside its encrypted memory and binds its public key into the report's
  REPORT_DATA (`challenge.report_data`). The private key never leaves the guest.
* The owner, once the report verified, `seal`s the secret to that public key. HPKE's `info` binds the
  release to its context: `release_info(authorization_id, challenge)`, so a wrapped secret can be opened
  only for the authorisation and the attestation session (the challenge) it was made for. The KEM context
  binds the recipient key already.
* The guest `open_secret`s it. Any change (other key, other info, a flipped bit) fails as
  `SecretUnwrapFailed`, with no detail an attacker can use.

On the wire the sealed secret is two fields: `enc` (the 97-byte encapsulated key) and `ciphertext` (the
secret and its 16-byte GCM tag).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.sev.errors import MalformedInput, VerificationFailed
from sevlaunch.snp.challenge import check_challenge, encode_guest_public_key, parse_guest_public_key

SUITE_NAME: Final = "DHKEM(P-384, HKDF-SHA384), HKDF-SHA384, AES-256-GCM"
ENC_SIZE: Final = 97
TAG_SIZE: Final = 16
MAX_SECRET_SIZE: Final = 64 * 1024
MAX_AUTHORIZATION_ID_BYTES: Final = 256
_INFO_LABEL: Final = b"sevlaunch snp secret release v1"


class WrapReason(StrEnum):
    # Reason names, not passwords (S105).
    BAD_WRAPPED_SECRET = "bad_wrapped_secret"  # noqa: S105
    SECRET_UNWRAP_FAILED = "secret_unwrap_failed"  # noqa: S105
    SECRET_TOO_LARGE = "secret_too_large"  # noqa: S105
    BAD_RELEASE_CONTEXT = "bad_release_context"


class SecretUnwrapFailed(VerificationFailed):
    def __init__(self) -> None:
        super().__init__(
            WrapReason.SECRET_UNWRAP_FAILED,
            "the wrapped secret does not open with this key for this authorisation and session",
        )


def _suite() -> hpke.Suite:
    return hpke.Suite(hpke.KEM.P384, hpke.KDF.HKDF_SHA384, hpke.AEAD.AES_256_GCM)


def release_info(authorization_id: str, challenge: bytes) -> bytes:
    """HPKE `info`: label || u16 length || authorisation id (UTF-8) || u16 length || challenge."""
    check_challenge(challenge)
    aid = authorization_id.encode("utf-8") if isinstance(authorization_id, str) else b""
    if not 0 < len(aid) <= MAX_AUTHORIZATION_ID_BYTES:
        raise MalformedInput(
            WrapReason.BAD_RELEASE_CONTEXT, f"authorization id: 1..{MAX_AUTHORIZATION_ID_BYTES} bytes"
        )
    return _INFO_LABEL + struct.pack(">H", len(aid)) + aid + struct.pack(">H", len(challenge)) + challenge


class GuestKeyPair:
    """The guest's ephemeral P-384 key pair. `repr`/`str` show the public key's fingerprint only."""

    __slots__ = ("_private",)

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP384R1
        ):
            raise TypeError("a guest key pair is a P-384 key")
        self._private = private_key

    @classmethod
    def generate(cls) -> GuestKeyPair:
        return cls(ec.generate_private_key(ec.SECP384R1()))

    @property
    def public_bytes(self) -> bytes:
        """The 97-byte uncompressed point bound into REPORT_DATA and sent to the owner."""
        return encode_guest_public_key(self._private.public_key())

    def open(self, wrapped: WrappedSecret, *, authorization_id: str, challenge: bytes) -> bytes:
        return open_secret(wrapped, self, authorization_id=authorization_id, challenge=challenge)

    def __repr__(self) -> str:
        return f"GuestKeyPair(public={self.public_bytes[1:9].hex()}...)"

    __str__ = __repr__


@dataclass(frozen=True)
class WrappedSecret:
    """A sealed secret: HPKE's encapsulated key and the AEAD ciphertext (secret || tag)."""

    enc: bytes
    ciphertext: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.enc, bytes) or len(self.enc) != ENC_SIZE or self.enc[:1] != b"\x04":
            raise MalformedInput(WrapReason.BAD_WRAPPED_SECRET, f"enc: a {ENC_SIZE}-byte P-384 point")
        if not isinstance(self.ciphertext, bytes) or not TAG_SIZE < len(self.ciphertext):
            raise MalformedInput(WrapReason.BAD_WRAPPED_SECRET, "ciphertext: shorter than its tag")
        if len(self.ciphertext) > MAX_SECRET_SIZE + TAG_SIZE:
            raise MalformedInput(
                WrapReason.SECRET_TOO_LARGE, f"ciphertext: more than {MAX_SECRET_SIZE} bytes"
            )

    def __repr__(self) -> str:
        return f"WrappedSecret(enc={len(self.enc)} bytes, ciphertext={len(self.ciphertext)} bytes)"


def seal(secret: bytes, guest_public_key: bytes, *, authorization_id: str, challenge: bytes) -> WrappedSecret:
    """The owner's side: `secret` sealed to the guest key the verified report bound."""
    if not isinstance(secret, bytes) or not 0 < len(secret) <= MAX_SECRET_SIZE:
        raise MalformedInput(WrapReason.SECRET_TOO_LARGE, f"secret: 1..{MAX_SECRET_SIZE} bytes")
    key = parse_guest_public_key(guest_public_key)
    info = release_info(authorization_id, challenge)
    sealed = _suite().encrypt(secret, key, info=info)
    return WrappedSecret(sealed[:ENC_SIZE], sealed[ENC_SIZE:])


def open_secret(
    wrapped: WrappedSecret, key_pair: GuestKeyPair, *, authorization_id: str, challenge: bytes
) -> bytes:
    """The guest's side. Raises SecretUnwrapFailed for any wrong key, context or tampered byte."""
    info = release_info(authorization_id, challenge)
    try:
        return _suite().decrypt(wrapped.enc + wrapped.ciphertext, key_pair._private, info=info)
    except (InvalidTag, ValueError):
        # ValueError: an `enc` that is not a valid point (the KEM's deserialisation); same answer.
        raise SecretUnwrapFailed() from None
