"""The owner store's SEV-SNP tables (`owner_svc.core.snp_ports.SnpStore`), for both SQL dialects.

A mixin of `SqlStore`: the same transactions, audit appends and dialect rendering. Single use is the
conditional UPDATE, as for SEV sessions (`WHERE state = 'authorized' ...`, `WHERE used_at IS NULL ...`):
the database's write lock (SQLite) or row lock (PostgreSQL) lets exactly one caller match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from owner_svc.adapters.dialect import Dialect, Tx
from owner_svc.adapters.schema import SNP_AUTHORIZATION_COLUMNS, SNP_KEY_COLUMNS
from owner_svc.core.model import AuditEvent
from owner_svc.core.snp_model import (
    AuthorizationState,
    SnpAuthorization,
    SnpChallengeRecord,
    SnpKeyKind,
    SnpKeyRecord,
)
from owner_svc.core.snp_ports import ChallengeSpend

# Column lists are constants, never input.
_SELECT_AUTH = f"SELECT {SNP_AUTHORIZATION_COLUMNS} FROM snp_authorizations"  # noqa: S608
_INSERT_AUTH = (
    f"INSERT INTO snp_authorizations ({SNP_AUTHORIZATION_COLUMNS}) "  # noqa: S608
    f"VALUES ({', '.join('?' * 19)})"
)
_SELECT_KEYS = f"SELECT {SNP_KEY_COLUMNS} FROM snp_keys WHERE workload_id = ? AND kind = ? ORDER BY version"  # noqa: S608


def _authorization(row: Sequence[Any]) -> SnpAuthorization:
    return SnpAuthorization(
        authorization_id=str(row[0]),
        workload_id=str(row[1]),
        caller=str(row[2]),
        product=str(row[3]),
        policy=int(row[4]),
        vcpus=int(row[5]),
        launch_digest=str(row[6]),
        manifest_id=str(row[7]),
        host_data=str(row[8]),
        id_key_digest=str(row[9]),
        author_key_digest=str(row[10]),
        id_key_version=int(row[11]),
        init_data=bytes(row[12]),
        vek_cert=bytes(row[13]),
        created_at=float(row[14]),
        expires_at=float(row[15]),
        state=AuthorizationState(row[16]),
        finished_at=None if row[17] is None else float(row[17]),
        reason=str(row[18]),
    )


def _key(row: Sequence[Any]) -> SnpKeyRecord:
    return SnpKeyRecord(
        workload_id=str(row[0]),
        kind=SnpKeyKind(row[1]),
        version=int(row[2]),
        public_digest=str(row[3]),
        sealed=bytes(row[4]),
        created_at=float(row[5]),
        retired_at=None if row[6] is None else float(row[6]),
        source=str(row[7]),
    )


class SnpSqlStore:
    """Provided by `SqlStore`: transactions, reads, audit appends, the clock."""

    _d: Dialect
    _q: Callable[[str], str]
    _one: Callable[..., Any]
    _all: Callable[..., list[Any]]
    _write: Callable[[], AbstractContextManager[Tx]]
    _append_audit: Callable[[Tx, AuditEvent], None]

    # --------------------------------------------------------------------------------- keys

    def snp_keys(self, workload_id: str, kind: SnpKeyKind) -> Sequence[SnpKeyRecord]:
        return [_key(r) for r in self._all(_SELECT_KEYS, (workload_id, kind.value))]

    def add_snp_key(self, record: SnpKeyRecord, event: AuditEvent) -> bool:
        with self._write() as tx:
            inserted = tx.execute(
                self._q(
                    f"INSERT INTO snp_keys ({SNP_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
                    "ON CONFLICT (workload_id, kind, version) DO NOTHING"
                ),
                (
                    record.workload_id,
                    record.kind.value,
                    record.version,
                    record.public_digest,
                    record.sealed,
                    record.created_at,
                    record.retired_at,
                    record.source,
                ),
            ).rowcount
            if inserted != 1:
                return False
            tx.execute(
                self._q(
                    "UPDATE snp_keys SET retired_at = ? WHERE workload_id = ? AND kind = ? AND version < ? "
                    "AND retired_at IS NULL"
                ),
                (record.created_at, record.workload_id, record.kind.value, record.version),
            )
            self._append_audit(tx, event)
        return True

    # ------------------------------------------------------------------------ authorisations

    def insert_snp_authorization(self, record: SnpAuthorization, event: AuditEvent) -> None:
        with self._write() as tx:
            tx.execute(
                self._q(_INSERT_AUTH),
                (
                    record.authorization_id,
                    record.workload_id,
                    record.caller,
                    record.product,
                    record.policy,
                    record.vcpus,
                    record.launch_digest,
                    record.manifest_id,
                    record.host_data,
                    record.id_key_digest,
                    record.author_key_digest,
                    record.id_key_version,
                    record.init_data,
                    record.vek_cert,
                    record.created_at,
                    record.expires_at,
                    record.state.value,
                    record.finished_at,
                    record.reason,
                ),
            )
            self._append_audit(tx, event)

    def get_snp_authorization(self, authorization_id: str) -> SnpAuthorization | None:
        row = self._one(_SELECT_AUTH + " WHERE authorization_id = ?", (authorization_id,))
        return None if row is None else _authorization(row)

    def list_snp_authorizations(self, workload_id: str, limit: int) -> Sequence[SnpAuthorization]:
        if workload_id:
            rows = self._all(
                _SELECT_AUTH + " WHERE workload_id = ? ORDER BY created_at DESC LIMIT ?", (workload_id, limit)
            )
        else:
            rows = self._all(_SELECT_AUTH + " ORDER BY created_at DESC LIMIT ?", (limit,))
        return [_authorization(r) for r in rows]

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
        with self._write() as tx:
            moved = tx.execute(
                self._q(
                    "UPDATE snp_authorizations SET state = ?, finished_at = ?, reason = ? "
                    "WHERE authorization_id = ? AND state = 'authorized' AND expires_at > ?"
                ),
                (
                    to_state.value,
                    now,
                    reason,
                    authorization_id,
                    now if require_unexpired else float("-inf"),
                ),
            ).rowcount
            if moved != 1:
                return False
            self._append_audit(tx, event)
        return True

    # ---------------------------------------------------------------------------- challenges

    def insert_snp_challenge(self, record: SnpChallengeRecord, *, max_outstanding: int) -> bool:
        with self._write() as tx:
            # Under the transaction's write lock (SQLite) or the authorisation's row lock (PostgreSQL),
            # so concurrent issuers cannot both see room for one more.
            tx.execute(
                self._q(f"SELECT state FROM snp_authorizations WHERE authorization_id = ?{self._d.lock_row}"),  # noqa: S608
                (record.authorization_id,),
            ).fetchone()
            (outstanding,) = tx.execute(
                self._q(
                    "SELECT count(*) FROM snp_challenges WHERE authorization_id = ? AND used_at IS NULL "
                    "AND expires_at > ?"
                ),
                (record.authorization_id, record.issued_at),
            ).fetchone()
            if int(outstanding) >= max_outstanding:
                return False
            tx.execute(
                self._q(
                    "INSERT INTO snp_challenges (challenge, authorization_id, issued_at, expires_at, "
                    "used_at) VALUES (?, ?, ?, ?, ?)"
                ),
                (record.challenge, record.authorization_id, record.issued_at, record.expires_at, None),
            )
        return True

    def spend_snp_challenge(self, authorization_id: str, challenge: str, now: float) -> ChallengeSpend:
        with self._write() as tx:
            spent = tx.execute(
                self._q(
                    "UPDATE snp_challenges SET used_at = ? WHERE challenge = ? AND authorization_id = ? "
                    "AND used_at IS NULL AND expires_at > ?"
                ),
                (now, challenge, authorization_id, now),
            ).rowcount
            if spent == 1:
                return ChallengeSpend.SPENT
            row = tx.execute(
                self._q("SELECT used_at FROM snp_challenges WHERE challenge = ? AND authorization_id = ?"),
                (challenge, authorization_id),
            ).fetchone()
        if row is None:
            return ChallengeSpend.UNKNOWN
        return ChallengeSpend.REUSED if row[0] is not None else ChallengeSpend.EXPIRED
