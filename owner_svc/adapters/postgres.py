"""The shared store: PostgreSQL, for several owner replicas over one database. Same tables and semantics
as `adapters/sqlite.py` (a store only ever sees ciphertext: the core seals TEK/TIK and secrets above it).

Concurrency, between threads of one replica and between replicas:
* Migrations run in one transaction under a transaction-scoped advisory lock, so replicas starting
  together apply each migration exactly once (the second waits, then finds the schema current).
* A session leaves OPEN by one conditional `UPDATE ... WHERE state = 'open' AND expires_at > now
  RETURNING`: under READ COMMITTED a concurrent updater of the same row waits for the first to commit,
  re-checks the WHERE clause against the committed row and matches nothing, so exactly one caller wins.
* The audit chain's "read the head, append the next record" runs under `SELECT ... FOR UPDATE` on the
  single `audit_head` row (created, at seq 0, by the first migration): appends from every replica are
  serialised, in the same transaction as the decision they record, so the chain never forks. Every writer
  takes the head lock last and holds no other lock it could wait for: no deadlock cycle.
* The audit table refuses UPDATE, DELETE and TRUNCATE by trigger; so do `manifests` and
  `revoked_manifests` (a revocation must not be undone by deleting rows).

Connections: a small psycopg pool (autocommit connections; writes open explicit transactions), since the
owner calls the store from worker threads. A lost connection surfaces as UNAVAILABLE, so a client retries;
a release whose COMMIT outcome was lost is then `session_already_used` on retry, never a second secret.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from owner_svc.adapters.rows import audit_record_from_row, session_from_row
from owner_svc.core.audit import canonical_record
from owner_svc.core.model import AuditEvent, AuditRecord, SessionRecord, SessionState
from sevlaunch import dsn as dsn_text
from sevlaunch.audit import record_hash, record_mac
from sevlaunch.errors import Unavailable

# Each entry migrates from version i to i+1: its statements run in order, all migrations in one
# transaction under MIGRATION_LOCK. Types mirror sqlite.py: REAL -> DOUBLE PRECISION, BLOB -> BYTEA.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE workloads (
            workload_id TEXT PRIMARY KEY,
            config_json TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE secrets (
            workload_id TEXT PRIMARY KEY REFERENCES workloads(workload_id),
            sealed BYTEA NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY,
            workload_id TEXT NOT NULL,
            caller TEXT NOT NULL,
            policy BIGINT NOT NULL,
            generation TEXT NOT NULL,
            cek_fingerprint TEXT NOT NULL,
            godh_cert BYTEA NOT NULL,
            session_blob BYTEA NOT NULL,
            sealed_keys BYTEA NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            state TEXT NOT NULL,
            finished_at DOUBLE PRECISION,
            matched_digest TEXT NOT NULL DEFAULT '',
            reason TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX sessions_by_workload ON sessions(workload_id, created_at)",
        "CREATE INDEX sessions_by_created ON sessions(created_at)",
        """CREATE TABLE manifests (
            manifest_id TEXT PRIMARY KEY,
            envelope BYTEA NOT NULL,
            source TEXT NOT NULL,
            imported_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE revoked_manifests (
            manifest_id TEXT PRIMARY KEY,
            revoked_by TEXT NOT NULL,
            revoked_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE audit (
            seq BIGINT PRIMARY KEY,
            canonical TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL,
            mac TEXT NOT NULL
        )""",
        """CREATE FUNCTION sevlaunch_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit is append-only';
        END
        $$""",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
            FOR EACH ROW EXECUTE FUNCTION sevlaunch_audit_append_only()""",
        """CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
            FOR EACH STATEMENT EXECUTE FUNCTION sevlaunch_audit_append_only()""",
        # The head row exists from the start (seq 0: no record yet), so the first append locks it too.
        """CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq BIGINT NOT NULL,
            hash TEXT NOT NULL
        )""",
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, repeat('0', 64))",  # GENESIS
    ),
    # 2: the reference value generation, bumped in the transaction of every manifest or revocation
    # stored, so every replica notices a change made by another (one primary-key read per decision).
    (
        """CREATE TABLE refvalues_generation (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation BIGINT NOT NULL
        )""",
        "INSERT INTO refvalues_generation (id, generation) VALUES (1, 1)",
    ),
    # 3: manifests and revocations are append-only, like the audit: deleting a revoking manifest and
    # its revocation rows would put a revoked (validly signed) manifest back in force on every replica.
    # (`ON CONFLICT DO NOTHING` fires no UPDATE trigger.)
    (
        """CREATE FUNCTION sevlaunch_refvalues_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
        END
        $$""",
        """CREATE TRIGGER manifests_no_update BEFORE UPDATE OR DELETE ON manifests
            FOR EACH ROW EXECUTE FUNCTION sevlaunch_refvalues_append_only()""",
        """CREATE TRIGGER manifests_no_truncate BEFORE TRUNCATE ON manifests
            FOR EACH STATEMENT EXECUTE FUNCTION sevlaunch_refvalues_append_only()""",
        """CREATE TRIGGER revoked_manifests_no_update BEFORE UPDATE OR DELETE ON revoked_manifests
            FOR EACH ROW EXECUTE FUNCTION sevlaunch_refvalues_append_only()""",
        """CREATE TRIGGER revoked_manifests_no_truncate BEFORE TRUNCATE ON revoked_manifests
            FOR EACH STATEMENT EXECUTE FUNCTION sevlaunch_refvalues_append_only()""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

#: pg_advisory_xact_lock key for migrations: the first 8 bytes of SHA-256("sevlaunch-owner/schema"),
#: as a signed 64-bit integer.
MIGRATION_LOCK = 0x439A4D33_94D70FE7

_SESSION_COLUMNS = (
    "session_id, workload_id, caller, policy, generation, cek_fingerprint, godh_cert, session_blob, "
    "sealed_keys, created_at, expires_at, state, finished_at, matched_digest, reason"
)
# Column lists are this module's constants, never input: the f-strings below cannot inject anything.
_SELECT_SESSIONS = f"SELECT {_SESSION_COLUMNS} FROM sessions"  # noqa: S608
_INSERT_SESSION = f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({', '.join(['%s'] * 15)})"  # noqa: S608


class SchemaError(Exception):
    """The database was written by a newer version of the owner service."""


class StoreUnavailable(Unavailable):
    """PostgreSQL cannot be reached (or the connection broke): the request may be retried."""

    def __init__(self, detail: str) -> None:
        super().__init__("store_unavailable", detail)


def redact_dsn(dsn: str) -> str:
    """The DSN for logs and error messages: only keys known to hold no secret shown (`sevlaunch.dsn`)."""
    return dsn_text.redact_dsn(dsn)


class PostgresStore:
    def __init__(
        self,
        dsn: str,
        *,
        audit_mac_key: bytes | None,
        clock: Callable[[], float] = time.time,
        min_connections: int = 1,
        max_connections: int = 16,
        connect_timeout: float = 10.0,
    ) -> None:
        self._dsn_redacted = redact_dsn(dsn)
        self._audit_mac_key = audit_mac_key
        self._clock = clock
        params = conninfo.conninfo_to_dict(dsn)
        defaults: dict[str, Any] = {"application_name": "sevlaunch-owner"}
        if "connect_timeout" not in params:
            defaults["connect_timeout"] = max(1, round(connect_timeout))
        full = conninfo.make_conninfo(dsn, **{k: v for k, v in defaults.items() if k not in params})
        # One direct connection first: an unreachable server, a wrong password or a missing database
        # fails the start at once with libpq's reason, instead of a pool retrying in the background.
        try:
            with psycopg.connect(full, autocommit=True) as conn:
                self._migrate(conn)
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = dsn_text.scrub(reason, dsn)
            raise StoreUnavailable(f"cannot connect to PostgreSQL ({self._dsn_redacted}): {reason}") from None
        self._pool = ConnectionPool(
            full,
            min_size=min_connections,
            max_size=max_connections,
            kwargs={"autocommit": True},
            # A connection broken while idle (server restart, failover) is replaced before use.
            check=ConnectionPool.check_connection,
            timeout=connect_timeout,
            name="sevlaunch-owner",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout:
            self._pool.close()
            raise StoreUnavailable(f"cannot connect to PostgreSQL ({self._dsn_redacted})") from None

    # ------------------------------------------------------------------------------- plumbing

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            # Not psycopg's text: it may name the server; the DSN shown is redacted.
            raise StoreUnavailable(
                f"PostgreSQL unavailable ({self._dsn_redacted}): {type(exc).__name__}"
            ) from exc

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction (READ COMMITTED): committed on exit, rolled back on any exception."""
        with self._conn() as conn, conn.transaction():
            yield conn

    def _read_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._conn() as conn:
            return conn.execute(sql, params).fetchone()

    def _read_all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._conn() as conn:
            return conn.execute(sql, params).fetchall()

    def close(self) -> None:
        self._pool.close()

    def schema_version(self) -> int:
        row = self._read_one("SELECT version FROM sevlaunch_owner_schema WHERE id = 1")
        return 0 if row is None else int(row[0])

    def migrate(self) -> None:
        with self._conn() as conn:
            self._migrate(conn)

    @staticmethod
    def _migrate(conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            # Waits for any other replica migrating now; released at COMMIT/ROLLBACK.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS sevlaunch_owner_schema ("
                "id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
            )
            row = conn.execute("SELECT version FROM sevlaunch_owner_schema WHERE id = 1").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise SchemaError(f"database schema {version} is newer than this code's {SCHEMA_VERSION}")
            for target in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[target]:
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(
                    "INSERT INTO sevlaunch_owner_schema (id, version) VALUES (1, %s) "
                    "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    (SCHEMA_VERSION,),
                )

    # ------------------------------------------------------------------------------ audit log

    def _append_audit(self, conn: psycopg.Connection[Any], event: AuditEvent) -> None:
        # The row lock serialises every append, from every replica, until this transaction ends.
        row = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE").fetchone()
        if row is None:
            raise SchemaError("the audit head row is missing: the audit table was tampered with")
        seq, prev = int(row[0]) + 1, str(row[1])
        canonical = canonical_record(seq, self._clock(), event, prev)
        digest = record_hash(canonical)
        mac = record_mac(self._audit_mac_key, digest) if self._audit_mac_key is not None else ""
        conn.execute(
            "INSERT INTO audit (seq, canonical, prev_hash, hash, mac) VALUES (%s, %s, %s, %s, %s)",
            (seq, canonical, prev, digest, mac),
        )
        conn.execute("UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1", (seq, digest))

    def append_audit(self, event: AuditEvent) -> None:
        with self._write() as conn:
            self._append_audit(conn, event)

    def audit_records(self, after_seq: int, limit: int) -> Sequence[AuditRecord]:
        rows = self._read_all(
            "SELECT seq, canonical, prev_hash, hash, mac FROM audit WHERE seq > %s ORDER BY seq LIMIT %s",
            (after_seq, limit),
        )
        return [audit_record_from_row(r) for r in rows]

    def audit_head(self) -> tuple[int, str] | None:
        """(last seq, its hash), or None before the first record (as in the SQLite store)."""
        row = self._read_one("SELECT seq, hash FROM audit_head WHERE id = 1")
        return None if row is None or int(row[0]) == 0 else (int(row[0]), str(row[1]))

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
                "INSERT INTO workloads (workload_id, config_json, updated_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (workload_id) DO UPDATE SET config_json = excluded.config_json, "
                "updated_at = excluded.updated_at",
                (workload_id, config_json, self._clock()),
            )
            self._append_audit(conn, event)

    def get_workload(self, workload_id: str) -> str | None:
        row = self._read_one("SELECT config_json FROM workloads WHERE workload_id = %s", (workload_id,))
        return None if row is None else str(row[0])

    def put_secret(self, workload_id: str, sealed: bytes, event: AuditEvent) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO secrets (workload_id, sealed, updated_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (workload_id) DO UPDATE SET sealed = excluded.sealed, "
                "updated_at = excluded.updated_at",
                (workload_id, sealed, self._clock()),
            )
            self._append_audit(conn, event)

    def get_secret(self, workload_id: str) -> bytes | None:
        row = self._read_one("SELECT sealed FROM secrets WHERE workload_id = %s", (workload_id,))
        return None if row is None else bytes(row[0])

    # --------------------------------------------------------------------------- sessions

    def insert_session(self, record: SessionRecord, event: AuditEvent) -> None:
        with self._write() as conn:
            conn.execute(
                _INSERT_SESSION,
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
        row = self._read_one(_SELECT_SESSIONS + " WHERE session_id = %s", (session_id,))
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
            # session moves. A concurrent updater blocks on the row lock, then re-evaluates the WHERE
            # clause against the committed row (READ COMMITTED) and moves nothing.
            # Expiry is compared with `now` always; a non-release passes -inf so any expiry qualifies.
            row = conn.execute(
                "UPDATE sessions SET state = %s, finished_at = %s, matched_digest = %s, reason = %s "
                "WHERE session_id = %s AND state = 'open' AND expires_at > %s RETURNING session_id",
                (
                    to_state.value,
                    now,
                    matched_digest,
                    reason,
                    session_id,
                    now if require_unexpired else float("-inf"),
                ),
            ).fetchone()
            if row is None:
                return False
            self._append_audit(conn, event)
        return True

    def list_sessions(self, workload_id: str, limit: int) -> Sequence[SessionRecord]:
        if workload_id:
            rows = self._read_all(
                _SELECT_SESSIONS + " WHERE workload_id = %s ORDER BY created_at DESC LIMIT %s",
                (workload_id, limit),
            )
        else:
            rows = self._read_all(_SELECT_SESSIONS + " ORDER BY created_at DESC LIMIT %s", (limit,))
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
                "INSERT INTO manifests (manifest_id, envelope, source, imported_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (manifest_id) DO NOTHING",
                (manifest_id, envelope, source, self._clock()),
            )
            self._insert_revocations(conn, revokes, manifest_id)
            # Lock order: the generation row, then the audit head (taken last by every writer).
            self._bump_generation(conn)
            self._append_audit(conn, event)

    def list_manifests(self) -> Sequence[tuple[str, bytes, str]]:
        rows = self._read_all("SELECT manifest_id, envelope, source FROM manifests ORDER BY imported_at")
        return [(str(r[0]), bytes(r[1]), str(r[2])) for r in rows]

    def add_revocations(self, manifest_ids: Sequence[str], by: str) -> None:
        with self._write() as conn:
            self._insert_revocations(conn, manifest_ids, by)
            self._bump_generation(conn)

    def _insert_revocations(
        self, conn: psycopg.Connection[Any], manifest_ids: Sequence[str], by: str
    ) -> None:
        if not manifest_ids:
            return
        with conn.cursor() as cur:
            # Sorted: two transactions inserting overlapping lists take the key locks in one order.
            cur.executemany(
                "INSERT INTO revoked_manifests (manifest_id, revoked_by, revoked_at) "
                "VALUES (%s, %s, %s) ON CONFLICT (manifest_id) DO NOTHING",
                [(mid, by, self._clock()) for mid in sorted(set(manifest_ids))],
            )

    @staticmethod
    def _bump_generation(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE refvalues_generation SET generation = generation + 1 WHERE id = 1")

    def revoked_manifests(self) -> set[str]:
        return {str(r[0]) for r in self._read_all("SELECT manifest_id FROM revoked_manifests")}

    def refvalues_generation(self) -> int:
        row = self._read_one("SELECT generation FROM refvalues_generation WHERE id = 1")
        return 0 if row is None else int(row[0])

    def load_refvalues(self) -> tuple[int, Sequence[tuple[str, bytes]], set[str]]:
        with self._conn() as conn, conn.transaction():
            # One snapshot: the generation returned is exactly that of the rows read with it.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = conn.execute("SELECT generation FROM refvalues_generation WHERE id = 1").fetchone()
            rows = conn.execute("SELECT manifest_id, envelope FROM manifests ORDER BY imported_at").fetchall()
            revoked = {
                str(r[0]) for r in conn.execute("SELECT manifest_id FROM revoked_manifests").fetchall()
            }
        return (0 if row is None else int(row[0])), [(str(r[0]), bytes(r[1])) for r in rows], revoked
