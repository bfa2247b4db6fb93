"""What differs between the owner's two SQL databases, and nothing else: placeholders, column types, the
row lock, append-only triggers and where the schema version is kept. The schema (`schema.py`) and every
query (`sqlstore.py`) are written once, against the small `Tx` surface below, and rendered per dialect;
each driver module (`sqlite.py`, `postgres.py`) only connects, runs transactions and turns its driver's
exceptions into the core's `StoreError`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """One connection inside one transaction (or, for plain reads, autocommit): SQL in the dialect's
    own placeholders (see `Dialect.sql`)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


@dataclass(frozen=True)
class AppendOnly:
    """A migration step: `table` refuses UPDATE and DELETE (and TRUNCATE where the database has it)."""

    table: str


@dataclass(frozen=True)
class Dialect:
    name: str
    #: The driver's parameter marker; queries are written with `?` and rendered by `sql()`.
    placeholder: str
    blob: str
    real: str
    int64: str
    #: Appended to the SELECT of the one row every writer serialises on (the audit head).
    lock_row: str
    #: Statements run first in the migration transaction (a lock between replicas, the version table).
    migration_preamble: tuple[str, ...]
    version_query: str

    def sql(self, text: str) -> str:
        """`text` with `?` markers in this dialect's; the queries hold no other `?` (nor `%`)."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def render(self, step: str | AppendOnly) -> list[str]:
        """The statements of a migration step."""
        if isinstance(step, AppendOnly):
            return self._append_only(step.table)
        return [step.format(blob=self.blob, real=self.real, int64=self.int64)]

    def set_version(self, version: int) -> str:
        if self.name == "sqlite":
            return f"PRAGMA user_version = {int(version)}"  # PRAGMA takes no bound parameter
        return (
            "INSERT INTO sevlaunch_owner_schema (id, version) VALUES (1, "  # noqa: S608 - an int
            f"{int(version)}) ON CONFLICT (id) DO UPDATE SET version = excluded.version"
        )

    def _append_only(self, table: str) -> list[str]:
        if self.name == "sqlite":
            return [
                f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                for verb in ("UPDATE", "DELETE")
            ]
        return [
            "CREATE OR REPLACE FUNCTION sevlaunch_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$",
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION sevlaunch_append_only()",
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION sevlaunch_append_only()",
        ]


SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    blob="BLOB",
    real="REAL",
    # Exactly INTEGER: in SQLite only that makes `seq INTEGER PRIMARY KEY` the rowid.
    int64="INTEGER",
    # SQLite has no row locks: BEGIN IMMEDIATE takes the database's write lock for the transaction.
    lock_row="",
    migration_preamble=(),
    version_query="PRAGMA user_version",
)

#: pg_advisory_xact_lock key for migrations: the first 8 bytes of SHA-256("sevlaunch-owner/schema").
MIGRATION_LOCK = 0x439A4D33_94D70FE7

POSTGRES = Dialect(
    name="postgres",
    placeholder="%s",
    blob="BYTEA",
    real="DOUBLE PRECISION",
    int64="BIGINT",
    # Every append, from every replica, waits here until the appending transaction ends.
    lock_row=" FOR UPDATE",
    migration_preamble=(
        # Replicas starting together: the second waits, then finds the schema current.
        f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})",
        "CREATE TABLE IF NOT EXISTS sevlaunch_owner_schema ("
        "id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
    ),
    version_query="SELECT version FROM sevlaunch_owner_schema WHERE id = 1",
)
