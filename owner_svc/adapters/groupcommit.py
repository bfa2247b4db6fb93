"""Group commit: the writes of concurrent calls share one transaction and one durable COMMIT.

Every OpenSession and ReleaseSecret ends in a small write (a session row, an audit record) that must be
durable before the reply: with SQLite in WAL mode and `synchronous=FULL`, one fsync per COMMIT, taken
under the database's single write lock. One transaction per call made the owner as fast as the disk's
fsync, however many calls were waiting. Here one writer thread takes every write waiting in its queue,
runs them in one transaction, each in its own savepoint (a write that fails is rolled back alone and its
caller gets its error), commits once, and only then wakes the callers: no call returns before its write
is durable, and a COMMIT that fails fails every write of the batch, none of which was acknowledged.

The batch grows by itself with the load: while one COMMIT's fsync runs, the next calls queue, and the
next batch takes them all. A lone call waits for no one.

Order: the writer runs the jobs in the order they were queued, one after another on one connection, so
each sees the writes before it (an audit append reads the head the previous one wrote; a second
conditional release of the same session in the batch finds it no longer open).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from owner_svc.core.ports import StoreUnavailable

log = logging.getLogger("owner_svc.store")

T = TypeVar("T")
#: A write: runs inside the batch's transaction, given the database's transaction handle.
Job = Callable[[Any], Any]
#: Per job, in order: (True, its result) or (False, the exception its caller gets).
Outcome = tuple[bool, Any]
#: Runs the jobs in one transaction and commits; raises (a StoreError) when the transaction as a whole
#: failed, in which case nothing of it was committed, or its COMMIT's outcome is unknown.
RunBatch = Callable[[Sequence[Job]], list[Outcome]]

DEFAULT_MAX_BATCH = 256


class _Pending(Generic[T]):
    __slots__ = ("done", "error", "job", "value")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


_STOP = object()


class GroupCommit:
    """One writer thread over `run_batch`; `submit` blocks until the job's transaction committed."""

    def __init__(
        self, run_batch: RunBatch, *, max_batch: int = DEFAULT_MAX_BATCH, name: str = "owner-store-writer"
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        #: Batch sizes committed so far (for tests and the benchmark's report), and how many batches.
        self.batches = 0
        self.jobs = 0
        self._thread = threading.Thread(target=self._writer, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[Any], T]) -> T:
        """Runs `job(tx)` in the next batch; returns its result once the batch committed, or raises
        the job's own error, or the batch's when the transaction as a whole failed."""
        pending: _Pending[T] = _Pending(job)
        with self._close_lock:
            if self._closed:
                raise StoreUnavailable("the owner's store is closed")
            self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.value  # type: ignore[no-any-return]

    def close(self) -> None:
        """Commits what was already queued, then stops the writer."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def _writer(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                return
            batch: list[_Pending[Any]] = [item]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[_Pending[Any]]) -> None:
        try:
            outcomes = self._run_batch([p.job for p in batch])
            if len(outcomes) != len(batch):  # pragma: no cover - a broken RunBatch
                raise RuntimeError("the batch returned a wrong number of outcomes")
        except BaseException as exc:  # handed to every caller of the batch, never lost
            for p in batch:
                p.error = exc
                p.done.set()
            return
        self.batches += 1
        self.jobs += len(batch)
        for p, (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                p.value = value
            else:
                p.error = value
            p.done.set()
