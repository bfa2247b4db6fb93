"""Row mapping shared by the SQLite and PostgreSQL stores: both keep the same columns in the same order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from owner_svc.core.audit import parse_canonical
from owner_svc.core.model import AuditRecord, SessionRecord, SessionState


def session_from_row(row: Sequence[Any]) -> SessionRecord:
    (
        sid,
        wid,
        caller,
        policy,
        generation,
        cek,
        godh,
        blob,
        sealed,
        created,
        expires,
        state,
        finished,
        digest,
        reason,
    ) = row
    return SessionRecord(
        session_id=str(sid),
        workload_id=str(wid),
        caller=str(caller),
        policy=int(policy),
        generation=str(generation),
        cek_fingerprint=str(cek),
        godh_cert=bytes(godh),
        session_blob=bytes(blob),
        sealed_keys=bytes(sealed),
        created_at=float(created),
        expires_at=float(expires),
        state=SessionState(state),
        finished_at=None if finished is None else float(finished),
        matched_digest=str(digest),
        reason=str(reason),
    )


def audit_record_from_row(row: Sequence[Any]) -> AuditRecord:
    # The event comes from the hashed text itself, so what is shown is what the chain covers.
    _, t, event, _ = parse_canonical(str(row[1]))
    return AuditRecord(
        seq=int(row[0]), time=t, event=event, prev_hash=str(row[2]), hash=str(row[3]), mac=str(row[4])
    )
