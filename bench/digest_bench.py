"""`sevlaunch measurement digest` on a 4 MiB image vs hashlib.sha256 on the same bytes, and vs
sev-snp-measure (in-process and as a command, wall time)."""

from __future__ import annotations

import contextlib
import io
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench._timing import bench_pair
from bench.bench_sev import four_mib_image
from sevlaunch.cli import main as sevlaunch_main
from sevlaunch.sev.digest import launch_digest

MB = 1 << 20


@dataclass
class DigestResult:
    image_source: str
    size: int
    ours_mb_s: float
    hashlib_mb_s: float
    ratio: float  # `sevlaunch measurement digest` in-process (argv -> printed digest) / hashlib's time
    core_ratio: float  # the digest the command computes (read + launch_digest) / hashlib's time
    snp_inproc_ratio: float  # our time / sev-snp-measure's time, both in-process
    cli_wall_ms: float  # `sevlaunch measurement digest` as a command (interpreter start included)
    snp_cli_wall_ms: float | None  # `sev-snp-measure --mode sev` as a command


def _cli(path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = sevlaunch_main(["measurement", "digest", "--mode", "sev", "--firmware", str(path)])
    assert code == 0


def _wall(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=120)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def digest(workdir: Path, *, rounds: int, wall_runs: int) -> DigestResult:
    image, source = four_mib_image()
    path = workdir / "ovmf-4m.fd"
    path.write_bytes(image)

    import hashlib

    from sevsnpmeasure.guest import sev_calc_launch_digest

    def floor() -> None:
        hashlib.sha256(path.read_bytes()).digest()  # the CLI reads the file too

    def snp() -> None:
        sev_calc_launch_digest(str(path), None, None, None)  # type: ignore[arg-type]

    assert sev_calc_launch_digest(str(path), None, None, None) == hashlib.sha256(image).digest()  # type: ignore[arg-type]
    vs_hashlib = bench_pair(
        "digest", lambda: _cli(path), floor, rounds=rounds, batch_s=0.1, clock=time.perf_counter
    )

    def core() -> None:
        launch_digest(path.read_bytes(), mode="sev")

    vs_core = bench_pair("digest-core", core, floor, rounds=rounds, batch_s=0.1, clock=time.perf_counter)
    vs_snp = bench_pair(
        "digest-snp", lambda: _cli(path), snp, rounds=rounds, batch_s=0.1, clock=time.perf_counter
    )
    cli_wall = _wall([sys.executable, "-m", "sevlaunch", "measurement", "digest", "--mode", "sev",
                      "--firmware", str(path)], wall_runs)  # fmt: skip
    snp_bin = shutil.which("sev-snp-measure") or str(Path(sys.executable).parent / "sev-snp-measure")
    snp_wall = (
        _wall([snp_bin, "--mode", "sev", "--ovmf", str(path)], wall_runs) if Path(snp_bin).exists() else None
    )
    return DigestResult(
        image_source=source,
        size=len(image),
        ours_mb_s=len(image) / MB * vs_hashlib.ops_per_s,
        hashlib_mb_s=len(image) / MB * vs_hashlib.floor_ops_per_s,
        ratio=vs_hashlib.ratio,
        core_ratio=vs_core.ratio,
        snp_inproc_ratio=vs_snp.ratio,
        cli_wall_ms=cli_wall,
        snp_cli_wall_ms=snp_wall,
    )
