"""The owner's attestation decision for an SEV-SNP guest: one report and its certificates, against what
the owner authorised for that launch (PROTOCOL.md section 11).

`attest(evidence, expected, rules, manifests, now=...)` returns an `AttestationVerdict` or raises
`AttestationRefused` carrying one `AttestReason` (a StrEnum the owner audits and counts by). The checks,
in order, each with its own reason:

1. the report parses (MALFORMED_REPORT) and is of the authorised product (WRONG_PRODUCT);
2. the VCEK/VLEK chains to the product's pinned AMD root or to an extra root the rules name explicitly,
   with valid dates (FORGED_CHAIN, MALFORMED_CERTIFICATES; a VLEK only if allowed: VLEK_NOT_ALLOWED);
3. the report is signed by that key (FORGED_CHAIN), its REPORTED_TCB is the certificate's
   (VCEK_TCB_MISMATCH) and its CHIP_ID the VCEK's hwID (HWID_MISMATCH);
4. VMPL 0 (VMPL_NOT_ALLOWED), the guest policy's flags allowed (POLICY_NOT_ALLOWED: DEBUG, MIGRATE_MA
   unless allowed) and equal to the authorised policy (POLICY_MISMATCH);
5. TCB order and committed firmware (TCB_ORDER, PROVISIONAL_FIRMWARE), then the workload's minimum
   reported, committed and launch TCB (REPORTED_/COMMITTED_/LAUNCH_TCB_TOO_LOW, the detail names the
   component);
6. the measurement against the signed reference values in force, per vCPU count (MEASUREMENT_MISMATCH,
   VCPUS_MISMATCH, FAMILY_ID/IMAGE_ID_MISMATCH, GUEST_SVN_TOO_LOW, the manifest's TCB floors as in 5,
   NO_REFERENCE_VALUES);
7. the ID key digest is this workload's (ID_KEY_MISMATCH), and the author key's when one was used
   (AUTHOR_KEY_MISMATCH);
8. HOST_DATA is the digest of the init data authorised (HOST_DATA_MISMATCH);
9. REPORT_DATA binds the challenge issued and the guest's key (REPORT_DATA_MISMATCH, BAD_GUEST_KEY).

Trust is established before any field is believed: nothing after step 3 is looked at on an unsigned
report. The challenge's single use and lifetime are the owner store's; this module is pure.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from cryptography import x509

from sevlaunch.refvalues import VerifiedManifest
from sevlaunch.sev.errors import MalformedInput, SevError, Unsupported, VerificationFailed
from sevlaunch.snp.appraisal import (
    DEFAULT_ALLOWED_POLICY_FLAGS,
    AppraisalPolicy,
    MinimumTcb,
    appraise,
    verify_report,
)
from sevlaunch.snp.certs import (
    CertKind,
    TrustedRoot,
    VerifiedVek,
    load_certificate,
    load_certificates,
    vek_extensions,
    verify_vek_chain,
)
from sevlaunch.snp.certtable import CertTable
from sevlaunch.snp.challenge import ChallengeReason, check_report_data
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.policy import PolicyFlag
from sevlaunch.snp.refmatch import ReferenceMismatch, RefReason, ReportFacts, SnpMatch, match_report
from sevlaunch.snp.report import AttestationReport, ReportTcbs, SigningKey
from sevlaunch.snp.tcb import Product

MAX_CERTIFICATE_BYTES = 16 * 1024
MAX_CHAIN = 4


class AttestReason(StrEnum):
    MALFORMED_REPORT = "malformed_report"
    MALFORMED_CERTIFICATES = "malformed_certificates"
    WRONG_PRODUCT = "wrong_product"
    FORGED_CHAIN = "forged_chain"
    VLEK_NOT_ALLOWED = "vlek_not_allowed"
    VCEK_TCB_MISMATCH = "vcek_tcb_mismatch"
    HWID_MISMATCH = "hwid_mismatch"
    VMPL_NOT_ALLOWED = "vmpl_not_allowed"
    POLICY_NOT_ALLOWED = "policy_not_allowed"
    POLICY_MISMATCH = "policy_mismatch"
    TCB_ORDER = "tcb_order"
    PROVISIONAL_FIRMWARE = "provisional_firmware"
    REPORTED_TCB_TOO_LOW = "reported_tcb_too_low"
    COMMITTED_TCB_TOO_LOW = "committed_tcb_too_low"
    LAUNCH_TCB_TOO_LOW = "launch_tcb_too_low"
    NO_REFERENCE_VALUES = "no_reference_values"
    MEASUREMENT_MISMATCH = "measurement_mismatch"
    VCPUS_MISMATCH = "vcpus_mismatch"
    FAMILY_ID_MISMATCH = "family_id_mismatch"
    IMAGE_ID_MISMATCH = "image_id_mismatch"
    GUEST_SVN_TOO_LOW = "guest_svn_too_low"
    PRODUCT_NOT_COVERED = "product_not_covered"
    ID_KEY_MISMATCH = "id_key_mismatch"
    AUTHOR_KEY_MISMATCH = "author_key_mismatch"
    HOST_DATA_MISMATCH = "host_data_mismatch"
    REPORT_DATA_MISMATCH = "report_data_mismatch"
    BAD_GUEST_KEY = "bad_guest_key"


class AttestationRefused(VerificationFailed):
    """The one refusal of `attest`. `cause` keeps the underlying library reason for the audit detail."""

    reason: AttestReason

    def __init__(self, reason: AttestReason, detail: str, *, cause: SevError | None = None) -> None:
        self.cause_reason = None if cause is None else cause.reason.value
        super().__init__(reason, detail)


_TCB_REASON = {
    "reported": AttestReason.REPORTED_TCB_TOO_LOW,
    "committed": AttestReason.COMMITTED_TCB_TOO_LOW,
    "launch": AttestReason.LAUNCH_TCB_TOO_LOW,
}

_CHAIN_REASONS: Mapping[SnpReason, AttestReason] = {
    SnpReason.UNTRUSTED_ARK: AttestReason.FORGED_CHAIN,
    SnpReason.BAD_CERT_SIGNATURE: AttestReason.FORGED_CHAIN,
    SnpReason.WRONG_ISSUER: AttestReason.FORGED_CHAIN,
    SnpReason.CERT_NOT_VALID: AttestReason.FORGED_CHAIN,
    SnpReason.CERT_REVOKED: AttestReason.FORGED_CHAIN,
    SnpReason.BAD_CRL: AttestReason.FORGED_CHAIN,
    SnpReason.BAD_REPORT_SIGNATURE: AttestReason.FORGED_CHAIN,
    SnpReason.SIGNING_KEY_MISMATCH: AttestReason.FORGED_CHAIN,
    SnpReason.PRODUCT_MISMATCH: AttestReason.WRONG_PRODUCT,
    SnpReason.UNKNOWN_PRODUCT: AttestReason.WRONG_PRODUCT,
    SnpReason.TCB_MISMATCH: AttestReason.VCEK_TCB_MISMATCH,
    SnpReason.CHIP_ID_MISMATCH: AttestReason.HWID_MISMATCH,
    SnpReason.BAD_CERTIFICATE: AttestReason.MALFORMED_CERTIFICATES,
    SnpReason.BAD_REPORT: AttestReason.MALFORMED_REPORT,
    SnpReason.BAD_GUEST_POLICY: AttestReason.MALFORMED_REPORT,
    SnpReason.UNSUPPORTED_SIGNATURE_ALGO: AttestReason.MALFORMED_REPORT,
    SnpReason.VMPL_REFUSED: AttestReason.VMPL_NOT_ALLOWED,
    SnpReason.GUEST_POLICY_REFUSED: AttestReason.POLICY_NOT_ALLOWED,
    SnpReason.SIGNING_KEY_REFUSED: AttestReason.VLEK_NOT_ALLOWED,
    SnpReason.TCB_ORDER: AttestReason.TCB_ORDER,
    SnpReason.PROVISIONAL_FIRMWARE: AttestReason.PROVISIONAL_FIRMWARE,
}

_REF_REASONS: Mapping[RefReason, AttestReason] = {
    RefReason.NO_REFERENCE_VALUES: AttestReason.NO_REFERENCE_VALUES,
    RefReason.MEASUREMENT_MISMATCH: AttestReason.MEASUREMENT_MISMATCH,
    RefReason.VCPUS_MISMATCH: AttestReason.VCPUS_MISMATCH,
    RefReason.FAMILY_ID_MISMATCH: AttestReason.FAMILY_ID_MISMATCH,
    RefReason.IMAGE_ID_MISMATCH: AttestReason.IMAGE_ID_MISMATCH,
    RefReason.GUEST_SVN_TOO_LOW: AttestReason.GUEST_SVN_TOO_LOW,
    RefReason.PRODUCT_NOT_COVERED: AttestReason.PRODUCT_NOT_COVERED,
}


def _refused(exc: SevError, fallback: AttestReason) -> AttestationRefused:
    reason = _CHAIN_REASONS.get(exc.reason, fallback) if isinstance(exc.reason, SnpReason) else fallback
    return AttestationRefused(reason, exc.detail or exc.reason.value, cause=exc)


# ------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Evidence:
    """What the guest sent: the report, and its VCEK/VLEK with, optionally, the ASK/ASVK and ARK (DER or
    PEM each). Without a chain, the pinned (or explicitly trusted) root's own intermediates are used."""

    report: bytes
    vek: bytes
    chain: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if len(self.chain) > MAX_CHAIN:
            raise AttestationRefused(
                AttestReason.MALFORMED_CERTIFICATES, f"more than {MAX_CHAIN} chain certificates"
            )
        for cert in (self.vek, *self.chain):
            if not isinstance(cert, bytes) or not 0 < len(cert) <= MAX_CERTIFICATE_BYTES:
                raise AttestationRefused(
                    AttestReason.MALFORMED_CERTIFICATES, f"a certificate is 1..{MAX_CERTIFICATE_BYTES} bytes"
                )

    @classmethod
    def from_cert_table(cls, report: bytes, cert_table: bytes) -> Evidence:
        """From an extended report's certificate table (GHCB GUIDs): the VCEK or VLEK, then ASK and ARK."""
        try:
            table = CertTable.from_bytes(cert_table)
        except MalformedInput as exc:
            raise AttestationRefused(AttestReason.MALFORMED_CERTIFICATES, exc.detail, cause=exc) from None
        if (table.vcek is None) == (table.vlek is None):
            raise AttestationRefused(
                AttestReason.MALFORMED_CERTIFICATES, "the certificate table must hold one VCEK or one VLEK"
            )
        vek = table.vcek if table.vcek is not None else table.vlek
        assert vek is not None
        chain = tuple(c for c in (table.ask, table.ark) if c is not None)
        return cls(report, vek, chain)


@dataclass(frozen=True)
class AttestationRules:
    """The workload's SNP rules that apply at attestation. Deny by default: no debug, no migration agent,
    VCEK only, VMPL 0, committed firmware only, AMD's pinned roots only."""

    allowed_policy_flags: PolicyFlag = DEFAULT_ALLOWED_POLICY_FLAGS
    min_tcb: Mapping[Product, MinimumTcb] = field(default_factory=dict)
    products: frozenset[Product] | None = None  # None: any product
    allow_vlek: bool = False
    allow_provisional_firmware: bool = False
    extra_roots: tuple[TrustedRoot, ...] = ()  # e.g. an emulated AMD root, trusted only when listed


@dataclass(frozen=True)
class Expected:
    """What the owner authorised for this launch and issued for this attestation."""

    authorization_id: str
    policy: int
    id_key_digest: bytes
    host_data: bytes
    challenge: bytes
    guest_public_key: bytes
    product: Product | None = None  # the platform's product, when the authorisation recorded it
    author_key_digest: bytes | None = None
    vcpus: int | None = None


@dataclass(frozen=True)
class AttestationVerdict:
    """An accepted report and why: which product, key kind, root and reference digest."""

    report: AttestationReport
    product: Product
    vek_kind: CertKind
    root: str
    tcbs: ReportTcbs
    reference: SnpMatch

    def audit(self) -> dict[str, object]:
        """Public facts for the audit record (no secret is among them)."""
        return {
            "product": self.product.value,
            "signing_key": self.vek_kind.value,
            "root": self.root,
            "measurement": self.report.measurement.hex(),
            "manifest_id": self.reference.manifest_id,
            "vcpus": self.reference.digest.config.vcpus,
            "guest_svn": self.report.guest_svn,
            "reported_tcb": str(self.tcbs.reported),
            "committed_tcb": str(self.tcbs.committed),
            "launch_tcb": str(self.tcbs.launch),
            "report_id": self.report.report_id.hex(),
        }


# ----------------------------------------------------------------------------------------- decision


def _product(
    report: AttestationReport, vek: x509.Certificate, expected: Expected, rules: AttestationRules
) -> Product:
    try:
        if expected.product is not None or report.cpuid_fam_id:
            product = report.product(expected.product)
        else:
            # A v2 report without CPUID, and no product recorded: the certificate's productName says it,
            # and the chain check below holds the certificate to that product's root.
            name = (vek_extensions(vek).product_name or "").split("-")[0]
            product = Product.parse(name)
    except (VerificationFailed, Unsupported, MalformedInput) as exc:
        raise _refused(exc, AttestReason.WRONG_PRODUCT) from None
    if rules.products is not None and product not in rules.products:
        raise AttestationRefused(AttestReason.WRONG_PRODUCT, f"product: {product.value} is not allowed")
    return product


class VekCache:
    """Chains already verified, so that the owner's hot path verifies one ECDSA signature per report.

    Keyed by the exact certificate bytes, the product and the pins of the extra roots trusted, so a
    different chain or a change of trusted roots is a miss; an entry is used only while its VEK is still
    valid at the time asked, and the cache is bounded (least recently used out). Thread-safe.
    """

    def __init__(self, max_entries: int = 256) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self._max = max_entries
        self._entries: OrderedDict[bytes, VerifiedVek] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(evidence: Evidence, product: Product, rules: AttestationRules) -> bytes:
        digest = hashlib.sha256(product.value.encode())
        for blob in (evidence.vek, *evidence.chain):
            digest.update(len(blob).to_bytes(4, "big") + blob)
        for root in rules.extra_roots:
            digest.update(bytes.fromhex(root.pin))
        return digest.digest()

    def get(self, key: bytes, now: datetime) -> VerifiedVek | None:
        with self._lock:
            vek = self._entries.get(key)
            if vek is not None:
                self._entries.move_to_end(key)
        if vek is None:
            return None
        try:
            vek.check_validity(now)
        except VerificationFailed:
            with self._lock:
                self._entries.pop(key, None)
            return None
        return vek

    def put(self, key: bytes, vek: VerifiedVek) -> None:
        with self._lock:
            self._entries[key] = vek
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def verify_evidence(
    evidence: Evidence,
    expected: Expected,
    rules: AttestationRules,
    *,
    now: datetime,
    cache: VekCache | None = None,
) -> tuple[AttestationReport, Product, VerifiedVek]:
    """Steps 1-3: the report is authentic, signed by a VEK that chains to a trusted root."""
    try:
        report = AttestationReport.from_bytes(evidence.report)
    except MalformedInput as exc:
        raise AttestationRefused(AttestReason.MALFORMED_REPORT, exc.detail, cause=exc) from None
    try:
        vek_cert = load_certificate(evidence.vek, what="vek")
        chain: list[x509.Certificate] = []
        for item in evidence.chain:
            chain += load_certificates(item, what="chain")
    except MalformedInput as exc:
        raise AttestationRefused(AttestReason.MALFORMED_CERTIFICATES, exc.detail, cause=exc) from None
    product = _product(report, vek_cert, expected, rules)
    key = VekCache.key(evidence, product, rules) if cache is not None else b""
    vek_or_none = cache.get(key, now) if cache is not None else None
    if vek_or_none is None:
        try:
            vek = verify_vek_chain(vek_cert, product, at=now, chain=chain, extra_roots=rules.extra_roots)
        except (VerificationFailed, MalformedInput, Unsupported) as exc:
            raise _refused(exc, AttestReason.FORGED_CHAIN) from None
        if cache is not None:
            cache.put(key, vek)
    else:
        vek = vek_or_none
    if vek.kind is CertKind.VLEK and not rules.allow_vlek:
        raise AttestationRefused(
            AttestReason.VLEK_NOT_ALLOWED, "signing_key: a VLEK, and the rules allow VCEKs only"
        )
    try:
        verify_report(report, vek, product=product)
    except (VerificationFailed, MalformedInput, Unsupported) as exc:
        raise _refused(exc, AttestReason.FORGED_CHAIN) from None
    return report, product, vek


def _appraise(
    report: AttestationReport, product: Product, expected: Expected, rules: AttestationRules
) -> ReportTcbs:
    keys = {SigningKey.VCEK, SigningKey.VLEK} if rules.allow_vlek else {SigningKey.VCEK}
    policy = AppraisalPolicy(
        signing_keys=frozenset(keys),
        max_vmpl=0,
        allowed_policy_flags=rules.allowed_policy_flags,
        allow_provisional_firmware=rules.allow_provisional_firmware,
    )
    try:
        appraise(report, policy, product=product)
    except (VerificationFailed, MalformedInput, Unsupported) as exc:
        raise _refused(exc, AttestReason.POLICY_NOT_ALLOWED) from None
    if report.policy != expected.policy:
        raise AttestationRefused(
            AttestReason.POLICY_MISMATCH,
            f"policy: {report.policy:#x} is not the authorised {expected.policy:#x}",
        )
    tcbs = report.tcbs(product)
    floors = rules.min_tcb.get(product)
    if floors is not None:
        for kind in ("reported", "committed", "launch"):
            floor = getattr(floors, kind)
            if floor is not None and (short := getattr(tcbs, kind).shortfall(floor)):
                raise AttestationRefused(
                    _TCB_REASON[kind], f"{kind}_tcb: {', '.join(short)} (workload minimum)"
                )
    return tcbs


def _check_bindings(report: AttestationReport, expected: Expected) -> None:
    if not hmac.compare_digest(report.id_key_digest, expected.id_key_digest):
        raise AttestationRefused(AttestReason.ID_KEY_MISMATCH, "id_key_digest: not this workload's ID key")
    if expected.author_key_digest is not None and (
        not report.author_key_en
        or not hmac.compare_digest(report.author_key_digest, expected.author_key_digest)
    ):
        raise AttestationRefused(
            AttestReason.AUTHOR_KEY_MISMATCH, "author_key_digest: not the owner's author key"
        )
    if not hmac.compare_digest(report.host_data, expected.host_data):
        raise AttestationRefused(AttestReason.HOST_DATA_MISMATCH, "host_data: not the init data authorised")
    try:
        check_report_data(report.report_data, expected.challenge, expected.guest_public_key)
    except MalformedInput as exc:
        raise AttestationRefused(AttestReason.BAD_GUEST_KEY, exc.detail, cause=exc) from None
    except VerificationFailed as exc:
        assert exc.reason is ChallengeReason.REPORT_DATA_MISMATCH
        raise AttestationRefused(AttestReason.REPORT_DATA_MISMATCH, exc.detail, cause=exc) from None


def attest(
    evidence: Evidence,
    expected: Expected,
    rules: AttestationRules,
    manifests: Iterable[VerifiedManifest] | Sequence[VerifiedManifest],
    *,
    now: datetime,
    cache: VekCache | None = None,
) -> AttestationVerdict:
    """The full decision (module docstring). Returns the verdict or raises AttestationRefused. With a
    `cache`, a VEK chain verified before (same bytes, same trusted roots, still valid) is not re-verified."""
    report, product, vek = verify_evidence(evidence, expected, rules, now=now, cache=cache)
    tcbs = _appraise(report, product, expected, rules)
    facts = ReportFacts.from_report(report, product, vcpus=expected.vcpus)
    try:
        reference = match_report(manifests, facts, now=now)
    except ReferenceMismatch as exc:
        if exc.reason is RefReason.TCB_TOO_LOW and exc.tcb_kind in _TCB_REASON:
            raise AttestationRefused(_TCB_REASON[exc.tcb_kind], exc.detail, cause=exc) from None
        raise AttestationRefused(
            _REF_REASONS.get(exc.reason, AttestReason.MEASUREMENT_MISMATCH), exc.detail, cause=exc
        ) from None
    _check_bindings(report, expected)
    return AttestationVerdict(report, product, vek.kind, vek.root, tcbs, reference)
