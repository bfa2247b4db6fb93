"""`sevlaunch-owner --workers N`: N owner processes serving one port (SO_REUSEPORT), under a supervisor.

One owner process runs its Python on one core at a time (the GIL; `cryptography` holds it too), so on a
machine with cores to spare N processes serve more launches. The supervisor prepares what the workers
must not race on (the KEK file when `--create-kek`, the store's migration and its integrity check),
then starts the workers with the same flags; the kernel spreads incoming connections over them.

What each worker has of its own, and why that is safe:
* Its store connection: SQLite serialises writers across processes (a file lock taken before
  `BEGIN IMMEDIATE`, see `adapters/sqlite.py`); PostgreSQL is built for several owners (replicas).
* Its verified-chain cache and parsed workloads: caches of what the store and the configuration say.
* Its reference values, reloaded whenever the store's generation moves (any worker's import counts
  on every worker from its next call).
* Its metrics: worker i serves them on the `--metrics-listen` port + i (a fixed port), so a scrape
  config lists N targets. Only worker 0 serves `--health-listen` and polls `--refvalues-url`.
* The SEV-SNP guest port, shared like the main one; its rate limits are per worker, so the owner as a
  whole admits up to N times the `--guest-*-rate` it is given.

The supervisor, once the preparation is done, replaces itself (same pid) with `python -m
owner_svc.workers`, which imports only the standard library: the process that only waits stays a few
megabytes instead of a full owner's. It forwards SIGTERM/SIGINT to every worker and waits for them
(each drains for `--grace`); a worker that exits on its own stops the others and the supervisor exits
1, so the process manager restarts the whole owner.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from types import FrameType

MAX_WORKERS = 64
_OFF = ("", "off")


def _optional(value: str | None) -> str | None:
    return None if value is None or value.strip() in _OFF else value


def _with_port(address: str, offset: int) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address
    number = int(port)
    return f"{host}:{number + offset if number else 0}"


def worker_argv(argv: Sequence[str], args: argparse.Namespace, index: int) -> list[str]:
    """The command line of worker `index`: the supervisor's own flags, then the worker's (later flags
    win), so whatever came from the environment reaches it the same way."""
    metrics = _optional(args.metrics_listen)
    health = _optional(args.health_listen)
    return [
        sys.executable,
        "-m",
        "owner_svc.server",
        *argv,
        "--workers",
        "1",
        "--worker-index",
        str(index),
        "--metrics-listen",
        _with_port(metrics, index) if metrics is not None else "off",
        "--health-listen",
        health if health is not None and index == 0 else "off",
    ]


def supervisor_argv(argvs: Sequence[Sequence[str]], grace: float) -> list[str]:
    """The supervisor's own command line: this module alone, which imports nothing but the standard
    library, so the process that only waits for its workers stays small."""
    return [
        sys.executable,
        "-m",
        "owner_svc.workers",
        json.dumps({"workers": [list(a) for a in argvs], "grace": grace}),
    ]


def _log(level: str, message: str, **fields: object) -> None:
    # The same JSON line shape as the services' logging (sevlaunch.rpc.logs), without importing it.
    record = {
        "time": datetime.now(UTC).isoformat(),
        "level": level,
        "logger": "owner_svc",
        "message": message,
    }
    print(json.dumps({**record, **fields}), file=sys.stderr, flush=True)


def supervise(argvs: Sequence[Sequence[str]], *, grace: float) -> int:
    """Starts the workers and waits; returns the exit status."""
    stopping: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for argv in argvs:
            procs.append(subprocess.Popen(list(argv)))
        _log("info", "owner workers started", workers=len(procs), pids=[p.pid for p in procs])
        failed = None
        while not stopping and failed is None:
            failed = next((p for p in procs if p.poll() is not None), None)
            time.sleep(0.2)
        if failed is not None:
            _log(
                "ERROR", "owner worker exited: stopping the others", pid=failed.pid, status=failed.returncode
            )
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _log("error", "owner worker did not stop: killed", pid=p.pid)
                p.kill()
                p.wait()
        if failed is not None:
            return 1
        return 0 if all(p.returncode in (0, -signal.SIGTERM) for p in procs) else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    plan = json.loads((sys.argv[1:] if argv is None else argv)[0])
    return supervise(plan["workers"], grace=float(plan["grace"]))


if __name__ == "__main__":
    raise SystemExit(main())
