"""What the core needs from the outside world: a store and a sealer (encryption at rest), and the
store's own error types.

The core seals TEK/TIK and secrets before they reach a store, so no store adapter (SQLite, or PostgreSQL
for replicas) can forget to: a store only ever sees ciphertext bound to its row by the AAD. A store raises
only the `StoreError`s below, never its driver's exceptions, so the core and the tests need not know
which database is behind the port.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from owner_svc.core.model import AuditEvent, AuditRecord, SessionRecord, SessionState
from owner_svc.core.reasons import Reason
from owner_svc.core.snp_ports import SnpStore
from sevlaunch.audit import Checkpoint
from sevlaunch.errors import Aborted, ServiceError, Unavailable


class Sealer(Protocol):
    def seal(self, plaintext: bytes, aad: bytes) -> bytes: ...

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """Raises `SealError` when the ciphertext, the AAD or the key does not match."""
        ...


class SealError(Exception):
    """Sealed data does not open: wrong key, edited ciphertext, or moved to another row."""


class StoreError(Exception):
    """Base of what a store raises. Messages name tables and conditions, never row contents."""


class StoreIntegrityError(StoreError):
    """A write broke a rule of the schema (a duplicate key, a missing workload, an append-only table);
    the transaction was rolled back whole."""


class StoreConflict(StoreError, Aborted):
    """A concurrent transaction won (serialisation failure, deadlock, a lock held too long): nothing was
    written, the call may be retried."""

    def __init__(self, detail: str) -> None:
        Aborted.__init__(self, Reason.STORE_CONFLICT, detail)


class StoreUnavailable(StoreError, Unavailable):
    """The store cannot be reached or cannot write (server down, connection lost, disk full, I/O error):
    nothing was written, or the outcome of a lost COMMIT is unknown; the call may be retried."""

    def __init__(self, detail: str) -> None:
        Unavailable.__init__(self, Reason.STORE_UNAVAILABLE, detail)


class StoreCorrupt(StoreError, ServiceError):
    """The database is damaged: not a database, a failed integrity check, or a missing or edited audit
    head. Serving on it would append to a log that no longer proves anything."""

    def __init__(self, detail: str) -> None:
        ServiceError.__init__(self, Reason.STORE_CORRUPT, detail)


class SchemaError(StoreError):
    """The database was written by a newer version of the owner service."""


class Store(SnpStore, Protocol):
    # Workloads and their secrets (sealed).
    def put_workload(self, workload_id: str, config_json: str, event: AuditEvent) -> None: ...

    def get_workload(self, workload_id: str) -> str | None: ...

    def put_secret(self, workload_id: str, sealed: bytes, event: AuditEvent) -> None: ...

    def get_secret(self, workload_id: str) -> bytes | None: ...

    # Sessions.
    def insert_session(self, record: SessionRecord, event: AuditEvent) -> None: ...

    def get_session(self, session_id: str) -> SessionRecord | None: ...

    def finish_session(
        self,
        session_id: str,
        *,
        to_state: SessionState,
        now: float,
        require_unexpired: bool,
        matched_digest: str,
        reason: str,
        event: AuditEvent,
    ) -> bool:
        """Atomically moves an OPEN session to `to_state` and appends `event`, in one transaction.

        Returns False (and writes nothing) when the session is no longer OPEN, or, with
        `require_unexpired`, when it expired: of concurrent callers exactly one gets True.
        """
        ...

    def list_sessions(self, workload_id: str, limit: int) -> Sequence[SessionRecord]: ...

    # Reference values (signed envelopes, stored as imported; re-verified on load).
    def put_manifest(
        self,
        manifest_id: str,
        envelope: bytes,
        source: str,
        event: AuditEvent,
        *,
        revokes: Sequence[str] = (),
    ) -> None:
        """Stores the envelope and the revocations it carries, bumps the reference value generation and
        appends `event`, in one transaction."""
        ...

    def list_manifests(self) -> Sequence[tuple[str, bytes, str]]: ...

    def add_revocations(self, manifest_ids: Sequence[str], by: str) -> None: ...

    def revoked_manifests(self) -> set[str]: ...

    def refvalues_generation(self) -> int:
        """A counter that grows with every stored manifest or revocation, by any replica: one cheap
        read, so each decision can tell whether its in-memory reference values are still current."""
        ...

    def load_refvalues(self) -> tuple[int, Sequence[tuple[str, bytes]], set[str]]:
        """(generation, [(manifest id, envelope)], revoked ids), read in one snapshot."""
        ...

    # Audit.
    def append_audit(self, event: AuditEvent) -> None: ...

    def audit_records(self, after_seq: int, limit: int) -> Sequence[AuditRecord]: ...

    def audit_checkpoint(self) -> Checkpoint:
        """The audit head (seq, hash, MAC), its MAC checked; raises StoreCorrupt when it does not verify
        or moved back."""
        ...
