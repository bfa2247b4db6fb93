"""SEV platform certificates (OCA, PEK, PDH, CEK, and the owner's GODH): 0x824 bytes each.

Layout (SEV API spec, publication 55766, appendix C.2 "SEV Certificate"; PROTOCOL.md section 3), all
integers little-endian, including EC coordinates, RSA numbers and signatures:

    0x000 version u32 (= 1)   0x004 api_major u8   0x005 api_minor u8   0x006 reserved[2]
    0x008 pub_key_usage u32   0x00C pub_key_algo u32
    0x010 pub_key[0x404]      EC: curve u32, Qx[72], Qy[72], zero padding (C.4 "ECDSA Public Key")
                              RSA: modulus_bits u32, pub_exp[512], modulus[512] (C.3 "RSA Public Key")
    0x414 sig1: usage u32, algo u32, sig[0x200]    ECDSA: r[72], s[72], zero (C.5); RSA: sig[512]
    0x61C sig2: same layout

The signed region (the "body") is [0, 0x414). An empty signature slot has usage 0x1000 and algo 0.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, replace
from enum import IntEnum
from functools import cached_property

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sevlaunch.sev.amd_cert import AMDCertificate, AMDKeyUsage
from sevlaunch.sev.errors import MalformedInput, Reason, VerificationFailed

CERT_SIZE = 0x824
BODY_SIZE = 0x414
PUBKEY_OFFSET = 0x10
PUBKEY_SIZE = 0x404
SIG_SLOT_OFFSETS = (0x414, 0x61C)
SIG_SIZE = 0x200
EC_COORD_SIZE = 72  # bytes per little-endian coordinate or r/s field, whatever the curve
RSA_FIELD_SIZE = 512
_HEADER = struct.Struct("<IBB2sII")


class Usage(IntEnum):
    ARK = 0x0000
    ASK = 0x0013
    NONE = 0x1000  # "invalid": an empty signature slot
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class Algorithm(IntEnum):
    NONE = 0x000  # "invalid": an empty signature slot
    RSA_SHA256 = 0x001
    ECDSA_SHA256 = 0x002
    ECDH_SHA256 = 0x003
    RSA_SHA384 = 0x101
    ECDSA_SHA384 = 0x102
    ECDH_SHA384 = 0x103

    @property
    def is_rsa(self) -> bool:
        return self in (Algorithm.RSA_SHA256, Algorithm.RSA_SHA384)

    @property
    def is_ec(self) -> bool:
        return self in _EC_ALGORITHMS

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        """The digest follows the algorithm, not the key: ECDSA_SHA256 over a P-384 key hashes SHA-256."""
        return hashes.SHA384() if self & 0x100 else hashes.SHA256()


_EC_ALGORITHMS = frozenset(
    {
        Algorithm.ECDSA_SHA256,
        Algorithm.ECDH_SHA256,
        Algorithm.ECDSA_SHA384,
        Algorithm.ECDH_SHA384,
    }
)
_SIGNING_ALGORITHMS = frozenset(
    {Algorithm.RSA_SHA256, Algorithm.RSA_SHA384, Algorithm.ECDSA_SHA256, Algorithm.ECDSA_SHA384}
)


class Curve(IntEnum):
    P256 = 1
    P384 = 2

    def curve(self) -> ec.EllipticCurve:
        return ec.SECP256R1() if self is Curve.P256 else ec.SECP384R1()

    @property
    def size(self) -> int:
        return 32 if self is Curve.P256 else 48


@dataclass(frozen=True)
class ECKey:
    """An EC public key field: coordinates little-endian, 72 bytes each (only the curve size significant)."""

    curve: Curve
    qx: bytes
    qy: bytes

    def __post_init__(self) -> None:
        if len(self.qx) != EC_COORD_SIZE or len(self.qy) != EC_COORD_SIZE:
            raise MalformedInput(Reason.BAD_LENGTH, "EC coordinates are 72-byte fields")

    @classmethod
    def from_public_key(cls, key: ec.EllipticCurvePublicKey) -> ECKey:
        if isinstance(key.curve, ec.SECP384R1):
            curve = Curve.P384
        elif isinstance(key.curve, ec.SECP256R1):
            curve = Curve.P256
        else:
            raise ValueError(f"SEV certificates hold P-256 or P-384 keys, not {key.curve.name}")
        numbers = key.public_numbers()
        x = numbers.x.to_bytes(EC_COORD_SIZE, "little")
        return cls(curve, x, numbers.y.to_bytes(EC_COORD_SIZE, "little"))

    def to_bytes(self) -> bytes:
        encoded = struct.pack("<I", self.curve) + self.qx + self.qy
        return encoded + bytes(PUBKEY_SIZE - len(encoded))

    @classmethod
    def from_bytes(cls, data: bytes) -> ECKey:
        (curve_id,) = struct.unpack_from("<I", data)
        try:
            curve = Curve(curve_id)
        except ValueError:
            raise MalformedInput(Reason.UNSUPPORTED_ALGORITHM, f"unknown EC curve id {curve_id}") from None
        end = 4 + 2 * EC_COORD_SIZE
        if any(data[end:]):
            raise MalformedInput(Reason.BAD_FIELD, "EC public key padding is not zero")
        return cls(curve, data[4 : 4 + EC_COORD_SIZE], data[4 + EC_COORD_SIZE : end])

    def public_key(self) -> ec.EllipticCurvePublicKey:
        x = int.from_bytes(self.qx, "little")
        y = int.from_bytes(self.qy, "little")
        try:
            return ec.EllipticCurvePublicNumbers(x, y, self.curve.curve()).public_key()
        except ValueError:
            raise MalformedInput(Reason.BAD_FIELD, "EC public key is not a point on its curve") from None


@dataclass(frozen=True)
class RSAKey:
    """An RSA public key field: modulus size in bits, exponent and modulus as 512-byte LE fields."""

    modulus_bits: int
    pub_exp: bytes
    modulus: bytes

    def __post_init__(self) -> None:
        if not 2048 <= self.modulus_bits <= 4096 or self.modulus_bits % 8:
            raise MalformedInput(Reason.BAD_FIELD, f"RSA modulus size {self.modulus_bits} bits")
        if len(self.pub_exp) != RSA_FIELD_SIZE or len(self.modulus) != RSA_FIELD_SIZE:
            raise MalformedInput(Reason.BAD_LENGTH, "RSA key fields are 512 bytes")

    def to_bytes(self) -> bytes:
        return struct.pack("<I", self.modulus_bits) + self.pub_exp + self.modulus

    @classmethod
    def from_bytes(cls, data: bytes) -> RSAKey:
        (bits,) = struct.unpack_from("<I", data)
        return cls(bits, data[4 : 4 + RSA_FIELD_SIZE], data[4 + RSA_FIELD_SIZE : 4 + 2 * RSA_FIELD_SIZE])

    def public_key(self) -> rsa.RSAPublicKey:
        e = int.from_bytes(self.pub_exp, "little")
        n = int.from_bytes(self.modulus, "little")
        if n.bit_length() > self.modulus_bits:
            raise MalformedInput(Reason.BAD_FIELD, "RSA modulus is larger than its declared size")
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise MalformedInput(Reason.BAD_FIELD, "RSA public key is not valid") from None


@dataclass(frozen=True)
class Signature:
    """One signature slot. Usage and algorithm stay raw integers so that any slot round-trips; `check`
    decides whether the slot is well formed."""

    usage: int
    algorithm: int
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.data) != SIG_SIZE:
            raise MalformedInput(Reason.BAD_LENGTH, f"signature field is {SIG_SIZE:#x} bytes")
        if not (0 <= self.usage < 2**32 and 0 <= self.algorithm < 2**32):
            raise MalformedInput(Reason.BAD_FIELD, "signature usage/algo are u32")

    @classmethod
    def empty(cls) -> Signature:
        return cls(Usage.NONE, Algorithm.NONE, bytes(SIG_SIZE))

    @property
    def is_empty(self) -> bool:
        return self.usage == Usage.NONE and self.algorithm == Algorithm.NONE

    @property
    def is_malformed(self) -> bool:
        # The firmware rejects a slot that is half empty (AMD-ASPFW sev_cert_validate_sig; AMDESE/AMDSEV#18).
        return (self.usage == Usage.NONE) != (self.algorithm == Algorithm.NONE)

    def to_bytes(self) -> bytes:
        return struct.pack("<II", self.usage, self.algorithm) + self.data


@dataclass(frozen=True)
class SEVCertificate:
    api_major: int
    api_minor: int
    usage: Usage
    algorithm: Algorithm
    key: ECKey | RSAKey
    sig1: Signature = field(default_factory=Signature.empty)
    sig2: Signature = field(default_factory=Signature.empty)
    version: int = 1
    reserved: bytes = field(default=bytes(2), repr=False)

    def __post_init__(self) -> None:
        if self.version != 1:
            raise MalformedInput(Reason.BAD_VERSION, f"SEV certificate version {self.version}, expected 1")
        if not (0 <= self.api_major <= 0xFF and 0 <= self.api_minor <= 0xFF) or len(self.reserved) != 2:
            raise MalformedInput(Reason.BAD_FIELD, "API version is two bytes; reserved is 2 bytes")
        if not isinstance(self.usage, Usage) or not isinstance(self.algorithm, Algorithm):
            raise MalformedInput(Reason.BAD_FIELD, "usage and algorithm must be known values")
        if self.usage in (Usage.NONE, Usage.ARK, Usage.ASK) or self.algorithm is Algorithm.NONE:
            raise MalformedInput(Reason.BAD_FIELD, f"{self.usage.name} key with {self.algorithm.name}")
        if self.algorithm.is_ec != isinstance(self.key, ECKey):
            raise MalformedInput(Reason.BAD_FIELD, f"{self.algorithm.name} does not match the key field")

    # -- encoding ---------------------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes) -> SEVCertificate:
        data = bytes(data)
        if len(data) < CERT_SIZE:
            raise MalformedInput(Reason.TRUNCATED, f"SEV certificate is {len(data)} bytes, not {CERT_SIZE}")
        if len(data) > CERT_SIZE:
            raise MalformedInput(Reason.BAD_LENGTH, f"SEV certificate is {len(data)} bytes, not {CERT_SIZE}")
        version, api_major, api_minor, reserved, usage_raw, algo_raw = _HEADER.unpack_from(data)
        if version != 1:
            raise MalformedInput(Reason.BAD_VERSION, f"SEV certificate version {version}, expected 1")
        try:
            usage = Usage(usage_raw)
        except ValueError:
            raise MalformedInput(Reason.BAD_FIELD, f"unknown key usage {usage_raw:#x}") from None
        try:
            algorithm = Algorithm(algo_raw)
        except ValueError:
            raise MalformedInput(Reason.UNSUPPORTED_ALGORITHM, f"key algorithm {algo_raw:#x}") from None
        raw_key = data[PUBKEY_OFFSET:BODY_SIZE]
        key: ECKey | RSAKey = ECKey.from_bytes(raw_key) if algorithm.is_ec else RSAKey.from_bytes(raw_key)
        slots = []
        for off in SIG_SLOT_OFFSETS:
            s_usage, s_algo = struct.unpack_from("<II", data, off)
            slots.append(Signature(s_usage, s_algo, data[off + 8 : off + 8 + SIG_SIZE]))
        cert = cls(
            version=version,
            api_major=api_major,
            api_minor=api_minor,
            reserved=reserved,
            usage=usage,
            algorithm=algorithm,
            key=key,
            sig1=slots[0],
            sig2=slots[1],
        )
        object.__setattr__(cert, "_encoded", data)
        return cert

    @cached_property
    def _encoded(self) -> bytes:
        header = _HEADER.pack(
            self.version, self.api_major, self.api_minor, self.reserved, self.usage, self.algorithm
        )
        return header + self.key.to_bytes() + self.sig1.to_bytes() + self.sig2.to_bytes()

    def to_bytes(self) -> bytes:
        return self._encoded

    def body(self) -> bytes:
        """The signed region, bytes [0, 0x414)."""
        return self._encoded[:BODY_SIZE]

    def public_key_bytes(self) -> bytes:
        """The encoded public key field (0x404 bytes), e.g. for a fingerprint."""
        return self._encoded[PUBKEY_OFFSET:BODY_SIZE]

    @cached_property
    def _public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        return self.key.public_key()

    def public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        return self._public_key

    @property
    def signatures(self) -> tuple[Signature, Signature]:
        return (self.sig1, self.sig2)

    def fingerprint(self) -> str:
        """SHA-256 of the public key field, hex: stable across re-signing (KDS re-signs the CEK each time)."""
        return hashlib.sha256(self.public_key_bytes()).hexdigest()

    # -- creation ---------------------------------------------------------------------------------

    @classmethod
    def for_ec_key(
        cls,
        *,
        usage: Usage,
        algorithm: Algorithm,
        public_key: ec.EllipticCurvePublicKey,
        api_major: int,
        api_minor: int,
    ) -> SEVCertificate:
        """An unsigned certificate (both slots empty) for an EC key, e.g. a PEK before signing or a GODH."""
        return cls(
            api_major=api_major,
            api_minor=api_minor,
            usage=usage,
            algorithm=algorithm,
            key=ECKey.from_public_key(public_key),
        )

    def sign_with(
        self,
        signer_usage: Usage,
        signer_algorithm: Algorithm,
        private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    ) -> SEVCertificate:
        """Returns a copy with the first empty slot holding a signature over the body by `private_key`.

        ECDSA with an EC key (r, s little-endian in 72-byte fields); RSA-PSS with an RSA key (salt = digest
        length, MGF1 on the algorithm's hash; the ASK signing a CEK)."""
        if signer_algorithm not in _SIGNING_ALGORITHMS:
            raise ValueError(f"{signer_algorithm.name} is not a signature algorithm")
        algorithm = signer_algorithm.hash_algorithm()
        body = self.body()
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            if signer_algorithm.is_rsa:
                raise TypeError("an RSA algorithm needs an RSA private key")
            r, s = decode_dss_signature(private_key.sign(body, ec.ECDSA(algorithm)))
            sig = r.to_bytes(EC_COORD_SIZE, "little") + s.to_bytes(EC_COORD_SIZE, "little")
        elif isinstance(private_key, rsa.RSAPrivateKey):
            if not signer_algorithm.is_rsa:
                raise TypeError("an ECDSA algorithm needs an EC private key")
            pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
            sig = private_key.sign(body, pss, algorithm)[::-1]
        else:
            raise TypeError("private_key must be an EC or RSA private key")
        slot = Signature(signer_usage, signer_algorithm, sig + bytes(SIG_SIZE - len(sig)))
        if self.sig1.is_empty:
            return replace(self, sig1=slot)
        if self.sig2.is_empty:
            return replace(self, sig2=slot)
        raise RuntimeError("both signature slots are already filled")

    # -- verification -----------------------------------------------------------------------------

    def verify_signed_by(self, signer: SEVCertificate | AMDCertificate) -> None:
        """Checks that `signer` signed this certificate, raising on failure (never returns False).

        The slot is found by the signer's usage and algorithm, not by position (the firmware tries both).
        A half-empty slot makes the whole certificate malformed (AMDESE/AMDSEV#18).
        """
        for slot in (self.sig1, self.sig2):
            if slot.is_malformed:
                raise MalformedInput(
                    Reason.MALFORMED_SIGNATURE_SLOT,
                    f"signature slot with usage {slot.usage:#x} and algo {slot.algorithm:#x} is half empty",
                )
        if isinstance(signer, AMDCertificate):
            signer_usage = Usage.ASK if signer.key_usage is AMDKeyUsage.ASK else Usage.ARK
            # An AMD key signs with RSA-PSS; the slot's algo names the hash (RSA_SHA256 on Naples).
            candidates = [s for s in self.signatures if s.usage == signer_usage and s.algorithm in _RSA_ALGOS]
        else:
            signer_usage = signer.usage
            if signer.algorithm not in _SIGNING_ALGORITHMS:
                raise VerificationFailed(
                    Reason.WRONG_USAGE, f"a {signer.algorithm.name} key cannot sign certificates"
                )
            candidates = [
                s for s in self.signatures if s.usage == signer_usage and s.algorithm == signer.algorithm
            ]
        if not candidates:
            raise VerificationFailed(
                Reason.MISSING_SIGNATURE,
                f"{self.usage.name} carries no signature by a {signer_usage.name} key",
            )
        key = signer.public_key()
        body = self.body()
        for slot in candidates:
            if _verify_slot(key, slot, body):
                return
        raise VerificationFailed(
            Reason.BAD_SIGNATURE, f"{signer_usage.name} signature on the {self.usage.name} does not verify"
        )


_RSA_ALGOS = frozenset({Algorithm.RSA_SHA256, Algorithm.RSA_SHA384})


def _verify_slot(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, slot: Signature, body: bytes) -> bool:
    algorithm = Algorithm(slot.algorithm).hash_algorithm()
    data = slot.data
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if not Algorithm(slot.algorithm).is_rsa:
                return False
            size = (key.key_size + 7) // 8
            if any(data[size:]):
                return False
            pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
            key.verify(data[:size][::-1], body, pss, algorithm)
        else:
            if Algorithm(slot.algorithm).is_rsa or any(data[2 * EC_COORD_SIZE :]):
                return False
            r = int.from_bytes(data[:EC_COORD_SIZE], "little")
            s = int.from_bytes(data[EC_COORD_SIZE : 2 * EC_COORD_SIZE], "little")
            if r == 0 or s == 0:
                return False
            key.verify(encode_dss_signature(r, s), body, ec.ECDSA(algorithm))
    except InvalidSignature:
        return False
    return True
