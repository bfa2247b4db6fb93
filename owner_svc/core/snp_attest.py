"""The SEV-SNP guest port's decisions (a part of `OwnerCore`, with `snp.py`): a single-use challenge,
then the attestation of a report and the once-only release of the secret sealed to the guest's key.

The guest has no identity: its report is its credential. So a refusal of a report that may not be this
launch's own (unsigned by a trusted VEK, another HOST_DATA, a REPORT_DATA that binds no challenge issued
for it) leaves the launch able to attest, while a refusal of its own report abandons it (REFUSED), as a
refused SEV release does.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from owner_svc.core.metrics import Metrics
from owner_svc.core.model import AuditEvent, Workload, secret_aad
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
from sevlaunch.refvalues import VerifiedManifest
from sevlaunch.sev import secret as sev_secret
from sevlaunch.sev.errors import MalformedInput, SevError
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
from sevlaunch.snp.certs import CertKind, TrustedRoot
from sevlaunch.snp.challenge import (
    CHALLENGE_SIZE,
    DEFAULT_CHALLENGE_TTL,
    IssuedChallenge,
    check_report_data,
    parse_guest_public_key,
)
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.report import REPORT_SIZE
from sevlaunch.snp.secret_wrap import MAX_SECRET_SIZE, seal
from sevlaunch.snp.tcb import Product

log = logging.getLogger("owner_svc.core")

DEFAULT_AUTHORIZATION_TTL = 3600.0
MAX_AUTHORIZATION_TTL = 86400.0
DEFAULT_MAX_CHALLENGES = 8
MAX_CERT_TABLE_BYTES = 64 * 1024

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
class SnpReleased:
    """The secret table sealed to the guest's key (HPKE); empty with `no_secret`."""

    enc: bytes
    ciphertext: bytes
    measurement: bytes
    manifest_id: str
    no_secret: bool = False

    def __repr__(self) -> str:
        return f"SnpReleased(manifest_id={self.manifest_id}, no_secret={self.no_secret})"


class OwnerSnpAttest(OwnerSnpKeys):
    """Mixed into `OwnerCore` (through `OwnerSnp`), which provides these attributes."""

    store: Store
    sealer: Sealer
    refvalues: ReferenceValueSet
    metrics: Metrics
    clock: Callable[[], float]
    snp: SnpSettings | None
    _launch_id: Callable[[], str | None]  # the caller's x-sevlaunch-launch-id, for audit records

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
            bound = self._bound_to_launch(evidence, expected, attestation_rules, now_dt, auth.vek_cert)
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
        self,
        evidence: Evidence,
        expected: Expected,
        rules: AttestationRules,
        now: datetime,
        authorized_vek: bytes,
    ) -> bool:
        """Whether a refused report is this launch's own: authentic (signed by a VEK of a trusted root),
        its HOST_DATA the authorised one, its REPORT_DATA binding the challenge just spent and the key.
        Only such a refusal abandons the launch: anything else may come from anyone on the guest network
        (or be an old report replayed), and must not end a launch it cannot speak for.

        A report signed by the very VEK the launch was authorised with is authentic whatever the
        workload's rules say now: the rules decide whether to release, not who signed. So a workload
        that stopped allowing VLEKs after authorising a VLEK launch refuses that launch's own report,
        and the launch ends (REFUSED) at once instead of waiting out its deadline."""
        if authorized_vek and hmac.compare_digest(evidence.vek, authorized_vek):
            rules = replace(rules, allow_vlek=True)
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


def _chip(verdict: AttestationVerdict) -> str:
    return "" if verdict.vek_kind is CertKind.VLEK else f"hwid:{verdict.report.chip_id.hex()[:32]}"
