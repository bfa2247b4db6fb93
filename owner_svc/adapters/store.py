"""Opens the owner's store from `--db`: a SQLite file by default, PostgreSQL for several replicas.

    owner.db, /var/lib/sevlaunch/owner.db      SQLite (a path)
    sqlite:owner.db, sqlite:///var/lib/x.db     SQLite (explicit; `sqlite:///ABS` is the absolute /ABS)
    postgresql://user@host:5432/db?sslmode=..   PostgreSQL (also postgres://); the password belongs in
                                                the DSN from a Secret, or in PGPASSWORD / ~/.pgpass

Any other `scheme://` is refused rather than taken for a file name. psycopg is imported only for a
PostgreSQL URL, so the SQLite default needs nothing beyond the standard library.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.core.ports import Store
from sevlaunch.rpc.entry import StartupError

if TYPE_CHECKING:
    from owner_svc.adapters.postgres import PostgresStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class StoreConfigError(StartupError):
    """`--db` names no store this build can open."""


class OwnerStore(Store, Protocol):
    """A `Store` the server also lists manifests from at start, and closes at stop."""

    def close(self) -> None: ...


def is_postgres_url(url_or_path: str | os.PathLike[str]) -> bool:
    return isinstance(url_or_path, str) and url_or_path.lower().startswith(POSTGRES_SCHEMES)


def open_store(
    url_or_path: str | os.PathLike[str],
    *,
    audit_mac_key: bytes | None,
    clock: Callable[[], float] = time.time,
) -> SQLiteStore | PostgresStore:
    """The store `url_or_path` names, migrated to this code's schema."""
    if isinstance(url_or_path, os.PathLike):
        return SQLiteStore(Path(url_or_path), audit_mac_key=audit_mac_key, clock=clock)
    text = url_or_path.strip()
    if not text:
        raise StoreConfigError("--db is empty: give a SQLite file or a postgresql:// URL")
    if is_postgres_url(text):
        return _open_postgres(text, audit_mac_key=audit_mac_key, clock=clock)
    if text.lower().startswith("sqlite:"):
        path = text[len("sqlite:") :]
        if path.startswith("//"):
            if not path.startswith("///"):
                raise StoreConfigError(
                    "a sqlite: URL names a local file: sqlite:///ABSOLUTE or sqlite:RELATIVE"
                )
            path = path[2:]
        if not path:
            raise StoreConfigError("sqlite: URL without a file")
        return SQLiteStore(Path(path), audit_mac_key=audit_mac_key, clock=clock)
    if _URL_SCHEME.match(text):
        scheme = text.partition("://")[0]
        raise StoreConfigError(
            f"--db: unsupported store URL scheme {scheme!r} (a file path, sqlite: or postgresql://)"
        )
    return SQLiteStore(Path(text), audit_mac_key=audit_mac_key, clock=clock)


def _open_postgres(dsn: str, *, audit_mac_key: bytes | None, clock: Callable[[], float]) -> PostgresStore:
    try:
        import psycopg

        from owner_svc.adapters.postgres import PostgresStore, StoreUnavailable
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
        return PostgresStore(dsn, audit_mac_key=audit_mac_key, clock=clock)
    except StoreUnavailable as exc:
        raise StoreConfigError(str(exc.detail)) from None
