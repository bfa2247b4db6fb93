"""The benchmarks run and print the documented keys (tiny counts; never asserts a timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "SEVLAUNCH_BENCH_TINY": "1"}


def test_bench_sev_json_keys() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_sev.py"), "--json"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    data = json.loads(out.stdout)
    assert set(data) == {
        "chain_verify",
        "session_create",
        "launch_digest",
        "secret_package",
        "snp_report_verify",
    }
    for entry in data.values():
        assert set(entry) == {"ops_per_s", "floor_ops_per_s", "ratio"}
        assert all(isinstance(v, int | float) and v > 0 for v in entry.values())


def test_bench_main_quick_json_keys() -> None:
    # Starts real services (owner, 2 platforms, 2 launchers) with tiny counts; RESULTS.md is not written.
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", "--no-write"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    data = json.loads(out.stdout)
    assert set(data) == {
        "owner_physical_floor_pairs_per_s",
        "owner_floor_ratio",
        "owner_p50_ms_1",
        "owner_p99_ms_1",
        "owner_p50_ms_8",
        "owner_p99_ms_8",
        "owner_p50_ms_64",
        "owner_p99_ms_64",
        "owner_throughput_ratio",
        "owner_pairs_per_s",
        "owner_cpu_ms_per_pair",
        "grpc_floor_cpu_ms_per_pair",
        "owner_ceiling_ratio",
        "owner_vs_ceiling",
        "launch_overhead_ratio",
        "launch_p50_ms",
        "launch_p99_ms",
        "exports_per_pdh",
        "digest_ratio",
        "digest_core_ratio",
        "digest_cli_vs_snp_measure",
        "scale_launches_per_s",
        "owner_peak_rss_mb",
        "owner_rss_growth_mb",
        "snp_attest_per_s",
        "snp_attest_ratio",
        "snp_launch_p50_ms",
        "snp_launch_overhead_ratio",
    }
    assert all(isinstance(v, int | float) for v in data.values())


def test_bench_snp_json_keys() -> None:
    # The SNP benchmarks alone: the SNP demo's services, tiny counts.
    out = subprocess.run(
        [sys.executable, "-m", "bench.snp_bench", "--json"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    data = json.loads(out.stdout)
    assert set(data) == {
        "snp_attest_per_s",
        "snp_attest_ratio",
        "snp_launch_p50_ms",
        "snp_launch_overhead_ratio",
    }
    assert all(isinstance(v, int | float) and v > 0 for v in data.values())
