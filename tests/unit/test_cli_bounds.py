"""Issue 12, item 7: every numeric option of `measurement` and `secret build` is range-checked while the
command line is parsed, with the option's name and range, before any work (exit status 2).

`measurement digest --vcpus 99999999999` used to build that many VMSAs (unbounded time and memory), and
`secret build --api-major 99999999999` exited 0 although the field is one byte (a value above 255 picks a
MAC rule no firmware has). The limits are the services' (`sevlaunch.limits`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from sevlaunch.cli import main
from sevlaunch.limits import MAX_SECRET_AREA_SIZE, MAX_VCPUS

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
AMDSEV = VECTORS / "measurement" / "ovmf_AmdSev_suffix.bin"


def _case(case_id: str) -> dict[str, Any]:
    cases = json.loads((VECTORS / "kat.json").read_text())["cases"]
    return next(c for c in cases if c["id"] == case_id)


def _secret_build(tmp_path: Path, *extra: str) -> list[str]:
    i = _case("sevctl-secret-build-one-secret")["inputs"]
    secret = i["secrets"][0]
    return [
        "secret",
        "build",
        "--tek",
        str(VECTORS / i["tek_file"]),
        "--tik",
        str(VECTORS / i["tik_file"]),
        "--launch-measure-blob",
        i["launch_measure_blob_b64"],
        "--secret",
        f"{secret['guid']}:{VECTORS / secret['file']}",
        "--header-out",
        str(tmp_path / "header"),
        "--payload-out",
        str(tmp_path / "payload"),
        *extra,
    ]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], option: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err
    assert "Traceback" not in err
    return err


def test_huge_vcpu_count_is_refused_before_any_digest_work(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    err = _refused(
        ["measurement", "digest", "--mode", "sev-es", "--firmware", str(AMDSEV), "--vcpu-type", "EPYC",
         "--vcpus", "99999999999"],
        capsys,
        "--vcpus",
    )
    assert f"at most {MAX_VCPUS}" in err
    assert time.monotonic() - started < 5  # refused at parse time, not after building VMSAs


def test_zero_vcpus_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # Moved from test_cli_measurement.py's usage errors: now an argparse error (usage line + message).
    argv = ["measurement", "digest", "--mode", "sev-es", "--firmware", str(AMDSEV), "--vcpu-sig", "0x1"]
    err = _refused([*argv, "--vcpus", "0"], capsys, "--vcpus")
    assert "at least 1" in err


def test_one_byte_api_version_wider_than_a_byte_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for option in ("--api-major", "--api-minor"):
        other = "--api-minor" if option == "--api-major" else "--api-major"
        err = _refused(_secret_build(tmp_path, option, "99999999999", other, "0"), capsys, option)
        assert "at most 255" in err
        assert not (tmp_path / "header").exists()
    # The largest one-byte values still work.
    assert main(_secret_build(tmp_path, "--api-major", "255", "--api-minor", "255")) == 0


@pytest.mark.parametrize("value", ["0", "-1", str(MAX_SECRET_AREA_SIZE + 1), "1e9", "0x10"])
def test_secret_area_size_out_of_range_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    _refused(_secret_build(tmp_path, "--max-size", value), capsys, "--max-size")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--api-major", "256"),
        ("--api-minor", "-1"),
        ("--build-id", "0x100"),
        ("--policy", str(2**32)),
        ("--vcpus", "0"),
        ("--vcpus", str(MAX_VCPUS + 1)),
        ("--vcpu-family", str(0xF + 0xFF + 1)),
        ("--vcpu-model", "256"),
        ("--vcpu-stepping", "16"),
        ("--policy", "lots"),
    ],
)
def test_measurement_build_numeric_options_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    tik = tmp_path / "tik"
    tik.write_bytes(bytes(16))
    args = {"--api-major": "0", "--api-minor": "24", "--build-id": "15", "--policy": "0x3"}
    args[option] = value
    argv = ["measurement", "build", "--tik", str(tik), "--nonce", "00" * 16, "--mode", "sev-es",
            "--firmware", str(AMDSEV)]
    argv += [a for kv in args.items() for a in kv]
    _refused(argv, capsys, option)


def test_vcpu_signature_wider_than_32_bits_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    _refused(
        ["measurement", "digest", "--mode", "sev-es", "--firmware", str(AMDSEV), "--vcpu-sig", hex(2**32)],
        capsys,
        "--vcpu-sig",
    )


def test_cli_limits_are_the_services() -> None:
    """Until the services take their limits from sevlaunch.limits, they must agree."""
    from launcher_svc.core import spec
    from owner_svc.core import model
    from sevlaunch import limits

    assert (spec.MAX_VCPUS, spec.MIN_MEMORY_MIB, spec.MAX_MEMORY_MIB) == (
        limits.MAX_VCPUS,
        limits.MIN_MEMORY_MIB,
        limits.MAX_MEMORY_MIB,
    )
    assert model.MAX_SECRET_AREA_SIZE == limits.MAX_SECRET_AREA_SIZE


# The other commands' numeric options: each value out of its field's range (or not finite, for a
# duration) is refused while parsing, naming the option.
OTHER_COMMANDS = [
    (["emulator", "init", "--state", "/nonexistent/x", "--api-major"], "--api-major", "256"),
    (["emulator", "init", "--state", "/nonexistent/x", "--build"], "--build", "0x100"),
    (["emulator", "init", "--state", "/nonexistent/x", "--max-guests"], "--max-guests", "99999999999"),
    (["emulator", "kds", "--state", "/nonexistent/x", "--retry-after"], "--retry-after", "-1"),
    (["owner", "sessions", "--limit"], "--limit", "0"),
    (["owner", "audit", "show", "--after"], "--after", "-1"),
    (["platform", "status", "--timeout"], "--timeout", "nan"),
    (["platform", "status", "--timeout"], "--timeout", "1e12"),
    (["session", "--chain", "/nonexistent", "--out", "/nonexistent", "--policy"], "--policy", "0x100000000"),
    (["snp", "id-block", "--launch-digest", "00", "--id-key", "k", "--author-key", "a", "--out", "o",
      "--guest-svn"], "--guest-svn", str(1 << 32)),
    (["refvalues", "make", "--firmware", "f", "--name", "n", "--version", "1", "--out", "o",
      "--valid-days"], "--valid-days", "99999999999"),
    (["guest", "attest", "--init-data", "i", "--out", "o", "--timeout"], "--timeout", "inf"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "option", "value"), OTHER_COMMANDS)
def test_other_numeric_options_are_range_checked(
    argv: list[str], option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _refused([*argv, value], capsys, option)
