"""What the SEV-SNP part of the core needs from the store: its own tables, beside the SEV ones.

Every write that is a decision carries its audit event and commits with it. Keys reach the store only
sealed (the core seals them under the KEK with `snp_key_aad`). Single use is the store's conditional
update, as for SEV sessions: of concurrent callers exactly one gets True.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol

from owner_svc.core.model import AuditEvent
from owner_svc.core.snp_model import (
    AuthorizationState,
    SnpAuthorization,
    SnpChallengeRecord,
    SnpKeyKind,
    SnpKeyRecord,
)


class ChallengeSpend(StrEnum):
    """What spending a challenge found."""

    SPENT = "spent"  # it was issued for this authorisation, unused and unexpired: now used
    UNKNOWN = "unknown"  # never issued (for this authorisation)
    REUSED = "reused"  # already spent
    EXPIRED = "expired"


class SnpStore(Protocol):
    def snp_keys(self, workload_id: str, kind: SnpKeyKind) -> Sequence[SnpKeyRecord]:
        """Every version of the workload's key of `kind`, oldest first (retired ones included)."""
        ...

    def add_snp_key(self, record: SnpKeyRecord, event: AuditEvent) -> bool:
        """Inserts `record` and retires the older versions of its kind, with `event`, in one transaction.
        False (nothing written) when that version exists already: a concurrent caller made it."""
        ...

    def insert_snp_authorization(self, record: SnpAuthorization, event: AuditEvent) -> None: ...

    def get_snp_authorization(self, authorization_id: str) -> SnpAuthorization | None: ...

    def list_snp_authorizations(self, workload_id: str, limit: int) -> Sequence[SnpAuthorization]: ...

    def finish_snp_authorization(
        self,
        authorization_id: str,
        *,
        to_state: AuthorizationState,
        now: float,
        require_unexpired: bool,
        reason: str,
        event: AuditEvent,
    ) -> bool:
        """Moves an AUTHORIZED authorisation to `to_state` and appends `event` in one transaction; False
        (nothing written) when it is no longer AUTHORIZED or, with `require_unexpired`, expired."""
        ...

    def insert_snp_challenge(self, record: SnpChallengeRecord, *, max_outstanding: int) -> bool:
        """Stores a challenge; False (nothing written) when the authorisation already has
        `max_outstanding` unspent, unexpired challenges."""
        ...

    def spend_snp_challenge(self, authorization_id: str, challenge: str, now: float) -> ChallengeSpend:
        """Marks the challenge used if it is this authorisation's, unused and unexpired (one conditional
        update: a challenge is spent once, by one caller)."""
        ...
