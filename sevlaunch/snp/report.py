"""The SEV-SNP ATTESTATION_REPORT, versions 2 to 5 (SNP ABI, publication 56860, table ATTESTATION_REPORT
structure; PROTOCOL.md section 11): a parser, a writer, signature verification and signing.

0x4A0 bytes, little-endian. The signature at 0x2A0 covers bytes 0x000-0x29F: ECDSA P-384 with SHA-384, R
and S each a 72-byte little-endian integer, then zero padding to 0x200 bytes. Field names are the ABI's,
lower-cased. Every reserved byte must be zero (the ABI says so, and it keeps write(parse(x)) == x exact);
version-dependent bytes:

* v3+: CPUID_FAM_ID, CPUID_MOD_ID, CPUID_STEP at 0x188-0x18A (zero, reserved, in v2);
* v5 defines LAUNCH_MIT_VECTOR (0x1F8) and CURRENT_MIT_VECTOR (0x200). Turin firmware that still writes
  version 4 has been seen to fill the same bytes, so v4 reads them too instead of refusing the report;
  in v2 and v3 they are reserved.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from enum import IntEnum
from functools import cached_property

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sevlaunch.sev.errors import MalformedInput, Unsupported, VerificationFailed
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.policy import SnpGuestPolicy
from sevlaunch.snp.tcb import Product, TcbVersion, product_from_cpuid

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0  # bytes 0x000-0x29F are signed
SIGNATURE_SIZE = 0x200
EC_COMPONENT_SIZE = 72
SUPPORTED_VERSIONS = range(2, 6)
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
CHIP_ID_SIZE = 64
TURIN_HWID_SIZE = 8

_CPUID_VERSION = 3
_MIT_VECTOR_VERSION = 4

# The signed body, every byte accounted for: reserved ranges are read as bytes and checked to be zero.
_BODY = struct.Struct(
    "<"
    "I I Q 16s 16s I I Q Q I 4s"  # 0x000 version .. flags, reserved 0x04C
    "64s 48s 32s 48s 48s 32s 32s"  # 0x050 report_data .. report_id_ma
    "Q B B B 21s"  # 0x180 reported_tcb, cpuid fam/mod/step, reserved 0x18B-0x19F
    "64s Q"  # 0x1A0 chip_id, 0x1E0 committed_tcb
    "B B B 1s B B B 1s"  # 0x1E8 current build/minor/major, 0x1EC committed build/minor/major
    "Q Q Q 152s"  # 0x1F0 launch_tcb, launch/current mit vector, reserved 0x208-0x29F
)
assert _BODY.size == SIGNED_SIZE

_FLAG_AUTHOR_KEY_EN = 1 << 0
_FLAG_MASK_CHIP_KEY = 1 << 1
_SIGNING_KEY_SHIFT = 2
_SIGNING_KEY_MASK = 0x7
_FLAGS_DEFINED = 0x1F


class SigningKey(IntEnum):
    """SIGNING_KEY (report bits 4:2 at 0x48): which key signed the report. 2-6 are reserved."""

    VCEK = 0
    VLEK = 1
    NONE = 7


_SIGNING_KEY_VALUES = frozenset(k.value for k in SigningKey)

_BYTE_FIELDS = {
    "family_id": 16,
    "image_id": 16,
    "report_data": 64,
    "measurement": 48,
    "host_data": 32,
    "id_key_digest": 48,
    "author_key_digest": 48,
    "report_id": 32,
    "report_id_ma": 32,
    "chip_id": CHIP_ID_SIZE,
}
_U8_FIELDS = (
    "current_build",
    "current_minor",
    "current_major",
    "committed_build",
    "committed_minor",
    "committed_major",
)
_U32_FIELDS = ("version", "guest_svn", "vmpl", "signature_algo")
_U64_FIELDS = ("policy", "current_tcb", "platform_info", "reported_tcb", "committed_tcb", "launch_tcb")


def _le(value: int) -> bytes:
    return value.to_bytes(EC_COMPONENT_SIZE, "little")


@dataclass(frozen=True)
class ReportTcbs:
    """The report's four TCB versions decoded for one product."""

    current: TcbVersion
    reported: TcbVersion
    committed: TcbVersion
    launch: TcbVersion


@dataclass(frozen=True)
class AttestationReport:
    """One ATTESTATION_REPORT. TCB fields are the raw u64s (decode them with `tcbs(product)`); the policy is
    the raw u64 (decode it with `guest_policy()`); the signature is R and S as integers."""

    version: int = 5
    guest_svn: int = 0
    policy: int = 0x30000
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    vmpl: int = 0
    signature_algo: int = SIGNATURE_ALGO_ECDSA_P384_SHA384
    current_tcb: int = 0
    platform_info: int = 0
    author_key_en: bool = False
    mask_chip_key: bool = False
    signing_key: SigningKey = SigningKey.VCEK
    report_data: bytes = bytes(64)
    measurement: bytes = bytes(48)
    host_data: bytes = bytes(32)
    id_key_digest: bytes = bytes(48)
    author_key_digest: bytes = bytes(48)
    report_id: bytes = bytes(32)
    report_id_ma: bytes = b"\xff" * 32
    reported_tcb: int = 0
    cpuid_fam_id: int | None = None
    cpuid_mod_id: int | None = None
    cpuid_step: int | None = None
    chip_id: bytes = bytes(CHIP_ID_SIZE)
    committed_tcb: int = 0
    current_build: int = 0
    current_minor: int = 0
    current_major: int = 0
    committed_build: int = 0
    committed_minor: int = 0
    committed_major: int = 0
    launch_tcb: int = 0
    launch_mit_vector: int | None = None
    current_mit_vector: int | None = None
    signature_r: int = 0
    signature_s: int = 0
    # The bytes this report was parsed from (None when built in code): signed_bytes() then costs nothing.
    _raw: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.version not in SUPPORTED_VERSIONS:
            raise MalformedInput(SnpReason.BAD_REPORT, f"version: {self.version} is not one of 2..5")
        for name, size in _BYTE_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise MalformedInput(SnpReason.BAD_REPORT, f"{name}: must be {size} bytes")
        for names, bits in ((_U8_FIELDS, 8), (_U32_FIELDS, 32), (_U64_FIELDS, 64)):
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, int) or not 0 <= value < 1 << bits:
                    raise MalformedInput(SnpReason.BAD_REPORT, f"{name}: {value!r} is not a u{bits}")
        # A field the version has but the caller left None is zero, as the firmware writes "not reported".
        if self.version >= _CPUID_VERSION:
            for name in ("cpuid_fam_id", "cpuid_mod_id", "cpuid_step"):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, 0)
        if self.version >= _MIT_VECTOR_VERSION:
            for name in ("launch_mit_vector", "current_mit_vector"):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, 0)
        cpuid = (self.cpuid_fam_id, self.cpuid_mod_id, self.cpuid_step)
        if self.version >= _CPUID_VERSION:
            if any(not isinstance(v, int) or not 0 <= v <= 0xFF for v in cpuid):
                raise MalformedInput(
                    SnpReason.BAD_REPORT, "cpuid_fam_id/mod_id/step: a v3+ report needs 3 bytes"
                )
        elif cpuid != (None, None, None):
            raise MalformedInput(SnpReason.BAD_REPORT, f"cpuid_fam_id: a v{self.version} report has no CPUID")
        vectors = (self.launch_mit_vector, self.current_mit_vector)
        if self.version >= _MIT_VECTOR_VERSION:
            if any(not isinstance(v, int) or not 0 <= v < 1 << 64 for v in vectors):
                raise MalformedInput(
                    SnpReason.BAD_REPORT, "launch/current_mit_vector: a v4+ report needs two u64"
                )
        elif vectors != (None, None):
            raise MalformedInput(
                SnpReason.BAD_REPORT, f"launch_mit_vector: a v{self.version} report has no mitigation vectors"
            )
        object.__setattr__(self, "signing_key", SigningKey(self.signing_key))
        for name in ("signature_r", "signature_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 1 << (8 * EC_COMPONENT_SIZE):
                raise MalformedInput(SnpReason.BAD_REPORT, f"{name}: not a 72-byte integer")

    # ------------------------------------------------------------------------------ parse and write

    @classmethod
    def from_bytes(cls, data: bytes) -> AttestationReport:
        data = bytes(data)
        if len(data) != REPORT_SIZE:
            raise MalformedInput(
                SnpReason.BAD_REPORT,
                f"report_size: {len(data)} bytes, an ATTESTATION_REPORT is {REPORT_SIZE}",
            )
        (
            version, guest_svn, policy, family_id, image_id, vmpl, signature_algo, current_tcb, platform_info,
            flags, reserved_04c,
            report_data, measurement, host_data, id_key_digest, author_key_digest, report_id, report_id_ma,
            reported_tcb, fam, mod, step, reserved_18b,
            chip_id, committed_tcb,
            current_build, current_minor, current_major, reserved_1eb,
            committed_build, committed_minor, committed_major, reserved_1ef,
            launch_tcb, launch_mit, current_mit, reserved_208,
        ) = _BODY.unpack_from(data)  # fmt: skip
        if version not in SUPPORTED_VERSIONS:
            raise MalformedInput(SnpReason.BAD_REPORT, f"version: {version} is not one of 2..5")
        if flags & ~_FLAGS_DEFINED:
            raise MalformedInput(SnpReason.BAD_REPORT, f"flags (0x048): reserved bits set ({flags:#x})")
        signing_key = (flags >> _SIGNING_KEY_SHIFT) & _SIGNING_KEY_MASK
        if signing_key not in _SIGNING_KEY_VALUES:
            raise MalformedInput(SnpReason.BAD_REPORT, f"signing_key: {signing_key} is reserved")
        reserved = [(0x04C, reserved_04c), (0x18B, reserved_18b), (0x1EB, reserved_1eb)]
        reserved += [(0x1EF, reserved_1ef), (0x208, reserved_208)]
        if version < _CPUID_VERSION:
            reserved.append((0x188, bytes((fam, mod, step))))
        if version < _MIT_VECTOR_VERSION:
            reserved.append((0x1F8, data[0x1F8:0x208]))
        tail = SIGNED_SIZE + 2 * EC_COMPONENT_SIZE
        reserved.append((tail, data[tail:]))
        for offset, value in reserved:
            if any(value):
                raise MalformedInput(SnpReason.BAD_REPORT, f"reserved bytes at {offset:#05x} are not zero")
        has_cpuid = version >= _CPUID_VERSION
        has_vectors = version >= _MIT_VECTOR_VERSION
        report = cls(
            version=version,
            guest_svn=guest_svn,
            policy=policy,
            family_id=family_id,
            image_id=image_id,
            vmpl=vmpl,
            signature_algo=signature_algo,
            current_tcb=current_tcb,
            platform_info=platform_info,
            author_key_en=bool(flags & _FLAG_AUTHOR_KEY_EN),
            mask_chip_key=bool(flags & _FLAG_MASK_CHIP_KEY),
            signing_key=SigningKey(signing_key),
            report_data=report_data,
            measurement=measurement,
            host_data=host_data,
            id_key_digest=id_key_digest,
            author_key_digest=author_key_digest,
            report_id=report_id,
            report_id_ma=report_id_ma,
            reported_tcb=reported_tcb,
            cpuid_fam_id=fam if has_cpuid else None,
            cpuid_mod_id=mod if has_cpuid else None,
            cpuid_step=step if has_cpuid else None,
            chip_id=chip_id,
            committed_tcb=committed_tcb,
            current_build=current_build,
            current_minor=current_minor,
            current_major=current_major,
            committed_build=committed_build,
            committed_minor=committed_minor,
            committed_major=committed_major,
            launch_tcb=launch_tcb,
            launch_mit_vector=launch_mit if has_vectors else None,
            current_mit_vector=current_mit if has_vectors else None,
            signature_r=int.from_bytes(data[SIGNED_SIZE : SIGNED_SIZE + EC_COMPONENT_SIZE], "little"),
            signature_s=int.from_bytes(data[SIGNED_SIZE + EC_COMPONENT_SIZE : tail], "little"),
        )
        object.__setattr__(report, "_raw", data)
        return report

    def signed_bytes(self) -> bytes:
        """Bytes 0x000-0x29F: what the signature covers."""
        if self._raw is not None:
            return self._raw[:SIGNED_SIZE]
        return self._body

    @cached_property
    def _body(self) -> bytes:
        flags = (
            (_FLAG_AUTHOR_KEY_EN if self.author_key_en else 0)
            | (_FLAG_MASK_CHIP_KEY if self.mask_chip_key else 0)
            | int(self.signing_key) << _SIGNING_KEY_SHIFT
        )
        return _BODY.pack(
            self.version, self.guest_svn, self.policy, self.family_id, self.image_id, self.vmpl,
            self.signature_algo, self.current_tcb, self.platform_info, flags, bytes(4),
            self.report_data, self.measurement, self.host_data, self.id_key_digest, self.author_key_digest,
            self.report_id, self.report_id_ma,
            self.reported_tcb, self.cpuid_fam_id or 0, self.cpuid_mod_id or 0, self.cpuid_step or 0,
            bytes(21),
            self.chip_id, self.committed_tcb,
            self.current_build, self.current_minor, self.current_major, bytes(1),
            self.committed_build, self.committed_minor, self.committed_major, bytes(1),
            self.launch_tcb, self.launch_mit_vector or 0, self.current_mit_vector or 0, bytes(152),
        )  # fmt: skip

    def signature_bytes(self) -> bytes:
        """The 0x200-byte SIGNATURE field: R, S (72 bytes little-endian each), zero padding."""
        rs = _le(self.signature_r) + _le(self.signature_s)
        return rs + bytes(SIGNATURE_SIZE - len(rs))

    def to_bytes(self) -> bytes:
        if self._raw is not None:
            return self._raw
        return self._body + self.signature_bytes()

    # ------------------------------------------------------------------------------ sign and verify

    def sign(self, private_key: ec.EllipticCurvePrivateKey) -> bytes:
        """The SIGNATURE field (0x200 bytes) over this report's signed bytes, by a P-384 key (a VCEK/VLEK)."""
        if not isinstance(private_key.curve, ec.SECP384R1):
            raise Unsupported(SnpReason.UNSUPPORTED_SIGNATURE_ALGO, "signing key: not a P-384 key")
        r, s = decode_dss_signature(private_key.sign(self.signed_bytes(), ec.ECDSA(hashes.SHA384())))
        rs = _le(r) + _le(s)
        return rs + bytes(SIGNATURE_SIZE - len(rs))

    def signed(self, private_key: ec.EllipticCurvePrivateKey) -> AttestationReport:
        """A copy of this report carrying `sign(private_key)`'s signature."""
        signature = self.sign(private_key)
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values["signature_r"] = int.from_bytes(signature[:EC_COMPONENT_SIZE], "little")
        values["signature_s"] = int.from_bytes(signature[EC_COMPONENT_SIZE : 2 * EC_COMPONENT_SIZE], "little")
        return AttestationReport(**values)

    def verify_signature(self, public_key: ec.EllipticCurvePublicKey) -> None:
        """Raises VerificationFailed unless the VCEK/VLEK `public_key` signed bytes 0x000-0x29F."""
        if self.signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
            raise Unsupported(
                SnpReason.UNSUPPORTED_SIGNATURE_ALGO,
                f"signature_algo: {self.signature_algo} (only 1, ECDSA P-384)",
            )
        if self.signing_key is SigningKey.NONE:
            raise VerificationFailed(SnpReason.BAD_REPORT_SIGNATURE, "signing_key: the report is not signed")
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP384R1
        ):
            raise VerificationFailed(SnpReason.BAD_REPORT_SIGNATURE, "report_signature: the key is not P-384")
        try:
            public_key.verify(
                encode_dss_signature(self.signature_r, self.signature_s),
                self.signed_bytes(),
                ec.ECDSA(hashes.SHA384()),
            )
        except InvalidSignature:
            raise VerificationFailed(
                SnpReason.BAD_REPORT_SIGNATURE,
                "report_signature: bytes 0x000-0x29F are not signed by this key",
            ) from None

    # ------------------------------------------------------------------------------ decoded views

    def product(self, hint: Product | None = None) -> Product:
        """The product that made the report: from CPUID on v3+, else `hint`; a contradicting hint refuses."""
        cpuid_product = None
        if self.cpuid_fam_id:  # zero: not reported
            assert self.cpuid_mod_id is not None
            cpuid_product = product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)
            if cpuid_product is None:
                raise Unsupported(
                    SnpReason.UNKNOWN_PRODUCT,
                    f"cpuid_fam_id/cpuid_mod_id: {self.cpuid_fam_id:#x}/{self.cpuid_mod_id:#x} "
                    "is no known product",
                )
        if cpuid_product is not None and hint is not None and hint is not cpuid_product:
            raise VerificationFailed(
                SnpReason.PRODUCT_MISMATCH,
                f"product: the report's CPUID says {cpuid_product.value}, {hint.value} was asked",
            )
        product = cpuid_product or hint
        if product is None:
            raise Unsupported(
                SnpReason.UNKNOWN_PRODUCT,
                f"product: a v{self.version} report without CPUID needs the product given",
            )
        return product

    def tcbs(self, product: Product) -> ReportTcbs:
        return ReportTcbs(
            current=TcbVersion.from_raw(self.current_tcb, product, field="current_tcb"),
            reported=TcbVersion.from_raw(self.reported_tcb, product, field="reported_tcb"),
            committed=TcbVersion.from_raw(self.committed_tcb, product, field="committed_tcb"),
            launch=TcbVersion.from_raw(self.launch_tcb, product, field="launch_tcb"),
        )

    def guest_policy(self) -> SnpGuestPolicy:
        return SnpGuestPolicy.from_int(self.policy)

    def hwid(self, product: Product) -> bytes:
        """The chip id as KDS and the VCEK's hwID extension use it: 8 bytes on Turin, all 64 elsewhere."""
        return self.chip_id[:TURIN_HWID_SIZE] if product is Product.TURIN else self.chip_id

    @property
    def chip_id_masked(self) -> bool:
        return self.mask_chip_key or not any(self.chip_id)

    @property
    def current_version(self) -> tuple[int, int, int]:
        return (self.current_major, self.current_minor, self.current_build)

    @property
    def committed_version(self) -> tuple[int, int, int]:
        return (self.committed_major, self.committed_minor, self.committed_build)

    def as_json(self, product: Product | None = None) -> dict[str, object]:
        """Every field (byte fields in hex); with a product, the decoded TCBs too."""
        out: dict[str, object] = {}
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if isinstance(value, bytes):
                out[f.name] = value.hex()
            elif isinstance(value, SigningKey):
                out[f.name] = value.name.lower()
            elif f.name in ("signature_r", "signature_s"):
                out[f.name] = (
                    f"{value:096x}"  # the integer, big-endian hex (the field stores it little-endian)
                )
            else:
                out[f.name] = value
        if product is not None:
            tcbs = self.tcbs(product)
            out["product"] = product.value
            for name in ("current", "reported", "committed", "launch"):
                out[f"{name}_tcb_decoded"] = getattr(tcbs, name).as_json()
        return out
