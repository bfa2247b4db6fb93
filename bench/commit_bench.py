"""How the owner's writes reach the disk: the owner core in-process, called from many threads at once.

    python -m bench.commit_bench [--threads 16] [--pairs 25] [--dsn postgresql://...]

The same core (KEK, reference values, workload, secret, the emulated root trusted) over stores that
write in different ways, interleaved:
* group commit taking at most 1 write per transaction (every session row and audit record its own
  transaction, one after another);
* group commit (the first caller commits every write waiting, together);
* SQLite only, without group commit: each write commits on its caller's thread, and one flusher makes
  the log durable for every COMMIT before it (`owner_svc.adapters.walflush`), as the server's hot path
  does on the event loop.
Reports pairs/s, the process's CPU per pair, and how many writes, transactions and fsyncs there were.
With `--dsn`, the PostgreSQL store on that server (use one with fsync and synchronous_commit on, or the
comparison measures nothing); else SQLite in a temporary directory.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench._world import POLICY, WORKLOAD_ID, World
from bench.owner_bench import direct_measurer
from owner_svc.adapters.groupcommit import DEFAULT_MAX_BATCH
from owner_svc.adapters.kek import KeyEncryptionKey
from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.api.servicer import workload_from_proto
from owner_svc.core.refset import ReferenceValueSet
from owner_svc.core.service import ChainInput, OwnerCore
from sevlaunch.refvalues import PublisherKey
from sevlaunch.sev.chain import load_roots_file

#: The `max_batch` of a store without group commit (each write commits on its caller's thread).
FLUSH_BEHIND = 0


@dataclass
class CommitRun:
    max_batch: int  # FLUSH_BEHIND: no group commit
    pairs_per_s: float
    cpu_ms_per_pair: float
    writes: int
    commits: int  # transactions
    fsyncs: int

    @property
    def mode(self) -> str:
        if self.max_batch == FLUSH_BEHIND:
            return "own transaction, fsync shared behind"
        return f"group commit, at most {self.max_batch} a transaction"


def _counts(store: Any) -> tuple[int, int, int]:
    """(writes, transactions, fsyncs) so far. SQLite's fsyncs are its flusher's; PostgreSQL's one per
    COMMIT, on the server."""
    flusher = getattr(getattr(store, "db", None), "flusher", None)
    group = store.group_commit
    if group is None:
        assert flusher is not None
        return flusher.commits, flusher.commits, flusher.flushes
    return group.jobs, group.batches, flusher.flushes if flusher is not None else group.batches


def _core(world: World, store: Any, kek: KeyEncryptionKey) -> OwnerCore:
    refset = ReferenceValueSet([PublisherKey.from_pem(world.publisher_pub.read_bytes(), name="bench")])
    core = OwnerCore(
        store, kek, refset, extra_roots=[load_roots_file(world.root_file.read_bytes(), "emulated")]
    )
    core.import_reference_values("owner-admin", world.envelope, "bench")
    core.put_workload("owner-admin", workload_from_proto(world.workload_proto()))
    core.put_secret("owner-admin", WORKLOAD_ID, [(str(world.secret.guid), world.secret.data)])
    return core


def run(world: World, make_store: Callable[[KeyEncryptionKey, int], Any], *, threads: int, pairs: int,
        max_batch: int) -> CommitRun:  # fmt: skip
    """`threads` threads each open `pairs` sessions, then release them (the host side's measurement
    is computed between the two phases, untimed)."""
    (world.workdir / "owner").mkdir(exist_ok=True)
    kek = KeyEncryptionKey.from_file(world.workdir / "owner" / "kek-commit", create=True)
    store = make_store(kek, max_batch)
    core = _core(world, store, kek)
    host = world.hosts[0]
    c = world.chain_proto(host)
    measure = direct_measurer(host.firmware)
    cfg = host.firmware.config

    def opens(n: int, out: list[Any]) -> None:
        for _ in range(n):
            chain = ChainInput(c.pdh_cert, c.pek_cert, c.oca_cert, c.cek_cert, c.ask_cert, c.ark_cert)
            out.append(core.open_session("client", WORKLOAD_ID, chain, POLICY))

    def releases(items: list[tuple[Any, bytes]]) -> None:
        for o, m in items:
            core.release_secret(
                "client", o.session_id, m, api_major=cfg.api_major, api_minor=cfg.api_minor,
                build_id=cfg.build, policy=POLICY,
            )  # fmt: skip

    def phase(target: Callable[..., None], args: list[tuple[Any, ...]]) -> tuple[float, float]:
        workers = [threading.Thread(target=target, args=a) for a in args]
        cpu, wall = time.process_time(), time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - wall, time.process_time() - cpu

    warm: list[Any] = []
    opens(4, warm)
    releases([(o, measure(o.godh_cert, o.session_blob)) for o in warm])
    before = _counts(store)
    outs: list[list[Any]] = [[] for _ in range(threads)]
    wall_open, cpu_open = phase(opens, [(pairs, out) for out in outs])
    measured = [[(o, measure(o.godh_cert, o.session_blob)) for o in out] for out in outs]
    wall_release, cpu_release = phase(releases, [(m,) for m in measured])
    after = _counts(store)
    store.close()
    n = threads * pairs
    writes, commits, fsyncs = (a - b for a, b in zip(after, before, strict=True))
    return CommitRun(
        max_batch=max_batch,
        pairs_per_s=n / (wall_open + wall_release),
        cpu_ms_per_pair=(cpu_open + cpu_release) / n * 1000,
        writes=writes,
        commits=commits,
        fsyncs=fsyncs,
    )


def compare(world: World, make_store: Callable[[KeyEncryptionKey, int], Any], *, threads: int,
            pairs: int, flush_behind: bool = True) -> list[CommitRun]:  # fmt: skip
    """One transaction per write, group commit, (flush-behind,) and again, interleaved (a noisy machine)."""
    modes = (1, DEFAULT_MAX_BATCH, *((FLUSH_BEHIND,) if flush_behind else ()))
    return [run(world, make_store, threads=threads, pairs=pairs, max_batch=b) for b in modes * 2]


def sqlite_store(world: World) -> Callable[[KeyEncryptionKey, int], Any]:
    counter = iter(range(1_000_000))

    def make(kek: KeyEncryptionKey, max_batch: int) -> Any:
        db = world.workdir / "owner" / f"commit-{next(counter)}.db"
        if max_batch == FLUSH_BEHIND:
            return SQLiteStore(db, audit_mac_key=kek.audit_key, group_commit=False)
        return SQLiteStore(db, audit_mac_key=kek.audit_key, max_batch=max_batch)

    return make


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.commit_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--pairs", type=int, default=25, help="pairs per thread")
    p.add_argument("--dsn", help="a PostgreSQL server to run the store on (a fresh database each run)")
    args = p.parse_args()
    with World(hosts=1) as world:
        world.prepare()
        (world.workdir / "owner").mkdir(exist_ok=True)
        make = sqlite_store(world)
        if args.dsn:
            make = _postgres_store(args.dsn, args.threads)
        for r in compare(world, make, threads=args.threads, pairs=args.pairs, flush_behind=not args.dsn):
            print(
                f"{r.mode}: {r.pairs_per_s:7.1f} pairs/s, CPU {r.cpu_ms_per_pair:.3f} ms a pair, "
                f"{r.writes} writes in {r.commits} transactions, {r.fsyncs} fsyncs"
            )
    return 0


def _postgres_store(dsn: str, threads: int) -> Callable[[KeyEncryptionKey, int], Any]:
    import psycopg

    from owner_svc.adapters.postgres import PostgresStore

    counter = iter(range(1_000_000))

    def make(kek: KeyEncryptionKey, max_batch: int) -> Any:
        name = f"sevlaunch_commit_bench_{time.time_ns()}_{next(counter)}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        target = psycopg.conninfo.make_conninfo(dsn, dbname=name)
        return PostgresStore(
            target, audit_mac_key=kek.audit_key, max_connections=threads + 4, max_batch=max_batch
        )

    return make


if __name__ == "__main__":
    raise SystemExit(main())
