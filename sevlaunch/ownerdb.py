"""The owner's database seen from outside the service: where `--db` points, the KEK file, and the audit
chain stored in the database, read and verified offline.

One module for the three that need it: `sevlaunch owner audit verify`, the demo (which checks the
owner's log after its launches) and owner_svc itself (its `--db` and `--kek-file`). The hash chain's
format is `sevlaunch.audit`; this module knows where the owner keeps it (the `audit` and `audit_head`
tables) and how to read them without the service: a SQLite file opened `mode=ro`, or PostgreSQL in one
`REPEATABLE READ, READ ONLY` transaction, so the records and the head are one snapshot while replicas
append. psycopg (extra `sevlaunch[postgres]`) is imported only for a PostgreSQL URL.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sevlaunch.audit import AuditChainBroken, ChainEntry, Checkpoint, audit_mac_key, verify_chain
from sevlaunch.dsn import redact_params, scrub

KEK_SIZE = 32
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

#: The audit table's columns in the order `ChainEntry` takes them.
AUDIT_COLUMNS = "seq, canonical, prev_hash, hash, mac"
# Constants, never input: the f-string cannot inject anything. The head row is read whole: a database
# from before heads were MACed has no `mac` column there (schema 4 and older).
SELECT_HEAD = "SELECT * FROM audit_head WHERE id = 1"
SELECT_CHAIN = f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq"  # noqa: S608


class KEKFileError(Exception):
    """The KEK file is missing, malformed or too open. The message names the file, never its bytes."""


class DatabaseLocationError(ValueError):
    """`--db` names no store: empty, an unknown URL scheme, or a malformed `sqlite:` URL."""


class AuditDatabaseError(Exception):
    """The owner's database cannot be read, or its audit chain does not verify; one line that says which
    and where (a PostgreSQL DSN shown without its secrets)."""


# ------------------------------------------------------------------------------------------ KEK


def load_kek(path: str | os.PathLike[str], *, create: bool = False) -> bytes:
    """The key-encryption key in `path`: 32 raw bytes, or their base64 on one line. With `create`, makes
    one (0600, never overwriting a file another process created meanwhile) when the file does not
    exist. A file readable by group or others is refused: whoever reads it opens every sealed secret."""
    p = Path(path)
    if not p.exists():
        if not create:
            raise KEKFileError(f"KEK file {p} does not exist (use --create-kek to make one)")
        key = secrets.token_bytes(KEK_SIZE)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return load_kek(p)
        except OSError as exc:
            raise KEKFileError(f"cannot create KEK file {p}: {exc.strerror}") from None
        try:
            os.write(fd, base64.b64encode(key) + b"\n")
        finally:
            os.close(fd)
        return key
    try:
        mode = p.stat().st_mode
        data = p.read_bytes()
    except OSError as exc:
        raise KEKFileError(f"cannot read KEK file {p}: {exc.strerror}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise KEKFileError(f"KEK file {p} is readable by group or others (chmod 600 it)")
    if len(data) == KEK_SIZE:
        return data
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEK_SIZE:
        raise KEKFileError(f"KEK file {p} must hold 32 bytes (raw or base64)")
    return key


# ------------------------------------------------------------------------------------- location


@dataclass(frozen=True)
class DbLocation:
    """A SQLite file (`path`) or a PostgreSQL DSN (`dsn`)."""

    path: Path | None = None
    dsn: str | None = None

    @property
    def is_postgres(self) -> bool:
        return self.dsn is not None


def is_postgres_url(url_or_path: str | os.PathLike[str]) -> bool:
    return isinstance(url_or_path, str) and url_or_path.strip().lower().startswith(POSTGRES_SCHEMES)


def parse_location(url_or_path: str | os.PathLike[str]) -> DbLocation:
    """Where `--db` points:

        owner.db, /var/lib/sevlaunch/owner.db      SQLite (a path)
        sqlite:owner.db, sqlite:///var/lib/x.db     SQLite (explicit; `sqlite:///ABS` is the absolute /ABS)
        postgresql://user@host:5432/db?sslmode=..   PostgreSQL (also postgres://)

    Any other `scheme://` is refused rather than taken for a file name."""
    if isinstance(url_or_path, os.PathLike):
        return DbLocation(path=Path(url_or_path))
    text = url_or_path.strip()
    if not text:
        raise DatabaseLocationError("--db is empty: give a SQLite file or a postgresql:// URL")
    if is_postgres_url(text):
        return DbLocation(dsn=text)
    if text.lower().startswith("sqlite:"):
        path = text[len("sqlite:") :]
        if path.startswith("//"):
            if not path.startswith("///"):
                raise DatabaseLocationError(
                    "a sqlite: URL names a local file: sqlite:///ABSOLUTE or sqlite:RELATIVE"
                )
            path = path[2:]
        if not path:
            raise DatabaseLocationError("sqlite: URL without a file")
        return DbLocation(path=Path(path))
    if _URL_SCHEME.match(text):
        scheme = text.partition("://")[0]
        raise DatabaseLocationError(
            f"--db: unsupported store URL scheme {scheme!r} (a file path, sqlite: or postgresql://)"
        )
    return DbLocation(path=Path(text))


# --------------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class _Check:
    mac_key: bytes | None
    checkpoints: tuple[Checkpoint, ...]


def verify_rows(
    head: dict[str, Any] | None,
    rows: Iterable[Any],
    *,
    mac_key: bytes | None,
    checkpoints: Iterable[Checkpoint] = (),
) -> int:
    """Checks the chain of `rows` (SELECT_CHAIN's) against the `head` row (column name -> value, None
    when absent), the head's MAC and the checkpoints' when `mac_key` is given; returns the record count
    or raises AuditChainBroken. A head at seq 0 means no record yet."""
    return verify_chain(
        (ChainEntry(*row) for row in rows),
        head=None if head is None else (int(head["seq"]), head["hash"]),
        mac_key=mac_key,
        head_mac=None if head is None or "mac" not in head else str(head["mac"]),
        checkpoints=checkpoints,
    )


def verify_audit_db(
    db: str | os.PathLike[str], kek: bytes | None = None, *, checkpoints: Iterable[Checkpoint] = ()
) -> int:
    """Checks the audit chain of an owner database (a SQLite file or a postgresql:// URL): links, hashes
    and the head; with the KEK also every record's MAC and the head's; and that each checkpoint (a head
    the owner logged earlier) is still in the log. Returns the record count or raises
    AuditDatabaseError."""
    try:
        location = parse_location(db)
    except DatabaseLocationError as exc:
        raise AuditDatabaseError(str(exc)) from None
    check = _Check(audit_mac_key(kek) if kek is not None else None, tuple(checkpoints))
    if location.dsn is not None:
        return _verify_postgres(location.dsn, check)
    assert location.path is not None
    return _verify_sqlite(location.path, check)


def _head(cursor: Any) -> dict[str, Any] | None:
    row = cursor.fetchone()
    if row is None:
        return None
    return {d[0]: value for d, value in zip(cursor.description, row, strict=True)}


def _verify_sqlite(path: Path, check: _Check) -> int:
    if not path.is_file():
        raise AuditDatabaseError(f"{path} is not a file")
    # Read-only, so verifying can never change what it verifies; one read transaction, so the records
    # and the head are one snapshot even while the owner appends.
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise AuditDatabaseError(f"{path}: {exc}") from None
    try:
        conn.execute("BEGIN")
        head = _head(conn.execute(SELECT_HEAD))
        rows = conn.execute(SELECT_CHAIN)
        return verify_rows(head, rows, mac_key=check.mac_key, checkpoints=check.checkpoints)
    except AuditChainBroken as exc:
        raise AuditDatabaseError(str(exc)) from None
    except sqlite3.Error as exc:
        raise AuditDatabaseError(f"{path}: {exc}") from None
    finally:
        conn.close()


def _verify_postgres(dsn: str, check: _Check) -> int:
    """One read-only REPEATABLE READ transaction (a snapshot: records and head agree even while replicas
    append), records streamed by a server-side cursor. Errors name the server without the DSN's secrets."""
    try:
        import psycopg
        from psycopg import conninfo
    except ImportError:
        raise AuditDatabaseError(
            "--db is a PostgreSQL URL but psycopg is not installed: install sevlaunch[postgres]"
        ) from None
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise AuditDatabaseError("--db: not a valid PostgreSQL URL") from None  # its text quotes the DSN
    shown = redact_params(params)
    given = dsn
    if "connect_timeout" not in params:
        dsn = conninfo.make_conninfo(dsn, connect_timeout=10)
    try:
        with psycopg.connect(dsn, autocommit=True, application_name="sevlaunch-audit-verify") as conn:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                head = _head(conn.execute(SELECT_HEAD))
                with conn.cursor(name="sevlaunch_audit_verify") as cur:
                    cur.itersize = 2000
                    cur.execute(SELECT_CHAIN)
                    return verify_rows(
                        head, _iterate(cur), mac_key=check.mac_key, checkpoints=check.checkpoints
                    )
    except AuditChainBroken as exc:
        raise AuditDatabaseError(str(exc)) from None
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AuditDatabaseError(f"PostgreSQL ({shown}): {scrub(first, given)}") from None


def _iterate(cursor: Any) -> Iterator[Any]:
    yield from cursor
