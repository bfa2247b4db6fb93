"""A value cached until invalidated, computed at most once at a time (single-flight).

A storm of launches asks for the certificate chain at once; each would otherwise issue its own
PDH_CERT_EXPORT (and KDS fetch). Concurrent callers share one computation; an invalidation during a
computation makes its result unusable for the cache (it may describe the old PDH), so the next caller
recomputes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlightCache(Generic[T]):
    def __init__(self, *, max_age: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_age = max_age
        self._clock = clock
        self._value: T | None = None
        self._stored_at = 0.0
        self._epoch = 0
        self._inflight: asyncio.Future[T] | None = None
        self._inflight_epoch = -1

    def invalidate(self) -> None:
        self._value = None
        self._epoch += 1

    def _fresh(self) -> T | None:
        if self._value is None:
            return None
        if self._max_age is not None and self._clock() - self._stored_at > self._max_age:
            return None
        return self._value

    async def get(self, compute: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """(value, computed_here): computed_here is False for a cache hit or a shared computation."""
        value = self._fresh()
        if value is not None:
            return value, False
        if self._inflight is not None and self._inflight_epoch == self._epoch:
            # shield: one waiter's cancellation must not cancel the shared computation.
            return await asyncio.shield(self._inflight), False
        epoch = self._epoch
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inflight, self._inflight_epoch = future, epoch
        try:
            value = await compute()
        except BaseException as exc:
            future.set_exception(exc)
            # Waiters get the error; nobody else must see "Future exception was never retrieved".
            future.exception()
            raise
        else:
            future.set_result(value)
            if epoch == self._epoch:
                self._value, self._stored_at = value, self._clock()
            return value, True
        finally:
            if self._inflight is future:
                self._inflight = None
