"""The SEV-SNP ID block and ID authentication information (AMD SEV-SNP ABI spec, publication 56860,
section 8.18 SNP_LAUNCH_FINISH, tables "ID_BLOCK", "ID_AUTH_INFO", and the appendix "Digital Signatures":
"ECDSA Public Key Format", "ECDSA Signature Format"). PROTOCOL.md section 11.

The owner signs the launch it expects: the 96-byte ID block (launch digest, family and image id, guest
SVN, policy) with its ID key, and the ID key with its author key. At SNP_LAUNCH_FINISH the firmware
checks both signatures, then refuses the launch if the ID block's digest or policy differ from the
guest's; the attestation report then carries SHA-384 of the two public keys (`key_digest`).

ID_BLOCK (96 bytes)::

    0x00 LD[48]  0x30 FAMILY_ID[16]  0x40 IMAGE_ID[16]
    0x50 u32 VERSION = 1  0x54 u32 GUEST_SVN  0x58 u64 POLICY

ID_AUTH_INFO (4096 bytes)::

    0x000 u32 ID_KEY_ALGO  0x004 u32 AUTH_KEY_ALGO   (1 = ECDSA P-384 with SHA-384)
    0x040 ID_BLOCK_SIG[0x200]   0x240 ID_KEY[0x404]   0x680 ID_KEY_SIG[0x200]   0x880 AUTHOR_KEY[0x404]

A public key is u32 CURVE (2 = P-384), then Qx and Qy as 72-byte little-endian integers, zero to 0x404;
a signature is R and S as 72-byte little-endian integers, zero to 0x200. Every reserved byte must be
zero: a blob with bytes this parser would drop cannot be written back as it was read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sevlaunch.sev.errors import MalformedInput, Reason, Unsupported, VerificationFailed
from sevlaunch.snp.errors import SnpReason

ID_BLOCK_SIZE = 0x60
ID_AUTH_SIZE = 0x1000
PUBLIC_KEY_SIZE = 0x404
SIGNATURE_SIZE = 0x200
DIGEST_SIZE = 48
ID_SIZE = 16
ID_BLOCK_VERSION = 1
ALGO_ECDSA_P384_SHA384 = 1
CURVE_P384 = 2
# SMT allowed and the must-be-one bit 17, ABI 0.0: sev-snp-measure's and QEMU's default policy.
DEFAULT_POLICY = 0x30000

_COORD = 72  # Qx, Qy, R and S are 72-byte little-endian fields (576 bits, room for P-521)
_ID_BLOCK = struct.Struct("<48s16s16sIIQ")
_KEY_HEAD = struct.Struct("<I")
_ALGOS = struct.Struct("<II")
_ID_BLOCK_SIG_AT = 0x040
_ID_KEY_AT = 0x240
_ID_KEY_SIG_AT = 0x680
_AUTHOR_KEY_AT = 0x880
_P384 = ec.SECP384R1()


def _le(value: int) -> bytes:
    return value.to_bytes(_COORD, "little")


def _reserved_zero(data: bytes | memoryview, start: int, end: int, reason: SnpReason, what: str) -> None:
    if any(data[start:end]):
        raise MalformedInput(reason, f"{what}: reserved bytes {start:#x}..{end:#x} are not zero")


@dataclass(frozen=True)
class AmdPublicKey:
    """An ECDSA P-384 public key in AMD's 0x404-byte format. Constructing one checks the point."""

    qx: int
    qy: int

    def __post_init__(self) -> None:
        self.to_cryptography()

    @classmethod
    def from_cryptography(cls, key: ec.EllipticCurvePublicKey) -> AmdPublicKey:
        if not isinstance(key.curve, ec.SECP384R1):
            raise Unsupported(SnpReason.UNSUPPORTED_CURVE, f"SEV-SNP keys are P-384, not {key.curve.name}")
        numbers = key.public_numbers()
        return cls(qx=numbers.x, qy=numbers.y)

    def to_cryptography(self) -> ec.EllipticCurvePublicKey:
        try:
            return ec.EllipticCurvePublicNumbers(self.qx, self.qy, _P384).public_key()
        except (ValueError, TypeError):
            raise MalformedInput(SnpReason.BAD_PUBLIC_KEY, "public key is not a point on P-384") from None

    def to_bytes(self) -> bytes:
        blob = _KEY_HEAD.pack(CURVE_P384) + _le(self.qx) + _le(self.qy)
        return blob.ljust(PUBLIC_KEY_SIZE, b"\x00")

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> AmdPublicKey:
        if len(data) != PUBLIC_KEY_SIZE:
            raise MalformedInput(
                SnpReason.BAD_PUBLIC_KEY, f"an AMD public key is {PUBLIC_KEY_SIZE} bytes, got {len(data)}"
            )
        (curve,) = _KEY_HEAD.unpack_from(data)
        if curve != CURVE_P384:
            raise Unsupported(SnpReason.UNSUPPORTED_CURVE, f"public key curve {curve} (only 2, P-384)")
        end = 4 + 2 * _COORD
        _reserved_zero(data, end, PUBLIC_KEY_SIZE, SnpReason.BAD_PUBLIC_KEY, "public key")
        return cls(
            qx=int.from_bytes(data[4 : 4 + _COORD], "little"),
            qy=int.from_bytes(data[4 + _COORD : end], "little"),
        )

    def digest(self) -> bytes:
        """SHA-384 of the 0x404-byte blob: the report's ID_KEY_DIGEST or AUTHOR_KEY_DIGEST."""
        return hashlib.sha384(self.to_bytes()).digest()


def key_digest(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """The digest an attestation report shows for this key (ID key or author key)."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return AmdPublicKey.from_cryptography(public).digest()


@dataclass(frozen=True)
class AmdSignature:
    """An ECDSA P-384 signature in AMD's 0x200-byte format (R, S little-endian)."""

    r: int
    s: int

    def __post_init__(self) -> None:
        if not (0 <= self.r < 1 << (8 * _COORD) and 0 <= self.s < 1 << (8 * _COORD)):
            raise MalformedInput(SnpReason.BAD_SIGNATURE_BLOB, "signature R or S does not fit 72 bytes")

    @classmethod
    def sign(cls, key: ec.EllipticCurvePrivateKey, message: bytes) -> AmdSignature:
        if not isinstance(key.curve, ec.SECP384R1):
            raise Unsupported(SnpReason.UNSUPPORTED_CURVE, f"SEV-SNP keys are P-384, not {key.curve.name}")
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA384())))
        return cls(r=r, s=s)

    def verify(self, key: AmdPublicKey, message: bytes, *, reason: SnpReason, what: str) -> None:
        """Raises VerificationFailed(`reason`) unless this is `key`'s signature over `message`."""
        try:
            der = encode_dss_signature(self.r, self.s)
            key.to_cryptography().verify(der, message, ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            raise VerificationFailed(reason, f"{what} does not verify") from None

    def to_bytes(self) -> bytes:
        return (_le(self.r) + _le(self.s)).ljust(SIGNATURE_SIZE, b"\x00")

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> AmdSignature:
        if len(data) != SIGNATURE_SIZE:
            raise MalformedInput(
                SnpReason.BAD_SIGNATURE_BLOB, f"an AMD signature is {SIGNATURE_SIZE} bytes, got {len(data)}"
            )
        _reserved_zero(data, 2 * _COORD, SIGNATURE_SIZE, SnpReason.BAD_SIGNATURE_BLOB, "signature")
        return cls(
            r=int.from_bytes(data[:_COORD], "little"),
            s=int.from_bytes(data[_COORD : 2 * _COORD], "little"),
        )


def _b64decode(text: str | bytes, what: str, reason: SnpReason) -> bytes:
    # Whitespace around or inside (a file's newline, a wrapped XML element) is layout, not data.
    compact = "".join(text.split()) if isinstance(text, str) else b"".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedInput(reason, f"{what} is not base64") from None


@dataclass(frozen=True, kw_only=True)
class IdBlock:
    """The 96-byte ID block. `to_b64` is the form QEMU's `id-block` and libvirt's `<idBlock>` take."""

    launch_digest: bytes
    family_id: bytes = bytes(ID_SIZE)
    image_id: bytes = bytes(ID_SIZE)
    guest_svn: int = 0
    policy: int = DEFAULT_POLICY
    version: int = ID_BLOCK_VERSION

    def __post_init__(self) -> None:
        for name, size in (("launch_digest", DIGEST_SIZE), ("family_id", ID_SIZE), ("image_id", ID_SIZE)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise MalformedInput(SnpReason.BAD_ID_BLOCK, f"ID block {name} must be {size} bytes")
        if self.version != ID_BLOCK_VERSION:
            raise MalformedInput(SnpReason.BAD_ID_BLOCK, f"ID block version {self.version} (only 1)")
        if isinstance(self.guest_svn, bool) or not 0 <= self.guest_svn < 1 << 32:
            raise MalformedInput(
                SnpReason.BAD_ID_BLOCK, f"ID block guest SVN {self.guest_svn!r} is not a u32"
            )
        if isinstance(self.policy, bool) or not 0 <= self.policy < 1 << 64:
            raise MalformedInput(SnpReason.BAD_ID_BLOCK, f"ID block policy {self.policy!r} is not a u64")

    def to_bytes(self) -> bytes:
        return _ID_BLOCK.pack(
            self.launch_digest, self.family_id, self.image_id, self.version, self.guest_svn, self.policy
        )

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> IdBlock:
        if len(data) != ID_BLOCK_SIZE:
            raise MalformedInput(
                SnpReason.BAD_ID_BLOCK, f"an ID block is {ID_BLOCK_SIZE} bytes, got {len(data)}"
            )
        digest, family, image, version, svn, policy = _ID_BLOCK.unpack(data)
        return cls(
            launch_digest=digest,
            family_id=family,
            image_id=image,
            version=version,
            guest_svn=svn,
            policy=policy,
        )

    def to_b64(self) -> str:
        return base64.b64encode(self.to_bytes()).decode("ascii")

    @classmethod
    def from_b64(cls, text: str | bytes) -> IdBlock:
        return cls.from_bytes(_b64decode(text, "ID block", SnpReason.BAD_ID_BLOCK))

    def check_launch(self, *, launch_digest: bytes, policy: int) -> None:
        """What SNP_LAUNCH_FINISH checks once the signatures held: the guest launched is the one the ID
        block names. Raises VerificationFailed otherwise."""
        if not hmac.compare_digest(self.launch_digest, launch_digest):
            raise VerificationFailed(Reason.MEASUREMENT_MISMATCH, "launch digest differs from the ID block's")
        if self.policy != policy:
            raise VerificationFailed(
                SnpReason.ID_BLOCK_MISMATCH,
                f"guest policy {policy:#x} differs from the ID block's {self.policy:#x}",
            )


@dataclass(frozen=True, kw_only=True)
class IdAuth:
    """ID_AUTH_INFO. `author_key`/`id_key_sig` are None when the block is used without an author key
    (SNP_LAUNCH_FINISH with AUTHOR_KEY_EN = 0): both regions are then zero."""

    id_block_sig: AmdSignature
    id_key: AmdPublicKey
    id_key_sig: AmdSignature | None = None
    author_key: AmdPublicKey | None = None
    id_key_algo: int = ALGO_ECDSA_P384_SHA384
    auth_key_algo: int = ALGO_ECDSA_P384_SHA384

    def __post_init__(self) -> None:
        if (self.author_key is None) != (self.id_key_sig is None):
            raise MalformedInput(SnpReason.BAD_ID_AUTH, "an author key and its ID key signature go together")
        if self.id_key_algo != ALGO_ECDSA_P384_SHA384:
            raise Unsupported(SnpReason.UNSUPPORTED_KEY_ALGO, f"ID key algorithm {self.id_key_algo} (only 1)")
        allowed = (ALGO_ECDSA_P384_SHA384,) if self.author_key else (0, ALGO_ECDSA_P384_SHA384)
        if self.auth_key_algo not in allowed:
            raise Unsupported(
                SnpReason.UNSUPPORTED_KEY_ALGO, f"author key algorithm {self.auth_key_algo} (only 1)"
            )

    @property
    def id_key_digest(self) -> bytes:
        return self.id_key.digest()

    @property
    def author_key_digest(self) -> bytes:
        """Zeros without an author key, as the report shows it."""
        return bytes(DIGEST_SIZE) if self.author_key is None else self.author_key.digest()

    def to_bytes(self) -> bytes:
        blob = bytearray(ID_AUTH_SIZE)
        _ALGOS.pack_into(blob, 0, self.id_key_algo, self.auth_key_algo)
        blob[_ID_BLOCK_SIG_AT : _ID_BLOCK_SIG_AT + SIGNATURE_SIZE] = self.id_block_sig.to_bytes()
        blob[_ID_KEY_AT : _ID_KEY_AT + PUBLIC_KEY_SIZE] = self.id_key.to_bytes()
        if self.id_key_sig is not None and self.author_key is not None:
            blob[_ID_KEY_SIG_AT : _ID_KEY_SIG_AT + SIGNATURE_SIZE] = self.id_key_sig.to_bytes()
            blob[_AUTHOR_KEY_AT : _AUTHOR_KEY_AT + PUBLIC_KEY_SIZE] = self.author_key.to_bytes()
        return bytes(blob)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> IdAuth:
        if len(data) != ID_AUTH_SIZE:
            raise MalformedInput(
                SnpReason.BAD_ID_AUTH, f"ID auth info is {ID_AUTH_SIZE} bytes, got {len(data)}"
            )
        view = memoryview(data)
        id_algo, auth_algo = _ALGOS.unpack_from(view)
        what = "ID auth info"
        _reserved_zero(view, _ALGOS.size, _ID_BLOCK_SIG_AT, SnpReason.BAD_ID_AUTH, what)
        _reserved_zero(view, _ID_KEY_AT + PUBLIC_KEY_SIZE, _ID_KEY_SIG_AT, SnpReason.BAD_ID_AUTH, what)
        _reserved_zero(view, _AUTHOR_KEY_AT + PUBLIC_KEY_SIZE, ID_AUTH_SIZE, SnpReason.BAD_ID_AUTH, what)
        author_region = view[_ID_KEY_SIG_AT : _AUTHOR_KEY_AT + PUBLIC_KEY_SIZE]
        has_author = any(author_region)
        return cls(
            id_key_algo=id_algo,
            auth_key_algo=auth_algo,
            id_block_sig=AmdSignature.from_bytes(view[_ID_BLOCK_SIG_AT : _ID_BLOCK_SIG_AT + SIGNATURE_SIZE]),
            id_key=AmdPublicKey.from_bytes(view[_ID_KEY_AT : _ID_KEY_AT + PUBLIC_KEY_SIZE]),
            id_key_sig=(
                AmdSignature.from_bytes(view[_ID_KEY_SIG_AT : _ID_KEY_SIG_AT + SIGNATURE_SIZE])
                if has_author
                else None
            ),
            author_key=(
                AmdPublicKey.from_bytes(view[_AUTHOR_KEY_AT : _AUTHOR_KEY_AT + PUBLIC_KEY_SIZE])
                if has_author
                else None
            ),
        )

    def to_b64(self) -> str:
        return base64.b64encode(self.to_bytes()).decode("ascii")

    @classmethod
    def from_b64(cls, text: str | bytes) -> IdAuth:
        return cls.from_bytes(_b64decode(text, "ID auth info", SnpReason.BAD_ID_AUTH))

    def verify(self, id_block: IdBlock, *, author_key_enabled: bool = True) -> None:
        """The signature checks of SNP_LAUNCH_FINISH: the ID key signed the ID block and, with
        `author_key_enabled`, the author key signed the ID key. Raises VerificationFailed."""
        self.id_block_sig.verify(
            self.id_key, id_block.to_bytes(), reason=SnpReason.ID_BLOCK_SIGNATURE, what="ID block signature"
        )
        if not author_key_enabled:
            return
        if self.author_key is None or self.id_key_sig is None:
            raise VerificationFailed(SnpReason.ID_KEY_SIGNATURE, "the author key is enabled but absent")
        self.id_key_sig.verify(
            self.author_key,
            self.id_key.to_bytes(),
            reason=SnpReason.ID_KEY_SIGNATURE,
            what="ID key signature",
        )


def load_signing_key(pem: bytes, *, what: str = "key") -> ec.EllipticCurvePrivateKey:
    """An unencrypted P-384 private key from PEM (SEC1 or PKCS#8). Errors never quote the key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise MalformedInput(
            SnpReason.BAD_SIGNING_KEY, f"{what} is encrypted; give an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise MalformedInput(SnpReason.BAD_SIGNING_KEY, f"{what} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise Unsupported(SnpReason.UNSUPPORTED_CURVE, f"{what} is not an EC key (SEV-SNP needs P-384)")
    if not isinstance(key.curve, ec.SECP384R1):
        raise Unsupported(SnpReason.UNSUPPORTED_CURVE, f"{what} is on {key.curve.name}, SEV-SNP needs P-384")
    return key


def sign_id_block(
    id_block: IdBlock, id_key: ec.EllipticCurvePrivateKey, author_key: ec.EllipticCurvePrivateKey | None
) -> IdAuth:
    """The ID auth info for `id_block`: the ID key's signature over it and, with an author key, the
    author's signature over the ID key's AMD blob (ECDSA is randomized: two runs differ, both verify)."""
    public_id = AmdPublicKey.from_cryptography(id_key.public_key())
    if author_key is None:
        return IdAuth(
            id_block_sig=AmdSignature.sign(id_key, id_block.to_bytes()),
            id_key=public_id,
            auth_key_algo=0,
        )
    return IdAuth(
        id_block_sig=AmdSignature.sign(id_key, id_block.to_bytes()),
        id_key=public_id,
        id_key_sig=AmdSignature.sign(author_key, public_id.to_bytes()),
        author_key=AmdPublicKey.from_cryptography(author_key.public_key()),
    )
