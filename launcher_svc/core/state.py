"""The launch state machine, persisted in SQLite so a restarted launcher knows every launch in flight.

The order of a launch lives here and nowhere else (STYLE.md rule 7): `LaunchStore.advance` refuses any
transition not in `TRANSITIONS`, and `may_resume` is the one gate in front of resuming a guest: only a
launch whose secret was injected (or whose owner explicitly waived it) may run.

Nothing secret is stored: the spec, the owner's endpoint, the session id and the measurement are not
secrets; the GODH, session blob and wrapped secret are never written here.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from enum import StrEnum

from launcher_svc.core.spec import GuestSpec
from sevlaunch.errors import FailedPrecondition, NotFound
from sevlaunch.files import create_private_sqlite


class Phase(StrEnum):
    ACCEPTED = "ACCEPTED"
    CHAIN_FETCHED = "CHAIN_FETCHED"
    SESSION_OPENED = "SESSION_OPENED"
    DEFINED = "DEFINED"
    STARTED_PAUSED = "STARTED_PAUSED"
    MEASURED = "MEASURED"
    SECRET_RELEASED = "SECRET_RELEASED"  # noqa: S105 - a phase name
    SECRET_INJECTED = "SECRET_INJECTED"  # noqa: S105 - a phase name
    RUNNING = "RUNNING"
    FAILED = "FAILED"  # ended before RUNNING, the domain destroyed
    DESTROYED = "DESTROYED"  # destroyed on request


class LaunchFlow(StrEnum):
    ORCHESTRATED = "orchestrated"
    TWO_PHASE = "two-phase"


TERMINAL = frozenset({Phase.FAILED, Phase.DESTROYED})
# Phases in which a domain may exist that has not been given its secret: what fail-closed cleans.
PRE_RUNNING = frozenset(Phase) - TERMINAL - {Phase.RUNNING}

_ORCHESTRATED_ORDER = (
    Phase.ACCEPTED,
    Phase.CHAIN_FETCHED,
    Phase.SESSION_OPENED,
    Phase.DEFINED,
    Phase.STARTED_PAUSED,
    Phase.MEASURED,
    Phase.SECRET_RELEASED,
    Phase.SECRET_INJECTED,
    Phase.RUNNING,
)
_TWO_PHASE_ORDER = (
    Phase.ACCEPTED,
    Phase.DEFINED,
    Phase.STARTED_PAUSED,
    Phase.MEASURED,
    Phase.SECRET_INJECTED,
    Phase.RUNNING,
)


def _chain(order: tuple[Phase, ...]) -> set[tuple[Phase, Phase]]:
    return set(itertools.pairwise(order))


TRANSITIONS: dict[LaunchFlow, frozenset[tuple[Phase, Phase]]] = {
    # SECRET_RELEASED -> RUNNING is the waived-secret path; `may_resume` additionally checks the waiver.
    LaunchFlow.ORCHESTRATED: frozenset(
        _chain(_ORCHESTRATED_ORDER) | {(Phase.SECRET_RELEASED, Phase.RUNNING)}
    ),
    LaunchFlow.TWO_PHASE: frozenset(_chain(_TWO_PHASE_ORDER)),
}


def next_phase(mode: LaunchFlow, current: Phase) -> Phase:
    order = _ORCHESTRATED_ORDER if mode is LaunchFlow.ORCHESTRATED else _TWO_PHASE_ORDER
    idx = order.index(current)
    return order[idx + 1]


@dataclass(frozen=True)
class LaunchRecord:
    launch_id: str
    mode: LaunchFlow
    state: Phase
    spec: GuestSpec
    domain_name: str
    requested_by: str
    incarnation: str  # the launcher process that drives this launch; another one's launch is orphaned
    created_at: float
    updated_at: float
    deadline: float | None = None  # wall clock by which the current phase must be left
    failed_phase: Phase | None = None
    reason: str = ""
    detail: str = ""
    domain_uuid: str = ""
    owner_endpoint: str = ""
    workload_id: str = ""
    session_id: str = ""
    measurement: bytes = b""
    secret_waived: bool = False

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def may_resume(record: LaunchRecord) -> bool:
    """The only condition under which a guest may run: its secret is in, or the owner waived it."""
    if record.state is Phase.SECRET_INJECTED:
        return True
    return (
        record.mode is LaunchFlow.ORCHESTRATED
        and record.state is Phase.SECRET_RELEASED
        and record.secret_waived
        and record.spec.launch_without_secret
    )


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


class LaunchStore:
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
            raise NotFound("launch_not_found", "no such launch")
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

    def advance(
        self, record: LaunchRecord, to: Phase, *, deadline: float | None = None, **changes: object
    ) -> LaunchRecord:
        """Moves a launch one step along its mode's order; anything else is a programming error."""
        current = self.get(record.launch_id)
        if current.state is not record.state:
            # Someone else (an abort, the watchdog) moved it meanwhile: this driver must stop.
            raise FailedPrecondition(
                "launch_state_changed", f"launch is {current.state.value}, not {record.state.value}"
            )
        if (record.state, to) not in TRANSITIONS[record.mode]:
            raise RuntimeError(f"illegal launch transition {record.state.value} -> {to.value}")
        if to is Phase.RUNNING and not may_resume(replace(current, **changes)):  # type: ignore[arg-type]
            raise RuntimeError("refusing to mark RUNNING a launch without an injected secret")
        new = replace(current, state=to, updated_at=time.time(), deadline=deadline, **changes)  # type: ignore[arg-type]
        self._write(new)
        return new

    def update(self, record: LaunchRecord, **changes: object) -> LaunchRecord:
        """Changes non-state fields (e.g. the domain uuid once defined)."""
        new = replace(self.get(record.launch_id), updated_at=time.time(), **changes)  # type: ignore[arg-type]
        self._write(new)
        return new

    def finish(
        self, record: LaunchRecord, to: Phase, *, failed_phase: Phase | None, reason: str, detail: str
    ) -> LaunchRecord:
        """Moves a launch to FAILED or DESTROYED (from any state), recording why."""
        if to not in TERMINAL:
            raise RuntimeError("finish() only moves to a terminal state")
        current = self.get(record.launch_id)
        new = replace(
            current,
            state=to,
            updated_at=time.time(),
            deadline=None,
            failed_phase=failed_phase,
            reason=reason,
            detail=detail,
        )
        self._write(new)
        return new
