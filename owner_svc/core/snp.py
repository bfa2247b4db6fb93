"""The guest owner's SEV-SNP decisions (PROTOCOL.md section 11): authorise a launch before it starts,
then attest the running guest and release its secret to it.

* `authorize_snp_launch` (launcher role): the platform's VCEK/VLEK chains to the product's pinned root
  (or an explicitly trusted one), its TCBs meet the workload's floors, the launch configuration is one the
  workload allows and the signed reference values give a digest for exactly it. The owner then signs an
  ID block (ID key, and the author key over the ID key) and makes the init data (its guest endpoint, the
  CA serving it, the authorisation id, a nonce) whose SHA-256 is HOST_DATA. Recorded: single use, expiring.
* `issue_snp_challenge` / `attest_snp` (the guest port, no client identity: the report is the
  credential): a single-use, short-lived challenge; then `sevlaunch.snp.attest` decides on the report,
  and the workload's secret table is sealed with HPKE to the key REPORT_DATA binds, once per
  authorisation (a conditional update in the store, as for SEV sessions).

Host-reported platform facts (committed and current TCB) are hostile: at authorisation they only refuse
early; the signed report decides at attestation. Every decision is audited; every refusal raises a
typed error with an owner reason and leaves nothing released.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from owner_svc.core.metrics import Metrics
from owner_svc.core.model import AuditEvent, Workload, check_workload_id, secret_aad
from owner_svc.core.ports import Sealer, SealError, Store
from owner_svc.core.reasons import Reason
from owner_svc.core.refset import ReferenceValueSet
from owner_svc.core.snp_keys import OwnerSnpKeys
from owner_svc.core.snp_model import (
    AuthorizationState,
    SnpAuthorization,
    SnpChallengeRecord,
    SnpKeyKind,
    SnpRules,
    check_authorization_id,
    check_snp_policy,
)
from owner_svc.core.snp_ports import ChallengeSpend
from sevlaunch.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
)
from sevlaunch.refvalues import SNP_MAX_VCPUS, SNP_VMM_TYPES, KernelHashes, VerifiedManifest
from sevlaunch.sev import secret as sev_secret
from sevlaunch.sev.errors import MalformedInput, SevError, Unsupported, VerificationFailed
from sevlaunch.snp.attest import (
    AttestationRefused,
    AttestationRules,
    AttestationVerdict,
    AttestReason,
    Evidence,
    Expected,
    VekCache,
    attest,
    verify_evidence,
)
from sevlaunch.snp.certs import CertKind, TrustedRoot, load_certificates, verify_vek_chain
from sevlaunch.snp.certs import vek_extensions as read_vek_extensions
from sevlaunch.snp.challenge import (
    CHALLENGE_SIZE,
    DEFAULT_CHALLENGE_TTL,
    IssuedChallenge,
    check_report_data,
    parse_guest_public_key,
)
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.idblock import IdBlock, sign_id_block
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.refmatch import ReferenceMismatch, RefReason, SnpMatch, check_min_tcb, digest_for_config
from sevlaunch.snp.report import REPORT_SIZE
from sevlaunch.snp.secret_wrap import MAX_SECRET_SIZE, seal
from sevlaunch.snp.tcb import Product, TcbVersion

log = logging.getLogger("owner_svc.core")

DEFAULT_AUTHORIZATION_TTL = 3600.0
MAX_AUTHORIZATION_TTL = 86400.0
DEFAULT_MAX_CHALLENGES = 8
MAX_CERT_BYTES = 16 * 1024
MAX_CERT_TABLE_BYTES = 64 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_VCPU_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

#: The library's attestation reasons, as the owner's: refusals on the merits (PERMISSION_DENIED), a report
#: or certificates that do not parse included (only a wrong size is INVALID_ARGUMENT, before any lookup).
_ATTEST_REASONS: Mapping[AttestReason, Reason] = {
    AttestReason.MALFORMED_REPORT: Reason.MALFORMED_REPORT,
    AttestReason.MALFORMED_CERTIFICATES: Reason.MALFORMED_CERTIFICATES,
    AttestReason.BAD_GUEST_KEY: Reason.BAD_GUEST_KEY,
    AttestReason.WRONG_PRODUCT: Reason.WRONG_PRODUCT,
    AttestReason.FORGED_CHAIN: Reason.FORGED_CHAIN,
    AttestReason.VLEK_NOT_ALLOWED: Reason.VLEK_NOT_ALLOWED,
    AttestReason.VCEK_TCB_MISMATCH: Reason.VCEK_TCB_MISMATCH,
    AttestReason.HWID_MISMATCH: Reason.HWID_MISMATCH,
    AttestReason.VMPL_NOT_ALLOWED: Reason.VMPL_NOT_ALLOWED,
    AttestReason.POLICY_NOT_ALLOWED: Reason.POLICY_NOT_ALLOWED,
    AttestReason.POLICY_MISMATCH: Reason.POLICY_MISMATCH,
    AttestReason.TCB_ORDER: Reason.TCB_ORDER,
    AttestReason.PROVISIONAL_FIRMWARE: Reason.PROVISIONAL_FIRMWARE,
    AttestReason.REPORTED_TCB_TOO_LOW: Reason.REPORTED_TCB_TOO_LOW,
    AttestReason.COMMITTED_TCB_TOO_LOW: Reason.COMMITTED_TCB_TOO_LOW,
    AttestReason.LAUNCH_TCB_TOO_LOW: Reason.LAUNCH_TCB_TOO_LOW,
    AttestReason.NO_REFERENCE_VALUES: Reason.NO_REFERENCE_VALUES,
    AttestReason.MEASUREMENT_MISMATCH: Reason.MEASUREMENT_MISMATCH,
    AttestReason.VCPUS_MISMATCH: Reason.VCPUS_MISMATCH,
    AttestReason.FAMILY_ID_MISMATCH: Reason.FAMILY_ID_MISMATCH,
    AttestReason.IMAGE_ID_MISMATCH: Reason.IMAGE_ID_MISMATCH,
    AttestReason.GUEST_SVN_TOO_LOW: Reason.GUEST_SVN_TOO_LOW,
    AttestReason.PRODUCT_NOT_COVERED: Reason.PRODUCT_NOT_COVERED,
    AttestReason.ID_KEY_MISMATCH: Reason.ID_KEY_MISMATCH,
    AttestReason.AUTHOR_KEY_MISMATCH: Reason.AUTHOR_KEY_MISMATCH,
    AttestReason.HOST_DATA_MISMATCH: Reason.HOST_DATA_MISMATCH,
    AttestReason.REPORT_DATA_MISMATCH: Reason.REPORT_DATA_MISMATCH,
}
_CHAIN_REASONS: Mapping[SnpReason, Reason] = {
    SnpReason.PRODUCT_MISMATCH: Reason.WRONG_PRODUCT,
    SnpReason.UNKNOWN_PRODUCT: Reason.WRONG_PRODUCT,
}
_TCB_REASONS = {
    "reported": Reason.REPORTED_TCB_TOO_LOW,
    "committed": Reason.COMMITTED_TCB_TOO_LOW,
    "launch": Reason.LAUNCH_TCB_TOO_LOW,
}
_REF_REASONS: Mapping[RefReason, Reason] = {
    RefReason.FAMILY_ID_MISMATCH: Reason.FAMILY_ID_MISMATCH,
    RefReason.IMAGE_ID_MISMATCH: Reason.IMAGE_ID_MISMATCH,
    RefReason.GUEST_SVN_TOO_LOW: Reason.GUEST_SVN_TOO_LOW,
    RefReason.PRODUCT_NOT_COVERED: Reason.PRODUCT_NOT_COVERED,
}


@dataclass(frozen=True)
class SnpSettings:
    """The owner's SNP configuration: where guests reach it, the CA that serves that endpoint, extra
    (non-AMD) roots trusted explicitly, and lifetimes."""

    endpoint: str  # https://HOST:PORT, as guests dial it
    ca_pem: str
    extra_roots: tuple[TrustedRoot, ...] = ()
    authorization_ttl: float = DEFAULT_AUTHORIZATION_TTL
    challenge_ttl: float = DEFAULT_CHALLENGE_TTL.total_seconds()
    max_challenges: int = DEFAULT_MAX_CHALLENGES

    def __post_init__(self) -> None:
        # Both checked now, so a bad --guest-endpoint or CA stops the start rather than every launch.
        InitData.new(endpoint=self.endpoint, ca_pem=self.ca_pem, authorization_id="check")
        if not 1 <= self.authorization_ttl <= MAX_AUTHORIZATION_TTL:
            raise ValueError(f"authorisation TTL must be 1..{MAX_AUTHORIZATION_TTL:.0f} seconds")
        if not 1 <= self.challenge_ttl <= 3600:
            raise ValueError("challenge TTL must be 1..3600 seconds")
        if not 1 <= self.max_challenges <= 64:
            raise ValueError("at most 1..64 outstanding challenges per authorisation")


@dataclass(frozen=True)
class SnpPlatformInput:
    """What the launcher forwards from the platform (hostile until verified): the VCEK or VLEK with its
    chain (DER or PEM), and the TCBs the firmware reports (raw TCB_VERSION; None: not known)."""

    vek: bytes
    chain: tuple[bytes, ...] = ()
    committed_tcb: int | None = None
    current_tcb: int | None = None


@dataclass(frozen=True)
class SnpLaunchConfig:
    """The launch the launcher intends: what the reference digest is looked up by."""

    vcpus: int
    vcpu_type: str
    guest_features: int
    vmm_type: str
    kernel_hashes: KernelHashes | None = None
    policy: int = 0  # 0: the workload's first allowed policy
    #: SHA-256 (hex) of the image the launcher loads, "" if not given: a manifest naming another image's
    #: hash is then not used (one naming none still is; the firmware checks the digest in any case).
    firmware_sha256: str = ""

    def check(self) -> None:
        bad = [
            isinstance(self.vcpus, bool) or not 1 <= self.vcpus <= SNP_MAX_VCPUS,
            not 0 <= self.guest_features < 1 << 64 or not self.guest_features & 1,
            self.vmm_type not in SNP_VMM_TYPES,
            bool(self.vcpu_type) and not _VCPU_TYPE.fullmatch(self.vcpu_type),
            self.vmm_type == "QEMU" and not self.vcpu_type,
            not 0 <= self.policy < 1 << 64,
        ]
        if any(bad):
            raise InvalidArgument(
                Reason.BAD_LAUNCH_CONFIG,
                f"launch config: vcpus 1..{SNP_MAX_VCPUS}, guest_features a u64 with bit 0 set, vmm_type "
                f"one of {', '.join(SNP_VMM_TYPES)} (QEMU needs a vcpu_type), policy a u64",
            )
        if self.firmware_sha256 and not _HEX64.fullmatch(self.firmware_sha256):
            raise InvalidArgument(Reason.BAD_LAUNCH_CONFIG, "firmware_sha256: SHA-256, lower-case hex")
        kh = self.kernel_hashes
        if kh is not None and not all(_HEX64.fullmatch(h) for h in (kh.kernel, kh.initrd, kh.cmdline)):
            raise InvalidArgument(Reason.BAD_LAUNCH_CONFIG, "kernel hashes: three SHA-256, lower-case hex")


@dataclass(frozen=True)
class SnpAuthorized:
    """What the launcher passes to libvirt (none of it secret)."""

    authorization_id: str
    id_block: bytes
    id_auth: bytes
    policy: int
    host_data: bytes
    init_data: bytes
    author_key: bool
    launch_digest: bytes
    manifest_id: str
    product: str
    expires_at: float


@dataclass(frozen=True)
class SnpReleased:
    """The secret table sealed to the guest's key (HPKE); empty with `no_secret`."""

    enc: bytes
    ciphertext: bytes
    measurement: bytes
    manifest_id: str
    no_secret: bool = False

    def __repr__(self) -> str:
        return f"SnpReleased(manifest_id={self.manifest_id}, no_secret={self.no_secret})"


def _load_certs(data: Sequence[bytes]) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for item in data:
        if not isinstance(item, bytes) or not 0 < len(item) <= MAX_CERT_BYTES:
            raise InvalidArgument(Reason.BAD_PLATFORM, f"a certificate is 1..{MAX_CERT_BYTES} bytes")
        try:
            certs += load_certificates(item, what="chain")
        except MalformedInput as exc:
            raise InvalidArgument(Reason.BAD_PLATFORM, exc.detail) from None
    return certs


class OwnerSnp(OwnerSnpKeys):
    """Mixed into `OwnerCore`, which provides these attributes."""

    store: Store
    sealer: Sealer
    refvalues: ReferenceValueSet
    metrics: Metrics
    clock: Callable[[], float]
    snp: SnpSettings | None

    def sync_reference_values(self) -> None:
        raise NotImplementedError

    @property
    def _vek_cache(self) -> VekCache:
        # Verified VCEK chains by their exact bytes: the hot path then checks one report signature.
        cache: VekCache | None = self.__dict__.get("_snp_vek_cache")
        if cache is None:
            cache = self.__dict__.setdefault("_snp_vek_cache", VekCache())
        return cache

    def _settings(self) -> SnpSettings:
        if self.snp is None:
            raise FailedPrecondition(
                Reason.SNP_NOT_CONFIGURED, "this owner serves no SEV-SNP guests (no --guest-endpoint)"
            )
        return self.snp

    def _snp_manifests(self, workload: Workload, now: datetime) -> list[VerifiedManifest]:
        self.sync_reference_values()
        return self.refvalues.snp_manifests(workload, now)

    # ------------------------------------------------------------------------- AuthorizeSnpLaunch

    def authorize_snp_launch(
        self, caller: str, workload_id: str, platform: SnpPlatformInput, config: SnpLaunchConfig
    ) -> SnpAuthorized:
        # 1. Parse: malformed input writes nothing.
        check_workload_id(workload_id)
        config.check()
        vek = _load_certs([platform.vek])
        if len(vek) != 1:
            raise InvalidArgument(Reason.BAD_PLATFORM, "vek: exactly one certificate")
        chain = _load_certs(platform.chain)
        for raw in (platform.committed_tcb, platform.current_tcb):
            if raw is not None and not 0 <= raw < 1 << 64:
                raise InvalidArgument(Reason.BAD_PLATFORM, "a TCB is a u64")
        event = AuditEvent(
            actor=caller, action="authorize_snp_launch", outcome="refused", workload_id=workload_id
        )

        def refuse(exc: ServiceError) -> NoReturn:
            self.store.append_audit(replace(event, reason=exc.reason, detail=exc.detail))
            self.metrics.snp_authorization("refused", exc.reason)
            log.info(
                "snp launch refused", extra={"workload": workload_id, "reason": exc.reason, "caller": caller}
            )
            raise exc

        # 2. Decide.
        settings = self._settings()
        workload = self._workload_or_none(workload_id)
        if workload is None:
            refuse(NotFound(Reason.UNKNOWN_WORKLOAD, f"no workload {workload_id!r}"))
        rules = workload.snp
        if rules is None:
            refuse(FailedPrecondition(Reason.NO_SNP_RULES, "the workload has no SEV-SNP rules"))
        now = self.clock()
        now_dt = datetime.fromtimestamp(now, UTC)
        product = self._platform_product(vek[0], rules, refuse)
        try:
            verified = verify_vek_chain(
                vek[0], product, at=now_dt, chain=chain, extra_roots=settings.extra_roots
            )
        except (VerificationFailed, Unsupported) as exc:
            reason = (
                _CHAIN_REASONS.get(exc.reason, Reason.FORGED_CHAIN)
                if isinstance(exc.reason, SnpReason)
                else Reason.FORGED_CHAIN
            )
            refuse(PermissionDenied(reason, exc.detail))
        except MalformedInput as exc:
            refuse(InvalidArgument(Reason.BAD_PLATFORM, exc.detail))
        event = replace(event, cek_fingerprint=_hwid(verified.extensions.hwid))
        if verified.kind is CertKind.VLEK and not rules.allow_vlek:
            refuse(
                PermissionDenied(
                    Reason.VLEK_NOT_ALLOWED, "signing_key: a VLEK, the workload allows VCEKs only"
                )
            )
        tcbs = {"reported": verified.tcb}
        for kind, raw in (("committed", platform.committed_tcb), ("launch", platform.current_tcb)):
            if raw is not None:
                try:
                    tcbs[kind] = TcbVersion.from_raw(raw, product, field=f"{kind}_tcb")
                except SevError as exc:
                    refuse(InvalidArgument(Reason.BAD_PLATFORM, exc.detail))
        if (
            "committed" in tcbs
            and "launch" in tcbs
            and tcbs["launch"] != tcbs["committed"]
            and not rules.allow_provisional_firmware
        ):
            refuse(
                PermissionDenied(
                    Reason.PROVISIONAL_FIRMWARE,
                    f"the platform runs uncommitted firmware (current {tcbs['launch']}, committed "
                    f"{tcbs['committed']}) and the workload allows committed firmware only",
                )
            )
        floor = rules.floor(product)
        if floor is not None:
            for kind, tcb in tcbs.items():
                minimum = getattr(floor, kind)
                if minimum is not None and (short := tcb.shortfall(minimum)):
                    refuse(
                        PermissionDenied(
                            _TCB_REASONS[kind], f"{kind}_tcb: {', '.join(short)} (workload minimum)"
                        )
                    )
        policy = config.policy or rules.policies[0]
        if policy not in rules.policies:
            refuse(PermissionDenied(Reason.POLICY_NOT_ALLOWED, f"policy {policy:#x} is not allowed"))
        try:
            # Again at every use: defence against an edited workload row.
            check_snp_policy(
                policy, allow_debug=rules.allow_debug, allow_migration_agent=rules.allow_migration_agent
            )
        except InvalidArgument as exc:
            refuse(PermissionDenied(Reason.POLICY_NOT_ALLOWED, exc.detail))
        refusal = _config_refusal(rules, config)
        if refusal is not None:
            refuse(refusal)
        match = self._reference_for(workload, rules, config, product, tcbs, now_dt, refuse)
        if self.store.get_secret(workload_id) is None and not workload.allow_launch_without_secret:
            refuse(FailedPrecondition(Reason.NO_SECRET, "the workload has no secret to release"))

        # 3. Sign the ID block and record the authorisation.
        id_key = self.active_snp_key(caller, workload_id, SnpKeyKind.ID)
        author_key = (
            self.active_snp_key(caller, workload_id, SnpKeyKind.AUTHOR) if rules.use_author_key else None
        )
        snp_ref = match.snp
        id_block = IdBlock(
            launch_digest=match.launch_digest,
            family_id=snp_ref.family_id,
            image_id=snp_ref.image_id,
            guest_svn=snp_ref.guest_svn,
            policy=policy,
        )
        id_auth = sign_id_block(
            id_block, id_key.private_key, None if author_key is None else author_key.private_key
        )
        authorization_id = f"snp-{secrets.token_hex(16)}"
        init = InitData.new(
            endpoint=settings.endpoint, ca_pem=settings.ca_pem, authorization_id=authorization_id
        )
        init_bytes = init.to_bytes()
        record = SnpAuthorization(
            authorization_id=authorization_id,
            workload_id=workload_id,
            caller=caller,
            product=product.value,
            policy=policy,
            vcpus=config.vcpus,
            launch_digest=match.launch_digest.hex(),
            manifest_id=match.manifest_id,
            host_data=init.host_data.hex(),
            id_key_digest=id_auth.id_key_digest.hex(),
            author_key_digest="" if author_key is None else id_auth.author_key_digest.hex(),
            id_key_version=id_key.record.version,
            init_data=init_bytes,
            vek_cert=vek[0].public_bytes(serialization.Encoding.DER),
            created_at=now,
            expires_at=now + settings.authorization_ttl,
        )
        self.store.insert_snp_authorization(
            record,
            replace(
                event,
                outcome="allowed",
                session_id=authorization_id,
                digest=record.launch_digest,
                detail=f"{product.value}, {config.vcpus} vCPU(s), policy {policy:#x}, manifest "
                f"{match.manifest_id[:16]}, ID key v{id_key.record.version}, host_data {record.host_data}",
            ),
        )
        self.metrics.snp_authorization("allowed", "")
        log.info(
            "snp launch authorised",
            extra={"workload": workload_id, "caller": caller, "product": product.value},
        )
        return SnpAuthorized(
            authorization_id=authorization_id,
            id_block=id_block.to_bytes(),
            id_auth=id_auth.to_bytes(),
            policy=policy,
            host_data=init.host_data,
            init_data=init_bytes,
            author_key=author_key is not None,
            launch_digest=match.launch_digest,
            manifest_id=match.manifest_id,
            product=product.value,
            expires_at=record.expires_at,
        )

    def _platform_product(
        self, vek: x509.Certificate, rules: SnpRules, refuse: Callable[[ServiceError], NoReturn]
    ) -> Product:
        # The certificate's productName says which pinned root to verify against; the chain check then
        # holds it to that product (a certificate naming another product does not verify).
        try:
            name = (read_vek_extensions(vek).product_name or "").split("-")[0]
            product = Product.parse(name)
        except SevError as exc:
            refuse(PermissionDenied(Reason.WRONG_PRODUCT, exc.detail))
        if product not in rules.products:
            refuse(PermissionDenied(Reason.WRONG_PRODUCT, f"product: {product.value} is not allowed"))
        return product

    def _reference_for(
        self,
        workload: Workload,
        rules: SnpRules,
        config: SnpLaunchConfig,
        product: Product,
        tcbs: dict[str, TcbVersion],
        now: datetime,
        refuse: Callable[[ServiceError], NoReturn],
    ) -> SnpMatch:
        manifests = [
            vm
            for vm in self._snp_manifests(workload, now)
            if not config.firmware_sha256 or vm.manifest.firmware_sha256 in (None, config.firmware_sha256)
        ]
        if not manifests:
            refuse(
                FailedPrecondition(Reason.NO_REFERENCE_VALUES, "no SEV-SNP reference values in force for it")
            )
        try:
            match = digest_for_config(
                manifests,
                vcpus=config.vcpus,
                vcpu_type=config.vcpu_type or None,
                guest_features=config.guest_features,
                vmm_type=config.vmm_type,
                kernel_hashes=config.kernel_hashes,
                now=now,
            )
        except ReferenceMismatch as exc:
            refuse(FailedPrecondition(Reason.NO_DIGEST_FOR_CONFIG, exc.detail))
        snp_ref = match.snp
        if rules.family_id is not None and not hmac.compare_digest(rules.family_id, snp_ref.family_id):
            refuse(PermissionDenied(Reason.FAMILY_ID_MISMATCH, "family_id: not the workload's"))
        if rules.image_id is not None and not hmac.compare_digest(rules.image_id, snp_ref.image_id):
            refuse(PermissionDenied(Reason.IMAGE_ID_MISMATCH, "image_id: not the workload's"))
        if snp_ref.guest_svn < rules.min_guest_svn:
            refuse(
                PermissionDenied(
                    Reason.GUEST_SVN_TOO_LOW,
                    f"guest_svn: the reference values vouch for {snp_ref.guest_svn}, the workload needs "
                    f"{rules.min_guest_svn}",
                )
            )
        publisher_floor = snp_ref.min_tcb_for(product)
        if publisher_floor is None and snp_ref.min_tcb:
            refuse(
                PermissionDenied(
                    Reason.PRODUCT_NOT_COVERED, f"the reference values do not cover {product.value}"
                )
            )
        if publisher_floor is not None:
            try:
                check_min_tcb(publisher_floor, tcbs, source=f"manifest {match.manifest_id[:16]}")
            except ReferenceMismatch as exc:
                refuse(
                    PermissionDenied(
                        _TCB_REASONS.get(exc.tcb_kind or "", Reason.REPORTED_TCB_TOO_LOW), exc.detail
                    )
                )
        return match

    # ------------------------------------------------------------------------------ GetChallenge

    def issue_snp_challenge(self, peer: str, authorization_id: str) -> IssuedChallenge:
        """A single-use challenge for the guest of `authorization_id`. Not audited (it decides nothing;
        the Attest that spends it is), and bounded per authorisation."""
        check_authorization_id(authorization_id)
        settings = self._settings()
        auth = self._authorization(authorization_id)
        now = self.clock()
        refusal = _state_refusal(auth, now)
        if refusal is not None:
            self.metrics.snp_attestation("refused", refusal.reason)
            raise refusal
        issued = IssuedChallenge.issue(
            datetime.fromtimestamp(now, UTC), timedelta(seconds=settings.challenge_ttl)
        )
        record = SnpChallengeRecord(
            authorization_id=authorization_id,
            challenge=issued.value.hex(),
            issued_at=now,
            expires_at=now + settings.challenge_ttl,
        )
        if not self.store.insert_snp_challenge(record, max_outstanding=settings.max_challenges):
            self.metrics.snp_attestation("refused", Reason.TOO_MANY_CHALLENGES)
            raise ResourceExhausted(
                Reason.TOO_MANY_CHALLENGES,
                f"{settings.max_challenges} challenges of this authorisation are outstanding; use one",
            )
        return issued

    def _authorization(self, authorization_id: str) -> SnpAuthorization:
        auth = self.store.get_snp_authorization(authorization_id)
        if auth is None:
            # Not audited: no workload is concerned, and anyone on the guest network can ask.
            self.metrics.snp_attestation("refused", Reason.UNKNOWN_AUTHORIZATION)
            raise NotFound(Reason.UNKNOWN_AUTHORIZATION, "no such authorisation")
        return auth

    # ------------------------------------------------------------------------------------ Attest

    def attest_snp(
        self,
        peer: str,
        authorization_id: str,
        challenge: bytes,
        report: bytes,
        *,
        vek: bytes = b"",
        chain: Sequence[bytes] = (),
        cert_table: bytes = b"",
        guest_public_key: bytes,
    ) -> SnpReleased:
        # 1. Parse (nothing written, nothing audited: the request is not yet about any launch).
        check_authorization_id(authorization_id)
        if not isinstance(challenge, bytes) or len(challenge) != CHALLENGE_SIZE:
            raise InvalidArgument(Reason.BAD_CHALLENGE, f"a challenge is {CHALLENGE_SIZE} bytes")
        try:
            parse_guest_public_key(guest_public_key)
        except MalformedInput as exc:
            raise InvalidArgument(Reason.BAD_GUEST_KEY, exc.detail) from None
        if len(report) != REPORT_SIZE:
            raise InvalidArgument(Reason.BAD_REPORT, f"a report is {REPORT_SIZE} bytes")
        if (cert_table and vek) or len(cert_table) > MAX_CERT_TABLE_BYTES:
            raise InvalidArgument(
                Reason.BAD_CERTIFICATES, "give the VCEK/VLEK (and its chain) or a certificate table, not both"
            )
        settings = self._settings()

        # 2. Decide: the authorisation, the challenge, then the report.
        auth = self._authorization(authorization_id)
        try:
            # Without certificates: the VCEK/VLEK the platform was authorised with (its chain is checked
            # again below like any other).
            evidence = (
                Evidence.from_cert_table(report, cert_table)
                if cert_table
                else Evidence(report, vek or auth.vek_cert, tuple(chain))
            )
        except AttestationRefused as exc:
            raise InvalidArgument(Reason.BAD_CERTIFICATES, exc.detail) from None
        event = AuditEvent(
            actor=f"guest:{peer}",
            action="attest_snp",
            outcome="refused",
            workload_id=auth.workload_id,
            session_id=authorization_id,
        )
        now = self.clock()
        refusal = _state_refusal(auth, now)
        if refusal is not None:
            self._refuse_attestation(event, refusal)
        spend = self.store.spend_snp_challenge(authorization_id, challenge.hex(), now)
        if spend is not ChallengeSpend.SPENT:
            self._refuse_attestation(event, _challenge_refusal(spend))
        workload = self._workload_or_none(auth.workload_id)
        if workload is None:
            self._refuse_attestation(
                event, FailedPrecondition(Reason.UNKNOWN_WORKLOAD, "the workload is gone")
            )
        rules = workload.snp
        if rules is None:
            self._refuse_attestation(
                event, FailedPrecondition(Reason.NO_SNP_RULES, "the workload has no SNP rules")
            )
        now_dt = datetime.fromtimestamp(now, UTC)
        expected = Expected(
            authorization_id=authorization_id,
            policy=auth.policy,
            id_key_digest=bytes.fromhex(auth.id_key_digest),
            host_data=bytes.fromhex(auth.host_data),
            challenge=challenge,
            guest_public_key=guest_public_key,
            product=Product(auth.product),
            author_key_digest=bytes.fromhex(auth.author_key_digest) if auth.author_key_digest else None,
            vcpus=auth.vcpus,
        )
        # The workload's rules as they are now: an admin who raised a floor after the authorisation
        # refuses the launch it authorised.
        attestation_rules = AttestationRules(
            allowed_policy_flags=rules.allowed_policy_flags,
            min_tcb={f.product: f.minimum() for f in rules.min_tcb},
            products=frozenset(rules.products),
            allow_vlek=rules.allow_vlek,
            allow_provisional_firmware=rules.allow_provisional_firmware,
            extra_roots=settings.extra_roots,
        )
        manifests = self._snp_manifests(workload, now_dt)
        try:
            verdict = attest(
                evidence, expected, attestation_rules, manifests, now=now_dt, cache=self._vek_cache
            )
        except AttestationRefused as exc:
            bound = self._bound_to_launch(evidence, expected, attestation_rules, now_dt)
            self._refuse_attestation(event, _attestation_error(exc), burn=auth if bound else None)
        event = replace(event, digest=verdict.report.measurement.hex(), cek_fingerprint=_chip(verdict))
        # From here on the report is this launch's own: a refusal abandons the launch.
        self._check_workload_pins(event, rules, verdict, auth)

        # 3. Seal the secret to the guest's key, then claim the authorisation: only the caller whose
        # conditional update wins has its sealed secret returned.
        plain = self._snp_secret(event, workload, auth)
        wrapped = (
            None
            if plain is None
            else seal(plain, guest_public_key, authorization_id=authorization_id, challenge=challenge)
        )
        facts = verdict.audit()
        detail = ", ".join(
            f"{k} {facts[k]}" for k in ("product", "signing_key", "vcpus", "guest_svn", "manifest_id")
        )
        won = self.store.finish_snp_authorization(
            authorization_id,
            to_state=AuthorizationState.RELEASED,
            now=now,
            require_unexpired=True,
            reason="",
            event=replace(event, outcome="allowed", detail=detail + ("" if wrapped else ", no secret")),
        )
        if not won:
            self._refuse_attestation(event, FailedPrecondition(Reason.ALREADY_RELEASED, "already released"))
        self.metrics.snp_attestation("allowed", "")
        log.info("snp secret released", extra={"workload": auth.workload_id, "no_secret": wrapped is None})
        if wrapped is None:
            return SnpReleased(
                b"", b"", verdict.report.measurement, verdict.reference.manifest_id, no_secret=True
            )
        return SnpReleased(
            wrapped.enc, wrapped.ciphertext, verdict.report.measurement, verdict.reference.manifest_id
        )

    def _check_workload_pins(
        self, event: AuditEvent, rules: SnpRules, verdict: AttestationVerdict, auth: SnpAuthorization
    ) -> None:
        report = verdict.report
        if rules.family_id is not None and not hmac.compare_digest(rules.family_id, report.family_id):
            self._refuse_attestation(
                event, PermissionDenied(Reason.FAMILY_ID_MISMATCH, "family_id: not the workload's"), burn=auth
            )
        if rules.image_id is not None and not hmac.compare_digest(rules.image_id, report.image_id):
            self._refuse_attestation(
                event, PermissionDenied(Reason.IMAGE_ID_MISMATCH, "image_id: not the workload's"), burn=auth
            )
        if report.guest_svn < rules.min_guest_svn:
            self._refuse_attestation(
                event,
                PermissionDenied(
                    Reason.GUEST_SVN_TOO_LOW,
                    f"guest_svn: {report.guest_svn} < {rules.min_guest_svn} (workload)",
                ),
                burn=auth,
            )
        # The key that signed this authorisation's ID block must still be one of the workload's (any
        # version: a rotation keeps the older ones until their launches are done).
        known = self.known_snp_key_digests(auth.workload_id, SnpKeyKind.ID)
        if report.id_key_digest.hex() not in known:
            self._refuse_attestation(
                event,
                PermissionDenied(Reason.ID_KEY_MISMATCH, "id_key_digest: not this workload's"),
                burn=auth,
            )

    def _snp_secret(self, event: AuditEvent, workload: Workload, auth: SnpAuthorization) -> bytes | None:
        """The workload's secret table bytes (what an SEV guest finds in its secret area; the SNP guest
        parses them with the same `SecretTable`), or None when it has none and consents to that."""
        sealed = self.store.get_secret(workload.workload_id)
        if sealed is None:
            if workload.allow_launch_without_secret:
                return None
            self._refuse_attestation(
                event, FailedPrecondition(Reason.NO_SECRET, "the workload has no secret"), burn=auth
            )
        try:
            plain = self.sealer.open(sealed, secret_aad(workload.workload_id))
        except SealError:
            log.error("workload secret does not open (wrong KEK or tampered database)")
            raise RuntimeError("workload secret does not open") from None
        table = sev_secret.SecretTable.from_bytes(plain)
        if len(plain) > MAX_SECRET_SIZE:
            self._refuse_attestation(
                event,
                FailedPrecondition(Reason.SECRET_TOO_LARGE, f"more than {MAX_SECRET_SIZE} bytes"),
                burn=auth,
            )
        return table.to_bytes()

    def _bound_to_launch(
        self, evidence: Evidence, expected: Expected, rules: AttestationRules, now: datetime
    ) -> bool:
        """Whether a refused report is this launch's own: authentic (signed by a VEK of a trusted root),
        its HOST_DATA the authorised one, its REPORT_DATA binding the challenge just spent and the key.
        Only such a refusal abandons the launch: anything else may come from anyone on the guest network
        (or be an old report replayed), and must not end a launch it cannot speak for."""
        try:
            report, _, _ = verify_evidence(evidence, expected, rules, now=now, cache=self._vek_cache)
            check_report_data(report.report_data, expected.challenge, expected.guest_public_key)
        except SevError:
            return False
        return hmac.compare_digest(report.host_data, expected.host_data)

    def _refuse_attestation(
        self, event: AuditEvent, exc: ServiceError, *, burn: SnpAuthorization | None = None
    ) -> NoReturn:
        """Audits and raises the refusal; with `burn`, also moves that authorisation to REFUSED (in the
        same transaction as the audit record), so the launch cannot be retried with other evidence."""
        refused = replace(event, reason=exc.reason, detail=exc.detail)
        if burn is None or not self.store.finish_snp_authorization(
            burn.authorization_id,
            to_state=AuthorizationState.REFUSED,
            now=self.clock(),
            require_unexpired=False,
            reason=exc.reason,
            event=refused,
        ):
            self.store.append_audit(refused)
        self.metrics.snp_attestation("refused", exc.reason)
        log.info("snp attestation refused", extra={"workload": event.workload_id, "reason": exc.reason})
        raise exc

    def snp_authorization_of(self, caller: str, authorization_id: str) -> SnpAuthorization:
        """The authorisation, for the identity that got it (a launcher polls it while its guest boots)."""
        check_authorization_id(authorization_id)
        auth = self.store.get_snp_authorization(authorization_id)
        if auth is None:
            raise NotFound(Reason.UNKNOWN_AUTHORIZATION, "no such authorisation")
        if auth.caller != caller:
            raise PermissionDenied(Reason.WRONG_CALLER, "the launch was authorised for another caller")
        return auth

    # ------------------------------------------------------------------------------------- admin

    def revoke_snp_authorization(self, caller: str, authorization_id: str) -> None:
        check_authorization_id(authorization_id)
        auth = self.store.get_snp_authorization(authorization_id)
        if auth is None:
            raise NotFound(Reason.UNKNOWN_AUTHORIZATION, "no such authorisation")
        event = AuditEvent(
            actor=caller,
            action="revoke_snp_authorization",
            outcome="allowed",
            workload_id=auth.workload_id,
            session_id=authorization_id,
        )
        if not self.store.finish_snp_authorization(
            authorization_id,
            to_state=AuthorizationState.REVOKED,
            now=self.clock(),
            require_unexpired=False,
            reason="revoked",
            event=event,
        ):
            raise FailedPrecondition(Reason.SESSION_NOT_OPEN, "the authorisation is no longer open")

    def list_snp_authorizations(self, workload_id: str, limit: int) -> Sequence[SnpAuthorization]:
        if workload_id:
            check_workload_id(workload_id)
        if not 0 <= limit <= 1000:
            raise InvalidArgument(Reason.BAD_LIMIT, "limit must be 0..1000")
        return self.store.list_snp_authorizations(workload_id, limit or 100)


def _state_refusal(auth: SnpAuthorization, now: float) -> ServiceError | None:
    if auth.state is AuthorizationState.RELEASED:
        return FailedPrecondition(Reason.ALREADY_RELEASED, "the secret of this launch was released already")
    if auth.state is AuthorizationState.REFUSED:
        return FailedPrecondition(
            Reason.AUTHORIZATION_REFUSED, f"a report of this launch was refused ({auth.reason}); launch again"
        )
    if auth.state is AuthorizationState.REVOKED:
        return FailedPrecondition(Reason.AUTHORIZATION_REVOKED, "the authorisation was revoked")
    if now >= auth.expires_at:
        return FailedPrecondition(Reason.AUTHORIZATION_EXPIRED, "the authorisation has expired")
    return None


def _challenge_refusal(spend: ChallengeSpend) -> ServiceError:
    if spend is ChallengeSpend.REUSED:
        return FailedPrecondition(Reason.CHALLENGE_USED, "the challenge was used already (a replay?)")
    if spend is ChallengeSpend.EXPIRED:
        return FailedPrecondition(Reason.CHALLENGE_EXPIRED, "the challenge has expired; ask for another")
    return NotFound(Reason.UNKNOWN_CHALLENGE, "no such challenge for this authorisation")


def _attestation_error(exc: AttestationRefused) -> ServiceError:
    reason = _ATTEST_REASONS.get(exc.reason, Reason.MEASUREMENT_MISMATCH)
    if reason is Reason.NO_REFERENCE_VALUES:
        return FailedPrecondition(reason, exc.detail)
    return PermissionDenied(reason, exc.detail)


def _config_refusal(rules: SnpRules, config: SnpLaunchConfig) -> ServiceError | None:
    checks = (
        (config.vcpus in rules.vcpu_counts, f"{config.vcpus} vCPU(s)"),
        (not rules.vcpu_types or config.vcpu_type in rules.vcpu_types, f"vCPU type {config.vcpu_type!r}"),
        (config.guest_features in rules.guest_features, f"guest features {config.guest_features:#x}"),
        (config.vmm_type in rules.vmm_types, f"VMM type {config.vmm_type}"),
    )
    for ok, what in checks:
        if not ok:
            return PermissionDenied(Reason.CONFIG_NOT_ALLOWED, f"{what}: not allowed for this workload")
    return None


def _hwid(hwid: bytes | None) -> str:
    """A short, public chip identifier for the audit record (the VCEK's hwID; none for a VLEK)."""
    return "" if hwid is None else f"hwid:{hwid.hex()[:32]}"


def _chip(verdict: AttestationVerdict) -> str:
    return "" if verdict.vek_kind is CertKind.VLEK else f"hwid:{verdict.report.chip_id.hex()[:32]}"
