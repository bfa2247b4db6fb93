"""`sevlaunch session` and `sevlaunch secret build`, run through the real dispatcher on real vector files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import struct
from pathlib import Path
from typing import Any

import pytest

from sevlaunch.cli import main
from sevlaunch.sev.cert import SEVCertificate, Usage
from sevlaunch.sev.secret import SecretHeader, SecretTable, open_secret
from sevlaunch.sev.session import SessionBlob, TransportKeys

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
MILAN = VECTORS / "chains/virtee-milan"
SEVCTL = VECTORS / "secret/sevctl"


def _case(case_id: str) -> dict[str, Any]:
    cases = json.loads((VECTORS / "kat.json").read_text())["cases"]
    return next(c for c in cases if c["id"] == case_id)


def _parts(chain: Path, *, with_roots: bool = False) -> list[str]:
    names = ("pdh", "pek", "oca", "cek", "ask", "ark") if with_roots else ("pdh", "pek", "oca", "cek")
    return [arg for n in names for arg in (f"--{n}", str(chain / f"{n}.cert"))]


def _check_session_dir(out: Path, policy: int) -> None:
    for name in ("tek.bin", "tik.bin"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    godh = SEVCertificate.from_bytes(base64.b64decode((out / "godh.b64").read_text()))
    assert godh.usage == Usage.PDH
    blob = SessionBlob.from_bytes(base64.b64decode((out / "session.b64").read_text()))
    tik = (out / "tik.bin").read_bytes()
    assert len((out / "tek.bin").read_bytes()) == 16 and len(tik) == 16
    # The written TIK is the one inside the blob: policy_mac recomputed with stdlib hmac.
    assert blob.policy_mac == hmac.new(tik, struct.pack("<I", policy), hashlib.sha256).digest()


def test_session_from_separate_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert main(["session", *_parts(MILAN), "--policy", "0x3", "--out", str(out)]) == 0
    _check_session_dir(out, 3)
    assert "milan" in capsys.readouterr().out


@pytest.mark.parametrize("encoding", ["raw", "base64"])
def test_session_from_full_chain(tmp_path: Path, encoding: str) -> None:
    full = b"".join((MILAN / f"{n}.cert").read_bytes() for n in ("pdh", "pek", "oca", "cek", "ask", "ark"))
    chain = tmp_path / "chain"
    chain.write_bytes(full if encoding == "raw" else base64.b64encode(full))
    assert main(["session", "--chain", str(chain), "--policy", "7", "--out", str(tmp_path / "o")]) == 0
    _check_session_dir(tmp_path / "o", 7)


def _assert_one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("sevlaunch: error:")
    for needle in needles:
        assert needle in err


def test_session_refuses_unsigned_cek(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The 2019-02 Naples chain carries the firmware-exported (unsigned) CEK: ASK->CEK cannot hold.
    chain = VECTORS / "chains/virtee-naples-2019-02"
    out = tmp_path / "o"
    assert main(["session", *_parts(chain, with_roots=True), "--policy", "3", "--out", str(out)]) == 1
    _assert_one_line_error(capsys, "ASK->CEK")
    assert not out.exists()


def test_session_refuses_foreign_pdh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parts(MILAN)
    args[1] = str(VECTORS / "chains/virtee-rome/pdh.cert")
    assert main(["session", *args, "--policy", "3", "--out", str(tmp_path / "o")]) == 1
    _assert_one_line_error(capsys, "PEK->PDH")


def test_session_refuses_bad_policy_and_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["session", *_parts(MILAN), "--policy", "0x40", "--out", str(tmp_path / "o")]) == 1
    _assert_one_line_error(capsys, "reserved")
    args = _parts(MILAN)
    args[1] = str(MILAN / "pek.cert")  # a PEK in the PDH slot
    assert main(["session", *args, "--policy", "3", "--out", str(tmp_path / "o")]) == 1
    _assert_one_line_error(capsys, "PDH")
    # A missing --pek/--oca/--cek is a usage error: exit status 2.
    assert main(["session", "--pdh", str(MILAN / "pdh.cert"), "--policy", "3", "--out", str(tmp_path)]) == 2
    _assert_one_line_error(capsys, "--pek")


def _secret_args(case: dict[str, Any], tmp_path: Path, *extra: str) -> list[str]:
    i = case["inputs"]
    return [
        "secret",
        "build",
        "--tek",
        str(VECTORS / i["tek_file"]),
        "--tik",
        str(VECTORS / i["tik_file"]),
        "--launch-measure-blob",
        i["launch_measure_blob_b64"],
        "--header-out",
        str(tmp_path / "header"),
        "--payload-out",
        str(tmp_path / "payload"),
        *extra,
    ]


@pytest.mark.parametrize("case_id", ["sevctl-secret-build-one-secret", "sevctl-secret-build-two-secrets"])
@pytest.mark.parametrize("as_base64", [False, True])
def test_secret_build_matches_sevctl(case_id: str, as_base64: bool, tmp_path: Path) -> None:
    # kat.json sevctl-secret-build-* with the real sevctl files and the case's fixed IV.
    case = _case(case_id)
    secrets_args = [
        a for s in case["inputs"]["secrets"] for a in ("--secret", f"{s['guid']}:{VECTORS / s['file']}")
    ]
    extra = ["--iv", case["inputs"]["iv_b64"], *secrets_args, *(["--base64"] if as_base64 else [])]
    assert main(_secret_args(case, tmp_path, *extra)) == 0
    header, payload = (tmp_path / "header").read_bytes(), (tmp_path / "payload").read_bytes()
    if as_base64:
        header, payload = base64.b64decode(header), base64.b64decode(payload)
    assert base64.b64encode(header).decode() == case["expected"]["header_b64"]
    assert base64.b64encode(payload).decode() == case["expected"]["payload_b64"]


def test_secret_build_random_iv_opens_in_firmware(tmp_path: Path) -> None:
    case = _case("sevctl-secret-build-one-secret")
    guid = case["inputs"]["secrets"][0]["guid"]
    assert main(_secret_args(case, tmp_path, "--secret", f"{guid}:{SEVCTL / 'secret1.txt'}")) == 0
    header = SecretHeader.from_bytes((tmp_path / "header").read_bytes())
    assert base64.b64encode(header.iv).decode() != case["inputs"]["iv_b64"]
    keys = TransportKeys((SEVCTL / "tek1.bin").read_bytes(), (SEVCTL / "tik1.bin").read_bytes())
    measure = base64.b64decode(case["inputs"]["launch_measure_blob_b64"])[:32]
    table = SecretTable.from_bytes(open_secret(keys, measure, header, (tmp_path / "payload").read_bytes()))
    assert table.entries[0].data == b"MY-LUKS-PASSPHRASE"


def test_secret_build_old_api_leaves_measure_out(tmp_path: Path) -> None:
    case = _case("sevctl-secret-build-one-secret")
    guid = case["inputs"]["secrets"][0]["guid"]
    args = ["--iv", case["inputs"]["iv_b64"], "--secret", f"{guid}:{SEVCTL / 'secret1.txt'}"]
    assert main(_secret_args(case, tmp_path, *args, "--api-major", "0", "--api-minor", "16")) == 0
    header = SecretHeader.from_bytes((tmp_path / "header").read_bytes())
    payload = (tmp_path / "payload").read_bytes()
    tik = (SEVCTL / "tik1.bin").read_bytes()
    msg = b"\x01" + bytes(4) + header.iv + struct.pack("<II", len(payload), len(payload)) + payload
    assert header.mac == hmac.new(tik, msg, hashlib.sha256).digest()  # no measure appended
    assert base64.b64encode(header.to_bytes()).decode() != case["expected"]["header_b64"]


def test_secret_build_max_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # kat.json sevctl-secret-build-max-size-padding: both big secrets give 16384-byte payloads.
    case = _case("sevctl-secret-build-max-size-padding")
    guid = case["inputs"]["guid"]
    for name in case["inputs"]["secret_files"]:
        args = ["--secret", f"{guid}:{VECTORS / name}"]
        assert main(_secret_args(case, tmp_path, *args, "--max-size", "16384")) == 0
        assert len((tmp_path / "payload").read_bytes()) == case["derived"]["payload_len_each"]
        # OVMF's default 3 KiB secret area cannot take it.
        assert main(_secret_args(case, tmp_path, *args)) == 1
        _assert_one_line_error(capsys, "secret_too_large")


@pytest.mark.parametrize(
    ("change", "needle", "code"),
    [
        (["--secret", "not-a-guid:x"], "GUID", 1),
        (["--secret", "736869e5-84f0-4973-92ec-06879ce3da0b"], "GUID:FILE", 1),
        (["--secret", "736869e5-84f0-4973-92ec-06879ce3da0b:/nonexistent/file"], "cannot read", 1),
        (["--api-major", "1"], "--api-minor", 2),  # a usage error: the partner option is missing
        (["--iv", "!!"], "--iv", 2),  # not base64: the option's text is malformed, a usage error
        (["--iv", "AAAA"], "IV", 1),
    ],
)
def test_secret_build_errors(
    change: list[str], needle: str, code: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = _case("sevctl-secret-build-one-secret")
    base = ["--secret", f"{case['inputs']['secrets'][0]['guid']}:{SEVCTL / 'secret1.txt'}"]
    args = change if change[0] == "--secret" else [*base, *change]
    assert main(_secret_args(case, tmp_path, *args)) == code
    _assert_one_line_error(capsys, needle)


def test_secret_build_bad_keys_and_blob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = _case("sevctl-secret-build-one-secret")
    secret = ["--secret", f"{case['inputs']['secrets'][0]['guid']}:{SEVCTL / 'secret1.txt'}"]
    args = _secret_args(case, tmp_path, *secret)
    args[args.index("--tek") + 1] = str(SEVCTL / "secret1.txt")
    assert main(args) == 1
    _assert_one_line_error(capsys, "TEK", "16 bytes")
    args = _secret_args(case, tmp_path, *secret)
    args[args.index("--launch-measure-blob") + 1] = base64.b64encode(bytes(47)).decode()
    assert main(args) == 1
    _assert_one_line_error(capsys, "48 bytes")
