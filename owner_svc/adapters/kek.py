"""The key-encryption key (KEK): AES-256-GCM sealing of TEK/TIK and secrets at rest.

The KEK lives in a file apart from the database (a Kubernetes Secret in production), so the database
alone reveals no secret. Each sealed value is `version ‖ nonce[12] ‖ ciphertext‖tag` with an AAD naming
its row, so a ciphertext copied to another row (another session, another workload) does not open.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from owner_svc.core.ports import SealError
from sevlaunch.audit import audit_mac_key
from sevlaunch.ownerdb import KEK_SIZE, KEKFileError, load_kek

__all__ = ["KEK_SIZE", "KEKFileError", "KeyEncryptionKey"]

_NONCE_SIZE = 12
_VERSION = b"\x01"


class KeyEncryptionKey:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEK_SIZE:
            raise ValueError("a KEK is 32 bytes")
        self._aead = AESGCM(key)
        # Separate keys per purpose, derived one-way, so the audit MAC key cannot decrypt anything.
        self._audit_key = audit_mac_key(key)

    def __repr__(self) -> str:
        return "KeyEncryptionKey(<hidden>)"

    @property
    def audit_key(self) -> bytes:
        return self._audit_key

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_SIZE)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, _VERSION + aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < 1 + _NONCE_SIZE + 16 or sealed[:1] != _VERSION:
            raise SealError("sealed value is malformed")
        try:
            return self._aead.decrypt(sealed[1 : 1 + _NONCE_SIZE], sealed[1 + _NONCE_SIZE :], _VERSION + aad)
        except InvalidTag:
            raise SealError("sealed value does not open under this KEK and row") from None

    @classmethod
    def from_file(cls, path: str | Path, *, create: bool = False) -> KeyEncryptionKey:
        """Reads the KEK file (`sevlaunch.ownerdb.load_kek`: 32 raw bytes or their base64, 0600); with
        `create`, makes one when the file does not exist. Raises KEKFileError."""
        return cls(load_kek(path, create=create))
