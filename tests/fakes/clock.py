"""A clock the test moves: deadlines pass when the test says so, not after real seconds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(order=True)
class _Timer:
    due: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """`launcher_svc.core.clock.Clock` on a time that moves only by `advance` (or `jump`).

    `jump` moves the time without running the timers that fall due, as a busy event loop would run them
    late; `advance` moves it and runs them, in order."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall0 = start
        self._now = 0.0
        self._seq = 0
        self._timers: list[_Timer] = []

    def time(self) -> float:
        return self._wall0 + self._now

    def monotonic(self) -> float:
        return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        self._seq += 1
        timer = _Timer(self._now + max(0.0, delay), self._seq, callback)
        self._timers.append(timer)
        return timer

    async def sleep(self, seconds: float) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.call_later(seconds, lambda: None if done.done() else done.set_result(None))
        await done

    def jump(self, seconds: float) -> None:
        self._now += seconds

    def run_due(self) -> int:
        """Runs the timers due by now; returns how many ran."""
        ran = 0
        while True:
            due = sorted(t for t in self._timers if not t.cancelled and t.due <= self._now)
            if not due:
                return ran
            timer = due[0]
            self._timers.remove(timer)
            timer.callback()
            ran += 1

    def advance(self, seconds: float) -> int:
        self.jump(seconds)
        return self.run_due()

    @property
    def pending(self) -> int:
        """Timers not yet run or cancelled."""
        return sum(1 for t in self._timers if not t.cancelled)
