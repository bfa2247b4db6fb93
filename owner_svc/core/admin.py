"""The owner's administration: workloads and their secrets (put, list, delete), reference value imports
and revocations, the session list, the audit log and session revocation.
A part of `OwnerCore` (which mixes it in), apart from the launch decisions so each reads in one sitting;
the same rules hold: validate first, audit every change.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from owner_svc.core.metrics import Metrics
from owner_svc.core.model import (
    AuditEvent,
    AuditRecord,
    SecretEntry,
    SessionRecord,
    SessionState,
    SessionStatus,
    Workload,
    check_guid,
    check_session_id,
    check_workload_id,
    secret_aad,
)
from owner_svc.core.ports import Deletion, Revocation, Sealer, Store, WorkloadRow
from owner_svc.core.reasons import Reason
from owner_svc.core.refset import ReferenceValueSet
from sevlaunch.audit import MAX_PAGE, Checkpoint
from sevlaunch.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError
from sevlaunch.refvalues import VerifiedManifest
from sevlaunch.sev import secret as sev_secret
from sevlaunch.sev.errors import MalformedInput, Unsupported, VerificationFailed
from sevlaunch.sev.policy import GuestPolicy

log = logging.getLogger("owner_svc.core")

#: Audit sequence numbers are signed 64-bit integers in SQLite and PostgreSQL.
MAX_SEQ = 2**63 - 1
#: A manifest id is the SHA-256 of its signed payload (`sevlaunch.refvalues.manifest_id`).
MANIFEST_ID_RE = re.compile(r"[0-9a-f]{64}")
#: Manifests one RevokeReferenceValues call may name.
MAX_REVOKE = 100


@dataclass(frozen=True)
class SessionView:
    """A stored session and its state as of the call (EXPIRED for an open one past its expiry)."""

    record: SessionRecord
    status: SessionStatus


@dataclass(frozen=True)
class WorkloadSummary:
    workload: Workload
    has_secret: bool
    accepted_sev: int
    accepted_sev_es: int


@functools.lru_cache(maxsize=256)
def _parsed_workload(config_json: str) -> Workload:
    """A stored workload's configuration, parsed once per exact text: every OpenSession and release
    reads the row again (another replica may have changed it), but the same text parses to the same
    immutable `Workload`."""
    return Workload.from_json(config_json)


class OwnerAdmin:
    """The admin calls of `OwnerCore`, which provides these attributes and `sync_reference_values`."""

    store: Store
    sealer: Sealer
    refvalues: ReferenceValueSet
    clock: Callable[[], float]
    metrics: Metrics

    def sync_reference_values(self) -> None:
        raise NotImplementedError

    def _now_dt(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _workload_or_none(self, workload_id: str) -> Workload | None:
        text = self.store.get_workload(workload_id)
        return None if text is None else _parsed_workload(text)

    def get_workload(self, workload_id: str) -> Workload:
        check_workload_id(workload_id)
        workload = self._workload_or_none(workload_id)
        if workload is None:
            raise NotFound(Reason.UNKNOWN_WORKLOAD, f"no workload {workload_id!r}")
        return workload

    def workload_summary(self, workload_id: str) -> WorkloadSummary:
        """The workload, whether it has a secret, and how many launch digests in force it accepts now
        for a SEV and a SEV-ES launch (under the plain policies 0x3 and 0x7)."""
        workload = self.get_workload(workload_id)
        self.sync_reference_values()
        now = self._now_dt()
        return WorkloadSummary(
            workload=workload,
            has_secret=self.store.get_secret(workload.workload_id) is not None,
            accepted_sev=len(self.refvalues.accepted(workload, GuestPolicy(0x3), now)),
            accepted_sev_es=len(self.refvalues.accepted(workload, GuestPolicy(0x7), now)),
        )

    def put_workload(self, caller: str, workload: Workload) -> None:
        # `workload` validated itself on construction; a secret already stored must still fit.
        sealed = self.store.get_secret(workload.workload_id)
        if sealed is not None:
            table = sev_secret.SecretTable.from_bytes(
                self.sealer.open(sealed, secret_aad(workload.workload_id))
            )
            try:
                table.require_fits(workload.secret_area_size)
            except Unsupported as exc:
                raise InvalidArgument(Reason.SECRET_TOO_LARGE, exc.detail) from None
        self.store.put_workload(
            workload.workload_id,
            workload.to_json(),
            AuditEvent(
                actor=caller,
                action="put_workload",
                outcome="allowed",
                workload_id=workload.workload_id,
                detail=f"policies {[hex(p) for p in workload.allowed_policies]}, "
                f"generations {list(workload.generations)}",
            ),
        )

    def put_secret(self, caller: str, workload_id: str, entries: Sequence[tuple[str, bytes]]) -> int:
        """Replaces the workload's secret table; returns its padded size. Never audits the bytes."""
        check_workload_id(workload_id)
        if not entries:
            raise InvalidArgument(Reason.BAD_SECRET, "a secret table needs at least one entry")
        if len(entries) > 64:
            raise InvalidArgument(Reason.BAD_SECRET, "at most 64 secret entries")
        parsed = []
        for guid, data in entries:
            if not data:
                raise InvalidArgument(Reason.BAD_SECRET, "a secret entry cannot be empty")
            parsed.append(SecretEntry(check_guid(guid), data))
        try:
            table = sev_secret.SecretTable.of([sev_secret.SecretEntry(e.guid, e.data) for e in parsed])
        except MalformedInput as exc:
            raise InvalidArgument(Reason.BAD_SECRET, exc.detail) from None
        workload = self.get_workload(workload_id)
        try:
            table.require_fits(workload.secret_area_size)
        except Unsupported as exc:
            raise InvalidArgument(Reason.SECRET_TOO_LARGE, exc.detail) from None
        plain = table.to_bytes()
        self.store.put_secret(
            workload_id,
            self.sealer.seal(plain, secret_aad(workload_id)),
            AuditEvent(
                actor=caller,
                action="put_secret",
                outcome="allowed",
                workload_id=workload_id,
                detail=f"{len(parsed)} entries: {', '.join(str(e.guid) for e in parsed)}",
            ),
        )
        return len(plain)

    def import_reference_values(
        self, caller: str, envelope: bytes, source: str
    ) -> tuple[VerifiedManifest, bool]:
        """Verifies and stores a manifest envelope. Returns (manifest, newly imported)."""
        event = AuditEvent(actor=caller, action="import_reference_values", outcome="refused", detail=source)
        self.sync_reference_values()  # revocations and manifests another replica stored count here too
        try:
            vm = self.refvalues.verify(envelope, self._now_dt())
        except VerificationFailed as exc:
            self.store.append_audit(replace(event, reason=exc.reason.value, detail=f"{source}: {exc.detail}"))
            raise
        if self.refvalues.contains(vm.id):
            return vm, False
        self.store.put_manifest(
            vm.id,
            envelope,
            source,
            replace(
                event,
                outcome="allowed",
                digest=vm.id,
                detail=f"{source}: {vm.manifest.publisher} {vm.manifest.firmware_name} "
                f"{vm.manifest.firmware_version}, {len(vm.manifest.digests)} digests",
            ),
            revokes=vm.manifest.revokes,
        )
        # In force here at once; the generation it bumped makes the next call reload (a no-op change).
        self.refvalues.admit(vm)
        return vm, True

    def list_sessions(self, workload_id: str, limit: int) -> list[SessionView]:
        """The newest sessions (of one workload, or all), each with its state as of now: an OPEN session
        past its expiry shows as EXPIRED."""
        if workload_id:
            check_workload_id(workload_id)
        # At most MAX_PAGE a reply (owner.proto): refused, not clamped, so a caller never mistakes a
        # short page for the end.
        if not 0 <= limit <= MAX_PAGE:
            raise InvalidArgument(Reason.BAD_LIMIT, f"limit must be 0..{MAX_PAGE}")
        now = self.clock()
        return [SessionView(s, s.status(now)) for s in self.store.list_sessions(workload_id, limit or 100)]

    def list_workloads(self, after_workload_id: str, limit: int) -> Sequence[WorkloadRow]:
        if after_workload_id:
            check_workload_id(after_workload_id)
        if not 0 <= limit <= MAX_PAGE:
            raise InvalidArgument(
                Reason.BAD_LIMIT, f"limit must be 0..{MAX_PAGE}; page with after_workload_id"
            )
        return self.store.list_workloads(after_workload_id, limit or 100, self.clock())

    def delete_workload(self, caller: str, workload_id: str, *, force: bool) -> Deletion:
        """Deletes the workload and its secret (see `_delete`)."""
        return self._delete(caller, workload_id, force=force, secret_only=False)

    def delete_secret(self, caller: str, workload_id: str, *, force: bool) -> Deletion:
        """Deletes the workload's secret table; the workload stays."""
        return self._delete(caller, workload_id, force=force, secret_only=True)

    def _delete(self, caller: str, workload_id: str, *, force: bool, secret_only: bool) -> Deletion:
        """Refused while a session of the workload is open and unexpired: its release would then find no
        workload or no secret, which the launcher would learn only at the end of a launch. With `force`
        those sessions are revoked in the same transaction. Every outcome is audited."""
        check_workload_id(workload_id)
        action = "delete_secret" if secret_only else "delete_workload"
        event = AuditEvent(
            actor=caller,
            action=action,
            outcome="allowed",
            workload_id=workload_id,
            detail="force" if force else "",
        )
        done = self.store.delete_workload(
            workload_id,
            secret_only=secret_only,
            force=force,
            now=self.clock(),
            event=event,
            revoke_event=AuditEvent(
                actor=caller,
                action="revoke_session",
                outcome="allowed",
                workload_id=workload_id,
                detail=f"{action} with force",
            ),
            revoke_snp_event=AuditEvent(
                actor=caller,
                action="revoke_snp_authorization",
                outcome="allowed",
                workload_id=workload_id,
                detail=f"{action} with force",
            ),
        )
        if done.deleted:
            log.info(
                action.replace("_", " "),
                extra={
                    "workload": workload_id,
                    "caller": caller,
                    "revoked_sessions": len(done.revoked),
                    "revoked_snp_authorizations": len(done.revoked_authorizations),
                },
            )
            return done
        refusal: ServiceError
        if not done.found:
            refusal = NotFound(Reason.UNKNOWN_WORKLOAD, f"no workload {workload_id!r}")
        elif secret_only and not done.had_secret:
            refusal = NotFound(Reason.NO_SECRET, f"workload {workload_id!r} has no secret stored")
        else:
            n = len(done.in_use)
            what = ", ".join(
                f"{len(ids)} {name}{'s' if len(ids) != 1 else ''}"
                for ids, name in (
                    (done.open_sessions, "session"),
                    (done.open_authorizations, "SNP authorisation"),
                )
                if ids
            )
            refusal = FailedPrecondition(
                Reason.WORKLOAD_IN_USE,
                f"{what} of workload {workload_id!r} {'are' if n != 1 else 'is'} open "
                f"({', '.join(done.in_use[:3])}{', ...' if n > 3 else ''}): wait until they are released or "
                "expire, revoke them, or set force to revoke them and delete",
                metadata={
                    "open_sessions": str(len(done.open_sessions)),
                    "open_snp_authorizations": str(len(done.open_authorizations)),
                },
            )
        self.store.append_audit(
            replace(event, outcome="refused", reason=refusal.reason, detail=refusal.detail)
        )
        raise refusal

    def revoke_reference_values(self, caller: str, manifest_ids: Sequence[str]) -> Revocation:
        """Revokes stored manifests by id, at once on this replica and on the others at their next
        decision (the store's generation moves). Unknown ids refuse the whole call: a typo must not
        look like a revocation."""
        if not 1 <= len(manifest_ids) <= MAX_REVOKE:
            raise InvalidArgument(Reason.BAD_MANIFEST_ID, f"name 1..{MAX_REVOKE} manifest ids")
        for mid in manifest_ids:
            if not isinstance(mid, str) or not MANIFEST_ID_RE.fullmatch(mid):
                raise InvalidArgument(
                    Reason.BAD_MANIFEST_ID,
                    "a manifest id is 64 lower-case hex digits (the manifest_id of ListReferenceValues)",
                )
        ids = sorted(set(manifest_ids))
        event = AuditEvent(
            actor=caller,
            action="revoke_reference_values",
            outcome="allowed",
            detail=f"manifests {', '.join(ids)}",
        )
        done = self.store.revoke_manifests(ids, f"admin:{caller}", event)
        if done.unknown:
            refusal = NotFound(
                Reason.UNKNOWN_MANIFEST,
                f"no manifest {', '.join(done.unknown)} was imported or revoked here; nothing revoked "
                "(the ids are those of `sevlaunch owner refvalues list`)",
            )
            self.store.append_audit(
                replace(event, outcome="refused", reason=refusal.reason, detail=refusal.detail)
            )
            raise refusal
        self.sync_reference_values()  # out of force here at once
        log.info(
            "reference values revoked",
            extra={"caller": caller, "revoked": list(done.revoked), "already": list(done.already_revoked)},
        )
        return done

    def audit_log(self, after_seq: int, limit: int) -> Sequence[AuditRecord]:
        # seq is a signed 64-bit column in both stores: a larger bound would not even bind.
        if not 0 <= after_seq <= MAX_SEQ or not 0 <= limit <= MAX_PAGE:
            raise InvalidArgument(
                Reason.BAD_LIMIT,
                f"after_seq must be 0..{MAX_SEQ} and limit 0..{MAX_PAGE}; page with after_seq",
            )
        return self.store.audit_records(after_seq, limit or MAX_PAGE)

    def audit_checkpoint(self) -> Checkpoint:
        """Writes the audit head, MACed, where the database cannot reach it: a log line and a metric.
        Whoever later doubts the database checks it with `sevlaunch owner audit verify --checkpoint`."""
        checkpoint = self.store.audit_checkpoint()
        self.metrics.audit_checkpoint(checkpoint.seq, checkpoint.hash, checkpoint.mac)
        log.info(
            "audit checkpoint",
            extra={
                "seq": checkpoint.seq,
                "hash": checkpoint.hash,
                "mac": checkpoint.mac,
                "checkpoint": str(checkpoint),
            },
        )
        return checkpoint

    def revoke_session(self, caller: str, session_id: str) -> None:
        check_session_id(session_id)
        session = self.store.get_session(session_id)
        if session is None:
            raise NotFound(Reason.UNKNOWN_SESSION, "no such session")
        event = AuditEvent(
            actor=caller,
            action="revoke_session",
            outcome="allowed",
            session_id=session_id,
            workload_id=session.workload_id,
            cek_fingerprint=session.cek_fingerprint,
        )
        if not self.store.finish_session(
            session_id,
            to_state=SessionState.REVOKED,
            now=self.clock(),
            require_unexpired=False,
            matched_digest="",
            reason="revoked",
            event=event,
        ):
            raise FailedPrecondition(Reason.SESSION_NOT_OPEN, "the session is no longer open")
