"""The owner's authorisation of an SEV-SNP launch, before the guest exists (PROTOCOL.md section 11).

The launcher asks: launch this workload on this platform (its product, its SNP status TCBs and its
VCEK/VLEK, whose chain the caller verified with `certs.verify_vek_chain`) with this configuration (vCPU
count and type, guest features, VMM type, kernel hashes). `authorize_launch` checks the platform against
the workload's SNP rules, picks the launch digest from the signed reference values for exactly that
configuration, and returns an `SnpAuthorization`:

* the ID block (launch digest, the reference values' family id, image id and guest SVN, the 64-bit
  policy) and its ID auth info, signed with the workload's ID key and, when given, the owner's author key;
  the firmware refuses the launch at SNP_LAUNCH_FINISH if the guest's digest or policy differ;
* HOST_DATA, the SHA-256 of the launch's init data (`initdata`), which the firmware puts in every report;
* `expected(...)`, what `attest.attest` must then find in the guest's report.

Refusals raise `AuthorizationRefused` with one `AuthorizeReason`. Pure: keys come in as objects, nothing
is read or stored here.

The committed TCB is not in Linux's SNP_PLATFORM_STATUS: when the platform description lacks it, the
provisional-firmware rule cannot be checked here, and the report's COMMITTED_TCB (which `attest` checks)
is where it holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.refvalues import KernelHashes, VerifiedManifest
from sevlaunch.sev.errors import MalformedInput, SevError, VerificationFailed
from sevlaunch.snp.appraisal import DEFAULT_ALLOWED_POLICY_FLAGS
from sevlaunch.snp.attest import Expected
from sevlaunch.snp.certs import CertKind, VerifiedVek
from sevlaunch.snp.idblock import IdAuth, IdBlock, sign_id_block
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.policy import PolicyFlag, SnpGuestPolicy
from sevlaunch.snp.refmatch import ReferenceMismatch, SnpMatch, digest_for_config
from sevlaunch.snp.tcb import Product, TcbVersion
from sevlaunch.snp.vmsa import VmmType


class AuthorizeReason(StrEnum):
    BAD_POLICY = "bad_policy"
    POLICY_NOT_ALLOWED = "policy_not_allowed"
    WRONG_PRODUCT = "wrong_product"
    VLEK_NOT_ALLOWED = "vlek_not_allowed"
    VEK_TCB_MISMATCH = "vek_tcb_mismatch"
    PROVISIONAL_FIRMWARE = "provisional_firmware"
    PLATFORM_TCB_TOO_LOW = "platform_tcb_too_low"
    VCPUS_NOT_ALLOWED = "vcpus_not_allowed"
    NO_REFERENCE_DIGEST = "no_reference_digest"
    BAD_KEY = "bad_key"


class AuthorizationRefused(VerificationFailed):
    reason: AuthorizeReason

    def __init__(self, reason: AuthorizeReason, detail: str) -> None:
        super().__init__(reason, detail)


@dataclass(frozen=True)
class SnpWorkloadRules:
    """A workload's SNP launch rules. Deny by default: the policy may carry no DEBUG or MIGRATE_MA, VCEK
    only, committed firmware only; `min_tcb` floors the platform's TCBs per product."""

    policy: int
    allowed_policy_flags: PolicyFlag = DEFAULT_ALLOWED_POLICY_FLAGS
    min_tcb: Mapping[Product, TcbVersion] = field(default_factory=dict)
    products: frozenset[Product] | None = None
    vcpus: frozenset[int] | None = None  # allowed vCPU counts; None: any the reference values list
    allow_vlek: bool = False
    allow_provisional_firmware: bool = False


@dataclass(frozen=True)
class SnpPlatform:
    """The platform as its SNP status and verified VEK describe it."""

    product: Product
    current_tcb: TcbVersion
    reported_tcb: TcbVersion
    vek: VerifiedVek
    committed_tcb: TcbVersion | None = None  # None: the status source does not say (Linux's uapi)


@dataclass(frozen=True)
class LaunchConfig:
    vcpus: int
    vcpu_type: str | None
    guest_features: int
    vmm_type: str = VmmType.QEMU.value
    kernel_hashes: KernelHashes | None = None


@dataclass(frozen=True)
class SnpAuthorization:
    """What the owner returns for an authorised launch; all of it public (no key material)."""

    authorization_id: str
    id_block: IdBlock
    id_auth: IdAuth
    init_data: bytes
    product: Product
    reference: SnpMatch

    @property
    def policy(self) -> int:
        return self.id_block.policy

    @property
    def host_data(self) -> bytes:
        return InitData.parse(self.init_data).host_data

    @property
    def id_key_digest(self) -> bytes:
        return self.id_auth.id_key_digest

    @property
    def author_key_digest(self) -> bytes | None:
        return None if self.id_auth.author_key is None else self.id_auth.author_key_digest

    @property
    def author_key_enabled(self) -> bool:
        """libvirt's `<launchSecurity ... authorKey='yes'>` / QEMU's `author-key-enabled`."""
        return self.id_auth.author_key is not None

    def expected(self, *, challenge: bytes, guest_public_key: bytes) -> Expected:
        """What the attestation of this launch must show, for the challenge issued and the key sent."""
        return Expected(
            authorization_id=self.authorization_id,
            policy=self.policy,
            id_key_digest=self.id_key_digest,
            author_key_digest=self.author_key_digest,
            host_data=self.host_data,
            challenge=challenge,
            guest_public_key=guest_public_key,
            product=self.product,
            vcpus=self.reference.digest.config.vcpus,
        )


def _check_policy(rules: SnpWorkloadRules) -> None:
    try:
        policy = SnpGuestPolicy.from_int(rules.policy)
    except MalformedInput as exc:
        raise AuthorizationRefused(AuthorizeReason.BAD_POLICY, exc.detail) from None
    refused = (policy.flags & ~PolicyFlag.RESERVED_MBO) & ~rules.allowed_policy_flags
    if refused:
        names = ", ".join(f.name.lower() for f in PolicyFlag if f in refused and f.name)
        raise AuthorizationRefused(AuthorizeReason.POLICY_NOT_ALLOWED, f"policy: {names} not allowed")


def _check_tcbs(platform: SnpPlatform, floor: TcbVersion, source: str) -> None:
    tcbs = {"current": platform.current_tcb, "reported": platform.reported_tcb}
    if platform.committed_tcb is not None:
        tcbs["committed"] = platform.committed_tcb
    for kind, tcb in tcbs.items():
        if short := tcb.shortfall(floor):
            raise AuthorizationRefused(
                AuthorizeReason.PLATFORM_TCB_TOO_LOW, f"{kind}_tcb: {', '.join(short)} ({source})"
            )


def _check_platform(rules: SnpWorkloadRules, platform: SnpPlatform) -> None:
    product = platform.product
    if platform.vek.product is not product or any(
        t.product is not product
        for t in (platform.current_tcb, platform.reported_tcb, platform.committed_tcb)
        if t
    ):
        raise AuthorizationRefused(
            AuthorizeReason.WRONG_PRODUCT, f"platform: not consistently {product.value}"
        )
    if rules.products is not None and product not in rules.products:
        raise AuthorizationRefused(AuthorizeReason.WRONG_PRODUCT, f"product: {product.value} is not allowed")
    if platform.vek.kind is CertKind.VLEK and not rules.allow_vlek:
        raise AuthorizationRefused(AuthorizeReason.VLEK_NOT_ALLOWED, "the platform signs with a VLEK")
    if platform.vek.tcb != platform.reported_tcb:
        raise AuthorizationRefused(
            AuthorizeReason.VEK_TCB_MISMATCH,
            f"the {platform.vek.kind.value} is for {platform.vek.tcb}, "
            f"the reported TCB is {platform.reported_tcb}",
        )
    committed = platform.committed_tcb
    if committed is not None and committed != platform.current_tcb and not rules.allow_provisional_firmware:
        raise AuthorizationRefused(
            AuthorizeReason.PROVISIONAL_FIRMWARE,
            f"current_tcb ({platform.current_tcb}) is not committed ({committed})",
        )
    floor = rules.min_tcb.get(product)
    if floor is not None:
        _check_tcbs(platform, floor, "workload minimum")


def authorize_launch(
    rules: SnpWorkloadRules,
    platform: SnpPlatform,
    config: LaunchConfig,
    manifests: Iterable[VerifiedManifest],
    *,
    id_key: ec.EllipticCurvePrivateKey,
    author_key: ec.EllipticCurvePrivateKey | None,
    init_data: InitData,
    now: datetime,
) -> SnpAuthorization:
    """The authorisation of one launch (module docstring), or AuthorizationRefused."""
    _check_policy(rules)
    _check_platform(rules, platform)
    if rules.vcpus is not None and config.vcpus not in rules.vcpus:
        raise AuthorizationRefused(
            AuthorizeReason.VCPUS_NOT_ALLOWED, f"vcpus: {config.vcpus} is not among {sorted(rules.vcpus)}"
        )
    try:
        reference = digest_for_config(
            manifests,
            vcpus=config.vcpus,
            vcpu_type=config.vcpu_type,
            guest_features=config.guest_features,
            vmm_type=config.vmm_type,
            kernel_hashes=config.kernel_hashes,
            now=now,
        )
    except ReferenceMismatch as exc:
        raise AuthorizationRefused(AuthorizeReason.NO_REFERENCE_DIGEST, exc.detail) from None
    manifest_floor = reference.snp.min_tcb_for(platform.product)
    if reference.snp.min_tcb and manifest_floor is None:
        raise AuthorizationRefused(
            AuthorizeReason.PLATFORM_TCB_TOO_LOW,
            f"product: the reference values set no minimum TCB for {platform.product.value}",
        )
    if manifest_floor is not None:
        _check_tcbs(platform, manifest_floor, f"minimum of manifest {reference.manifest_id[:16]}")
    id_block = IdBlock(
        launch_digest=reference.launch_digest,
        family_id=reference.snp.family_id,
        image_id=reference.snp.image_id,
        guest_svn=reference.snp.guest_svn,
        policy=rules.policy,
    )
    try:
        id_auth = sign_id_block(id_block, id_key, author_key)
        id_auth.verify(id_block, author_key_enabled=author_key is not None)
    except SevError as exc:
        raise AuthorizationRefused(AuthorizeReason.BAD_KEY, exc.detail) from None
    return SnpAuthorization(
        authorization_id=init_data.authorization_id,
        id_block=id_block,
        id_auth=id_auth,
        init_data=init_data.to_bytes(),
        product=platform.product,
        reference=reference,
    )
