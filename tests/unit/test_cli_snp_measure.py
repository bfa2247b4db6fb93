"""`sevlaunch measurement digest --mode snp...` against sev-snp-measure's command, with its spellings, and
`sevlaunch snp id-block` against snp-create-id-block."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sevlaunch.cli import main
from sevlaunch.snp.idblock import IdAuth, IdBlock

SNP = Path(__file__).resolve().parents[1] / "vectors" / "snp"
AMDSEV = SNP / "measurement" / "ovmf_AmdSev_suffix.bin"
DEBIAN_2M = Path("/usr/share/OVMF/OVMF_CODE.fd")
KAT: list[dict[str, Any]] = json.loads((SNP / "kat-snp.json").read_text())

# Not usage errors but failures (exit 1): a file that cannot be read, a value the SNP core refuses.
_FAILURES = {"cannot read", "SNPActive", "not a PEM private key"}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exited:  # argparse's own usage errors (values out of range)
        code = int(exited.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _oracle_cli(*argv: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "sevsnpmeasure.cli", *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


def _kat_argv(inputs: dict[str, Any]) -> list[str]:
    """The sev-snp-measure command line of a kat case, in sev-snp-measure's spellings."""
    argv = ["--mode", inputs["mode"], "--vcpus", str(inputs["vcpus"]), "--ovmf", str(SNP / inputs["ovmf"])]
    if inputs["vcpu_type"]:
        argv += ["--vcpu-type", inputs["vcpu_type"]]
    for name in ("kernel", "initrd"):
        if inputs[name] is not None:
            argv += [f"--{name}", str(SNP / inputs[name])]
    if inputs["cmdline"] is not None:
        argv += ["--append", inputs["cmdline"]]
    argv += ["--guest-features", inputs["guest_features"], "--vmm-type", inputs["vmm_type"]]
    if inputs.get("snp_ovmf_hash"):
        argv += ["--snp-ovmf-hash", inputs["snp_ovmf_hash"]]
    if inputs.get("svsm"):
        argv += ["--svsm", str(SNP / inputs["svsm"]), "--vars-size", str(inputs["vars_size"])]
    return argv


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c["id"]) for c in KAT if c["kind"] == "snp_launch_digest"]
)
def test_kat_through_the_command(capsys: pytest.CaptureFixture[str], case: dict[str, Any]) -> None:
    code, out, err = _run(capsys, "measurement", "digest", *_kat_argv(case["inputs"]))
    assert (code, err) == (0, "")
    assert out == case["expected"] + "\n" and len(out.strip()) == 96


def test_kat_ovmf_hash_and_error(capsys: pytest.CaptureFixture[str]) -> None:
    (hash_case,) = (c for c in KAT if c["kind"] == "snp_ovmf_hash")
    code, out, _ = _run(
        capsys,
        "measurement",
        "digest",
        "--mode",
        "snp:ovmf-hash",
        "--ovmf",
        str(SNP / hash_case["inputs"]["ovmf"]),
    )
    assert (code, out.strip()) == (0, hash_case["expected"])
    (error_case,) = (c for c in KAT if c["kind"] == "snp_launch_digest_error")
    code, out, err = _run(capsys, "measurement", "digest", *_kat_argv(error_case["inputs"]))
    # The firmware cannot measure a kernel: the command failed (1), the command line was fine.
    assert code == 1 and out == "" and error_case["expected"]["error"] in err


@pytest.mark.parametrize(
    "extra",
    [
        ["--vcpus", "1", "--vcpu-type", "EPYC-v4"],
        ["--vcpus", "4", "--vcpu-type", "EPYC-Milan", "--guest-features", "0x21"],
        ["--vcpus", "16", "--vcpu-type", "EPYC-Genoa", "--guest-features", "0x21", "--vmm-type", "ec2"],
        ["--vcpus", "2", "--vcpu-family", "25", "--vcpu-model", "17", "--vcpu-stepping", "0"],
        ["--vcpus", "2", "--vcpu-sig", "0xa00f11"],
        ["--vcpus", "4", "--vmm-type", "gce"],
    ],
)
def test_debian_ovmf_equals_sev_snp_measure_command(
    capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    assert DEBIAN_2M.exists(), "Debian's ovmf package is needed"
    code, out, _ = _run(
        capsys, "measurement", "digest", "--mode", "snp", "--firmware", str(DEBIAN_2M), *extra
    )
    assert code == 0
    assert out.strip() == _oracle_cli("--mode", "snp", "--ovmf", str(DEBIAN_2M), *extra)


def test_kernel_options_and_base64(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"\x7fkernel" * 999)
    initrd.write_bytes(b"initrd" * 777)
    common = ["--vcpus", "2", "--vcpu-type", "EPYC-v4", "--kernel", str(kernel), "--initrd", str(initrd)]
    theirs = _oracle_cli(
        "--mode",
        "snp",
        "--ovmf",
        str(AMDSEV),
        *common,
        "--append",
        "console=ttyS0",
        "--output-format",
        "base64",
    )
    # Our spellings (--firmware, --cmdline, sev-snp) and theirs (--ovmf, --append, snp) give the same digest.
    for mode, firmware, cmdline in (("snp", "--ovmf", "--append"), ("sev-snp", "--firmware", "--cmdline")):
        code, out, _ = _run(
            capsys,
            "measurement",
            "digest",
            "--mode",
            mode,
            firmware,
            str(AMDSEV),
            *common,
            cmdline,
            "console=ttyS0",
            "--output-format",
            "base64",
        )
        assert (code, out.strip()) == (0, theirs)
        assert len(base64.b64decode(out)) == 48


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "snp", "--firmware", str(AMDSEV)], "needs --vcpu-type"),
        (["--mode", "snp", "--vcpu-type", "EPYC"], "--firmware is required"),
        (
            ["--mode", "snp", "--firmware", str(AMDSEV), "--vcpu-type", "EPYC", "--initrd", "x"],
            "need --kernel",
        ),
        (
            ["--mode", "snp", "--firmware", str(AMDSEV), "--vcpu-type", "EPYC", "--guest-features", "0x20"],
            "SNPActive",
        ),
        (
            ["--mode", "snp", "--firmware", str(AMDSEV), "--vcpu-type", "EPYC", "--snp-ovmf-hash", "abcd"],
            "48 bytes",
        ),
        (
            ["--mode", "snp", "--firmware", str(AMDSEV), "--vcpu-type", "EPYC", "--svsm", str(AMDSEV)],
            "snp:svsm",
        ),
        (["--mode", "snp:svsm", "--firmware", str(AMDSEV), "--vcpu-type", "EPYC"], "needs --svsm"),
        (
            ["--mode", "snp:svsm", "--firmware", str(AMDSEV), "--vcpu-type", "EPYC", "--svsm", str(AMDSEV)],
            "--vars-size",
        ),
        (["--mode", "snp:ovmf-hash", "--firmware", str(AMDSEV), "--kernel", str(AMDSEV)], "no --kernel"),
        (["--mode", "sev", "--firmware", str(AMDSEV), "--vmm-type", "ec2"], "only apply to the SNP modes"),
        (["--mode", "snp", "--firmware", "/nonexistent/ovmf.fd", "--vcpu-type", "EPYC"], "cannot read"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = _run(capsys, "measurement", "digest", *argv)
    assert code == (1 if message in _FAILURES else 2) and out == ""
    assert message in err and "Traceback" not in err


def test_unknown_vmm_type_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["measurement", "digest", "--mode", "snp", "--firmware", str(AMDSEV), "--vmm-type", "xen"])
    assert exc.value.code == 2
    assert "unknown VMM type" in capsys.readouterr().err


def test_svsm_with_vars_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (case,) = (c for c in KAT if c["id"] == "ssm-snp-svsm-2-vcpus")
    inputs = case["inputs"]
    variables = tmp_path / "OVMF_VARS.fd"
    variables.write_bytes(bytes(inputs["vars_size"]))
    code, out, _ = _run(
        capsys, "measurement", "digest", "--mode", "snp:svsm", "--firmware", str(SNP / inputs["ovmf"]),
        "--svsm", str(SNP / inputs["svsm"]), "--vars-file", str(variables), "--vcpus", "2",
        "--vcpu-type", "EPYC-v4",
    )  # fmt: skip
    assert (code, out.strip()) == (0, case["expected"])


def test_sev_modes_unchanged_and_accept_output_format(capsys: pytest.CaptureFixture[str]) -> None:
    code, hex_out, _ = _run(capsys, "measurement", "digest", "--mode", "sev", "--ovmf", str(AMDSEV))
    code_b64, b64_out, _ = _run(
        capsys,
        "measurement",
        "digest",
        "--mode",
        "sev",
        "--firmware",
        str(AMDSEV),
        "--output-format",
        "base64",
    )
    assert code == code_b64 == 0
    assert base64.b64decode(b64_out).hex() == hex_out.strip()
    assert hex_out.strip() == _oracle_cli("--mode", "sev", "--ovmf", str(AMDSEV))


# ---------------------------------------------------------------------------------- snp id-block


def _oracle_id_block(digest: bytes, id_key: Path, author_key: Path) -> str:
    script = shutil.which("snp-create-id-block") or str(Path(sys.executable).parent / "snp-create-id-block")
    return subprocess.run(
        [
            script,
            "--measurement",
            base64.b64encode(digest).decode(),
            "--idkey",
            str(id_key),
            "--authorkey",
            str(author_key),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_id_block_command_equals_snp_create_id_block(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (case,) = (c for c in KAT if c["id"] == "sev-snp-measure-id-block")
    inputs, expected = case["inputs"], case["expected"]
    id_key, author_key = SNP / inputs["id_key"], SNP / inputs["author_key"]
    code, out, err = _run(
        capsys, "snp", "id-block", "--launch-digest", inputs["launch_digest"], "--id-key", str(id_key),
        "--author-key", str(author_key), "--out", str(tmp_path),
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"id_key_digest: {expected['id_key_digest_hex']}",
        f"author_key_digest: {expected['author_key_digest_hex']}",
    ]
    block_b64 = (tmp_path / "id_block.b64").read_text().strip()
    auth_b64 = (tmp_path / "id_auth.b64").read_text().strip()
    theirs = _oracle_id_block(bytes.fromhex(inputs["launch_digest"]), id_key, author_key)
    their_block = re.search(r"id-block=([^,]+),id-auth=(\S+)", theirs)
    assert their_block is not None
    assert block_b64 == their_block[1] == expected["id_block_base64"]
    assert f"id_key_hash: {expected['id_key_digest_base64']}" in theirs
    ours, their_auth = IdAuth.from_b64(auth_b64), IdAuth.from_b64(their_block[2])
    assert (ours.id_key, ours.author_key) == (their_auth.id_key, their_auth.author_key)
    ours.verify(IdBlock.from_b64(block_b64))
    their_auth.verify(IdBlock.from_b64(block_b64))


def test_id_block_command_fields(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    id_key, author_key = (
        SNP / "idblock/virtee-sev/test_id_key.pem",
        SNP / "idblock/virtee-sev/test_auth_key.pem",
    )
    code, _, _ = _run(
        capsys, "snp", "id-block", "--launch-digest", "ab" * 48, "--id-key", str(id_key),
        "--author-key", str(author_key), "--policy", "0xb0000", "--family-id", "01" * 16,
        "--image-id", "02" * 16, "--guest-svn", "9", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0
    block = IdBlock.from_b64((tmp_path / "id_block.b64").read_text())
    assert (block.launch_digest, block.family_id, block.image_id) == (
        b"\xab" * 48,
        b"\x01" * 16,
        b"\x02" * 16,
    )
    assert (block.guest_svn, block.policy, block.version) == (9, 0xB0000, 1)
    IdAuth.from_b64((tmp_path / "id_auth.b64").read_text()).verify(block)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--launch-digest", "ab" * 32], "48 bytes"),
        (["--family-id", "zz"], "not hex"),
        (["--policy", "0x10000"], "bit 17"),
        (["--policy", str(1 << 64)], "argument --policy"),
        (["--guest-svn", "-1"], "argument --guest-svn"),
        (["--id-key", str(SNP / "measurement/empty")], "not a PEM private key"),
        (["--out", "/nonexistent-folder"], "not a folder"),
    ],
)
def test_id_block_command_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, change: list[str], message: str
) -> None:
    args = {
        "--launch-digest": "ab" * 48,
        "--id-key": str(SNP / "idblock/virtee-sev/test_id_key.pem"),
        "--author-key": str(SNP / "idblock/virtee-sev/test_auth_key.pem"),
        "--out": str(tmp_path),
    }
    args.update(dict(zip(change[::2], change[1::2], strict=True)))
    code, out, err = _run(capsys, "snp", "id-block", *[x for pair in args.items() for x in pair])
    assert code == (1 if message in _FAILURES else 2) and out == "" and message in err
    assert not (tmp_path / "id_block.b64").exists()


def test_vcpu_count_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # Range checks happen while parsing (sevlaunch.cli.bounds): argparse's usage error, exit 2.
    argv = ["--mode", "snp", "--firmware", str(AMDSEV), "--vcpu-type", "EPYC", "--vcpus", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(["measurement", "digest", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--vcpus" in err and "at least 1" in err and "Traceback" not in err
