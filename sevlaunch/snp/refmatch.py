"""Looking SEV-SNP launches up in verified reference value manifests (`sevlaunch.refvalues`).

Two questions, asked by the owner at the two ends of a launch:

* before launch, `digest_for_config`: which launch digest do the manifests in force give for exactly this
  configuration (vCPU count and type, guest features, VMM type, kernel hashes)? It goes in the ID block.
* after boot, `match_report`: does this report's MEASUREMENT appear in a manifest in force, and does the
  rest of the report meet what that manifest vouches for (vCPU count when known, family and image id,
  guest SVN, minimum TCB of the product)? Several manifests may be in force at once (a firmware update
  rolling across hosts); a report matches when one entry accepts all of it.

Both raise `ReferenceMismatch` with a `RefReason` naming what did not match, and a detail that names the
field or the TCB component (never a secret: digests and TCBs are public).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sevlaunch.refvalues import KernelHashes, Manifest, ReferenceDigest, VerifiedManifest
from sevlaunch.sev.errors import VerificationFailed
from sevlaunch.sev.technology import Technology
from sevlaunch.snp.reference import SnpReference
from sevlaunch.snp.report import AttestationReport
from sevlaunch.snp.tcb import Product, TcbVersion

TCB_KINDS = ("reported", "committed", "launch")


class RefReason(StrEnum):
    NO_REFERENCE_VALUES = "no_reference_values"
    NO_DIGEST_FOR_CONFIG = "no_digest_for_config"
    MEASUREMENT_MISMATCH = "measurement_mismatch"
    VCPUS_MISMATCH = "vcpus_mismatch"
    FAMILY_ID_MISMATCH = "family_id_mismatch"
    IMAGE_ID_MISMATCH = "image_id_mismatch"
    GUEST_SVN_TOO_LOW = "guest_svn_too_low"
    PRODUCT_NOT_COVERED = "product_not_covered"
    TCB_TOO_LOW = "tcb_too_low"


# How far a candidate got before it failed: the refusal reported is the one of the candidate that got
# furthest, which names the real difference (an SVN below the floor, not "wrong measurement").
_DEPTH = {
    r: i
    for i, r in enumerate(
        (
            RefReason.VCPUS_MISMATCH,
            RefReason.FAMILY_ID_MISMATCH,
            RefReason.IMAGE_ID_MISMATCH,
            RefReason.GUEST_SVN_TOO_LOW,
            RefReason.PRODUCT_NOT_COVERED,
            RefReason.TCB_TOO_LOW,
        )
    )
}


class ReferenceMismatch(VerificationFailed):
    """On TCB_TOO_LOW, `tcb_kind` (reported, committed, launch) says which TCB fell short."""

    reason: RefReason

    def __init__(self, reason: RefReason, detail: str, *, tcb_kind: str | None = None) -> None:
        self.tcb_kind = tcb_kind
        super().__init__(reason, detail)


@dataclass(frozen=True)
class SnpMatch:
    """One SNP reference digest and the verified manifest that vouches for it."""

    manifest_id: str
    manifest: Manifest
    digest: ReferenceDigest

    @property
    def snp(self) -> SnpReference:
        assert self.manifest.snp is not None  # a manifest with SNP digests has its snp section
        return self.manifest.snp

    @property
    def launch_digest(self) -> bytes:
        return self.digest.launch_digest


@dataclass(frozen=True)
class ReportFacts:
    """What the lookup needs from a verified report. `tcbs` by kind: reported, committed, launch."""

    measurement: bytes
    product: Product
    tcbs: Mapping[str, TcbVersion]
    family_id: bytes
    image_id: bytes
    guest_svn: int
    vcpus: int | None = None

    @classmethod
    def from_report(
        cls, report: AttestationReport, product: Product, *, vcpus: int | None = None
    ) -> ReportFacts:
        decoded = report.tcbs(product)
        return cls(
            measurement=report.measurement,
            product=product,
            tcbs={kind: getattr(decoded, kind) for kind in TCB_KINDS},
            family_id=report.family_id,
            image_id=report.image_id,
            guest_svn=report.guest_svn,
            vcpus=vcpus,
        )


def snp_matches(manifests: Iterable[VerifiedManifest], now: datetime) -> list[SnpMatch]:
    """Every SNP digest of the manifests in force at `now`, in manifest id order."""
    out: list[SnpMatch] = []
    for vm in sorted(manifests, key=lambda v: v.id):
        m = vm.manifest
        if m.snp is None or not m.not_before <= now < m.not_after:
            continue
        out += [SnpMatch(vm.id, m, d) for d in m.digests if d.config.mode is Technology.SEV_SNP]
    return out


def check_min_tcb(floor: TcbVersion, tcbs: Mapping[str, TcbVersion], *, source: str) -> None:
    """Each of `tcbs` (by kind) meets `floor`, component by component; the refusal names the kind and the
    components below the floor, e.g. `committed_tcb: microcode 3<5 (minimum of manifest 1a2b...)`."""
    for kind, tcb in tcbs.items():
        if short := tcb.shortfall(floor):
            raise ReferenceMismatch(
                RefReason.TCB_TOO_LOW, f"{kind}_tcb: {', '.join(short)} (minimum of {source})", tcb_kind=kind
            )


def _check_candidate(match: SnpMatch, facts: ReportFacts) -> None:
    cfg, snp, source = match.digest.config, match.snp, f"manifest {match.manifest_id[:16]}"
    if facts.vcpus is not None and cfg.vcpus != facts.vcpus:
        raise ReferenceMismatch(
            RefReason.VCPUS_MISMATCH,
            f"vcpus: the digest is for {cfg.vcpus} vCPUs, the guest has {facts.vcpus}",
        )
    if not hmac.compare_digest(facts.family_id, snp.family_id):
        raise ReferenceMismatch(RefReason.FAMILY_ID_MISMATCH, f"family_id: not the one of {source}")
    if not hmac.compare_digest(facts.image_id, snp.image_id):
        raise ReferenceMismatch(RefReason.IMAGE_ID_MISMATCH, f"image_id: not the one of {source}")
    if facts.guest_svn < snp.guest_svn:
        raise ReferenceMismatch(
            RefReason.GUEST_SVN_TOO_LOW, f"guest_svn: {facts.guest_svn} < {snp.guest_svn} ({source})"
        )
    floor = snp.min_tcb_for(facts.product)
    if floor is None:
        if snp.min_tcb:
            raise ReferenceMismatch(
                RefReason.PRODUCT_NOT_COVERED,
                f"product: {source} sets no minimum TCB for {facts.product.value}",
            )
        return
    check_min_tcb(floor, facts.tcbs, source=source)


def match_report(manifests: Iterable[VerifiedManifest], facts: ReportFacts, *, now: datetime) -> SnpMatch:
    """The reference digest that accepts this report, or ReferenceMismatch naming what did not match."""
    entries = snp_matches(manifests, now)
    if not entries:
        raise ReferenceMismatch(RefReason.NO_REFERENCE_VALUES, "no SEV-SNP reference values in force")
    # Compare with every digest (constant time each) before acting on any.
    hits = [e for e in entries if hmac.compare_digest(e.launch_digest, facts.measurement)]
    if not hits:
        raise ReferenceMismatch(
            RefReason.MEASUREMENT_MISMATCH,
            f"measurement: in none of the {len(entries)} SEV-SNP reference digests in force",
        )
    failures: list[ReferenceMismatch] = []
    for hit in hits:
        try:
            _check_candidate(hit, facts)
        except ReferenceMismatch as exc:
            failures.append(exc)
            continue
        return hit
    raise max(failures, key=lambda e: _DEPTH.get(e.reason, -1))


def digest_for_config(
    manifests: Iterable[VerifiedManifest],
    *,
    vcpus: int,
    vcpu_type: str | None,
    guest_features: int,
    vmm_type: str,
    kernel_hashes: KernelHashes | None,
    now: datetime,
) -> SnpMatch:
    """The SNP reference digest for exactly this launch configuration. Several manifests in force may list
    it (the same firmware re-issued): the newest wins (latest not_before, then manifest id), so its
    family/image id, SVN and TCB floor are the ones that go into the authorisation."""
    wanted = (vcpus, vcpu_type, guest_features, vmm_type, kernel_hashes)
    hits = [
        e
        for e in snp_matches(manifests, now)
        if (
            e.digest.config.vcpus,
            e.digest.config.vcpu_type,
            e.digest.config.guest_features,
            e.digest.config.vmm_type,
            e.digest.config.kernel_hashes,
        )
        == wanted
    ]
    if not hits:
        kernel = "with" if kernel_hashes is not None else "without"
        raise ReferenceMismatch(
            RefReason.NO_DIGEST_FOR_CONFIG,
            f"no SEV-SNP reference digest in force for {vcpus} vCPU(s) of type {vcpu_type or '-'}, guest "
            f"features {guest_features:#x}, VMM {vmm_type}, {kernel} kernel hashes",
        )
    return max(hits, key=lambda e: (e.manifest.not_before, e.manifest_id))
