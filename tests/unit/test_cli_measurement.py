"""`sevlaunch measurement digest|build`: against sev-snp-measure's CLI and sevctl's known answers."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sevlaunch.cli import main
from sevlaunch.sev.digest import launch_digest
from sevlaunch.sev.vmsa import VMSALayout, vcpu_signature

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
AMDSEV = VECTORS / "measurement" / "ovmf_AmdSev_suffix.bin"
CODE_4M = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
KAT = {case["id"]: case for case in json.loads((VECTORS / "kat.json").read_text())["cases"]}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["measurement", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _oracle_cli(*argv: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "sevsnpmeasure.cli", "--output-format", "hex", *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


def _need_4m() -> str:
    if not CODE_4M.exists():
        pytest.skip(f"{CODE_4M} not installed (Debian package ovmf)")
    return str(CODE_4M)


def test_digest_sev_equals_sev_snp_measure_cli(capsys: pytest.CaptureFixture[str]) -> None:
    firmware = _need_4m()
    code, out, _ = _run(capsys, "digest", "--mode", "sev", "--firmware", firmware)
    assert code == 0
    assert out.strip() == _oracle_cli("--mode", "sev", "--ovmf", firmware)


def test_digest_seves_family_equals_sev_snp_measure_cli(capsys: pytest.CaptureFixture[str]) -> None:
    firmware = _need_4m()
    vcpu = ["--vcpus", "2", "--vcpu-family", "25", "--vcpu-model", "1", "--vcpu-stepping", "1"]
    code, out, _ = _run(capsys, "digest", "--mode", "sev-es", "--firmware", firmware, *vcpu)
    assert code == 0
    assert out.strip() == _oracle_cli("--mode", "seves", "--ovmf", firmware, *vcpu)


def test_digest_seves_kernel_equals_sev_snp_measure_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"kernel" * 1000)
    (tmp_path / "initrd").write_bytes(b"initrd" * 700)
    files = ["--kernel", str(tmp_path / "vmlinuz"), "--initrd", str(tmp_path / "initrd")]
    vcpu = ["--vcpus", "4", "--vcpu-type", "EPYC-Genoa"]
    code, out, _ = _run(
        capsys, "digest", "--mode", "sev-es", "--firmware", str(AMDSEV), *files, "--cmdline", "quiet", *vcpu
    )
    assert code == 0
    assert out.strip() == _oracle_cli(
        "--mode", "seves", "--ovmf", str(AMDSEV), *files, "--append", "quiet", *vcpu
    )


@pytest.mark.parametrize("layout", list(VMSALayout))
def test_digest_vcpu_sig_and_layout(capsys: pytest.CaptureFixture[str], layout: VMSALayout) -> None:
    sig = vcpu_signature("EPYC-Rome")
    code, out, _ = _run(
        capsys, "digest", "--mode", "sev-es", "--firmware", str(AMDSEV), "--vcpus", "2",
        "--vcpu-sig", hex(sig), "--vmsa-layout", layout.value,
    )  # fmt: skip
    assert code == 0
    expected = launch_digest(AMDSEV.read_bytes(), mode="sev-es", vcpus=2, vcpu_sig=sig, layout=layout)
    assert out.strip() == expected.hex()


def test_digest_kat_kernel_only(capsys: pytest.CaptureFixture[str]) -> None:
    case = KAT["sev-launch-digest-ovmf-amdsev-kernel-only"]
    code, out, _ = _run(capsys, "digest", "--mode", "sev", "--firmware", str(AMDSEV), "--kernel", "/dev/null")
    assert code == 0
    assert out.strip() == case["expected"]["launch_digest_hex"]


@pytest.mark.parametrize(
    ("argv", "message", "status"),
    [
        (["--mode", "sev-es", "--firmware", str(AMDSEV)], "needs --vcpu-type", 2),
        (["--mode", "sev", "--firmware", str(AMDSEV), "--initrd", "/dev/null"], "need --kernel", 2),
        (["--mode", "sev-es", "--firmware", str(AMDSEV), "--vcpu-family", "25"], "--vcpu-model", 2),
        (["--mode", "sev", "--firmware", "/nonexistent/ovmf.fd"], "cannot read", 1),
        (["--mode", "sev"], "--firmware is required", 2),
    ],
)
def test_digest_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str, status: int
) -> None:
    # 2: the command line is wrong (a usage error); 1: the command failed (an unreadable file).
    code, out, err = _run(capsys, "digest", *argv)
    assert code == status
    assert out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_digest_kernel_with_debian_firmware_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    firmware = _need_4m()
    code, _, err = _run(capsys, "digest", "--mode", "sev", "--firmware", firmware, "--kernel", "/dev/null")
    assert code == 1
    assert "no_hashes_table" in err
    oracle = subprocess.run(
        [
            sys.executable,
            "-m",
            "sevsnpmeasure.cli",
            "--mode",
            "sev",
            "--ovmf",
            firmware,
            "--kernel",
            "/dev/null",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert oracle.returncode != 0


def _build_args(case: dict[str, Any]) -> list[str]:
    inputs = case["inputs"]
    args = ["build"]
    for name in ("api_major", "api_minor", "build_id", "policy"):
        args += [f"--{name.replace('_', '-')}", str(inputs[name])]
    args += ["--tik", str(VECTORS / inputs["tik_file"])]
    if "nonce_b64" in inputs:
        args += ["--nonce", base64.b64decode(inputs["nonce_b64"]).hex()]
    else:
        args += ["--launch-measure-blob", inputs["launch_measure_blob_b64"]]
    return args


def test_build_with_launch_digest(capsys: pytest.CaptureFixture[str]) -> None:
    case = KAT["sevctl-measurement-build-launch-digest"]
    digest = base64.b64decode(case["inputs"]["launch_digest_b64"]).hex()
    code, out, _ = _run(capsys, *_build_args(case), "--launch-digest", digest)
    assert code == 0
    assert out.strip() == case["expected"]["launch_measure_blob_b64"]


def test_build_firmware(capsys: pytest.CaptureFixture[str]) -> None:
    case = KAT["sevctl-measurement-build-firmware"]
    firmware = str(VECTORS / case["inputs"]["firmware_file"])
    code, out, _ = _run(capsys, *_build_args(case), "--firmware", firmware)
    assert code == 0
    assert out.strip() == case["expected"]["launch_measure_blob_b64"]


def test_build_kernel_hashes(capsys: pytest.CaptureFixture[str]) -> None:
    case = KAT["sevctl-measurement-build-kernel-hashes"]
    inputs = case["inputs"]
    code, out, _ = _run(
        capsys, *_build_args(case), "--mode", "sev",
        "--firmware", str(VECTORS / inputs["firmware_file"]),
        "--kernel", str(VECTORS / inputs["kernel_file"]),
        "--initrd", str(VECTORS / inputs["initrd_file"]),
        "--cmdline", inputs["cmdline"],
    )  # fmt: skip
    assert code == 0
    assert out.strip() == case["expected"]["launch_measure_blob_b64"]


def test_build_sev_es_vmsa(capsys: pytest.CaptureFixture[str]) -> None:
    """The policy's ES bit selects SEV-ES; sevctl's pages are the legacy layout."""
    case = KAT["sevctl-measurement-build-sev-es-vmsa"]
    inputs = case["inputs"]
    digest_args = [
        "--firmware", str(VECTORS / inputs["firmware_file"]), "--vcpus", str(inputs["num_cpus"]),
        "--vcpu-family", "25", "--vcpu-model", "1", "--vcpu-stepping", "1",
    ]  # fmt: skip
    code, out, _ = _run(capsys, *_build_args(case), *digest_args, "--vmsa-layout", "legacy")
    assert code == 0
    assert out.strip() == case["expected"]["launch_measure_blob_b64"]
    # The init2 layout is a different launch, so a different measurement.
    code, out, _ = _run(capsys, *_build_args(case), *digest_args, "--vmsa-layout", "init2")
    assert code == 0
    assert out.strip() != case["expected"]["launch_measure_blob_b64"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "sev-es", "--firmware", str(AMDSEV), "--vcpu-type", "EPYC"], "contradicts policy"),
        (["--launch-digest", "00" * 32, "--firmware", str(AMDSEV)], "not both"),
        (["--launch-digest", "00" * 31], "32 bytes"),
        ([], "--firmware is required"),
    ],
)
def test_build_errors(capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    case = KAT["sevctl-measurement-build-firmware"]
    code, out, err = _run(capsys, *_build_args(case), *extra)
    assert (code, out) == (2, "")  # each is a usage error: options that contradict, miss or misspell
    assert message in err


def test_build_rejects_bad_tik_and_blob(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "tik").write_bytes(bytes(15))
    base = ["build", "--api-major", "0", "--api-minor", "24", "--build-id", "15", "--policy", "3"]
    code, _, err = _run(capsys, *base, "--tik", str(tmp_path / "tik"), "--nonce", "00" * 16,
                        "--launch-digest", "00" * 32)  # fmt: skip
    assert code == 1 and "16 raw bytes" in err
    (tmp_path / "tik").write_bytes(bytes(16))
    code, _, err = _run(capsys, *base, "--tik", str(tmp_path / "tik"), "--launch-measure-blob", "AAAA",
                        "--launch-digest", "00" * 32)  # fmt: skip
    assert code == 2 and "48 bytes" in err  # the option's text, not a file: a usage error
