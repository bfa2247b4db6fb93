"""Time for the launch core, injectable so that deadline tests run on a fake clock in milliseconds.

`time()` is the wall clock (records and deadlines that survive a restart), `monotonic()` measures phase
durations, and `call_later` runs a callback on the event loop after a delay: every deadline of the core
(phase deadlines, the cleanup grace, the two-phase wait, the shutdown budget) is a `call_later`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Runs `callback` on the running event loop once `delay` seconds have passed."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def within(clock: Clock, seconds: float, work: Awaitable[T]) -> T:
    """`work`'s result, or TimeoutError once `seconds` have passed on `clock` (work is then cancelled
    and awaited). A cancellation of the caller cancels `work` too and propagates."""
    task = asyncio.ensure_future(work)
    expired: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    timer = clock.call_later(seconds, lambda: None if expired.done() else expired.set_result(None))
    try:
        await asyncio.wait({task, expired}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait({task})
        raise
    finally:
        timer.cancel()
        if not expired.done():
            expired.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        return task.result()  # it finished as it was told to stop: its result stands
    raise TimeoutError


async def wait_some(
    clock: Clock, futures: Iterable[asyncio.Future[object]], seconds: float
) -> set[asyncio.Future[object]]:
    """Waits until `futures` are done or `seconds` have passed on `clock`; returns those not done.
    Never cancels them."""
    pending = {f for f in futures if not f.done()}
    if not pending or seconds <= 0:
        return pending
    expired: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    timer = clock.call_later(seconds, lambda: None if expired.done() else expired.set_result(None))
    try:
        gathered = asyncio.ensure_future(asyncio.wait(pending))
        await asyncio.wait({gathered, expired}, return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():
            gathered.cancel()
    finally:
        timer.cancel()
        if not expired.done():
            expired.cancel()
    return {f for f in pending if not f.done()}
