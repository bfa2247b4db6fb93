"""AMD CA certificates: the ARK (AMD Root Key) and ASK (AMD SEV Key), RSA, in AMD's own format.

Layout (SEV API spec, publication 55766, appendix C.1 "AMD Root Key and AMD SEV Signing Key Certificate";
PROTOCOL.md section 2), all integers little-endian:

    0x00 version u32 (= 1)        0x04 key_id[16]      0x14 certifying_id[16]   0x24 key_usage u32
    0x28 reserved[16]             0x38 pub_exp_size u32 (bits)                  0x3C modulus_size u32 (bits)
    0x40 pub_exp[pub_exp_size/8]  then modulus[modulus_size/8]  then signature[modulus_size/8]

The signature is RSA-PSS (MGF1 on the same hash, salt = digest length) over everything before it. The
hash goes by key size: SHA-256 for RSA-2048 (Naples), SHA-384 for RSA-4096 (Rome and later).
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sevlaunch.sev import roots
from sevlaunch.sev.errors import MalformedInput, Reason, VerificationFailed

_HEADER = struct.Struct("<I16s16sI16sII")
HEADER_SIZE = _HEADER.size  # 0x40
ID_SIZE = 16
SUPPORTED_MODULUS_BITS = (2048, 4096)
# AMD publishes the Naples ARK without its 256-byte self-signature (AMDESE/AMDSEV#17).
NAPLES_PUBLISHED_ARK_SIZE = HEADER_SIZE + 2 * 256


class AMDKeyUsage(IntEnum):
    ARK = 0x00
    ASK = 0x13


def hash_for_modulus_bits(bits: int) -> hashes.HashAlgorithm:
    """AMD signs with SHA-256 under its 2048-bit keys and SHA-384 under its 4096-bit keys."""
    return hashes.SHA256() if bits <= 2048 else hashes.SHA384()


def _pss(hash_algorithm: hashes.HashAlgorithm) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size)


@dataclass(frozen=True)
class AMDCertificate:
    """One ARK or ASK. Byte strings are kept exactly as encoded (little-endian), so `to_bytes` round-trips."""

    key_id: bytes
    certifying_id: bytes
    key_usage: AMDKeyUsage
    pub_exp_bits: int
    modulus_bits: int
    pub_exp: bytes
    modulus: bytes
    signature: bytes
    version: int = 1
    reserved: bytes = field(default=bytes(16), repr=False)

    def __post_init__(self) -> None:
        if self.version != 1:
            raise MalformedInput(Reason.BAD_VERSION, f"AMD certificate version {self.version}, expected 1")
        if len(self.key_id) != ID_SIZE or len(self.certifying_id) != ID_SIZE or len(self.reserved) != 16:
            raise MalformedInput(Reason.BAD_LENGTH, "AMD certificate ids and reserved field are 16 bytes")
        if not isinstance(self.key_usage, AMDKeyUsage):
            raise MalformedInput(Reason.BAD_FIELD, "AMD certificate key usage must be ARK or ASK")
        if self.modulus_bits not in SUPPORTED_MODULUS_BITS:
            raise MalformedInput(Reason.BAD_FIELD, f"AMD certificate modulus size {self.modulus_bits} bits")
        if self.pub_exp_bits <= 0 or self.pub_exp_bits % 8 or self.pub_exp_bits > self.modulus_bits:
            raise MalformedInput(Reason.BAD_FIELD, f"AMD certificate exponent size {self.pub_exp_bits}")
        n = self.modulus_bits // 8
        if len(self.pub_exp) != self.pub_exp_bits // 8 or len(self.modulus) != n or len(self.signature) != n:
            raise MalformedInput(Reason.BAD_LENGTH, "AMD certificate field sizes disagree with the header")

    # -- encoding ---------------------------------------------------------------------------------

    @staticmethod
    def encoded_size(data: bytes) -> int:
        """The size that the header at the start of `data` announces (the header is checked, not the rest)."""
        if len(data) < HEADER_SIZE:
            raise MalformedInput(Reason.TRUNCATED, f"AMD certificate header needs {HEADER_SIZE} bytes")
        pub_exp_bits: int
        modulus_bits: int
        pub_exp_bits, modulus_bits = struct.unpack_from("<II", data, 0x38)
        if modulus_bits not in SUPPORTED_MODULUS_BITS:
            raise MalformedInput(Reason.BAD_FIELD, f"AMD certificate modulus size {modulus_bits} bits")
        if pub_exp_bits <= 0 or pub_exp_bits % 8 or pub_exp_bits > modulus_bits:
            raise MalformedInput(Reason.BAD_FIELD, f"AMD certificate public exponent size {pub_exp_bits}")
        return HEADER_SIZE + pub_exp_bits // 8 + 2 * (modulus_bits // 8)

    @classmethod
    def from_bytes(cls, data: bytes) -> AMDCertificate:
        """Parses exactly one certificate: `data` must have the size its header announces."""
        data = bytes(data)
        size = cls.encoded_size(data)
        if len(data) < size:
            raise MalformedInput(Reason.TRUNCATED, f"AMD certificate is {len(data)} bytes, not {size}")
        if len(data) > size:
            raise MalformedInput(Reason.BAD_LENGTH, f"AMD certificate is {len(data)} bytes, not {size}")
        fields = _HEADER.unpack_from(data)
        version, key_id, certifying_id, usage, reserved, pub_exp_bits, modulus_bits = fields
        try:
            key_usage = AMDKeyUsage(usage)
        except ValueError:
            raise MalformedInput(Reason.BAD_FIELD, f"AMD certificate key usage {usage:#x}") from None
        e_end = HEADER_SIZE + pub_exp_bits // 8
        n_end = e_end + modulus_bits // 8
        cert = cls(
            version=version,
            key_id=key_id,
            certifying_id=certifying_id,
            key_usage=key_usage,
            reserved=reserved,
            pub_exp_bits=pub_exp_bits,
            modulus_bits=modulus_bits,
            pub_exp=data[HEADER_SIZE:e_end],
            modulus=data[e_end:n_end],
            signature=data[n_end:],
        )
        # Parsed once from these exact bytes: keep them so that signed_bytes/to_bytes cost nothing later.
        object.__setattr__(cert, "_encoded", data)
        return cert

    def to_bytes(self) -> bytes:
        return self._encoded

    def signed_bytes(self) -> bytes:
        """Everything but the signature (the spec's signed region)."""
        return self._encoded[: len(self._encoded) - len(self.signature)]

    @cached_property
    def _encoded(self) -> bytes:
        header = _HEADER.pack(
            self.version,
            self.key_id,
            self.certifying_id,
            int(self.key_usage),
            self.reserved,
            self.pub_exp_bits,
            self.modulus_bits,
        )
        return header + self.pub_exp + self.modulus + self.signature

    # -- keys and signatures ----------------------------------------------------------------------

    @cached_property
    def _public_key(self) -> rsa.RSAPublicKey:
        e = int.from_bytes(self.pub_exp, "little")
        n = int.from_bytes(self.modulus, "little")
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise MalformedInput(Reason.BAD_FIELD, "AMD certificate holds no valid RSA public key") from None

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public_key

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm:
        """The hash this key signs with (by key size)."""
        return hash_for_modulus_bits(self.modulus_bits)

    def verify_signed_by(self, signer: AMDCertificate) -> None:
        """Checks that `signer` (an ARK: itself for the ARK, the ARK for the ASK) signed this certificate.

        Raises VerificationFailed: WRONG_SIGNER when the certifying id does not name the signer,
        MISSING_SIGNATURE for an all-zero signature, BAD_SIGNATURE otherwise.
        """
        if signer.key_usage is not AMDKeyUsage.ARK:
            raise VerificationFailed(Reason.WRONG_USAGE, f"signer is an {signer.key_usage.name}, not an ARK")
        if not hmac.compare_digest(self.certifying_id, signer.key_id):
            raise VerificationFailed(Reason.WRONG_SIGNER, "certifying id does not match the signer's key id")
        if not any(self.signature):
            raise VerificationFailed(Reason.MISSING_SIGNATURE, "the signature is all zeros")
        if len(self.signature) != signer.modulus_bits // 8:
            raise VerificationFailed(Reason.BAD_SIGNATURE, "signature size does not match the signer's key")
        algorithm = signer.hash_algorithm
        try:
            signer.public_key().verify(self.signature[::-1], self.signed_bytes(), _pss(algorithm), algorithm)
        except InvalidSignature:
            raise VerificationFailed(Reason.BAD_SIGNATURE, "RSA-PSS signature does not verify") from None

    def verify_self_signed(self) -> None:
        if self.key_usage is not AMDKeyUsage.ARK:
            raise VerificationFailed(Reason.WRONG_USAGE, f"an {self.key_usage.name} is not self-signed")
        self.verify_signed_by(self)

    @classmethod
    def create(
        cls,
        *,
        key_id: bytes,
        certifying_id: bytes,
        key_usage: AMDKeyUsage,
        public_key: rsa.RSAPublicKey,
        signer_private_key: rsa.RSAPrivateKey,
    ) -> AMDCertificate:
        """Makes and signs an ARK or ASK (the emulator's own AMD root). For an ARK, pass its own private key
        as the signer and `certifying_id == key_id`."""
        bits = public_key.key_size
        if bits not in SUPPORTED_MODULUS_BITS or signer_private_key.key_size not in SUPPORTED_MODULUS_BITS:
            raise ValueError("AMD certificates use RSA-2048 or RSA-4096 keys")
        if signer_private_key.key_size != bits:
            raise ValueError("signer and subject keys must have the same size (the format has one size)")
        numbers = public_key.public_numbers()
        size = bits // 8
        unsigned = cls(
            key_id=key_id,
            certifying_id=certifying_id,
            key_usage=key_usage,
            pub_exp_bits=bits,
            modulus_bits=bits,
            pub_exp=numbers.e.to_bytes(size, "little"),
            modulus=numbers.n.to_bytes(size, "little"),
            signature=bytes(size),
        )
        algorithm = hash_for_modulus_bits(bits)
        signature = signer_private_key.sign(unsigned.signed_bytes(), _pss(algorithm), algorithm)
        return cls(
            key_id=key_id,
            certifying_id=certifying_id,
            key_usage=key_usage,
            pub_exp_bits=bits,
            modulus_bits=bits,
            pub_exp=unsigned.pub_exp,
            modulus=unsigned.modulus,
            signature=signature[::-1],
        )


def parse_ark(data: bytes) -> AMDCertificate:
    """Parses an ARK. Also accepts the Naples ARK exactly as AMD publishes it (576 bytes, no signature),
    but only when its bytes are those of the pinned Naples ARK: it then stands for the pinned, signed
    ARK. Any other truncated ARK is malformed."""
    data = bytes(data)
    if len(data) == NAPLES_PUBLISHED_ARK_SIZE:
        pinned = roots.ark_bytes("naples")
        if hmac.compare_digest(data, pinned[:NAPLES_PUBLISHED_ARK_SIZE]):
            return AMDCertificate.from_bytes(pinned)
    ark = AMDCertificate.from_bytes(data)
    if ark.key_usage is not AMDKeyUsage.ARK:
        raise MalformedInput(Reason.BAD_FIELD, "expected an ARK, got an ASK")
    return ark


def parse_ask_ark(data: bytes) -> tuple[AMDCertificate, AMDCertificate]:
    """Splits AMD's `ask_ark_<gen>.cert` (ASK then ARK) into (ask, ark)."""
    data = bytes(data)
    ask_size = AMDCertificate.encoded_size(data)
    if len(data) < ask_size:
        raise MalformedInput(Reason.TRUNCATED, "ASK||ARK file ends inside the ASK")
    ask = AMDCertificate.from_bytes(data[:ask_size])
    if ask.key_usage is not AMDKeyUsage.ASK:
        raise MalformedInput(Reason.BAD_FIELD, "ASK||ARK file does not start with an ASK")
    return ask, parse_ark(data[ask_size:])
