"""The owner's administration: workloads and their secrets, reference value imports, the session list,
the audit log and session revocation. A part of `OwnerCore` (which mixes it in), apart from the launch
decisions so each reads in one sitting; the same rules hold: validate first, audit every change.
"""

from __future__ import annotations

import functools
import logging
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
from owner_svc.core.ports import Sealer, Store
from owner_svc.core.reasons import Reason
from owner_svc.core.refset import ReferenceValueSet
from sevlaunch.audit import MAX_PAGE, Checkpoint
from sevlaunch.errors import FailedPrecondition, InvalidArgument, NotFound
from sevlaunch.refvalues import VerifiedManifest
from sevlaunch.sev import secret as sev_secret
from sevlaunch.sev.errors import MalformedInput, Unsupported, VerificationFailed
from sevlaunch.sev.policy import GuestPolicy

log = logging.getLogger("owner_svc.core")

#: Audit sequence numbers are signed 64-bit integers in SQLite and PostgreSQL.
MAX_SEQ = 2**63 - 1


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
