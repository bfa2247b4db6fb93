"""The shared store: PostgreSQL, for several owner replicas over one database (`PostgresStore`, the
`SqlStore` over `PostgresDatabase`; same tables and semantics as the SQLite store, see `sqlstore.py`).

Migrations run in one transaction under a transaction-scoped advisory lock, so replicas starting together
apply each exactly once. Writes run under READ COMMITTED: the conditional session UPDATE and the audit
head's `SELECT ... FOR UPDATE` serialise what must be serialised across replicas.

Connections: a small psycopg pool (autocommit connections; writes open explicit transactions), since the
owner calls the store from worker threads. A broken connection is replaced before use. A lost server
surfaces as `StoreUnavailable` (UNAVAILABLE, `store_unavailable`), so a client retries; a release whose
COMMIT outcome was lost is then `session_already_used` on retry, never a second secret.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from owner_svc.adapters.dialect import MIGRATION_LOCK, POSTGRES, Dialect
from owner_svc.adapters.groupcommit import DEFAULT_MAX_BATCH, Job, Outcome
from owner_svc.adapters.schema import SCHEMA_VERSION
from owner_svc.adapters.sqlstore import SqlStore
from owner_svc.core.ports import (
    SchemaError,
    StoreConflict,
    StoreCorrupt,
    StoreError,
    StoreIntegrityError,
    StoreUnavailable,
)
from sevlaunch import dsn as dsn_text

__all__ = [
    "MIGRATION_LOCK",
    "SCHEMA_VERSION",
    "PostgresDatabase",
    "PostgresStore",
    "SchemaError",
    "StoreUnavailable",
    "redact_dsn",
]

_CONFLICT_STATES = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available
_CORRUPT_STATES = {"XX001", "XX002"}  # data corrupted, index corrupted
_UNAVAILABLE_STATES = {"25006"}  # read-only transaction: a failover left us on a standby


def redact_dsn(dsn: str) -> str:
    """The DSN for logs and error messages: only keys known to hold no secret shown (`sevlaunch.dsn`)."""
    return dsn_text.redact_dsn(dsn)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class _Tx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self._conn.execute(sql.encode(), params or None)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(sql.encode(), rows)


class PostgresDatabase:
    dialect: Dialect = POSTGRES

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 16,
        connect_timeout: float = 10.0,
        wait_timeout: float = 5.0,
    ) -> None:
        self.shown = redact_dsn(dsn)
        params = conninfo.conninfo_to_dict(dsn)
        defaults: dict[str, Any] = {"application_name": "sevlaunch-owner"}
        if "connect_timeout" not in params:
            defaults["connect_timeout"] = max(1, round(connect_timeout))
        full = conninfo.make_conninfo(dsn, **{k: v for k, v in defaults.items() if k not in params})
        # One direct connection first: an unreachable server, a wrong password or a missing database
        # fails the start at once with libpq's reason, instead of a pool retrying in the background.
        try:
            psycopg.connect(full, autocommit=True).close()
        except psycopg.OperationalError as exc:
            reason = dsn_text.scrub(_first_line(exc), dsn)
            raise StoreUnavailable(f"cannot connect to PostgreSQL ({self.shown}): {reason}") from None
        self._pool = ConnectionPool(
            full,
            min_size=min_connections,
            max_size=max_connections,
            kwargs={"autocommit": True},
            # A connection broken while idle (server restart, failover) is replaced before use.
            check=ConnectionPool.check_connection,
            # Reconnection attempts back off (1, 2, 4 s ...) only as long as a call waits for a
            # connection; then a new request starts a fresh attempt at once, so the owner serves again
            # within a request of the server's return however long it was gone.
            reconnect_timeout=wait_timeout,
            # How long a call waits for a connection: while the server is gone, UNAVAILABLE after this.
            timeout=wait_timeout,
            name="sevlaunch-owner",
            open=False,
        )
        #: Fault injection for tests: called in every write transaction just before its COMMIT.
        self.before_commit: Callable[[], None] | None = None
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout:
            self._pool.close()
            raise StoreUnavailable(f"cannot connect to PostgreSQL ({self.shown})") from None

    def translate(self, exc: Exception) -> StoreError:
        """The core's error for a psycopg or pool exception; psycopg's own text may name the server or
        quote row values, so only its first line is kept, and for a lost server only its class."""
        state = getattr(exc, "sqlstate", None)
        if isinstance(exc, psycopg.errors.IntegrityError) or state == "P0001":  # P0001: RAISE (triggers)
            return StoreIntegrityError(f"the store refused the write: {_first_line(exc)}")
        if state in _CONFLICT_STATES:
            return StoreConflict("a concurrent transaction on the owner's store won; retry")
        if state in _CORRUPT_STATES:
            return StoreCorrupt(f"PostgreSQL reports damaged data: {_first_line(exc)}")
        if (
            isinstance(exc, PoolTimeout | psycopg.OperationalError | psycopg.InterfaceError)
            or state in _UNAVAILABLE_STATES
        ):
            return StoreUnavailable(f"PostgreSQL unavailable ({self.shown}): {type(exc).__name__}")
        return StoreError(f"PostgreSQL: {type(exc).__name__}: {_first_line(exc)}")

    @contextmanager
    def write(self) -> Iterator[_Tx]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield _Tx(conn)
                if self.before_commit is not None:
                    self.before_commit()
        except (psycopg.Error, PoolTimeout) as exc:
            raise self.translate(exc) from None

    def write_batch(self, jobs: Sequence[Job], *, first: Callable[[_Tx], object]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        try:
            with self._pool.connection() as conn, conn.transaction():
                tx = _Tx(conn)
                first(tx)
                for job in jobs:
                    try:
                        with conn.transaction():  # a savepoint: a failing job is rolled back alone
                            value = job(tx)
                    except Exception as exc:  # the job's caller gets it
                        if conn.broken or isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                            raise  # the connection is gone, and the batch with it
                        outcomes.append(
                            (False, self.translate(exc) if isinstance(exc, psycopg.Error) else exc)
                        )
                    else:
                        outcomes.append((True, value))
                if self.before_commit is not None:
                    self.before_commit()
        except (psycopg.Error, PoolTimeout) as exc:
            raise self.translate(exc) from None
        return outcomes

    @contextmanager
    def read(self, *, snapshot: bool = False) -> Iterator[_Tx]:
        try:
            with self._pool.connection() as conn:
                if not snapshot:
                    yield _Tx(conn)
                    return
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    yield _Tx(conn)
        except (psycopg.Error, PoolTimeout) as exc:
            raise self.translate(exc) from None

    def deferring(self) -> bool:
        return False  # a COMMIT here is a round trip to the server: calls share them (group commit)

    def sync(self) -> None:
        pass  # every COMMIT returned durable (synchronous_commit is the server's to set)

    def check(self) -> None:
        with self.read() as tx:
            tx.execute("SELECT 1")

    def close(self) -> None:
        self._pool.close()


class PostgresStore(SqlStore):
    def __init__(
        self,
        dsn: str,
        *,
        audit_mac_key: bytes | None,
        clock: Callable[[], float] = time.time,
        min_connections: int = 1,
        max_connections: int = 16,
        connect_timeout: float = 10.0,
        wait_timeout: float = 5.0,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        db = PostgresDatabase(
            dsn,
            min_connections=min_connections,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            wait_timeout=wait_timeout,
        )
        super().__init__(db, audit_mac_key=audit_mac_key, clock=clock, max_batch=max_batch)
