"""The launch store in SQLite: `LaunchRecord`s, one row each, committed before every write returns
(WAL, synchronous FULL).

A file that is not a sound launch database (not SQLite, damaged pages, rows that do not decode) is
`CorruptLaunchStore`, never a traceback. `open_launch_store` sets such a file aside, renamed with a
timestamp, and starts on a fresh one; the reconciler then treats the host as after a lost database
(README, "launcher_svc"). Any other failure to open is `LaunchStoreUnusable`: one line, and no start.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime

from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.spec import GuestSpec
from launcher_svc.core.state import (
    PRE_RUNNING,
    LaunchFlow,
    LaunchRecord,
    Phase,
    PhaseChange,
    advanced,
    finished,
)
from sevlaunch.errors import NotFound
from sevlaunch.files import SQLITE_COMPANIONS, create_private_sqlite

log = logging.getLogger("launcher_svc")

# SQLite's primary result codes for a damaged file and for a file that is no database.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


class LaunchStoreUnusable(ValueError):
    """The launch database cannot be used; the message is one line naming the file and what to do."""


class CorruptLaunchStore(LaunchStoreUnusable):
    def __init__(self, path: str, why: str) -> None:
        self.path = path
        self.why = why
        super().__init__(f"the launch database {path} is corrupt: {why}")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS launches (
    launch_id TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    domain_name TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    incarnation TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    deadline REAL,
    failed_phase TEXT,
    reason TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    domain_uuid TEXT NOT NULL DEFAULT '',
    owner_endpoint TEXT NOT NULL DEFAULT '',
    workload_id TEXT NOT NULL DEFAULT '',
    session_id TEXT NOT NULL DEFAULT '',
    measurement BLOB NOT NULL DEFAULT x'',
    secret_waived INTEGER NOT NULL DEFAULT 0,
    authorization_id TEXT NOT NULL DEFAULT '',
    attested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS launches_state ON launches(state);
CREATE UNIQUE INDEX IF NOT EXISTS launches_domain ON launches(domain_name);
"""
# Columns added after the first schema, with their definitions: a database written by an earlier
# launcher gains them at open (its rows take the defaults, which are right for SEV launches).
_ADDED_COLUMNS = {
    "authorization_id": "TEXT NOT NULL DEFAULT ''",
    "attested": "INTEGER NOT NULL DEFAULT 0",
}

_COLUMN_NAMES = (
    "launch_id", "mode", "state", "spec", "domain_name", "requested_by", "incarnation", "created_at",
    "updated_at", "deadline", "failed_phase", "reason", "detail", "domain_uuid", "owner_endpoint",
    "workload_id", "session_id", "measurement", "secret_waived", "authorization_id", "attested",
)  # fmt: skip
_COLUMNS = ", ".join(_COLUMN_NAMES)
# What a launch's progress changes; the rest (id, mode, spec, domain name, caller, creation) is fixed.
_UPDATED = (
    "state", "updated_at", "deadline", "failed_phase", "reason", "detail", "domain_uuid", "owner_endpoint",
    "workload_id", "session_id", "measurement", "secret_waived", "incarnation", "authorization_id",
    "attested",
)  # fmt: skip
_UPDATE_SQL = f"UPDATE launches SET {', '.join(f'{c}=?' for c in _UPDATED)} WHERE launch_id=?"  # noqa: S608


class SqliteLaunchStore:
    """SQLite persistence of `LaunchRecord`s. Every write commits before it returns (WAL, synchronous
    FULL), so a launcher killed at any point restarts knowing which domains it may have left behind."""

    def __init__(self, path: str) -> None:
        """Opens (or creates) the database and checks it is sound; raises `CorruptLaunchStore` if it is
        not, `LaunchStoreUnusable` if it cannot be opened at all, OSError for the file itself."""
        self._lock = threading.Lock()
        self.path = path
        create_private_sqlite(path)  # 0600, and so its -wal/-shm: launch records name owners and sessions
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise LaunchStoreUnusable(f"cannot open the launch database {path}: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._add_columns()
            self._check()
        except sqlite3.Error as exc:
            self._db.close()
            code, text = getattr(exc, "sqlite_errorcode", None), str(exc)
            if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in text or "no such column" in text:
                raise CorruptLaunchStore(path, text) from None
            raise LaunchStoreUnusable(f"cannot use the launch database {path}: {text}") from None
        except CorruptLaunchStore:
            self._db.close()
            raise

    def _add_columns(self) -> None:
        have = {str(row[1]) for row in self._db.execute("PRAGMA table_info(launches)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE launches ADD COLUMN {name} {definition}")

    def _check(self) -> None:
        """SQLite's own check of the file, then every row must decode into a record."""
        (verdict,) = self._db.execute("PRAGMA quick_check(1)").fetchone()
        if verdict != "ok":
            raise CorruptLaunchStore(self.path, f"integrity check: {str(verdict)[:200]}")
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM launches").fetchall()  # noqa: S608 - constants
        for row in rows:
            try:
                self._record(row)
            except (ValueError, KeyError, TypeError, AssertionError) as exc:
                raise CorruptLaunchStore(self.path, f"a launch record does not decode ({exc})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, record: LaunchRecord) -> None:
        values = self._values(record)
        with self._lock:
            self._db.execute(
                f"INSERT INTO launches ({_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMN_NAMES))})",  # noqa: S608 - constants
                tuple(values[c] for c in _COLUMN_NAMES),
            )

    def _write(self, r: LaunchRecord) -> None:
        values = self._values(r)
        with self._lock:
            self._db.execute(_UPDATE_SQL, (*(values[c] for c in _UPDATED), r.launch_id))

    @staticmethod
    def _values(r: LaunchRecord) -> dict[str, object]:
        """The record's row, by column name."""
        return {
            "launch_id": r.launch_id,
            "mode": r.mode.value,
            "state": r.state.value,
            "spec": json.dumps(r.spec.to_json_dict(), sort_keys=True),
            "domain_name": r.domain_name,
            "requested_by": r.requested_by,
            "incarnation": r.incarnation,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
            "deadline": r.deadline,
            "failed_phase": r.failed_phase.value if r.failed_phase else None,
            "reason": r.reason,
            "detail": r.detail,
            "domain_uuid": r.domain_uuid,
            "owner_endpoint": r.owner_endpoint,
            "workload_id": r.workload_id,
            "session_id": r.session_id,
            "measurement": r.measurement,
            "secret_waived": 1 if r.secret_waived else 0,
            "authorization_id": r.authorization_id,
            "attested": 1 if r.attested else 0,
        }

    @staticmethod
    def _record(row: tuple[object, ...]) -> LaunchRecord:
        spec_raw = json.loads(str(row[3]))
        return LaunchRecord(
            launch_id=str(row[0]),
            mode=LaunchFlow(str(row[1])),
            state=Phase(str(row[2])),
            spec=GuestSpec.from_json_dict(spec_raw),
            domain_name=str(row[4]),
            requested_by=str(row[5]),
            incarnation=str(row[6]),
            created_at=float(str(row[7])),
            updated_at=float(str(row[8])),
            deadline=None if row[9] is None else float(str(row[9])),
            failed_phase=None if row[10] is None else Phase(str(row[10])),
            reason=str(row[11]),
            detail=str(row[12]),
            domain_uuid=str(row[13]),
            owner_endpoint=str(row[14]),
            workload_id=str(row[15]),
            session_id=str(row[16]),
            measurement=bytes(row[17]) if isinstance(row[17], bytes | bytearray | memoryview) else b"",
            secret_waived=bool(row[18]),
            authorization_id=str(row[19]),
            attested=bool(row[20]),
        )

    def get(self, launch_id: str) -> LaunchRecord:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM launches WHERE launch_id=?",  # noqa: S608 - constants
                (launch_id,),
            ).fetchone()
        if row is None:
            raise NotFound(LaunchReason.LAUNCH_NOT_FOUND, "no such launch")
        return self._record(row)

    def by_domain(self, domain_name: str) -> LaunchRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM launches WHERE domain_name=?",  # noqa: S608 - constants
                (domain_name,),
            ).fetchone()
        return None if row is None else self._record(row)

    def records(self, *, include_terminal: bool = True) -> list[LaunchRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM launches ORDER BY created_at"  # noqa: S608 - constants
            ).fetchall()
        records = [self._record(r) for r in rows]
        return records if include_terminal else [r for r in records if not r.terminal]

    def in_flight(self) -> list[LaunchRecord]:
        return [r for r in self.records() if r.state in PRE_RUNNING]

    def advance(self, record: LaunchRecord, change: PhaseChange) -> LaunchRecord:
        """Moves a launch one step along its flow's order (`advanced`); anything else is refused."""
        new = advanced(self.get(record.launch_id), record, change, time.time())
        self._write(new)
        return new

    def set_deadline(self, record: LaunchRecord, deadline: float | None) -> LaunchRecord:
        current = self.get(record.launch_id)
        new = replace(current, deadline=deadline, updated_at=time.time())
        self._write(new)
        return new

    def finish(
        self, record: LaunchRecord, to: Phase, *, failed_phase: Phase | None, reason: str, detail: str
    ) -> LaunchRecord:
        new = finished(
            self.get(record.launch_id),
            to,
            failed_phase=failed_phase,
            reason=reason,
            detail=detail,
            now=time.time(),
        )
        self._write(new)
        return new


#: The name the rest of the code knows the launcher's store by.
LaunchStore = SqliteLaunchStore


def set_aside(path: str, now: float | None = None) -> str:
    """Renames a database (and its -wal/-shm/-journal) to `<path>.corrupt-<UTC time>`; returns the name."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime("%Y%m%dT%H%M%SZ")
    target = f"{path}.corrupt-{stamp}"
    n = 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}.corrupt-{stamp}-{n}"
    for suffix in ("", *SQLITE_COMPANIONS):
        if os.path.lexists(path + suffix):
            os.rename(path + suffix, target + suffix)
    return target


def open_launch_store(path: str) -> SqliteLaunchStore:
    """The launch store at `path`. A corrupt database is set aside (renamed with a timestamp, kept for a
    post-mortem) and a fresh one started: the launches it held are unknown from then on, and the
    reconciler destroys the paused SEV domains of this launcher that no record owns, as after a lost
    database. A database that cannot be set aside stops the start with one line saying what to do."""
    try:
        return SqliteLaunchStore(path)
    except CorruptLaunchStore as exc:
        try:
            moved = set_aside(path)
        except OSError as err:
            raise LaunchStoreUnusable(
                f"the launch database {path} is corrupt ({exc.why}) and cannot be set aside ({err.strerror});"
                f" move it away (mv {path} {path}.corrupt) and start again"
            ) from None
        log.warning(
            "launch database corrupt: set aside, starting on a fresh one",
            extra={"db": path, "error": exc.why, "moved_to": moved},
        )
    return SqliteLaunchStore(path)
