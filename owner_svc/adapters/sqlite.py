"""The embedded store: one SQLite file in WAL mode (`SQLiteStore`, the `SqlStore` over `SQLiteDatabase`).

Durability: WAL with `synchronous=NORMAL`, made durable behind the COMMITs by shared flushes
(`walflush.py`): a caller on a thread waits for (or runs) the flush after its COMMIT, and after a read
that could have seen a COMMIT not yet flushed; a call run with `run_deferred` commits at once and its
coroutine awaits the flush before it answers.

Concurrency: one connection per thread (SQLite connections are not shared across threads), writers
serialised by a process-wide lock (this process's threads, handed over without SQLite's sleeping busy
handler) and `BEGIN IMMEDIATE` (any other process on the file), so the conditional session update is
atomic and the audit chain's "read the head, append the next record" cannot interleave.

Faults: every `sqlite3` exception leaves as a `StoreError` (a full disk or an I/O error is
`StoreUnavailable`, a damaged file `StoreCorrupt`), after the transaction was rolled back whole.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from owner_svc.adapters.dialect import SQLITE, Dialect
from owner_svc.adapters.groupcommit import DEFAULT_MAX_BATCH, Job, Outcome
from owner_svc.adapters.schema import SCHEMA_VERSION
from owner_svc.adapters.sqlstore import SqlStore
from owner_svc.adapters.walflush import WalFlusher, deferred
from owner_svc.core.ports import (
    SchemaError,
    StoreConflict,
    StoreCorrupt,
    StoreError,
    StoreIntegrityError,
    StoreUnavailable,
)
from sevlaunch.files import create_private_sqlite

__all__ = ["SCHEMA_VERSION", "SQLiteDatabase", "SQLiteStore", "SchemaError"]

# Primary result codes (sqlite3.h) of the faults that are not the caller's and may pass.
_UNAVAILABLE = {
    3: "access denied",  # SQLITE_PERM
    8: "the database is read-only",  # SQLITE_READONLY
    10: "disk I/O error",  # SQLITE_IOERR
    13: "database or disk is full",  # SQLITE_FULL
    14: "unable to open the database file",  # SQLITE_CANTOPEN
    22: "file too large",  # SQLITE_NOLFS
}
#: How long a write on the event loop's thread (`run_deferred`) waits for another writer's lock. Another
#: owner process holds it for milliseconds (a COMMIT, a checkpoint); past this the call is ABORTED
#: (StoreConflict, retryable), instead of the whole server, health checks included, freezing behind
#: whatever else holds the file's write lock (an operator's open transaction, say).
LOOP_BUSY_TIMEOUT_MS = 2000

_CONFLICT = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED: another writer held the lock past the busy timeout
_CORRUPT = {11: "the database disk image is malformed", 26: "file is not a database"}  # CORRUPT, NOTADB


def translate(exc: sqlite3.Error) -> StoreError:
    """The core's error for a sqlite3 exception. The text names the condition, never row contents."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if isinstance(exc, sqlite3.IntegrityError):
        return StoreIntegrityError(f"the store refused the write: {exc}")
    if primary in _UNAVAILABLE:
        return StoreUnavailable(f"the owner's store cannot be used: {_UNAVAILABLE[primary]}")
    if primary in _CONFLICT:
        return StoreConflict("the owner's store is locked by another writer")
    if primary in _CORRUPT:
        return StoreCorrupt(_CORRUPT[primary])
    return StoreError(f"SQLite: {exc}")


class _Tx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)


class SQLiteDatabase:
    dialect: Dialect = SQLITE

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()
        # Writers of this process queue here, before BEGIN IMMEDIATE: a thread that finds SQLite's write
        # lock taken sleeps in the busy handler (1, 2, 5, 10, ... 100 ms steps) while the lock may already
        # be free, which under 64 concurrent calls left the writer idle much of the time. A Python lock
        # hands over at once; BEGIN IMMEDIATE still serialises against other processes on the file.
        self._write_lock = threading.Lock()
        self._max_pages: int | None = None
        # Owner processes on one file (`--workers`) queue on a file lock the same way, before BEGIN
        # IMMEDIATE: the kernel wakes the next one as the lock is released, where SQLite's busy handler
        # would sleep. A file of its own, never the database: closing any descriptor of the database
        # would drop SQLite's own POSIX locks on it.
        self._lock_fd: int | None = None
        # close() waits for the reads and writes under way: closing a connection another thread is using
        # crashes the sqlite3 module (a late call after a test's or the server's shutdown did).
        self._users = 0
        self._closed = False
        self._idle = threading.Condition(self._conn_lock)
        # A file database's writes are flushed behind their COMMITs; an in-memory one has nothing to flush.
        self._flusher: WalFlusher | None = None
        if not _in_memory(self.path):
            self._flusher = WalFlusher(
                self.path + "-wal", self.path, self._write_lock, checkpoint=self._checkpoint
            )

    @contextmanager
    def _use(self) -> Iterator[sqlite3.Connection]:
        with self._conn_lock:
            if self._closed:
                raise StoreUnavailable("the owner's store is closed (the owner is stopping)")
            self._users += 1
        try:
            yield self.connection()
        finally:
            with self._conn_lock:
                self._users -= 1
                if self._users == 0:
                    self._idle.notify_all()

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (made on first use). Raises StoreError, never sqlite3's."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        # The file holds sealed keys and the audit log: 0600, and so its -wal/-shm (SQLite gives them
        # the database's mode).
        try:
            create_private_sqlite(self.path)
        except OSError as exc:
            raise StoreUnavailable(f"the owner's store cannot be used: {exc.strerror or exc}") from None
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), never implicit.
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise translate(exc) from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            if self._flusher is not None:
                # COMMIT writes the log without syncing it; the flusher syncs it before anyone is told.
                # Checkpoints run on the flusher's thread, not inside whichever caller's COMMIT.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA wal_autocheckpoint=0")
            else:
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            if self._max_pages is not None:
                conn.execute(f"PRAGMA max_page_count = {int(self._max_pages)}")
        except sqlite3.Error as exc:
            conn.close()
            raise translate(exc) from None
        self._local.conn = conn
        with self._conn_lock:
            self._connections.append(conn)
        return conn

    def check(self) -> None:
        with self.read() as tx:
            rows = tx.execute("PRAGMA quick_check").fetchall()
        problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
        if problems:
            raise StoreCorrupt(f"the database fails SQLite's integrity check: {problems[0]}")

    def limit_pages(self, pages: int | None = None) -> int:
        """Caps the file at `pages` pages (None: at its size now) on every connection, as a full disk
        would: writes that need a new page fail with SQLITE_FULL. For fault tests; returns the cap."""
        conn = self.connection()
        cap = int(pages if pages is not None else conn.execute("PRAGMA page_count").fetchone()[0])
        self._max_pages = cap
        with self._conn_lock:
            for c in self._connections:
                c.execute(f"PRAGMA max_page_count = {cap}")
        return cap

    @contextmanager
    def _processes_lock(self) -> Iterator[None]:
        """Between owner processes on this file (the caller holds `_write_lock`)."""
        name = self.path
        if _in_memory(name):
            yield
            return
        if self._lock_fd is None:
            try:
                self._lock_fd = os.open(
                    name + "-owner-lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
            except OSError as exc:
                raise StoreUnavailable(f"the owner's store cannot be used: {exc.strerror or exc}") from None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @property
    def flusher(self) -> WalFlusher | None:
        """The thread making commits durable (None for an in-memory database)."""
        return self._flusher

    def deferring(self) -> bool:
        """Whether a write now commits without waiting for durability (the caller awaits it later)."""
        return self._flusher is not None and deferred() is not None

    def _ticket(self) -> int:
        return 0 if self._flusher is None else self._flusher.reserve()

    def _durable(self, ticket: int) -> None:
        """Returns once `ticket` is durable; in a deferred call, leaves that to its coroutine."""
        if self._flusher is None or not ticket:
            return
        later = deferred()
        if later is not None:
            later.add(self._flusher, ticket)
        else:
            self._flusher.wait(ticket)

    def sync(self) -> None:
        """Makes whatever any process committed to the file so far durable (one flush)."""
        if self._flusher is not None:
            self._flusher.barrier()

    def _checkpoint(self) -> None:
        if self._closed:
            return  # closing checkpoints anyway (SQLite does, as the last connection closes)
        # Under the write locks: the next COMMIT then finds the whole log copied and starts it over from
        # its beginning. Checkpointing beside running writers, it never did, and the log grew without end.
        with self._use() as conn, self._write_lock, self._processes_lock():
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        self._local.writing = True
        try:
            yield
        finally:
            self._local.writing = False

    @contextmanager
    def write(self) -> Iterator[_Tx]:
        ticket = 0
        with self._use() as conn, self._write_lock, self._processes_lock(), self._writing():
            try:
                if deferred() is not None and not getattr(self._local, "short_busy", False):
                    conn.execute(f"PRAGMA busy_timeout={int(LOOP_BUSY_TIMEOUT_MS)}")
                    self._local.short_busy = True
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield _Tx(conn)
                    ticket = self._ticket()
                    conn.execute("COMMIT")
                finally:
                    # After an exception, or a COMMIT that failed (a full disk): nothing half-written
                    # stays, and this thread's connection is usable again.
                    if conn.in_transaction:
                        _rollback(conn)
            except sqlite3.Error as exc:
                raise translate(exc) from None
        self._durable(ticket)

    def write_batch(self, jobs: Sequence[Job], *, first: Callable[[_Tx], object]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        ticket = 0
        with self._use() as conn, self._write_lock, self._processes_lock(), self._writing():
            tx = _Tx(conn)
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    first(tx)
                    for job in jobs:
                        conn.execute("SAVEPOINT job")
                        try:
                            value = job(tx)
                        except Exception as exc:  # the job's caller gets it
                            if not conn.in_transaction:
                                # SQLite rolled the whole transaction back (some I/O errors, a full
                                # disk): the jobs before this one are gone too, the batch fails.
                                raise
                            conn.execute("ROLLBACK TO job")
                            conn.execute("RELEASE job")
                            outcomes.append(
                                (False, translate(exc) if isinstance(exc, sqlite3.Error) else exc)
                            )
                        else:
                            conn.execute("RELEASE job")
                            outcomes.append((True, value))
                    ticket = self._ticket()
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        _rollback(conn)
            except sqlite3.Error as exc:
                raise translate(exc) from None
        self._durable(ticket)
        return outcomes

    @contextmanager
    def read(self, *, snapshot: bool = False) -> Iterator[_Tx]:
        with self._use() as conn:
            yield from self._read(conn, snapshot)
        # What the read saw may include a COMMIT of this process not yet flushed: whoever the result
        # goes to learns of it only once it is durable (in a deferred call, its coroutine waits). Not
        # inside a write of this thread: that write's own wait covers it, and a flush now would need
        # the write lock this thread holds.
        if self._flusher is not None and not getattr(self._local, "writing", False):
            self._durable(self._flusher.latest_unflushed())

    @staticmethod
    def _read(conn: sqlite3.Connection, snapshot: bool) -> Iterator[_Tx]:
        try:
            if not snapshot:
                yield _Tx(conn)
                return
            # One read transaction: in WAL mode its reads are one snapshot.
            conn.execute("BEGIN")
            try:
                yield _Tx(conn)
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise translate(exc) from None

    def close(self) -> None:
        with self._conn_lock:
            self._closed = True
            self._idle.wait_for(lambda: self._users == 0, timeout=30)
        if self._flusher is not None:
            self._flusher.close()  # flushes what was committed, then its thread ends
        with self._conn_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
        with self._write_lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


def _in_memory(name: str) -> bool:
    return name in ("", ":memory:") or name.startswith("file:")


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # SQLite already rolled back (it does after some I/O errors); nothing is left to undo


class SQLiteStore(SqlStore):
    def __init__(
        self,
        path: str | Path,
        *,
        audit_mac_key: bytes | None,
        clock: Callable[[], float] = time.time,
        max_batch: int = DEFAULT_MAX_BATCH,
        group_commit: bool = True,
    ) -> None:
        """`group_commit`: callers on threads that write at once share one transaction (the first runs
        it for all, `groupcommit.py`), instead of each committing its own under the write lock (from 16
        threads sharing costs less CPU: `python -m bench.commit_bench`). Calls run with `run_deferred`
        commit their own on the event loop's thread either way."""
        self.path = str(path)
        db = SQLiteDatabase(path)
        super().__init__(
            db, audit_mac_key=audit_mac_key, clock=clock, max_batch=max_batch, group_commit=group_commit
        )
