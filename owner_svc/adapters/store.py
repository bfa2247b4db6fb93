"""Opens the owner's store from `--db`: a SQLite file by default, PostgreSQL for several replicas.

Where `--db` points is `sevlaunch.ownerdb.parse_location` (shared with `sevlaunch owner audit verify`);
a password belongs in the DSN from a Secret, or in PGPASSWORD / ~/.pgpass. psycopg is imported only for a
PostgreSQL URL, so the SQLite default needs nothing beyond the standard library. Any problem opening the
store is one `StoreConfigError` line naming the file or the server (never a password), no traceback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.core.ports import Store, StoreError
from sevlaunch.audit import Checkpoint
from sevlaunch.errors import ServiceError
from sevlaunch.ownerdb import DatabaseLocationError, is_postgres_url, parse_location
from sevlaunch.rpc.entry import StartupError

if TYPE_CHECKING:
    from owner_svc.adapters.postgres import PostgresStore

__all__ = ["DEFAULT_DB_WAIT", "OwnerStore", "StoreConfigError", "is_postgres_url", "open_store"]


#: Seconds a call waits for a PostgreSQL connection (`--db-wait`): long enough to ride out a server
#: restart or failover, short enough that a client sees UNAVAILABLE and retries elsewhere.
DEFAULT_DB_WAIT = 5.0


class StoreConfigError(StartupError):
    """`--db` names no store this build can open, or the store cannot be opened."""


class OwnerStore(Store, Protocol):
    """A `Store` the server also checks at start and closes at stop."""

    def check_integrity(self, tail: int = ...) -> Checkpoint: ...

    def close(self) -> None: ...


def open_store(
    url_or_path: str | os.PathLike[str],
    *,
    audit_mac_key: bytes | None,
    clock: Callable[[], float] = time.time,
    db_wait: float = DEFAULT_DB_WAIT,
) -> SQLiteStore | PostgresStore:
    """The store `url_or_path` names, migrated to this code's schema. `db_wait`: how long a call waits
    for a PostgreSQL connection before it is UNAVAILABLE (unused for SQLite)."""
    try:
        location = parse_location(url_or_path)
    except DatabaseLocationError as exc:
        raise StoreConfigError(str(exc)) from None
    if location.dsn is not None:
        return _open_postgres(location.dsn, audit_mac_key=audit_mac_key, clock=clock, db_wait=db_wait)
    assert location.path is not None
    try:
        return SQLiteStore(location.path, audit_mac_key=audit_mac_key, clock=clock)
    except StoreError as exc:
        raise StoreConfigError(f"--db {location.path}: {_message(exc)}") from None


def _open_postgres(
    dsn: str, *, audit_mac_key: bytes | None, clock: Callable[[], float], db_wait: float
) -> PostgresStore:
    try:
        import psycopg

        from owner_svc.adapters.postgres import PostgresStore
    except ImportError as exc:
        raise StoreConfigError(
            f"--db is a PostgreSQL URL but {exc.name} is not installed: install sevlaunch[postgres]"
        ) from None
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # psycopg's message would quote the DSN, password included.
        raise StoreConfigError("--db: not a valid PostgreSQL URL") from None
    try:
        return PostgresStore(dsn, audit_mac_key=audit_mac_key, clock=clock, wait_timeout=db_wait)
    except StoreError as exc:
        raise StoreConfigError(_message(exc)) from None


def _message(exc: StoreError) -> str:
    return exc.detail if isinstance(exc, ServiceError) else str(exc)
