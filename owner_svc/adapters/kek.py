"""The key-encryption key (KEK): AES-256-GCM sealing of TEK/TIK and secrets at rest.

The KEK lives in a file apart from the database (a Kubernetes Secret in production), so the database
alone reveals no secret. Each sealed value is `version ‖ nonce[12] ‖ ciphertext‖tag` with an AAD naming
its row, so a ciphertext copied to another row (another session, another workload) does not open.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from owner_svc.core.ports import SealError
from sevlaunch.audit import audit_mac_key

KEK_SIZE = 32
_NONCE_SIZE = 12
_VERSION = b"\x01"


class KEKFileError(Exception):
    """The KEK file is missing, malformed or too open. The message names the file, never its bytes."""


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
        """Reads the KEK (32 raw bytes, or their base64 on one line); with `create`, makes one (0600)
        when the file does not exist. A file readable by group or others is refused."""
        p = Path(path)
        if not p.exists():
            if not create:
                raise KEKFileError(f"KEK file {p} does not exist (use --create-kek to make one)")
            key = secrets.token_bytes(KEK_SIZE)
            try:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # created meanwhile by another process: use that one
                return cls.from_file(p)
            try:
                os.write(fd, base64.b64encode(key) + b"\n")
            finally:
                os.close(fd)
            return cls(key)
        try:
            mode = p.stat().st_mode
            data = p.read_bytes()
        except OSError as exc:
            raise KEKFileError(f"cannot read KEK file {p}: {exc.strerror}") from None
        if stat.S_IMODE(mode) & 0o077:
            raise KEKFileError(f"KEK file {p} is readable by group or others (chmod 600 it)")
        if len(data) == KEK_SIZE:
            return cls(data)
        try:
            key = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEK_SIZE:
            raise KEKFileError(f"KEK file {p} must hold 32 bytes (raw or base64)")
        return cls(key)
