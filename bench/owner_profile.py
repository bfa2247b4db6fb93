"""Where the owner core spends its time: cProfile over in-process OpenSession + ReleaseSecret pairs.

    python -m bench.owner_profile [--pairs 200] [--top 25] [--threads 1]

The core is built as `bench.owner_bench.inprocess_core` builds it (SQLite store, KEK, reference values,
the emulated root trusted); the host side's measurement is computed outside the profile. With
`--threads N` the pairs run from N threads at once (cProfile then sees the calling thread only, so the
table is of the one profiled thread; the wall figure is for all of them).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import threading
import time

from bench._world import POLICY, WORKLOAD_ID, World
from bench.owner_bench import direct_measurer, inprocess_core
from owner_svc.core.service import ChainInput, OwnerCore
from sevlaunch.rpc.v1 import common_pb2


def _pairs(core: OwnerCore, chain: common_pb2.CertificateChain, measure: object, fw: object, n: int,
           prof: cProfile.Profile | None) -> None:  # fmt: skip
    c = chain
    cfg = fw.config  # type: ignore[attr-defined]
    for _ in range(n):
        chain_in = ChainInput(c.pdh_cert, c.pek_cert, c.oca_cert, c.cek_cert, c.ask_cert, c.ark_cert)
        if prof is not None:
            prof.enable()
        opened = core.open_session("client", WORKLOAD_ID, chain_in, POLICY)
        if prof is not None:
            prof.disable()
        m = measure(opened.godh_cert, opened.session_blob)  # type: ignore[operator]
        if prof is not None:
            prof.enable()
        core.release_secret(
            "client", opened.session_id, m, api_major=cfg.api_major, api_minor=cfg.api_minor,
            build_id=cfg.build, policy=POLICY,
        )  # fmt: skip
        if prof is not None:
            prof.disable()


def profile(pairs: int, top: int, threads: int, world: World | None = None) -> str:
    """The profile's text (top functions by own time, then by cumulative time)."""
    if world is None:
        with World(hosts=1) as fresh:
            fresh.prepare()
            return profile(pairs, top, threads, fresh)
    (world.workdir / "owner").mkdir(exist_ok=True)
    host = world.hosts[0]
    chain = world.chain_proto(host)
    measure = direct_measurer(host.firmware)
    core = inprocess_core(world, world.workdir / "owner" / "profile.db")
    _pairs(core, chain, measure, host.firmware, 8, None)  # warm-up
    prof = cProfile.Profile()
    others = [
        threading.Thread(target=_pairs, args=(core, chain, measure, host.firmware, pairs, None))
        for _ in range(threads - 1)
    ]
    t = time.perf_counter()
    for th in others:
        th.start()
    _pairs(core, chain, measure, host.firmware, pairs, prof)
    for th in others:
        th.join()
    wall = time.perf_counter() - t
    flusher = core.store.db.flusher  # type: ignore[attr-defined]
    batches = f"{flusher.commits} commits made durable by {flusher.flushes} flushes"
    core.store.close()  # type: ignore[attr-defined]
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    out.write(
        f"{pairs * threads} pairs from {threads} thread(s) in {wall:.2f} s wall "
        f"({pairs * threads / wall:.1f} pairs/s); profiled thread: {total:.2f} s in the core, "
        f"{total / pairs * 1000:.2f} ms per pair; {batches}\n"
    )
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return _short_paths(out.getvalue())


def _short_paths(text: str) -> str:
    """Paths relative to the repository or the standard library, so profiles compare across machines."""
    import re
    import sysconfig
    from pathlib import Path

    repo = str(Path(__file__).resolve().parent.parent) + "/"
    text = text.replace(repo, "")
    stdlib = sysconfig.get_paths()["stdlib"] + "/"
    text = text.replace(stdlib, "")
    return re.sub(r"/\S*/site-packages/", "", text)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.owner_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    print(profile(args.pairs, args.top, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
