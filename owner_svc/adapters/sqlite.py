"""The embedded store: one SQLite file in WAL mode, schema migrations in code.

Concurrency: one connection per thread (SQLite connections are not shared across threads), writers
serialised by a process-wide lock (this process's threads, handed over without SQLite's sleeping busy
handler) and `BEGIN IMMEDIATE` (any other process on the file), so the conditional session update is
atomic and the audit chain's "read the head, append the next record" cannot interleave. The audit
table refuses UPDATE and DELETE by trigger: the log is append-only for anyone using this code, and the
hash chain shows tampering by anyone else. So do `manifests` and `revoked_manifests` (a revocation
must not be undone by deleting rows).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from owner_svc.adapters.rows import audit_record_from_row, session_from_row
from owner_svc.core.audit import canonical_record
from owner_svc.core.model import AuditEvent, AuditRecord, SessionRecord, SessionState
from sevlaunch.audit import GENESIS, record_hash, record_mac
from sevlaunch.files import create_private_sqlite

# Each entry migrates from version i to i+1; applied in order, in one transaction each.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE workloads (
        workload_id TEXT PRIMARY KEY,
        config_json TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE secrets (
        workload_id TEXT PRIMARY KEY REFERENCES workloads(workload_id),
        sealed BLOB NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        workload_id TEXT NOT NULL,
        caller TEXT NOT NULL,
        policy INTEGER NOT NULL,
        generation TEXT NOT NULL,
        cek_fingerprint TEXT NOT NULL,
        godh_cert BLOB NOT NULL,
        session_blob BLOB NOT NULL,
        sealed_keys BLOB NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        state TEXT NOT NULL,
        finished_at REAL,
        matched_digest TEXT NOT NULL DEFAULT '',
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX sessions_by_workload ON sessions(workload_id, created_at);
    CREATE TABLE manifests (
        manifest_id TEXT PRIMARY KEY,
        envelope BLOB NOT NULL,
        source TEXT NOT NULL,
        imported_at REAL NOT NULL
    );
    CREATE TABLE revoked_manifests (
        manifest_id TEXT PRIMARY KEY,
        revoked_by TEXT NOT NULL,
        revoked_at REAL NOT NULL
    );
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        canonical TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        mac TEXT NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    CREATE TABLE audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    """,
    # 2: the reference value generation, bumped in the transaction of every manifest or revocation
    # stored, so an owner sharing the file notices a change made by another process.
    """
    CREATE TABLE refvalues_generation (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        generation INTEGER NOT NULL
    );
    INSERT INTO refvalues_generation (id, generation) VALUES (1, 1);
    """,
    # 3: manifests and revocations are append-only, like the audit: deleting a revoking manifest and
    # its revocation rows would put a revoked (validly signed) manifest back in force on every replica.
    """
    CREATE TRIGGER manifests_no_update BEFORE UPDATE ON manifests
        BEGIN SELECT RAISE(ABORT, 'manifests are append-only'); END;
    CREATE TRIGGER manifests_no_delete BEFORE DELETE ON manifests
        BEGIN SELECT RAISE(ABORT, 'manifests are append-only'); END;
    CREATE TRIGGER revoked_manifests_no_update BEFORE UPDATE ON revoked_manifests
        BEGIN SELECT RAISE(ABORT, 'revocations are append-only'); END;
    CREATE TRIGGER revoked_manifests_no_delete BEFORE DELETE ON revoked_manifests
        BEGIN SELECT RAISE(ABORT, 'revocations are append-only'); END;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_SESSION_COLUMNS = (
    "session_id, workload_id, caller, policy, generation, cek_fingerprint, godh_cert, session_blob, "
    "sealed_keys, created_at, expires_at, state, finished_at, matched_digest, reason"
)
# Column lists are this module's constants, never input: the f-strings below cannot inject anything.
_SELECT_SESSIONS = f"SELECT {_SESSION_COLUMNS} FROM sessions"  # noqa: S608


class SchemaError(Exception):
    """The database was written by a newer version of the owner service."""


class SQLiteStore:
    def __init__(
        self,
        path: str | Path,
        *,
        audit_mac_key: bytes | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = str(path)
        self._audit_mac_key = audit_mac_key
        self._clock = clock
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()
        # Writers of this process queue here, before BEGIN IMMEDIATE: a thread that finds SQLite's write
        # lock taken sleeps in the busy handler (1, 2, 5, 10, ... 100 ms steps) while the lock may already
        # be free, which under 64 concurrent calls left the writer idle much of the time. A Python lock
        # hands over at once; BEGIN IMMEDIATE still serialises against other processes on the file.
        self._write_lock = threading.Lock()
        self.migrate()

    # ------------------------------------------------------------------------------- plumbing

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # The file holds sealed keys and the audit log: 0600, and so its -wal/-shm (SQLite gives them
            # the database's mode).
            create_private_sqlite(self.path)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), never implicit.
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._conn_lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._conn_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def schema_version(self) -> int:
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        with self._write() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise SchemaError(f"database schema {version} is newer than this code's {SCHEMA_VERSION}")
            for target in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[target]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target + 1}")

    # ------------------------------------------------------------------------------ audit log

    def _append_audit(self, conn: sqlite3.Connection, event: AuditEvent) -> None:
        row = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        seq, prev = (int(row[0]) + 1, str(row[1])) if row else (1, GENESIS)
        canonical = canonical_record(seq, self._clock(), event, prev)
        digest = record_hash(canonical)
        mac = record_mac(self._audit_mac_key, digest) if self._audit_mac_key is not None else ""
        conn.execute(
            "INSERT INTO audit (seq, canonical, prev_hash, hash, mac) VALUES (?, ?, ?, ?, ?)",
            (seq, canonical, prev, digest, mac),
        )
        conn.execute(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            (seq, digest),
        )

    def append_audit(self, event: AuditEvent) -> None:
        with self._write() as conn:
            self._append_audit(conn, event)

    def audit_records(self, after_seq: int, limit: int) -> Sequence[AuditRecord]:
        rows = (
            self._conn()
            .execute(
                "SELECT seq, canonical, prev_hash, hash, mac FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            )
            .fetchall()
        )
        return [audit_record_from_row(r) for r in rows]

    def audit_head(self) -> tuple[int, str] | None:
        row = self._conn().execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def iter_audit(self, batch: int = 1000) -> Iterator[AuditRecord]:
        after = 0
        while True:
            records = self.audit_records(after, batch)
            yield from records
            if len(records) < batch:
                return
            after = records[-1].seq

    # ------------------------------------------------------------------------- workloads

    def put_workload(self, workload_id: str, config_json: str, event: AuditEvent) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO workloads (workload_id, config_json, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(workload_id) DO UPDATE SET config_json = excluded.config_json, "
                "updated_at = excluded.updated_at",
                (workload_id, config_json, self._clock()),
            )
            self._append_audit(conn, event)

    def get_workload(self, workload_id: str) -> str | None:
        row = (
            self._conn()
            .execute("SELECT config_json FROM workloads WHERE workload_id = ?", (workload_id,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    def put_secret(self, workload_id: str, sealed: bytes, event: AuditEvent) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO secrets (workload_id, sealed, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(workload_id) DO UPDATE SET sealed = excluded.sealed, "
                "updated_at = excluded.updated_at",
                (workload_id, sealed, self._clock()),
            )
            self._append_audit(conn, event)

    def get_secret(self, workload_id: str) -> bytes | None:
        row = (
            self._conn()
            .execute("SELECT sealed FROM secrets WHERE workload_id = ?", (workload_id,))
            .fetchone()
        )
        return None if row is None else bytes(row[0])

    # --------------------------------------------------------------------------- sessions

    def insert_session(self, record: SessionRecord, event: AuditEvent) -> None:
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({', '.join('?' * 15)})",  # noqa: S608
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
            self._append_audit(conn, event)

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = (
            self._conn()
            .execute(
                _SELECT_SESSIONS + " WHERE session_id = ?",
                (session_id,),
            )
            .fetchone()
        )
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
        with self._write() as conn:
            # The WHERE clause is the whole guarantee: only an OPEN (and, for a release, unexpired)
            # session moves, and SQLite's write lock makes this check-and-set atomic.
            # Expiry is compared with `now` always; a non-release passes -inf so any expiry qualifies.
            cur = conn.execute(
                "UPDATE sessions SET state = ?, finished_at = ?, matched_digest = ?, reason = ? "
                "WHERE session_id = ? AND state = 'open' AND expires_at > ?",
                (
                    to_state.value,
                    now,
                    matched_digest,
                    reason,
                    session_id,
                    now if require_unexpired else float("-inf"),
                ),
            )
            if cur.rowcount != 1:
                return False
            self._append_audit(conn, event)
        return True

    def list_sessions(self, workload_id: str, limit: int) -> Sequence[SessionRecord]:
        if workload_id:
            rows = (
                self._conn()
                .execute(
                    _SELECT_SESSIONS + " WHERE workload_id = ? ORDER BY created_at DESC LIMIT ?",
                    (workload_id, limit),
                )
                .fetchall()
            )
        else:
            rows = (
                self._conn()
                .execute(
                    _SELECT_SESSIONS + " ORDER BY created_at DESC LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )
        return [session_from_row(r) for r in rows]

    # ------------------------------------------------------------------------ manifests

    def put_manifest(
        self,
        manifest_id: str,
        envelope: bytes,
        source: str,
        event: AuditEvent,
        *,
        revokes: Sequence[str] = (),
    ) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO manifests (manifest_id, envelope, source, imported_at) "
                "VALUES (?, ?, ?, ?)",
                (manifest_id, envelope, source, self._clock()),
            )
            self._insert_revocations(conn, revokes, manifest_id)
            self._bump_generation(conn)
            self._append_audit(conn, event)

    def list_manifests(self) -> Sequence[tuple[str, bytes, str]]:
        rows = (
            self._conn()
            .execute("SELECT manifest_id, envelope, source FROM manifests ORDER BY imported_at")
            .fetchall()
        )
        return [(str(r[0]), bytes(r[1]), str(r[2])) for r in rows]

    def add_revocations(self, manifest_ids: Sequence[str], by: str) -> None:
        with self._write() as conn:
            self._insert_revocations(conn, manifest_ids, by)
            self._bump_generation(conn)

    def _insert_revocations(self, conn: sqlite3.Connection, manifest_ids: Sequence[str], by: str) -> None:
        conn.executemany(
            "INSERT OR IGNORE INTO revoked_manifests (manifest_id, revoked_by, revoked_at) VALUES (?, ?, ?)",
            [(mid, by, self._clock()) for mid in sorted(set(manifest_ids))],
        )

    @staticmethod
    def _bump_generation(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE refvalues_generation SET generation = generation + 1 WHERE id = 1")

    def revoked_manifests(self) -> set[str]:
        return {str(r[0]) for r in self._conn().execute("SELECT manifest_id FROM revoked_manifests")}

    def refvalues_generation(self) -> int:
        row = self._conn().execute("SELECT generation FROM refvalues_generation WHERE id = 1").fetchone()
        return 0 if row is None else int(row[0])

    def load_refvalues(self) -> tuple[int, Sequence[tuple[str, bytes]], set[str]]:
        conn = self._conn()
        # One read transaction: in WAL mode its reads are one snapshot, so the generation returned is
        # exactly that of the rows (a write landing meanwhile shows as a newer generation next time).
        conn.execute("BEGIN")
        try:
            row = conn.execute("SELECT generation FROM refvalues_generation WHERE id = 1").fetchone()
            rows = conn.execute("SELECT manifest_id, envelope FROM manifests ORDER BY imported_at").fetchall()
            revoked = {str(r[0]) for r in conn.execute("SELECT manifest_id FROM revoked_manifests")}
        finally:
            conn.execute("COMMIT")
        return (0 if row is None else int(row[0])), [(str(r[0]), bytes(r[1])) for r in rows], revoked


def _statements(script: str) -> list[str]:
    # Split on statement ends, keeping trigger bodies (which hold their own ';') whole.
    out: list[str] = []
    current = ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip():
        out.append(current.strip())
    return out
