"""The guest owner's decisions: open a launch session, release a secret (administration: `admin.py`).

Pure logic over the `Store` and `Sealer` ports: no gRPC, no files. Every input from the host side is
hostile. The order in each call is fixed: first parse and validate (a malformed request raises
INVALID_ARGUMENT and writes nothing, not even an audit record), then decide; every decision, allowed or
refused, is appended to the audit log; refusals raise a typed error whose `reason` the caller sees.

A session releases at most once: the release is an atomic conditional transition OPEN → RELEASED in the
store, and the secret leaves this module only if that transition was ours. A release refused on the
merits (measurement mismatch, policy changed, firmware too old, expired) moves the session to REFUSED, so
the same launch cannot be retried with other evidence.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import NoReturn

from owner_svc.core.admin import OwnerAdmin, SessionView, WorkloadSummary
from owner_svc.core.chaincache import (
    DEFAULT_CAPACITY,
    CachedChain,
    TrustConfig,
    VerifiedChainCache,
    chain_key,
)
from owner_svc.core.metrics import Metrics, NullMetrics
from owner_svc.core.model import (
    AuditEvent,
    SessionRecord,
    SessionState,
    Workload,
    check_policy,
    check_session_id,
    check_workload_id,
    keys_aad,
    secret_aad,
)
from owner_svc.core.ports import Sealer, SealError, Store
from owner_svc.core.reasons import Reason
from owner_svc.core.refset import ReferenceValueSet
from owner_svc.core.snp import OwnerSnp, SnpSettings
from sevlaunch.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
)
from sevlaunch.refvalues import VerifiedManifest
from sevlaunch.sev import secret as sev_secret
from sevlaunch.sev.chain import CertificateChain, Generation, TrustedRoot, verify_chain
from sevlaunch.sev.errors import SevError, Unsupported, VerificationFailed
from sevlaunch.sev.measurement import LaunchMeasurement, verify_measurement
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.session import TransportKeys, create_session

log = logging.getLogger("owner_svc.core")

DEFAULT_SESSION_TTL = 300.0
MAX_SESSION_TTL = 86400.0
#: AMD's generation names. Only a chain that verified against AMD's pinned ARK may carry one.
AMD_GENERATIONS = frozenset(g.value for g in Generation)
#: From API 0.17 the measurement covers the API version and build (PROTOCOL.md; `compute_measure`).
MEASURED_VERSION_API = (0, 17)

__all__ = [
    "ChainInput",
    "Metrics",
    "OpenedSession",
    "OwnerCore",
    "PackagedSecret",
    "SessionView",
    "WorkloadSummary",
]


@dataclass(frozen=True)
class ChainInput:
    """The six certificates as received (raw bytes, hostile until verified)."""

    pdh: bytes
    pek: bytes
    oca: bytes
    cek: bytes
    ask: bytes
    ark: bytes


@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    godh_cert: bytes
    session_blob: bytes
    policy: int
    expires_at: float
    generation: str


@dataclass(frozen=True)
class PackagedSecret:
    """A successful release. With `no_secret` (the workload consents to launching without a secret and
    has none), `header` and `payload` are empty: the measurement matched, nothing is to be injected."""

    header: bytes
    payload: bytes
    matched_digest: bytes
    manifest_id: str
    no_secret: bool = False

    def __repr__(self) -> str:
        return (
            f"PackagedSecret(matched_digest={self.matched_digest.hex()}, manifest_id={self.manifest_id}, "
            f"no_secret={self.no_secret})"
        )


class OwnerCore(OwnerAdmin, OwnerSnp):
    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        refvalues: ReferenceValueSet,
        *,
        extra_roots: Sequence[TrustedRoot] = (),
        session_ttl: float = DEFAULT_SESSION_TTL,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        chain_cache_size: int = DEFAULT_CAPACITY,
        launch_id: Callable[[], str | None] = lambda: None,
        snp: SnpSettings | None = None,
    ) -> None:
        self._launch_id = launch_id
        if not 1 <= session_ttl <= MAX_SESSION_TTL:
            raise ValueError(f"session TTL must be 1..{MAX_SESSION_TTL:.0f} seconds")
        self.store = store
        self.sealer = sealer
        self.refvalues = refvalues
        self._chains = VerifiedChainCache(chain_cache_size)
        self._trust_lock = threading.Lock()
        self._trust = _trust_config(extra_roots)
        self.session_ttl = session_ttl
        self.metrics: Metrics = metrics or NullMetrics()
        self.clock = clock
        #: SEV-SNP (`snp.py`): None when this owner serves no SNP guests.
        self.snp = snp
        # The reference values are a cache of the store's manifests: the generation they were loaded at
        # (None: not loaded yet), and the stored envelopes already logged as failing verification.
        self._refvalues_generation: int | None = None
        self._refvalues_lock = threading.Lock()
        self._refvalues_failed: set[str] = set()

    # ---------------------------------------------------------------------------- trust roots

    @property
    def extra_roots(self) -> tuple[TrustedRoot, ...]:
        return self._trust.extra_roots

    def set_extra_roots(self, extra_roots: Sequence[TrustedRoot]) -> None:
        """Replaces the roots trusted besides AMD's pinned ones (one added, removed or revoked): from the
        next OpenSession on, every chain is verified again under the new set."""
        trust = _trust_config(extra_roots)
        with self._trust_lock:
            self._trust = trust
            # Every key names the configuration it was verified under, so no old entry could match
            # now; clearing frees them at once rather than as they age out.
            self._chains.clear()
        log.info("trust roots replaced", extra={"extra_roots": [r.name for r in trust.extra_roots]})

    def _cached_chain(self, chain_in: ChainInput) -> tuple[CachedChain | None, CertificateChain, _Lookup]:
        """(the cached verification or None, the parsed chain, how to remember a verification).
        Parsing raises on malformed input, before any decision."""
        trust = self._trust
        key = chain_key(
            trust.digest,
            (chain_in.pdh, chain_in.pek, chain_in.oca, chain_in.cek, chain_in.ask, chain_in.ark),
        )
        cached = self._chains.get(key)
        self.metrics.chain_cache(hit=cached is not None)
        if cached is not None:
            return cached, cached.chain, _Lookup(key, trust)
        chain = CertificateChain.from_parts(
            pdh=chain_in.pdh,
            pek=chain_in.pek,
            oca=chain_in.oca,
            cek=chain_in.cek,
            ask=chain_in.ask,
            ark=chain_in.ark,
        )
        return None, chain, _Lookup(key, trust)

    def _verify(self, chain: CertificateChain, lookup: _Lookup) -> CachedChain:
        """Verifies in full against the trust configuration the lookup was made under (raises
        VerificationFailed or Unsupported), and remembers the outcome if that configuration is still
        in force."""
        verified = verify_chain(chain, extra_roots=lookup.trust.extra_roots)
        entry = CachedChain(chain, verified.root_name, verified.generation, verified.cek_fingerprint)
        with self._trust_lock:
            if self._trust is lookup.trust:
                self._chains.put(lookup.key, entry)
        return entry

    # ------------------------------------------------------------------------- reference values

    def sync_reference_values(self) -> None:
        """Brings the in-memory reference values up to the store's: one read of the store's generation
        (bumped by every manifest or revocation stored, by any replica); when it moved, every stored
        envelope is re-verified against this replica's publisher keys and the set replaced. Called
        before each decision that uses reference values, so an import or a revocation through any
        replica counts on every replica from its next call on, without a restart."""
        generation = self.store.refvalues_generation()
        if generation == self._refvalues_generation:
            return
        with self._refvalues_lock:
            if generation == self._refvalues_generation:
                return  # another thread reloaded it meanwhile
            loaded, stored, revoked = self.store.load_refvalues()
            failures = self.refvalues.load(stored, revoked)
            self._refvalues_generation = loaded
            for mid, failure in failures:
                if mid not in self._refvalues_failed:
                    self._refvalues_failed.add(mid)
                    log.warning(
                        "stored reference values do not verify",
                        extra={"manifest": mid, "reason": failure.reason.value},
                    )
            log.info(
                "reference values loaded",
                extra={"generation": loaded, "stored": len(stored), "held": len(self.refvalues.ids())},
            )

    def reference_values_in_force(self) -> list[VerifiedManifest]:
        self.sync_reference_values()
        return self.refvalues.in_force(self._now_dt())

    # ------------------------------------------------------------------------------- OpenSession

    def open_session(self, caller: str, workload_id: str, chain_in: ChainInput, policy: int) -> OpenedSession:
        # 1. Parse: malformed input raises before any decision and writes nothing.
        check_workload_id(workload_id)
        guest_policy = check_policy(policy)
        cached, chain, lookup = self._cached_chain(chain_in)
        # The CEK fingerprint is only an identifier for the audit log here; it is trusted after verification.
        event = AuditEvent(
            actor=caller,
            action="open_session",
            outcome="refused",
            workload_id=workload_id,
            cek_fingerprint=chain.cek.fingerprint(),
            launch_id=self._launch_id() or "",
        )

        def refuse(exc: Exception) -> Exception:
            reason = _reason_of(exc)
            self.store.append_audit(replace(event, reason=reason, detail=_detail_of(exc)))
            self.metrics.session_refused(reason)
            log.info("session refused", extra={"workload": workload_id, "reason": reason, "caller": caller})
            return exc

        # 2. Decide.
        workload = self._workload_or_none(workload_id)
        if workload is None:
            raise refuse(NotFound(Reason.UNKNOWN_WORKLOAD, f"no workload {workload_id!r}"))
        if cached is None:
            # Never seen under this trust configuration (or evicted): verified in full, every link.
            started = time.perf_counter()
            try:
                verified = self._verify(chain, lookup)
            except (VerificationFailed, Unsupported) as exc:
                raise refuse(exc) from None
            finally:
                self.metrics.observe("chain", time.perf_counter() - started)
        else:
            verified = cached
        generation = _generation_of(verified.generation, verified.root_name)
        refusal = _generation_refusal(workload, generation)
        if refusal is not None:
            raise refuse(refusal)
        minimum = workload.firmware_minimum
        for name, cert in (("PDH", chain.pdh), ("PEK", chain.pek)):
            if not minimum.api_ok(cert.api_major, cert.api_minor):
                raise refuse(
                    PermissionDenied(
                        Reason.FIRMWARE_TOO_OLD,
                        f"{name} says API {cert.api_major}.{cert.api_minor}, the workload needs at least "
                        f"{minimum.api_major}.{minimum.api_minor}",
                    )
                )
        refusal = _policy_refusal(workload, policy, guest_policy)
        if refusal is not None:
            raise refuse(refusal)
        self.sync_reference_values()
        if not self.refvalues.accepted(workload, guest_policy, self._now_dt()):
            # Fail before the host spends a launch that could never be verified.
            raise refuse(
                FailedPrecondition(
                    Reason.NO_REFERENCE_VALUES, "no trusted reference value in force matches this workload"
                )
            )
        if self.store.get_secret(workload_id) is None and not workload.allow_launch_without_secret:
            raise refuse(FailedPrecondition(Reason.NO_SECRET, "the workload has no secret to release"))

        # 3. Make the session: fresh GODH, TEK and TIK, wrapped for this PDH only.
        launch = create_session(chain.pdh, guest_policy)
        session_id = secrets.token_hex(16)
        now = self.clock()
        record = SessionRecord(
            session_id=session_id,
            workload_id=workload_id,
            caller=caller,
            policy=policy,
            generation=generation,
            cek_fingerprint=verified.cek_fingerprint,
            godh_cert=launch.godh.to_bytes(),
            session_blob=launch.blob.to_bytes(),
            sealed_keys=self.sealer.seal(launch.keys.tek + launch.keys.tik, keys_aad(session_id)),
            created_at=now,
            expires_at=now + self.session_ttl,
        )
        self.store.insert_session(
            record,
            replace(
                event,
                outcome="allowed",
                session_id=session_id,
                cek_fingerprint=verified.cek_fingerprint,
                detail=f"generation {generation}, policy {policy:#x}",
            ),
        )
        self.metrics.session_opened()
        # Debug, not info: the shell's "rpc" line and the audit record already say it, and a line per
        # decision was a tenth of the owner's CPU in a launch storm (bench/RESULTS.md).
        log.debug(
            "session opened", extra={"workload": workload_id, "generation": generation, "caller": caller}
        )
        return OpenedSession(
            session_id=session_id,
            godh_cert=record.godh_cert,
            session_blob=record.session_blob,
            policy=policy,
            expires_at=record.expires_at,
            generation=generation,
        )

    # ----------------------------------------------------------------------------- ReleaseSecret

    def release_secret(
        self,
        caller: str,
        session_id: str,
        measurement_blob: bytes,
        *,
        api_major: int,
        api_minor: int,
        build_id: int,
        policy: int,
    ) -> PackagedSecret:
        # 1. Parse.
        check_session_id(session_id)
        measurement = LaunchMeasurement.from_bytes(measurement_blob)
        for name, value in (("api_major", api_major), ("api_minor", api_minor), ("build_id", build_id)):
            if not 0 <= value <= 255:
                raise InvalidArgument(Reason.BAD_FIRMWARE_VERSION, f"{name} must be 0..255")
        check_policy(policy, "reported policy")

        # 2. Decide.
        event = AuditEvent(
            actor=caller,
            action="release_secret",
            outcome="refused",
            session_id=session_id,
            launch_id=self._launch_id() or "",
        )
        session = self.store.get_session(session_id)
        if session is None:
            self._refuse_release(event, NotFound(Reason.UNKNOWN_SESSION, "no such session"))
        event = replace(event, workload_id=session.workload_id, cek_fingerprint=session.cek_fingerprint)
        if session.caller != caller:
            # Bound to whoever opened it: another identity with the right role still cannot use it.
            self._refuse_release(
                event, PermissionDenied(Reason.WRONG_CALLER, "the session was opened by another caller")
            )
        if session.state is not SessionState.OPEN:
            reason = {
                SessionState.RELEASED: Reason.SESSION_ALREADY_USED,
                SessionState.REFUSED: Reason.SESSION_REFUSED,
                SessionState.REVOKED: Reason.SESSION_REVOKED,
            }[session.state]
            self._refuse_release(event, FailedPrecondition(reason, f"the session is {session.state.value}"))
        now = self.clock()
        if now >= session.expires_at:
            self._burn(session, event, FailedPrecondition(Reason.SESSION_EXPIRED, "the session has expired"))
        if policy != session.policy:
            self._burn(
                session,
                event,
                PermissionDenied(
                    Reason.POLICY_MISMATCH,
                    f"reported policy {policy:#x} differs from the session's {session.policy:#x}",
                ),
            )
        guest_policy = check_policy(session.policy)
        workload = self._workload_or_none(session.workload_id)
        if workload is None:
            self._burn(
                session, event, FailedPrecondition(Reason.UNKNOWN_WORKLOAD, "the workload no longer exists")
            )
        # The workload's admission rules as they are now, not as they were at open: an admin who
        # tightened the workload (a generation dropped after a CVE, a policy withdrawn) stops the
        # release of sessions already open.
        for refusal in (
            _generation_refusal(workload, session.generation),
            _policy_refusal(workload, session.policy, guest_policy),
        ):
            if refusal is not None:
                self._burn(session, event, refusal)
        if (api_major, api_minor) < MEASURED_VERSION_API and not workload.allow_pre_0_17:
            # Below 0.17 the measurement leaves the API version and build out, so the host could report
            # any; the workload's minimum cannot be enforced. Only an explicit opt-in accepts that.
            self._burn(
                session,
                event,
                PermissionDenied(
                    Reason.FIRMWARE_TOO_OLD,
                    f"firmware API {api_major}.{api_minor} predates 0.17: its version and build are not "
                    "measured (the workload does not allow pre-0.17 firmware)",
                ),
            )
        if not workload.firmware_minimum.ok(
            api_major, api_minor, build_id
        ) or not guest_policy.firmware_allowed(api_major, api_minor):
            self._burn(
                session,
                event,
                PermissionDenied(
                    Reason.FIRMWARE_TOO_OLD,
                    f"firmware {api_major}.{api_minor} build {build_id} is below the minimum",
                ),
            )
        self.sync_reference_values()
        accepted = self.refvalues.accepted(workload, guest_policy, datetime.fromtimestamp(now, UTC))
        if not accepted:
            self._burn(
                session,
                event,
                FailedPrecondition(
                    Reason.NO_REFERENCE_VALUES, "no trusted reference value in force matches this workload"
                ),
            )
        keys = self._open_keys(session)
        started = time.perf_counter()
        try:
            matched = verify_measurement(
                keys.tik,
                measurement,
                api_major=api_major,
                api_minor=api_minor,
                build_id=build_id,
                policy=guest_policy,
                launch_digests=[a.launch_digest for a in accepted],
            )
        except VerificationFailed as exc:
            self._burn(
                session,
                event,
                PermissionDenied(
                    Reason.MEASUREMENT_MISMATCH,
                    f"the measurement matches none of the {len(accepted)} accepted launch digest(s)",
                ),
                cause=exc,
            )
        finally:
            self.metrics.observe("measurement", time.perf_counter() - started)
        manifest_id = next(a.manifest_id for a in accepted if a.launch_digest == matched)
        event = replace(event, digest=matched.hex())
        table = self._secret_table(session, workload, event)
        if table is None:
            # Every check passed, the workload consents to launching without a secret, and has none.
            header_bytes, payload, detail = b"", b"", "no secret"
        else:
            header, payload = sev_secret.package_secret(
                keys, measurement.measure, table.to_bytes(), api_major=api_major, api_minor=api_minor
            )
            header_bytes, detail = header.to_bytes(), f"manifest {manifest_id}"

        # 3. Claim the session; only the caller whose conditional update wins gets the secret.
        won = self.store.finish_session(
            session_id,
            to_state=SessionState.RELEASED,
            now=now,
            require_unexpired=True,
            matched_digest=matched.hex(),
            reason="",
            event=replace(event, outcome="allowed", detail=detail),
        )
        if not won:
            self._refuse_release(
                event, FailedPrecondition(Reason.SESSION_ALREADY_USED, "the session was already used")
            )
        self.metrics.secret_released()
        # Debug for the same reason as "session opened"; refusals stay at info.
        log.debug(
            "secret released",
            extra={"workload": session.workload_id, "caller": caller, "no_secret": table is None},
        )
        return PackagedSecret(header_bytes, payload, bytes(matched), manifest_id, no_secret=table is None)

    def _refuse_release(self, event: AuditEvent, exc: ServiceError) -> NoReturn:
        self.store.append_audit(replace(event, reason=exc.reason, detail=exc.detail))
        self.metrics.release_refused(exc.reason)
        log.info("release refused", extra={"workload": event.workload_id, "reason": exc.reason})
        raise exc

    def _burn(
        self, session: SessionRecord, event: AuditEvent, exc: ServiceError, cause: Exception | None = None
    ) -> NoReturn:
        """Refuses on the merits and retires the session, so the launch cannot be retried."""
        refused = replace(event, reason=exc.reason, detail=exc.detail)
        if not self.store.finish_session(
            session.session_id,
            to_state=SessionState.REFUSED,
            now=self.clock(),
            require_unexpired=False,
            matched_digest="",
            reason=exc.reason,
            event=refused,
        ):
            self.store.append_audit(refused)
        self.metrics.release_refused(exc.reason)
        log.info("release refused", extra={"workload": event.workload_id, "reason": exc.reason})
        raise exc from cause

    def _open_keys(self, session: SessionRecord) -> TransportKeys:
        try:
            raw = self.sealer.open(session.sealed_keys, keys_aad(session.session_id))
        except SealError:
            # Wrong KEK or a tampered row. Never say more to the caller; the operator sees the log.
            log.error("session keys do not open (wrong KEK or tampered database)")
            raise RuntimeError("session keys do not open") from None
        return TransportKeys(raw[:16], raw[16:])

    def _secret_table(
        self, session: SessionRecord, workload: Workload, event: AuditEvent
    ) -> sev_secret.SecretTable | None:
        """The workload's secret table; None when it has none and allows launching without one."""
        sealed = self.store.get_secret(session.workload_id)
        if sealed is None:
            if workload.allow_launch_without_secret:
                return None
            self._burn(session, event, FailedPrecondition(Reason.NO_SECRET, "the workload has no secret"))
        try:
            table = sev_secret.SecretTable.from_bytes(
                self.sealer.open(sealed, secret_aad(session.workload_id))
            )
        except SealError:
            log.error("workload secret does not open (wrong KEK or tampered database)")
            raise RuntimeError("workload secret does not open") from None
        try:
            table.require_fits(workload.secret_area_size)
        except Unsupported as exc:
            self._burn(session, event, FailedPrecondition(Reason.SECRET_TOO_LARGE, exc.detail))
        return table

    # ------------------------------------------------------------------------------------ admin


@dataclass(frozen=True)
class _Lookup:
    """A chain's cache key and the trust configuration it was made under."""

    key: bytes
    trust: TrustConfig


def _trust_config(extra_roots: Sequence[TrustedRoot]) -> TrustConfig:
    for root in extra_roots:
        # An extra root named like an AMD generation would let a workload allowing "milan" accept
        # whatever that root signs: only AMD's own ARK may carry an AMD generation name.
        if root.generation is None and root.name in AMD_GENERATIONS:
            raise ValueError(
                f"extra trust root {root.name!r} is named like an AMD generation but its ARK is not "
                "AMD's: give it another name"
            )
    return TrustConfig.of(extra_roots, AMD_GENERATIONS)


def _generation_of(generation: Generation | None, root_name: str) -> str:
    """The generation a verified chain counts as: AMD's name only for AMD's pinned ARK, else the extra
    root's name (which `OwnerCore` refuses to be an AMD name, checked here again)."""
    if generation is not None:
        return generation.value
    if root_name in AMD_GENERATIONS:
        raise RuntimeError(f"extra root {root_name!r} carries an AMD generation name")
    return root_name


def _generation_refusal(workload: Workload, generation: str) -> ServiceError | None:
    if generation not in workload.generations:
        return PermissionDenied(
            Reason.GENERATION_NOT_ALLOWED,
            f"platform generation {generation!r} is not allowed for this workload",
        )
    return None


def _policy_refusal(workload: Workload, policy: int, guest_policy: GuestPolicy) -> ServiceError | None:
    if policy not in workload.allowed_policies:
        return PermissionDenied(Reason.POLICY_NOT_ALLOWED, f"policy {policy:#x} is not allowed")
    # Checked at every use, not only at PutWorkload: defence against an edited workload row.
    if guest_policy.allows_debug and not workload.allow_debug:
        return PermissionDenied(Reason.POLICY_NOT_ALLOWED, "the policy allows debugging")
    if guest_policy.allows_key_sharing and not workload.allow_key_sharing:
        return PermissionDenied(Reason.POLICY_NOT_ALLOWED, "the policy allows key sharing")
    return None


def _reason_of(exc: Exception) -> str:
    if isinstance(exc, ServiceError):
        return exc.reason
    if isinstance(exc, SevError):
        return exc.reason.value
    return "internal"


def _detail_of(exc: Exception) -> str:
    if isinstance(exc, ServiceError | SevError):
        return exc.detail
    return ""
