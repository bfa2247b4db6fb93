"""Durable before the reply, without an fsync inside each COMMIT: SQLite commits to its write-ahead log
(WAL mode, `synchronous=NORMAL`, so a COMMIT writes its frames and returns), and one flush makes the log
durable with one `fdatasync` for every COMMIT that returned before it started: a waiting thread's own
flush when none is running, else the store's flusher thread's.

Why: with `synchronous=FULL` every COMMIT fsyncs under the database's write lock, so concurrent calls
either wait for each other's fsyncs or hand their writes to another thread (group commit), and on the
owner's hot path those thread hand-offs cost more CPU than the call's cryptography (bench/RESULTS.md).
Here a call commits on its own thread at once, learns the outcome of its conditional update at once,
and only its *reply* waits for the flush, together with every other call committed meanwhile.

What a reply may reveal is what this process committed up to then, so every reply waits for a flush
that covers its own COMMIT, and with it every earlier one: the WAL is append-only and checksummed, so
after a crash what survives is a prefix of the commits, and an acknowledged commit is inside it.

How a caller waits:
* A thread calls `wait(ticket)` (the store does this itself unless the call is deferred); when no
  flush is running it runs one itself, and whoever waits meanwhile shares it.
* A coroutine runs the synchronous store code inside `run_deferred`: the writes commit at once, their
  tickets are collected, and the coroutine awaits one future the flusher resolves on its event loop (one
  wake-up per flush for all of its calls).

Several owner processes on one file (`--workers`): a flush syncs the file, so it covers every process's
COMMITs before it. A launch call always writes (a session, a release, a refusal's audit record), so its
answer waits for a flush after everything it read. A read on a thread waits for this process's
unflushed COMMITs only: an admin listing through one worker may show another worker's write one flush
(about a millisecond) before that write is durable. The audit checkpoint, which is logged and exported,
waits for a flush of the whole file (`SQLiteDatabase.sync`).

A failed flush (an I/O error, or anything else) is reported to every caller waiting and to every later
one: what was committed may not be on disk, so the store stops acknowledging writes until the owner
restarts and SQLite recovers the log. Checkpoints (copying the log into the database file) run on the
flusher's thread, between flushes, instead of inside some caller's COMMIT.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from owner_svc.core.ports import StoreUnavailable

log = logging.getLogger("owner_svc.store")

P = ParamSpec("P")
T = TypeVar("T")

#: Commits between two checkpoints (SQLite's own default is about 1000 pages, a few hundred commits).
DEFAULT_CHECKPOINT_EVERY = 256


class WalFlusher:
    """Makes a SQLite WAL durable behind the commits: each COMMIT takes a ticket (`reserve`), durable once
    `wait` returns or `wait_async`'s future resolves."""

    def __init__(
        self,
        wal_path: str,
        db_path: str,
        commit_lock: threading.Lock,
        *,
        checkpoint: Callable[[], None] | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        name: str = "owner-store-flusher",
    ) -> None:
        self._wal_path = wal_path
        self._db_path = db_path
        # The lock every COMMIT of this process holds with its ticket: a flush reads its target under it,
        # so a ticket it covers is never one whose COMMIT is still writing.
        self._commit_lock = commit_lock
        self._checkpoint = checkpoint
        self._checkpoint_every = checkpoint_every
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the flusher waits here for commits
        self._done = threading.Condition(self._lock)  # threads wait here for flushes
        self._issued = 0
        self._flushed = 0
        self._failure: StoreUnavailable | None = None
        self._closing = False
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._kicks: set[asyncio.AbstractEventLoop] = set()
        self._since_checkpoint = 0
        self._checkpoint_due = False
        self._flushing = False  # a flush is running (on this object's thread or a caller's)
        #: How many flushes covered how many commits (for tests and the benchmark's report).
        self.flushes = 0
        self.commits = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def reserve(self) -> int:
        """The ticket of the COMMIT about to run (the caller holds `commit_lock` until it returned, or
        failed: then the ticket is flushed for nothing). Taken before the COMMIT so that whatever a
        reader can see of it already has its ticket. Raises StoreUnavailable once a flush failed: the
        store acknowledges no write until a restart."""
        with self._lock:
            self._usable()
            self._issued += 1
            # No wake-up yet: the waiter asks for the flush (`wait`, `wait_async`), so that the commits
            # of one pass of an event loop share it.
            return self._issued

    def _usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise StoreUnavailable("the owner's store is closed (the owner is stopping)")

    def latest_unflushed(self) -> int:
        """The newest ticket if it is not durable yet, else 0: every COMMIT of this process that a read
        could have seen is at or below it (its ticket was taken before it became visible)."""
        with self._lock:
            return self._issued if self._issued > self._flushed else 0

    def barrier(self) -> None:
        """Blocks until a flush that started after this call completed: whatever any process had
        committed to the log before this call is durable after it."""
        with self._lock:
            self._usable()
            self._issued += 1
            ticket = self._issued
        self.wait(ticket)

    def wait(self, ticket: int) -> None:
        """Blocks until `ticket` is durable; raises StoreUnavailable if its flush failed. When no flush
        is running, the calling thread runs it itself (no hand-off to the flusher thread and back)."""
        with self._lock:
            while True:
                if self._flushed >= ticket:
                    return
                if self._failure is not None:
                    raise self._failure
                if not self._flushing:
                    self._flushing = True
                    break
                self._done.wait()
        self._flush()
        with self._lock:
            if self._flushed < ticket:
                assert self._failure is not None
                raise self._failure

    def wait_async(self, ticket: int) -> asyncio.Future[None]:
        """A future of the running loop, resolved (or failed) when `ticket` is durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._flushed >= ticket:
                future.set_result(None)
            elif self._failure is not None:
                future.set_exception(self._failure)
            else:
                self._waiters.append((ticket, loop, future))
                if loop not in self._kicks:
                    # One flush request per pass of the loop, after every call that ran in it committed.
                    self._kicks.add(loop)
                    loop.call_soon(self._kick, loop)
        return future

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._kicks.discard(loop)
            self._work.notify()

    def close(self) -> None:
        """Flushes what was committed, then stops the thread."""
        with self._lock:
            self._closing = True
            self._work.notify()
        self._thread.join()

    def _thread_has_work(self) -> bool:
        if self._flushing:
            return False  # a caller is flushing; it wakes this thread when it is done
        pending = self._issued > self._flushed and self._failure is None
        return pending or self._checkpoint_due or self._closing

    def _run(self) -> None:
        while True:
            with self._lock:
                self._work.wait_for(self._thread_has_work)
                checkpoint = self._checkpoint_due
                self._checkpoint_due = False
                flush = not checkpoint and self._issued > self._flushed and self._failure is None
                if not (checkpoint or flush):
                    return  # closing, and nothing is left to flush
                self._flushing = flush
            if flush:
                self._flush()
            elif self._checkpoint is not None:
                try:
                    self._checkpoint()
                except Exception as exc:  # a later one catches up; SQLite's log stays valid meanwhile
                    log.warning("store checkpoint failed", extra={"error": str(exc)})

    def _flush(self) -> None:
        """One flush of everything committed before it starts, by whoever set `_flushing`."""
        with self._commit_lock, self._lock:
            target = self._issued
        failure = None
        try:
            self._sync()
        except Exception as exc:  # whatever it was, nobody may be told their write is durable
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            failure = StoreUnavailable(f"the owner's store cannot make its writes durable: {why}")
            log.error("the store's log could not be flushed; writes are refused until a restart")
        with self._lock:
            if failure is None:
                self.commits += target - self._flushed
                self.flushes += 1
                self._since_checkpoint += target - self._flushed
                self._flushed = target
                if self._since_checkpoint >= self._checkpoint_every:
                    self._since_checkpoint = 0
                    self._checkpoint_due = True
            else:
                self._failure = failure
            self._flushing = False
            due = [w for w in self._waiters if failure is not None or w[0] <= target]
            self._waiters = [w for w in self._waiters if failure is None and w[0] > target]
            self._done.notify_all()
            if (
                self._closing
                or self._checkpoint_due
                or (self._issued > self._flushed and self._failure is None)
            ):
                self._work.notify()  # the thread: commits made meanwhile, a checkpoint due, or it may end
        _settle(due, failure)

    def _sync(self) -> None:
        # Opened by path each time: SQLite may have replaced the log while no connection held it. No log
        # at all means it was checkpointed into the database file and removed: sync that instead.
        try:
            fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = os.open(self._db_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


def _settle(
    due: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]], failure: BaseException | None
) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for _, loop, future in due:
        by_loop.setdefault(loop, []).append(future)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, futures, failure)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting any more
            pass


def _resolve(futures: list[asyncio.Future[None]], failure: BaseException | None) -> None:
    for future in futures:
        if future.done():  # the call was cancelled
            continue
        if failure is None:
            future.set_result(None)
        else:
            future.set_exception(failure)


class DeferredFlushes:
    """The tickets of the writes one deferred call made, per flusher."""

    def __init__(self) -> None:
        self._due: dict[WalFlusher, int] = {}

    def add(self, flusher: WalFlusher, ticket: int) -> None:
        self._due[flusher] = max(ticket, self._due.get(flusher, 0))

    async def settled(self) -> None:
        for flusher, ticket in self._due.items():
            await flusher.wait_async(ticket)


_deferred: contextvars.ContextVar[DeferredFlushes | None] = contextvars.ContextVar(
    "owner_store_deferred_flushes", default=None
)


def deferred() -> DeferredFlushes | None:
    """The current call's deferral, if its writes' durability is awaited by its coroutine."""
    return _deferred.get()


async def run_deferred(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Runs the synchronous `fn` on the event loop's thread, its store writes committed but not waited
    for, then waits until all of them are durable, whether `fn` returned or raised: its answer (a
    reply, or a refusal whose audit record it wrote) leaves only after that."""
    due = DeferredFlushes()
    token = _deferred.set(due)
    try:
        return fn(*args, **kwargs)
    finally:
        _deferred.reset(token)
        await due.settled()
