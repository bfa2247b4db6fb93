"""Durability behind the COMMITs (owner_svc.adapters.walflush) on a real SQLite file.

The flush (`fdatasync` of the WAL) is held or failed by replacing the flusher's `_sync`, so each test
can look at the moment between a COMMIT and its flush:
* a deferred call (the owner's hot path) has committed, but its coroutine does not finish before the
  flush; neither does a call on a thread, nor a read that could see the unflushed row;
* one flush covers the commits of one pass of the event loop;
* a failed flush fails every call waiting and every later write, with StoreUnavailable;
* closing flushes what was committed; checkpoints run on the flusher's thread.
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from owner_svc.adapters import sqlite as sqlite_adapter
from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.adapters.walflush import WalFlusher, run_deferred
from owner_svc.core.model import AuditEvent
from owner_svc.core.ports import StoreConflict, StoreUnavailable


class HeldFlush:
    """Replaces a flusher's `_sync`: each flush waits for `release` (or raises `error`), and is counted."""

    def __init__(self, flusher: WalFlusher) -> None:
        self._real = flusher._sync
        self.release = threading.Event()
        self.entered = threading.Event()
        self.error: OSError | None = None
        self.calls = 0
        flusher._sync = self._sync  # type: ignore[method-assign]

    def _sync(self) -> None:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(10)
        if self.error is not None:
            raise self.error
        self._real()


async def _started(held: HeldFlush) -> None:
    """Until the flush began (the loop keeps running: its pass is what asks for the flush)."""
    deadline = time.monotonic() + 10
    while not held.entered.is_set():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)


def _event(n: int) -> AuditEvent:
    return AuditEvent(actor="admin", action=f"test_{n}", outcome="allowed")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "owner.db", audit_mac_key=b"k" * 32)
    yield s
    s.close()


def _flusher(store: SQLiteStore) -> WalFlusher:
    flusher = store.db.flusher
    assert flusher is not None
    return flusher


def _actions_on_disk(path: str) -> list[str]:
    """What another connection sees committed, without going through the store (no waiting)."""
    conn = sqlite3.connect(path)
    try:
        return [str(r[0]) for r in conn.execute("SELECT canonical FROM audit ORDER BY seq")]
    finally:
        conn.close()


def test_a_deferred_call_finishes_only_after_its_flush(store: SQLiteStore) -> None:
    held = HeldFlush(_flusher(store))

    async def scenario() -> None:
        task = asyncio.ensure_future(run_deferred(store.append_audit, _event(1)))
        await _started(held)  # the COMMIT is done and its flush started
        assert any("test_1" in c for c in _actions_on_disk(store.path))
        for _ in range(20):
            await asyncio.sleep(0.005)
            assert not task.done()  # no answer before the flush
        held.release.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())


def test_a_thread_write_returns_only_after_its_flush(store: SQLiteStore) -> None:
    held = HeldFlush(_flusher(store))
    done = threading.Event()

    def write() -> None:
        store.append_audit(_event(1))
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert held.entered.wait(10)
    assert not done.wait(0.1)
    held.release.set()
    assert done.wait(10)


def test_a_read_that_could_see_an_unflushed_commit_waits_for_it(store: SQLiteStore) -> None:
    held = HeldFlush(_flusher(store))
    seen: list[int] = []

    async def scenario() -> None:
        writer = asyncio.ensure_future(run_deferred(store.append_audit, _event(1)))
        await _started(held)
        reader = threading.Thread(target=lambda: seen.append(len(store.audit_records(0, 10))), daemon=True)
        reader.start()
        reader.join(0.1)
        assert reader.is_alive() and not seen  # it read the row, and waits until the row is durable
        held.release.set()
        await asyncio.wait_for(writer, 10)
        reader.join(10)

    asyncio.run(scenario())
    assert seen == [1]


def test_the_commits_of_one_loop_pass_share_one_flush(store: SQLiteStore) -> None:
    flusher = _flusher(store)
    before = flusher.flushes

    async def scenario() -> None:
        await asyncio.gather(*(run_deferred(store.append_audit, _event(n)) for n in range(20)))

    asyncio.run(scenario())
    assert flusher.flushes - before == 1
    assert len(_actions_on_disk(store.path)) == 20


def test_a_failed_flush_fails_the_waiting_calls_and_every_later_write(store: SQLiteStore) -> None:
    held = HeldFlush(_flusher(store))
    held.error = OSError(errno.EIO, "Input/output error")
    held.release.set()

    async def scenario() -> None:
        results = await asyncio.gather(
            *(run_deferred(store.append_audit, _event(n)) for n in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert "Input/output error" in str(results[0])

    asyncio.run(scenario())
    with pytest.raises(StoreUnavailable):
        store.append_audit(_event(9))  # refused before it commits: nothing more is acknowledged
    assert len(_actions_on_disk(store.path)) == 3  # committed, never acknowledged


def test_an_unexpected_flush_error_fails_closed_too(store: SQLiteStore) -> None:
    def broken() -> None:
        raise RuntimeError("not an OSError")

    _flusher(store)._sync = broken  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable, match="RuntimeError"):
        store.append_audit(_event(1))
    with pytest.raises(StoreUnavailable):
        store.append_audit(_event(2))


def test_a_refusal_also_waits_for_the_flush_of_what_it_wrote(store: SQLiteStore) -> None:
    held = HeldFlush(_flusher(store))

    def refuse() -> None:
        store.append_audit(_event(1))  # a refusal's audit record, then the refusal
        raise PermissionError("refused")

    async def scenario() -> None:
        task = asyncio.ensure_future(run_deferred(refuse))
        await _started(held)
        await asyncio.sleep(0.05)
        assert not task.done()
        held.release.set()
        with pytest.raises(PermissionError):
            await asyncio.wait_for(task, 10)

    asyncio.run(scenario())


def test_a_loop_write_behind_a_held_lock_is_aborted_not_frozen(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_adapter, "LOOP_BUSY_TIMEOUT_MS", 200)
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # someone else's open write transaction on the file
    try:
        started = time.monotonic()
        with pytest.raises(StoreConflict):
            asyncio.run(run_deferred(store.append_audit, _event(1)))
        assert time.monotonic() - started < 5  # the loop's 0.2 s, not the threads' 30 s
    finally:
        other.execute("ROLLBACK")
        other.close()
    asyncio.run(run_deferred(store.append_audit, _event(2)))  # the lock gone, writes go through
    assert len(_actions_on_disk(store.path)) == 1


def test_close_flushes_what_was_committed_and_refuses_later_writes(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "owner.db", audit_mac_key=b"k" * 32)
    flusher = _flusher(s)
    waiter: list[Any] = []

    async def scenario() -> None:
        waiter.append(await asyncio.wait_for(run_deferred(s.append_audit, _event(1)), 10))

    asyncio.run(scenario())
    s.close()
    assert flusher.commits >= 1 and waiter == [None]
    with pytest.raises(StoreUnavailable):
        s.append_audit(_event(2))


def test_checkpoints_run_on_the_flusher_thread(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    flusher = _flusher(store)
    threads: list[str] = []
    real = store.db._checkpoint

    def checkpoint() -> None:
        threads.append(threading.current_thread().name)
        real()

    monkeypatch.setattr(flusher, "_checkpoint", checkpoint)
    monkeypatch.setattr(flusher, "_checkpoint_every", 5)
    for n in range(12):
        store.append_audit(_event(n))
    deadline = time.monotonic() + 10
    while len(threads) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert set(threads) == {"owner-store-flusher"}
    # Every frame was copied into the database file: a reader without the log sees all twelve records.
    conn = sqlite3.connect(store.path)
    try:
        busy, log_frames, done_frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        conn.close()
    assert busy == 0 and log_frames == done_frames
    assert len(store.audit_records(0, 100)) == 12
