"""sevctl's and sev-snp-measure's spellings in `sevlaunch measurement`: `--mode seves`, `--output-format
hex|base64` for the SEV digests, and `build` taking its inputs as sevctl does (base64 launch digest and
nonce, TIK and measurement blob as a file or base64, `--outfile`), checked against sevctl's known answers
(tests/vectors/kat.json) and sev-snp-measure's CLI."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sevlaunch.cli import main

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
AMDSEV = VECTORS / "measurement" / "ovmf_AmdSev_suffix.bin"
KAT = {case["id"]: case for case in json.loads((VECTORS / "kat.json").read_text())["cases"]}
ES_VCPU = ["--vcpus", "2", "--vcpu-family", "25", "--vcpu-model", "1", "--vcpu-stepping", "1"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["measurement", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    return out.strip()


def test_mode_seves_is_sev_es(capsys: pytest.CaptureFixture[str]) -> None:
    firmware = ["--firmware", str(AMDSEV)]
    ours = _ok(capsys, "digest", "--mode", "sev-es", *firmware, *ES_VCPU)
    assert _ok(capsys, "digest", "--mode", "seves", *firmware, *ES_VCPU) == ours
    oracle = subprocess.run(
        [sys.executable, "-m", "sevsnpmeasure.cli", "--output-format", "hex", "--mode", "seves",
         "--ovmf", str(AMDSEV), *ES_VCPU],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    assert ours == oracle and len(bytes.fromhex(ours)) == 32  # SHA-256
    # Its usage errors name sev-es's needs like sev-es's own.
    code, _, err = _run(capsys, "digest", "--mode", "seves", *firmware)
    assert code == 2 and "sev-es needs --vcpu-type" in err


@pytest.mark.parametrize("mode", ["sev", "sev-es", "seves"])
def test_output_format_base64_for_sev_digests(capsys: pytest.CaptureFixture[str], mode: str) -> None:
    argv = ["digest", "--mode", mode, "--firmware", str(AMDSEV), *([] if mode == "sev" else ES_VCPU)]
    hex_out = _ok(capsys, *argv)
    assert _ok(capsys, *argv, "--output-format", "hex") == hex_out
    b64 = _ok(capsys, *argv, "--output-format", "base64")
    assert base64.b64decode(b64, validate=True) == bytes.fromhex(hex_out)
    oracle = subprocess.run(
        [sys.executable, "-m", "sevsnpmeasure.cli", "--output-format", "base64", "--mode",
         "seves" if mode != "sev" else "sev", "--ovmf", str(AMDSEV), *([] if mode == "sev" else ES_VCPU)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    assert b64 == oracle


def _sevctl_build(case: dict[str, Any]) -> list[str]:
    """`build` with sevctl's own argument forms: base64 nonce, the TIK file as sevctl reads it."""
    inputs = case["inputs"]
    args = ["build"]
    for name in ("api_major", "api_minor", "build_id", "policy"):
        args += [f"--{name.replace('_', '-')}", str(inputs[name])]
    return [*args, "--tik", str(VECTORS / inputs["tik_file"]), "--nonce", inputs["nonce_b64"]]


def test_build_takes_sevctls_base64(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    case = KAT["sevctl-measurement-build-launch-digest"]
    inputs, expected = case["inputs"], case["expected"]["launch_measure_blob_b64"]
    digest_b64 = inputs["launch_digest_b64"]
    assert _ok(capsys, *_sevctl_build(case), "--launch-digest", digest_b64) == expected
    # The hex spellings give the same.
    hex_args = [a if a != inputs["nonce_b64"] else base64.b64decode(a).hex() for a in _sevctl_build(case)]
    assert _ok(capsys, *hex_args, "--launch-digest", base64.b64decode(digest_b64).hex()) == expected
    # The TIK as base64 text, in a file or on the command line (sevctl's "path or base64").
    tik_b64 = base64.b64encode(bytes.fromhex(inputs["tik_hex"])).decode()
    (tmp_path / "tik.b64").write_text(tik_b64 + "\n")
    for tik in (str(tmp_path / "tik.b64"), tik_b64):
        argv = _sevctl_build(case)
        argv[argv.index("--tik") + 1] = tik
        assert _ok(capsys, *argv, "--launch-digest", digest_b64) == expected
    # The nonce from a file (raw bytes) too.
    (tmp_path / "nonce.bin").write_bytes(base64.b64decode(inputs["nonce_b64"]))
    argv = _sevctl_build(case)
    argv[argv.index("--nonce") + 1] = str(tmp_path / "nonce.bin")
    assert _ok(capsys, *argv, "--launch-digest", digest_b64) == expected


def test_build_blob_from_a_file_outfile_and_hex_output(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    case = KAT["sevctl-measurement-build-sev-es-vmsa"]
    inputs, expected = case["inputs"], case["expected"]["launch_measure_blob_b64"]
    (tmp_path / "blob.b64").write_text(inputs["launch_measure_blob_b64"] + "\n")
    base = ["build"]
    for name in ("api_major", "api_minor", "build_id", "policy"):
        base += [f"--{name.replace('_', '-')}", str(inputs[name])]
    digest_args = [
        "--firmware", str(VECTORS / inputs["firmware_file"]), "--vcpus", str(inputs["num_cpus"]),
        "--vcpu-family", "25", "--vcpu-model", "1", "--vcpu-stepping", "1", "--vmsa-layout", "legacy",
    ]  # fmt: skip
    argv = [
        *base,
        "--tik",
        str(VECTORS / inputs["tik_file"]),
        "--launch-measure-blob",
        str(tmp_path / "blob.b64"),
    ]
    out = tmp_path / "measurement.bin"
    # `--mode seves` agrees with the policy's ES bit.
    assert _ok(capsys, *argv, *digest_args, "--mode", "seves", "--outfile", str(out)) == expected
    assert out.read_bytes() == base64.b64decode(expected) and len(out.read_bytes()) == 48
    hex_out = _ok(capsys, *argv, *digest_args, "--output-format", "hex")
    assert bytes.fromhex(hex_out) == base64.b64decode(expected)
    # The blob as raw bytes in a file.
    (tmp_path / "blob.bin").write_bytes(base64.b64decode(inputs["launch_measure_blob_b64"]))
    argv[-1] = str(tmp_path / "blob.bin")
    assert _ok(capsys, *argv, *digest_args) == expected


@pytest.mark.parametrize(
    ("extra", "message", "code"),
    [
        (["--launch-digest", "not base64 or hex!"], "neither hex nor base64", 2),
        (["--launch-digest", base64.b64encode(bytes(31)).decode()], "must be 32 bytes", 2),
        (["--launch-digest", "00" * 32, "--mode", "seves"], "not both", 2),
    ],
)
def test_build_spelling_errors(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str, code: int
) -> None:
    got, out, err = _run(capsys, *_sevctl_build(KAT["sevctl-measurement-build-launch-digest"]), *extra)
    assert (got, out) == (code, "")
    assert message in err


def test_build_tik_neither_file_nor_base64(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = _sevctl_build(KAT["sevctl-measurement-build-launch-digest"])
    argv[argv.index("--tik") + 1] = str(tmp_path / "missing tik")
    code, out, err = _run(capsys, *argv, "--launch-digest", "00" * 32)
    assert (code, out) == (1, "") and "no such file, and not base64" in err
    (tmp_path / "tik").write_text("not a TIK")
    argv[argv.index("--tik") + 1] = str(tmp_path / "tik")
    code, _, err = _run(capsys, *argv, "--launch-digest", "00" * 32)
    assert code == 1 and "16 raw bytes (or their base64)" in err
