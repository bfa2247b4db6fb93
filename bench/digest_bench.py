"""`sevlaunch measurement digest` on a 4 MiB image vs hashlib.sha256 on the same bytes, and vs
sev-snp-measure (in-process and as a command, wall time); the SEV-SNP launch digest of the same image vs
hashlib.sha384 of its bytes.

    python -m bench.digest_bench [--rounds N] [--json]     # the SNP digest pair alone
"""

from __future__ import annotations

import contextlib
import io
import os
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
    wall_runs: int  # runs of each command, interleaved
    snp_launch_digest_ratio: float  # sevlaunch.snp launch_digest / hashlib.sha384 of the image's bytes
    snp_launch_digest_mb_s: float
    sha384_mb_s: float


@dataclass
class SnpDigestResult:
    image_source: str
    size: int
    ours_mb_s: float
    sha384_mb_s: float
    ratio: float  # median of per-round ratios, CPU time
    # The same pair against the hashing the format itself requires: SHA-384 of each 4 KiB page and of a
    # 112-byte PAGE_INFO per page, hashlib calls alone (no parsing, no VMSAs, no Python bookkeeping).
    per_page_floor_ratio: float
    per_page_floor_mb_s: float


def snp_digest(
    *, rounds: int, image: bytes | None = None, source: str = "", batch_s: float = 0.1
) -> SnpDigestResult:
    """`sevlaunch.snp.launch_digest` (4 vCPUs, EPYC-Milan, guest features 0x21) of the 4 MiB image, in
    memory, against its floor: hashlib.sha384 over the same bytes, one call. The digest hashes every
    4 KiB page and then a 112-byte PAGE_INFO per page; the floor hashes the bytes once."""
    import hashlib

    from sevlaunch.sev.vmsa import vcpu_signature
    from sevlaunch.snp.launch_digest import launch_digest as snp_launch_digest

    if image is None:
        image, source = four_mib_image()
    sig = vcpu_signature("EPYC-Milan")

    def ours() -> None:
        snp_launch_digest(image, vcpus=4, vcpu_sig=sig, guest_features=0x21)

    def floor() -> None:
        hashlib.sha384(image).digest()

    def per_page() -> None:
        view, info = memoryview(image), bytes(112)
        for at in range(0, len(image), 4096):
            hashlib.sha384(view[at : at + 4096]).digest()
            hashlib.sha384(info).digest()

    pair = bench_pair("snp-digest", ours, floor, rounds=rounds, batch_s=batch_s)
    structural = bench_pair("snp-digest-pages", ours, per_page, rounds=rounds, batch_s=batch_s)
    return SnpDigestResult(
        image_source=source,
        size=len(image),
        ours_mb_s=len(image) / MB * pair.ops_per_s,
        sha384_mb_s=len(image) / MB * pair.floor_ops_per_s,
        ratio=pair.ratio,
        per_page_floor_ratio=structural.ratio,
        per_page_floor_mb_s=len(image) / MB * structural.floor_ops_per_s,
    )


def _cli(path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = sevlaunch_main(["measurement", "digest", "--mode", "sev", "--firmware", str(path)])
    assert code == 0


def _installed_env(cache: Path) -> dict[str, str]:
    """The environment of a command run as installed: pip compiles an installed package's bytecode, as
    sev-snp-measure's is in the venv, but a source checkout run with PYTHONDONTWRITEBYTECODE compiles
    every module of ours on every start (~8 ms here). Bytecode goes to a private cache, not the tree."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def _walls(argvs: list[list[str]], runs: int, env: dict[str, str] | None = None) -> list[float]:
    """Median wall ms of each command, the commands interleaved run by run, so that a load swing on the
    shared machine falls on all of them alike. One warm-up run each (page cache, bytecode)."""
    for argv in argvs:
        subprocess.run(argv, check=True, capture_output=True, timeout=120, env=env)
    times: list[list[float]] = [[] for _ in argvs]
    for _ in range(runs):
        for argv, into in zip(argvs, times, strict=True):
            t = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True, timeout=120, env=env)
            into.append(time.perf_counter() - t)
    return [statistics.median(t) * 1000 for t in times]


def digest(workdir: Path, *, rounds: int, wall_runs: int, batch_s: float = 0.1) -> DigestResult:
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
        "digest", lambda: _cli(path), floor, rounds=rounds, batch_s=batch_s, clock=time.perf_counter
    )

    def core() -> None:
        launch_digest(path.read_bytes(), mode="sev")

    vs_core = bench_pair("digest-core", core, floor, rounds=rounds, batch_s=batch_s, clock=time.perf_counter)
    vs_snp = bench_pair(
        "digest-snp", lambda: _cli(path), snp, rounds=rounds, batch_s=batch_s, clock=time.perf_counter
    )
    env = _installed_env(workdir / "pycache")
    ours = [
        sys.executable,
        "-m",
        "sevlaunch",
        "measurement",
        "digest",
        "--mode",
        "sev",
        "--firmware",
        str(path),
    ]
    snp_bin = shutil.which("sev-snp-measure") or str(Path(sys.executable).parent / "sev-snp-measure")
    if Path(snp_bin).exists():
        cli_wall, snp_wall = _walls([ours, [snp_bin, "--mode", "sev", "--ovmf", str(path)]], wall_runs, env)
    else:
        (cli_wall,), snp_wall = _walls([ours], wall_runs, env), None
    snp_result = snp_digest(rounds=rounds, image=image, source=source, batch_s=batch_s)
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
        wall_runs=wall_runs,
        snp_launch_digest_ratio=snp_result.ratio,
        snp_launch_digest_mb_s=snp_result.ours_mb_s,
        sha384_mb_s=snp_result.sha384_mb_s,
    )


def _main() -> int:
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(prog="python -m bench.digest_bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rounds = 2 if os.environ.get("SEVLAUNCH_BENCH_TINY") else args.rounds
    result = snp_digest(rounds=rounds)
    if args.json:
        print(json.dumps(result.__dict__))
    else:
        print(f"image: {result.image_source}")
        print(
            f"SNP launch digest {result.ours_mb_s:.0f} MB/s, hashlib.sha384 {result.sha384_mb_s:.0f} MB/s, "
            f"ratio {result.ratio:.3f} (CPU time, {rounds} interleaved rounds)"
        )
        print(
            f"vs the per-page hashing alone ({result.per_page_floor_mb_s:.0f} MB/s): "
            f"ratio {result.per_page_floor_ratio:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
