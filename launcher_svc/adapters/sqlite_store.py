"""The launch store in SQLite: `LaunchRecord`s, one row each, committed before every write returns
(WAL, synchronous FULL).

A file that is not a readable launch database is `CorruptLaunchStore` (one line naming the file), never
a traceback: the server sets such a file aside and starts on a fresh one (README, "launcher_svc").
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import replace

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
from sevlaunch.files import create_private_sqlite

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
    secret_waived INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS launches_state ON launches(state);
CREATE UNIQUE INDEX IF NOT EXISTS launches_domain ON launches(domain_name);
"""

_COLUMN_NAMES = (
    "launch_id", "mode", "state", "spec", "domain_name", "requested_by", "incarnation", "created_at",
    "updated_at", "deadline", "failed_phase", "reason", "detail", "domain_uuid", "owner_endpoint",
    "workload_id", "session_id", "measurement", "secret_waived",
)  # fmt: skip
_COLUMNS = ", ".join(_COLUMN_NAMES)
# What a launch's progress changes; the rest (id, mode, spec, domain name, caller, creation) is fixed.
_UPDATED = (
    "state", "updated_at", "deadline", "failed_phase", "reason", "detail", "domain_uuid", "owner_endpoint",
    "workload_id", "session_id", "measurement", "secret_waived", "incarnation",
)  # fmt: skip
_UPDATE_SQL = f"UPDATE launches SET {', '.join(f'{c}=?' for c in _UPDATED)} WHERE launch_id=?"  # noqa: S608


class SqliteLaunchStore:
    """SQLite persistence of `LaunchRecord`s. Every write commits before it returns (WAL, synchronous
    FULL), so a launcher killed at any point restarts knowing which domains it may have left behind."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        create_private_sqlite(path)  # 0600, and so its -wal/-shm: launch records name owners and sessions
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

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
