"""Group commit: the writes of concurrent calls share one transaction and one durable COMMIT.

Every OpenSession and ReleaseSecret ends in a small write (a session row, an audit record) that must be
durable before the reply. One transaction and one disk flush per call made the owner as fast as the
disk, however many calls were waiting. Here the writes waiting are run in one transaction, each in its
own savepoint (a write that fails is rolled back alone and its caller gets its error), committed once,
and only then are their callers answered: no call returns before its write is durable, and a COMMIT
that fails fails every write of the batch, none of which was acknowledged. Callers on threads write
this way: PostgreSQL's every call, SQLite's admin and SEV-SNP calls (SQLite's OpenSession and
ReleaseSecret commit on the event loop instead, `walflush.py`).

Who runs the batch: the first caller that finds no batch running (the leader) runs its own write and
every write queued before it started, in one batch; if more were queued meanwhile, it hands the next
batch to the first of their callers and returns with its answer. A lone caller therefore commits on its
own thread, with no hand-off to another thread and back, and under load each batch takes everyone who
queued while the previous one ran.

Order: the leader runs the jobs in the order they were queued, one after another on one connection, so
each sees the writes before it (an audit append reads the head the previous one wrote; a second
conditional release of the same session in the batch finds it no longer open).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from owner_svc.core.ports import StoreUnavailable

T = TypeVar("T")
#: A write: runs inside the batch's transaction, given the database's transaction handle.
Job = Callable[[Any], Any]
#: Per job, in order: (True, its result) or (False, the exception its caller gets).
Outcome = tuple[bool, Any]
#: Runs the jobs in one transaction and commits (durably, before it returns); raises (a StoreError)
#: when the transaction as a whole failed, in which case nothing of it was committed, or its COMMIT's
#: outcome is unknown.
RunBatch = Callable[[Sequence[Job]], list[Outcome]]

DEFAULT_MAX_BATCH = 256


class _Pending(Generic[T]):
    __slots__ = ("error", "finished", "job", "value", "wake")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.wake = threading.Event()  # set when answered, or when asked to lead the next batch
        self.finished = False
        self.value: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    """`submit` blocks until the job's transaction committed; the first caller to find no batch
    running runs the batch itself (see the module's docstring)."""

    def __init__(self, run_batch: RunBatch, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._queue: deque[_Pending[Any]] = deque()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._leading = False
        self._closed = False
        #: Batch sizes committed so far (for tests and the benchmark's report), and how many batches.
        self.batches = 0
        self.jobs = 0

    def queued(self) -> int:
        """Writes waiting for a batch (not the one under way)."""
        with self._lock:
            return len(self._queue)

    def submit(self, job: Callable[[Any], T]) -> T:
        """Runs `job(tx)` in the next batch; returns its result once the batch committed, or raises
        the job's own error, or the batch's when the transaction as a whole failed."""
        pending: _Pending[T] = _Pending(job)
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the owner's store is closed")
            self._queue.append(pending)
            lead = not self._leading
            self._leading = True
        while True:
            if lead:
                self._lead()
            pending.wake.wait()
            if pending.finished:
                break
            pending.wake.clear()  # asked to lead the next batch, which holds this job
            lead = True
        if pending.error is not None:
            raise pending.error
        return pending.value  # type: ignore[no-any-return]

    def close(self) -> None:
        """Refuses new writes; returns once the batches under way (and what was queued for them)
        committed."""
        with self._lock:
            self._closed = True
            self._idle.wait_for(lambda: not self._leading)

    def _lead(self) -> None:
        """One batch: what is queued now (up to `max_batch`); then the next leader, or no one."""
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
        self._commit(batch)
        with self._lock:
            if self._queue:
                self._queue[0].wake.set()  # its caller leads the next batch
            else:
                self._leading = False
                self._idle.notify_all()

    def _commit(self, batch: list[_Pending[Any]]) -> None:
        try:
            outcomes = self._run_batch([p.job for p in batch])
            if len(outcomes) != len(batch):  # pragma: no cover - a broken RunBatch
                raise RuntimeError("the batch returned a wrong number of outcomes")
        except BaseException as exc:  # handed to every caller of the batch, never lost
            for p in batch:
                p.error = exc
                _answer(p)
            return
        self.batches += 1
        self.jobs += len(batch)
        for p, (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                p.value = value
            else:
                p.error = value
            _answer(p)


def _answer(p: _Pending[Any]) -> None:
    p.finished = True
    p.wake.set()
