"""Interleaved timing of an operation against its floor, so machine noise hits both alike."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PairResult:
    name: str
    ops_per_s: float
    floor_ops_per_s: float
    ratio: float  # our time per op / floor time per op (median of the per-round ratios)
    rounds: int
    batch: int

    def as_json(self) -> dict[str, float]:
        return {
            "ops_per_s": round(self.ops_per_s, 2),
            "floor_ops_per_s": round(self.floor_ops_per_s, 2),
            "ratio": round(self.ratio, 3),
        }


Clock = Callable[[], float]


def _time_batch(fn: Callable[[], object], batch: int, clock: Clock = time.process_time) -> float:
    start = clock()
    for _ in range(batch):
        fn()
    return clock() - start


def calibrate(fn: Callable[[], object], target_s: float, clock: Clock = time.process_time) -> int:
    """How many calls of `fn` take about `target_s` (at least 1)."""
    fn()  # warm caches (cached_property, imports, OpenSSL tables)
    n = 1
    while True:
        elapsed = _time_batch(fn, n, clock)
        if elapsed >= target_s / 4 or n >= 1 << 20:
            return max(1, round(n * target_s / max(elapsed, 1e-9)))
        n *= 4


def bench_pair(
    name: str,
    ours: Callable[[], object],
    floor: Callable[[], object],
    *,
    rounds: int,
    batch_s: float,
    clock: Clock = time.process_time,
) -> PairResult:
    """Times `rounds` batches of each, interleaved A B B A ..., the same batch size for both.

    The ratio is the median over rounds of (our batch time / the floor's batch time in the same round);
    ops/s are from the median batch times. The default clock is this process's CPU time: on a shared,
    noisy machine it does not count the time the process waited for a core (both sides are
    single-threaded; pass `clock=time.perf_counter` for wall time).
    """
    batch = calibrate(ours, batch_s, clock)
    floor()
    ours_t: list[float] = []
    floor_t: list[float] = []
    gc.collect()
    for i in range(rounds):
        if i % 2 == 0:
            ours_t.append(_time_batch(ours, batch, clock))
            floor_t.append(_time_batch(floor, batch, clock))
        else:
            floor_t.append(_time_batch(floor, batch, clock))
            ours_t.append(_time_batch(ours, batch, clock))
    ratio = statistics.median(o / f for o, f in zip(ours_t, floor_t, strict=True))
    return PairResult(
        name=name,
        ops_per_s=batch / statistics.median(ours_t),
        floor_ops_per_s=batch / statistics.median(floor_t),
        ratio=ratio,
        rounds=rounds,
        batch=batch,
    )
