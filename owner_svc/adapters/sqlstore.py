"""The owner's store (`owner_svc.core.ports.Store`) over SQL, written once for SQLite and PostgreSQL.

A `Database` (sqlite.py, postgres.py) gives transactions and raises only the core's `StoreError`s; its
`Dialect` renders the schema and these queries. Guarantees, for both:
* Every decision's write and its audit record are one transaction (or one savepoint of a group commit,
  below): nothing is stored without its record, and no record is kept for a write that was rolled back.
* The commit path (a session opened or finished, a refusal's audit record) goes through a group commit
  (`groupcommit.py`): concurrent calls' writes share one transaction and one durable COMMIT, each in its
  own savepoint, and no call returns before the COMMIT of its write.
* A session leaves OPEN by one conditional UPDATE (`WHERE state = 'open' AND expires_at > now`): SQLite's
  write lock, or PostgreSQL's row lock and READ COMMITTED re-check, lets exactly one caller win (within a
  batch, the second finds the row the first already moved).
* "Read the head, append the next record" runs under the head row's lock (SQLite: BEGIN IMMEDIATE;
  PostgreSQL: SELECT ... FOR UPDATE): the chain never forks. The other writers take it last; a group
  commit takes it first, then only session rows, which no other writer locks: no deadlock.
* The head carries a MAC under the audit key. Each append checks it, and that the head has not moved
  back below the highest this process has seen; `check_integrity` (at start) checks the database, the
  head and the chain's tail. A damaged log is `StoreCorrupt`: the owner appends nothing more to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from owner_svc.adapters.dialect import Dialect, Tx
from owner_svc.adapters.groupcommit import DEFAULT_MAX_BATCH, GroupCommit, Job, Outcome
from owner_svc.adapters.rows import audit_record_from_row, session_from_row
from owner_svc.adapters.schema import MIGRATIONS, SCHEMA_VERSION, SESSION_COLUMNS, MacHead, MacWorkloads
from owner_svc.adapters.snpstore import SnpSqlStore
from owner_svc.core.audit import canonical_record
from owner_svc.core.model import AuditEvent, AuditRecord, SessionRecord, SessionState
from owner_svc.core.ports import Deletion, Revocation, SchemaError, StoreCorrupt, WorkloadRow
from sevlaunch.audit import (
    AuditChainBroken,
    ChainEntry,
    Checkpoint,
    head_mac_ok,
    make_head_mac,
    record_hash,
    record_mac,
    verify_chain,
    workload_mac,
    workload_mac_ok,
)
from sevlaunch.ownerdb import AUDIT_COLUMNS

#: How many of the newest records the check at start verifies against the head.
DEFAULT_TAIL = 1000
RECOVERY = (
    "the owner will not serve on it. Stop every replica, keep this database for inspection, and restore "
    "the newest backup that `sevlaunch owner audit verify --db DB --kek-file KEK --checkpoint SEQ:HASH` "
    "(the last checkpoint the owner logged) passes"
)

# Column lists are constants, never input: the f-strings below cannot inject anything.
_SELECT_SESSIONS = f"SELECT {SESSION_COLUMNS} FROM sessions"  # noqa: S608
_INSERT_SESSION = f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ({', '.join('?' * 15)})"  # noqa: S608
_SELECT_AUDIT = f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?"  # noqa: S608

T = TypeVar("T")


class Database(Protocol):
    dialect: Dialect

    def write(self) -> AbstractContextManager[Tx]:
        """One write transaction: committed on exit, rolled back whole on any exception."""
        ...

    def read(self, *, snapshot: bool = False) -> AbstractContextManager[Tx]:
        """Reads; with `snapshot`, all in one consistent snapshot."""
        ...

    def write_batch(self, jobs: Sequence[Job], *, first: Callable[[Tx], object]) -> list[Outcome]:
        """One write transaction for several jobs: `first`, then each job in its own savepoint (a job
        that raises is rolled back alone; its outcome is its error, as a StoreError where it came from
        the driver), then one COMMIT. Raises a StoreError, with nothing committed (or the outcome of a
        lost COMMIT unknown), when the transaction as a whole failed."""
        ...

    def close(self) -> None: ...

    def deferring(self) -> bool:
        """Whether a write now commits at once and the caller awaits its durability later
        (`walflush.run_deferred`); then it need not queue for a group commit."""
        ...

    def sync(self) -> None:
        """Returns once every write committed so far is durable (a no-op where COMMIT already is)."""
        ...

    def check(self) -> None:
        """The database's own consistency check (SQLite: quick_check); raises StoreCorrupt."""
        ...


class AuditLogDamaged(StoreCorrupt):
    """The audit log does not verify against its MACed head: cut, rolled back or edited."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the audit log is damaged: {what}; {RECOVERY}")


class SqlStore(SnpSqlStore):
    def __init__(
        self,
        db: Database,
        *,
        audit_mac_key: bytes | None,
        clock: Callable[[], float] = time.time,
        max_batch: int = DEFAULT_MAX_BATCH,
        group_commit: bool = True,
    ) -> None:
        self.db = db
        self._d = db.dialect
        self._audit_mac_key = audit_mac_key
        self._clock = clock
        # The highest head this process wrote or verified: the head never goes below it.
        self._highest_seq = 0
        self._seen_lock = threading.Lock()
        self._verified_workloads: set[tuple[str, str, object]] = set()
        self._local = threading.local()
        try:
            self.migrate()
        except BaseException:
            db.close()
            raise
        # The commit path (sessions and their audit records, refusals' audit records): concurrent
        # calls' writes share one transaction and one durable COMMIT (groupcommit.py). Without it, or for
        # a deferred call (SQLite's hot path, walflush.py), a write commits on its caller's thread.
        self._group = GroupCommit(self._run_batch, max_batch=max_batch) if group_commit else None

    def _q(self, sql: str) -> str:
        return self._d.sql(sql)

    def _one(self, sql: str, params: Sequence[object] = ()) -> Any:
        with self.db.read() as tx:
            return tx.execute(self._q(sql), params).fetchone()

    def _all(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        with self.db.read() as tx:
            return tx.execute(self._q(sql), params).fetchall()

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
        self.db.close()

    @property
    def group_commit(self) -> GroupCommit | None:
        return self._group

    def _run_batch(self, jobs: Sequence[Job]) -> list[Outcome]:
        # The audit head's row lock first: every batch appends, and taking it before any session row
        # keeps one lock order between batches of several replicas (no deadlock).
        return self.db.write_batch(jobs, first=lambda tx: self._read_head(tx, lock=True))

    def _commit(self, write: Callable[[Tx], T]) -> T:
        """Runs `write` in the next group commit, or at once on this thread when there is none or the
        call is deferred; returns once it is durable (deferred: once committed, its coroutine awaits the
        rest). Notes the audit head it reached only then, as `_write` does."""
        if self._group is None or self.db.deferring():
            # Committed now on this thread (and, deferred, awaited before the reply): no queue, no hand-off.
            with self._write() as tx:
                return write(tx)

        def job(tx: Tx) -> tuple[T, int]:
            self._local.appended = 0
            result = write(tx)
            return result, self._local.appended

        result, appended = self._group.submit(job)
        if appended:
            self._saw(appended)
        return result

    # ------------------------------------------------------------------------------- schema

    def schema_version(self) -> int:
        row = self._one(self._d.version_query)
        return 0 if row is None else int(row[0])

    def migrate(self) -> None:
        with self.db.write() as tx:
            for statement in self._d.migration_preamble:
                tx.execute(statement)
            row = tx.execute(self._d.version_query).fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise SchemaError(f"database schema {version} is newer than this code's {SCHEMA_VERSION}")
            for target in range(version, SCHEMA_VERSION):
                for step in MIGRATIONS[target]:
                    if isinstance(step, MacHead):
                        self._mac_head(tx)
                        continue
                    if isinstance(step, MacWorkloads):
                        self._mac_workloads(tx)
                        continue
                    for statement in self._d.render(step):
                        tx.execute(statement)
            if version < SCHEMA_VERSION:
                tx.execute(self._d.set_version(SCHEMA_VERSION))

    # ---------------------------------------------------------------------------- audit log

    @contextmanager
    def _write(self) -> Iterator[Tx]:
        """`db.write()`, noting the head an append in it reached once (and only if) it committed."""
        self._local.appended = 0
        with self.db.write() as tx:
            yield tx
        if self._local.appended:
            self._saw(self._local.appended)

    def _saw(self, seq: int) -> None:
        with self._seen_lock:
            self._highest_seq = max(self._highest_seq, seq)

    def _read_head(self, tx: Tx, *, lock: bool = False) -> tuple[int, str, str]:
        suffix = self._d.lock_row if lock else ""
        row = tx.execute(f"SELECT seq, hash, mac FROM audit_head WHERE id = 1{suffix}").fetchone()  # noqa: S608
        if row is None:
            raise AuditLogDamaged("the audit head row is missing")
        return int(row[0]), str(row[1]), str(row[2])

    def _check_head(self, seq: int, digest: str, mac: str) -> None:
        if self._audit_mac_key is not None and not head_mac_ok(self._audit_mac_key, seq, digest, mac):
            raise AuditLogDamaged(
                f"the head (record {seq}) carries no valid MAC: it was moved or rewritten without the KEK"
            )
        if seq < self._highest_seq:
            raise AuditLogDamaged(f"the head moved back from record {self._highest_seq} to {seq}")

    def _mac_head(self, tx: Tx) -> None:
        if self._audit_mac_key is None:
            return
        seq, digest, _ = self._read_head(tx, lock=True)
        mac = make_head_mac(self._audit_mac_key, seq, digest)
        tx.execute(self._q("UPDATE audit_head SET mac = ? WHERE id = 1"), (mac,))

    def _mac_workloads(self, tx: Tx) -> None:
        if self._audit_mac_key is None:
            return
        for workload_id, config_json in tx.execute(
            "SELECT workload_id, config_json FROM workloads"
        ).fetchall():
            tx.execute(
                self._q("UPDATE workloads SET mac = ? WHERE workload_id = ?"),
                (workload_mac(self._audit_mac_key, str(workload_id), str(config_json)), workload_id),
            )

    def _append_audit(self, tx: Tx, event: AuditEvent) -> None:
        head_seq, prev, head_mac = self._read_head(tx, lock=True)
        self._check_head(head_seq, prev, head_mac)
        seq = head_seq + 1
        canonical = canonical_record(seq, self._clock(), event, prev)
        digest = record_hash(canonical)
        key = self._audit_mac_key
        tx.execute(
            self._q("INSERT INTO audit (seq, canonical, prev_hash, hash, mac) VALUES (?, ?, ?, ?, ?)"),
            (seq, canonical, prev, digest, record_mac(key, digest) if key is not None else ""),
        )
        tx.execute(
            self._q("UPDATE audit_head SET seq = ?, hash = ?, mac = ? WHERE id = 1"),
            (seq, digest, make_head_mac(key, seq, digest) if key is not None else ""),
        )
        self._local.appended = seq

    def audit_checkpoint(self) -> Checkpoint:
        """The head as it stands, its MAC checked: what the owner logs so it can be checked later."""
        with self.db.read() as tx:
            seq, digest, mac = self._read_head(tx)
        # Logged and exported: it must never name a head that a crash could still take back, whichever
        # process wrote it.
        self.db.sync()
        self._check_head(seq, digest, mac)
        self._saw(seq)
        return Checkpoint(seq, digest, mac)

    def check_integrity(self, tail: int = DEFAULT_TAIL) -> Checkpoint:
        """At start: the database's own check, the head's MAC, and the newest `tail` records (links,
        hashes, MACs) up to the head; returns the head. Raises StoreCorrupt (AuditLogDamaged)."""
        self.db.check()
        with self.db.read(snapshot=True) as tx:
            seq, digest, mac = self._read_head(tx)
            newest = tx.execute("SELECT max(seq) FROM audit").fetchone()
            first = max(0, seq - tail)
            rows = tx.execute(
                self._q(f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq >= ? ORDER BY seq"),  # noqa: S608
                (max(1, first),),
            ).fetchall()
        self._check_head(seq, digest, mac)
        if (newest[0] or 0) != seq:
            raise AuditLogDamaged(f"the head says {seq} records, the newest record is {newest[0] or 0}")
        entries = [ChainEntry(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows]
        after = None
        if first >= 1:
            if not entries or entries[0].seq != first:
                raise AuditLogDamaged(f"record {first} is missing")
            after = (first, entries.pop(0).hash)
        try:
            verify_chain(entries, head=(seq, digest), mac_key=self._audit_mac_key, after=after)
        except AuditChainBroken as exc:
            raise AuditLogDamaged(str(exc)) from None
        self._saw(seq)
        return Checkpoint(seq, digest, mac)

    def append_audit(self, event: AuditEvent) -> None:
        self._commit(lambda tx: self._append_audit(tx, event))

    def audit_records(self, after_seq: int, limit: int) -> Sequence[AuditRecord]:
        return [audit_record_from_row(r) for r in self._all(_SELECT_AUDIT, (after_seq, limit))]

    def audit_head(self) -> tuple[int, str] | None:
        """(last seq, its hash), or None before the first record."""
        row = self._one("SELECT seq, hash FROM audit_head WHERE id = 1")
        if row is None or int(row[0]) == 0:
            return None
        return int(row[0]), str(row[1])

    def iter_audit(self, batch: int = 1000) -> Iterator[AuditRecord]:
        after = 0
        while True:
            records = self.audit_records(after, batch)
            yield from records
            if len(records) < batch:
                return
            after = records[-1].seq

    # ---------------------------------------------------------------------------- workloads

    def put_workload(self, workload_id: str, config_json: str, event: AuditEvent) -> None:
        key = self._audit_mac_key
        mac = workload_mac(key, workload_id, config_json) if key is not None else ""
        with self._write() as tx:
            tx.execute(
                self._q(
                    "INSERT INTO workloads (workload_id, config_json, updated_at, mac) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (workload_id) DO UPDATE SET config_json = excluded.config_json, "
                    "updated_at = excluded.updated_at, mac = excluded.mac"
                ),
                (workload_id, config_json, self._clock(), mac),
            )
            self._append_audit(tx, event)

    def get_workload(self, workload_id: str) -> str | None:
        """The workload's configuration; StoreCorrupt when its MAC shows it was written without the KEK."""
        row = self._one("SELECT config_json, mac FROM workloads WHERE workload_id = ?", (workload_id,))
        if row is None:
            return None
        config_json = str(row[0])
        key = self._audit_mac_key
        if key is not None and not self._workload_mac_ok(key, workload_id, config_json, row[1]):
            raise StoreCorrupt(
                f"workload {workload_id!r} was changed outside the owner (its MAC does not verify): "
                "put it again with `sevlaunch owner workload put` once the database is trusted"
            )
        return config_json

    def _workload_mac_ok(self, key: bytes, workload_id: str, config_json: str, mac: object) -> bool:
        # Every OpenSession and release reads its workload's row: a row whose exact (id, text, MAC)
        # verified once verifies again, so it is remembered (bounded; any changed byte is a new entry).
        seen = (workload_id, config_json, mac)
        if seen in self._verified_workloads:
            return True
        if not workload_mac_ok(key, workload_id, config_json, mac):
            return False
        with self._seen_lock:
            if len(self._verified_workloads) >= 256:
                self._verified_workloads.clear()
            self._verified_workloads.add(seen)
        return True

    def put_secret(self, workload_id: str, sealed: bytes, event: AuditEvent) -> None:
        with self._write() as tx:
            tx.execute(
                self._q(
                    "INSERT INTO secrets (workload_id, sealed, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (workload_id) DO UPDATE SET sealed = excluded.sealed, "
                    "updated_at = excluded.updated_at"
                ),
                (workload_id, sealed, self._clock()),
            )
            self._append_audit(tx, event)

    def get_secret(self, workload_id: str) -> bytes | None:
        row = self._one("SELECT sealed FROM secrets WHERE workload_id = ?", (workload_id,))
        return None if row is None else bytes(row[0])

    def list_workloads(self, after_workload_id: str, limit: int, now: float) -> Sequence[WorkloadRow]:
        rows = self._all(
            "SELECT w.workload_id, w.updated_at, "
            "(SELECT count(*) FROM secrets s WHERE s.workload_id = w.workload_id), "
            "(SELECT count(*) FROM sessions x WHERE x.workload_id = w.workload_id "
            "AND x.state = 'open' AND x.expires_at > ?), "
            "(SELECT count(*) FROM snp_authorizations a WHERE a.workload_id = w.workload_id "
            "AND a.state = 'authorized' AND a.expires_at > ?) "
            "FROM workloads w WHERE w.workload_id > ? ORDER BY w.workload_id LIMIT ?",
            (now, now, after_workload_id, limit),
        )
        return [WorkloadRow(str(r[0]), int(r[2]) > 0, int(r[3]) + int(r[4]), float(r[1])) for r in rows]

    def delete_workload(
        self,
        workload_id: str,
        *,
        secret_only: bool,
        force: bool,
        now: float,
        event: AuditEvent,
        revoke_event: AuditEvent,
        revoke_snp_event: AuditEvent,
    ) -> Deletion:
        with self._write() as tx:
            # The workload row is locked first (PostgreSQL), so two deletes of one workload queue here.
            found = tx.execute(
                self._q(f"SELECT 1 FROM workloads WHERE workload_id = ?{self._d.lock_row}"),  # noqa: S608
                (workload_id,),
            ).fetchone()
            if found is None:
                return Deletion(found=False, had_secret=False, open_sessions=())
            had_secret = (
                tx.execute(self._q("SELECT 1 FROM secrets WHERE workload_id = ?"), (workload_id,)).fetchone()
                is not None
            )
            open_now = tuple(
                str(r[0])
                for r in tx.execute(
                    self._q(
                        "SELECT session_id FROM sessions WHERE workload_id = ? AND state = 'open' "
                        "AND expires_at > ? ORDER BY session_id"
                    ),
                    (workload_id, now),
                ).fetchall()
            )
            open_snp = tuple(
                str(r[0])
                for r in tx.execute(
                    self._q(
                        "SELECT authorization_id FROM snp_authorizations WHERE workload_id = ? "
                        "AND state = 'authorized' AND expires_at > ? ORDER BY authorization_id"
                    ),
                    (workload_id, now),
                ).fetchall()
            )
            found_only = Deletion(
                found=True, had_secret=had_secret, open_sessions=open_now, open_authorizations=open_snp
            )
            if (secret_only and not had_secret) or ((open_now or open_snp) and not force):
                return found_only
            # Conditional like every move out of OPEN / AUTHORIZED: a release that won meanwhile keeps
            # its state.
            revoked = [
                sid
                for sid in open_now
                if tx.execute(
                    self._q(
                        "UPDATE sessions SET state = 'revoked', finished_at = ?, reason = 'revoked' "
                        "WHERE session_id = ? AND state = 'open'"
                    ),
                    (now, sid),
                ).rowcount
                == 1
            ]
            revoked_snp = [
                aid
                for aid in open_snp
                if tx.execute(
                    self._q(
                        "UPDATE snp_authorizations SET state = 'revoked', finished_at = ?, "
                        "reason = 'revoked' WHERE authorization_id = ? AND state = 'authorized'"
                    ),
                    (now, aid),
                ).rowcount
                == 1
            ]
            tx.execute(self._q("DELETE FROM secrets WHERE workload_id = ?"), (workload_id,))
            if not secret_only:
                tx.execute(self._q("DELETE FROM workloads WHERE workload_id = ?"), (workload_id,))
            for sid in revoked:
                self._append_audit(tx, replace(revoke_event, session_id=sid))
            for aid in revoked_snp:
                self._append_audit(tx, replace(revoke_snp_event, session_id=aid))
            self._append_audit(tx, event)
        return replace(
            found_only, deleted=True, revoked=tuple(revoked), revoked_authorizations=tuple(revoked_snp)
        )

    # ----------------------------------------------------------------------------- sessions

    def insert_session(self, record: SessionRecord, event: AuditEvent) -> None:
        def write(tx: Tx) -> None:
            tx.execute(
                self._q(_INSERT_SESSION),
                (
                    record.session_id,
                    record.workload_id,
                    record.caller,
                    record.policy,
                    record.generation,
                    record.cek_fingerprint,
                    record.godh_cert,
                    record.session_blob,
                    record.sealed_keys,
                    record.created_at,
                    record.expires_at,
                    record.state.value,
                    record.finished_at,
                    record.matched_digest,
                    record.reason,
                ),
            )
            self._append_audit(tx, event)

        self._commit(write)

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = self._one(_SELECT_SESSIONS + " WHERE session_id = ?", (session_id,))
        return None if row is None else session_from_row(row)

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
        def write(tx: Tx) -> bool:
            # The WHERE clause is the whole guarantee: only an OPEN (and, for a release, unexpired)
            # session moves. Concurrent updaters of the row wait for the first (SQLite's write lock,
            # PostgreSQL's row lock) and then match nothing. Expiry is compared with `now` always; a
            # non-release passes -inf so any expiry qualifies.
            moved = tx.execute(
                self._q(
                    "UPDATE sessions SET state = ?, finished_at = ?, matched_digest = ?, reason = ? "
                    "WHERE session_id = ? AND state = 'open' AND expires_at > ?"
                ),
                (
                    to_state.value,
                    now,
                    matched_digest,
                    reason,
                    session_id,
                    now if require_unexpired else float("-inf"),
                ),
            ).rowcount
            if moved != 1:
                return False
            self._append_audit(tx, event)
            return True

        return self._commit(write)

    def list_sessions(self, workload_id: str, limit: int) -> Sequence[SessionRecord]:
        if workload_id:
            rows = self._all(
                _SELECT_SESSIONS + " WHERE workload_id = ? ORDER BY created_at DESC LIMIT ?",
                (workload_id, limit),
            )
        else:
            rows = self._all(_SELECT_SESSIONS + " ORDER BY created_at DESC LIMIT ?", (limit,))
        return [session_from_row(r) for r in rows]

    # ---------------------------------------------------------------------------- manifests

    def put_manifest(
        self,
        manifest_id: str,
        envelope: bytes,
        source: str,
        event: AuditEvent,
        *,
        revokes: Sequence[str] = (),
    ) -> None:
        with self._write() as tx:
            tx.execute(
                self._q(
                    "INSERT INTO manifests (manifest_id, envelope, source, imported_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (manifest_id) DO NOTHING"
                ),
                (manifest_id, envelope, source, self._clock()),
            )
            self._insert_revocations(tx, revokes, manifest_id)
            # Lock order: the generation row, then the audit head (taken last by every writer).
            self._bump_generation(tx)
            self._append_audit(tx, event)

    def list_manifests(self) -> Sequence[tuple[str, bytes, str]]:
        rows = self._all("SELECT manifest_id, envelope, source FROM manifests ORDER BY imported_at")
        return [(str(r[0]), bytes(r[1]), str(r[2])) for r in rows]

    def add_revocations(self, manifest_ids: Sequence[str], by: str) -> None:
        with self._write() as tx:
            self._insert_revocations(tx, manifest_ids, by)
            self._bump_generation(tx)

    def revoke_manifests(self, manifest_ids: Sequence[str], by: str, event: AuditEvent) -> Revocation:
        wanted = sorted(set(manifest_ids))
        with self._write() as tx:
            stored, revoked = set(), set()
            for mid in wanted:
                if tx.execute(self._q("SELECT 1 FROM manifests WHERE manifest_id = ?"), (mid,)).fetchone():
                    stored.add(mid)
                if tx.execute(
                    self._q("SELECT 1 FROM revoked_manifests WHERE manifest_id = ?"), (mid,)
                ).fetchone():
                    revoked.add(mid)
            unknown = tuple(m for m in wanted if m not in stored and m not in revoked)
            if unknown:
                return Revocation(unknown=unknown)
            new = tuple(m for m in wanted if m not in revoked)
            if new:
                self._insert_revocations(tx, new, by)
                self._bump_generation(tx)
            self._append_audit(tx, event)
        return Revocation(revoked=new, already_revoked=tuple(m for m in wanted if m in revoked))

    def _insert_revocations(self, tx: Tx, manifest_ids: Sequence[str], by: str) -> None:
        if not manifest_ids:
            return
        # Sorted: two transactions inserting overlapping lists take the key locks in one order.
        tx.executemany(
            self._q(
                "INSERT INTO revoked_manifests (manifest_id, revoked_by, revoked_at) "
                "VALUES (?, ?, ?) ON CONFLICT (manifest_id) DO NOTHING"
            ),
            [(mid, by, self._clock()) for mid in sorted(set(manifest_ids))],
        )

    @staticmethod
    def _bump_generation(tx: Tx) -> None:
        tx.execute("UPDATE refvalues_generation SET generation = generation + 1 WHERE id = 1")

    def revoked_manifests(self) -> set[str]:
        return {str(r[0]) for r in self._all("SELECT manifest_id FROM revoked_manifests")}

    def refvalues_generation(self) -> int:
        row = self._one("SELECT generation FROM refvalues_generation WHERE id = 1")
        return 0 if row is None else int(row[0])

    def load_refvalues(self) -> tuple[int, Sequence[tuple[str, bytes]], set[str]]:
        # One snapshot: the generation returned is exactly that of the rows read with it (a write
        # landing meanwhile shows as a newer generation next time).
        with self.db.read(snapshot=True) as tx:
            row = tx.execute("SELECT generation FROM refvalues_generation WHERE id = 1").fetchone()
            rows = tx.execute("SELECT manifest_id, envelope FROM manifests ORDER BY imported_at").fetchall()
            revoked = {str(r[0]) for r in tx.execute("SELECT manifest_id FROM revoked_manifests").fetchall()}
        return (0 if row is None else int(row[0])), [(str(r[0]), bytes(r[1])) for r in rows], revoked
