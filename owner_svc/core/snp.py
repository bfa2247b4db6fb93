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
from datetime import UTC, datetime
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from owner_svc.core.metrics import Metrics
from owner_svc.core.model import AuditEvent, Workload, check_workload_id
from owner_svc.core.ports import Sealer, Store
from owner_svc.core.reasons import Reason
from owner_svc.core.refset import ReferenceValueSet
from owner_svc.core.snp_attest import (
    DEFAULT_AUTHORIZATION_TTL,
    MAX_CERT_TABLE_BYTES,
    OwnerSnpAttest,
    SnpReleased,
    SnpSettings,
)
from owner_svc.core.snp_model import (
    AuthorizationState,
    SnpAuthorization,
    SnpKeyKind,
    SnpRules,
    check_authorization_id,
    check_snp_policy,
)
from sevlaunch.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
)
from sevlaunch.refvalues import SNP_MAX_VCPUS, SNP_VMM_TYPES, KernelHashes
from sevlaunch.sev.errors import MalformedInput, SevError, Unsupported, VerificationFailed
from sevlaunch.snp.certs import CertKind, load_certificates, verify_vek_chain
from sevlaunch.snp.certs import vek_extensions as read_vek_extensions
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.idblock import IdBlock, sign_id_block
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.refmatch import ReferenceMismatch, RefReason, SnpMatch, check_min_tcb, digest_for_config
from sevlaunch.snp.tcb import Product, TcbVersion

__all__ = [
    "DEFAULT_AUTHORIZATION_TTL",
    "MAX_CERT_TABLE_BYTES",
    "OwnerSnp",
    "SnpAuthorized",
    "SnpLaunchConfig",
    "SnpPlatformInput",
    "SnpReleased",
    "SnpSettings",
]

log = logging.getLogger("owner_svc.core")

MAX_CERT_BYTES = 16 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_VCPU_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

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


class OwnerSnp(OwnerSnpAttest):
    """Mixed into `OwnerCore`, which provides these attributes."""

    store: Store
    sealer: Sealer
    refvalues: ReferenceValueSet
    metrics: Metrics
    clock: Callable[[], float]
    snp: SnpSettings | None

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

    def revoke_snp_authorization(self, caller: str, authorization_id: str, *, admin: bool = True) -> None:
        """Ends an open authorisation (REVOKED): its guest can no longer attest. An admin may revoke any;
        otherwise only the identity that got the authorisation, for a launch it gave up before RUNNING
        (a firmware refusal at SNP_LAUNCH_FINISH, an abort, a failed start), so the authorisation does
        not stay open until it expires. Both are audited, a refusal too."""
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
            detail="" if admin else "by the identity it was granted to",
            launch_id=self._launch_id() or "",
        )
        if not admin and not hmac.compare_digest(auth.caller.encode(), caller.encode()):
            refused = PermissionDenied(Reason.WRONG_CALLER, "the launch was authorised for another caller")
            self.store.append_audit(
                replace(event, outcome="refused", reason=refused.reason, detail=refused.detail)
            )
            raise refused
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
