"""The SEV key derivation function (PROTOCOL.md §4.3; AMD SEV API spec, "Key Derivation Function").

NIST SP 800-108 in counter mode with HMAC-SHA256 as the PRF. AMD's firmware encodes both the counter and
the output length as **little-endian** u32, unlike the big-endian examples of SP 800-108 itself, so a
generic SP 800-108 implementation (e.g. `cryptography`'s KBKDFHMAC) gives different bytes.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevlaunch.sev.types import Nonce

KEY_SIZE = 16
_HASH_SIZE = 32
# The counter is a u32, so SP 800-108 bounds the output to (2**32 - 1) PRF blocks; far above any use here.
_MAX_LENGTH = _HASH_SIZE * 0xFFFF

LABEL_MASTER_SECRET = b"sev-master-secret"
LABEL_KEK = b"sev-kek"
LABEL_KIK = b"sev-kik"

# One hash descriptor for every HMAC: it is immutable, and building one per call costs more than the MAC
# of a short message.
_SHA256 = hashes.SHA256()


def kdf(key: bytes, label: bytes, context: bytes = b"", length: int = KEY_SIZE) -> bytes:
    """Derives `length` bytes: K(i) = HMAC(key, u32le(i) ‖ label ‖ 0x00 ‖ context ‖ u32le(length*8))."""
    if not isinstance(key, bytes | bytearray) or not isinstance(label, bytes | bytearray):
        raise TypeError("kdf key and label must be bytes")
    if not 0 < length <= _MAX_LENGTH:
        raise ValueError(f"kdf output length must be 1..{_MAX_LENGTH} bytes")
    suffix = bytes(label) + b"\x00" + bytes(context) + struct.pack("<I", length * 8)
    out = bytearray()
    counter = 1
    while len(out) < length:
        prf = hmac.HMAC(key, _SHA256)
        prf.update(struct.pack("<I", counter) + suffix)
        out += prf.finalize()
        counter += 1
    return bytes(out[:length])


def derive_master_secret(z: bytes, nonce: Nonce | bytes) -> bytes:
    """master = KDF(Z, "sev-master-secret", nonce): Z is the ECDH shared x-coordinate, nonce 16 bytes."""
    if len(nonce) != 16:
        raise ValueError("the session nonce must be 16 bytes")
    return kdf(z, LABEL_MASTER_SECRET, nonce)


def derive_kek(master: bytes) -> bytes:
    """KEK = KDF(master, "sev-kek"): the AES-128 key that wraps TEK‖TIK in the session blob."""
    return kdf(master, LABEL_KEK)


def derive_kik(master: bytes) -> bytes:
    """KIK = KDF(master, "sev-kik"): the HMAC key of the session blob's wrap_mac."""
    return kdf(master, LABEL_KIK)


def hmac_sha256(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over the concatenation of `parts`: the MAC of every SEV launch channel message."""
    mac = hmac.HMAC(key, _SHA256)
    for part in parts:
        mac.update(part)
    return mac.finalize()


def aes128_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-128-CTR with a 128-bit big-endian counter block starting at `iv` (its own inverse)."""
    if len(key) != KEY_SIZE or len(iv) != 16:
        raise ValueError("AES-128-CTR needs a 16-byte key and a 16-byte IV")
    # AES() and CTR() check the key and IV types (bytes-like) and copy nothing here: the context is used
    # at once and dropped.
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return encryptor.update(data) + encryptor.finalize()
