"""`sevlaunch snp verify-report | show-report | vcek-url`: exit codes (0 verified, 1 refused, 2 usage) and
the --json fields, on the real vectors and on an emulated root passed with --trust-root."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.cli import main
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.report import AttestationReport
from sevlaunch.snp.tcb import Product, TcbVersion

SNP = Path(__file__).resolve().parents[1] / "vectors" / "snp"
R = SNP / "reports"


def verify(*args: str | Path) -> list[str]:
    return ["snp", "verify-report", *map(str, args)]


def test_real_milan_report_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    d = R / "virtee-sev-milan"
    assert main(verify("--report", d / "report.bin", "--cert", d / "vcek.der", "--at", "2026-01-15")) == 0
    out = capsys.readouterr().out
    assert "chain: AMD ARK-Milan -> VCEK ok" in out and "chip_id = VCEK hwID: ok" in out
    assert "appraisal: not done (no --policy)" in out and out.rstrip().endswith("report verified")


def test_json_fields(capsys: pytest.CaptureFixture[str]) -> None:
    d = R / "trustee-genoa-e2e"
    args = verify(
        "--report", d / "report.bin", "--cert", d / "vcek.der", "--at", "2026-01-15T12:00:00", "--json"
    )
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verified"] is True and data["appraised"] is False and "refused" not in data
    assert (data["product"], data["signing_key"], data["root"]) == ("genoa", "vcek", "AMD ARK-Genoa")
    assert data["at"] == "2026-01-15T12:00:00Z"
    assert data["report"]["reported_tcb_decoded"] == {"bootloader": 10, "tee": 0, "snp": 23, "microcode": 25,
                                                      "raw": 1807913775412543498}  # fmt: skip
    assert data["report"]["measurement"].startswith("6a6519d7")


def test_expired_vlek_refused_with_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    d = R / "trustee-milan-vlek"
    base = ("--report", d / "report.bin", "--cert", d / "vlek.der")
    assert main(verify(*base, "--at", "2025-06-01")) == 0
    capsys.readouterr()
    assert main(verify(*base, "--at", "2026-01-15")) == 1
    captured = capsys.readouterr()
    assert "REFUSED at chain: cert_not_valid: vlek_validity" in captured.out
    assert "report NOT accepted" in captured.err and "Traceback" not in captured.err


def test_forged_chain_refused_json(capsys: pytest.CaptureFixture[str]) -> None:
    d = R / "forged-milan-amd-names"
    args = verify(
        "--report", d / "report.bin", "--cert", d / "vcek.der", "--chain", d / "chain.pem", "--json"
    )
    assert main(args) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["verified"] is False
    assert data["refused"]["check"] == "chain" and data["refused"]["reason"] == "untrusted_ark"
    assert "ark_pin" in data["refused"]["detail"]


def test_tampered_and_truncated_reports_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = R / "go-sev-guest-milan"
    data = bytearray((d / "report.bin").read_bytes())
    data[0x90] ^= 1  # the measurement
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(bytes(data))
    assert main(verify("--report", tampered, "--cert", d / "vcek.der", "--at", "2026-01-15")) == 1
    assert "REFUSED at report_signature: bad_report_signature" in capsys.readouterr().out
    short = tmp_path / "short.bin"
    short.write_bytes(bytes(data[:1183]))
    assert main(verify("--report", short, "--cert", d / "vcek.der", "--json")) == 1
    refused = json.loads(capsys.readouterr().out)["refused"]
    assert refused["check"] == "report" and "report_size" in refused["detail"]


def test_wrong_product_and_wrong_signer(capsys: pytest.CaptureFixture[str]) -> None:
    d = R / "virtee-sev-milan"
    assert main(verify("--report", d / "report.bin", "--cert", d / "vcek.der", "--product", "genoa")) == 1
    assert "REFUSED at chain: wrong_issuer" in capsys.readouterr().out
    genoa = R / "trustee-genoa-e2e"
    assert (
        main(verify("--report", genoa / "report.bin", "--cert", genoa / "vcek.der", "--product", "milan"))
        == 1
    )
    assert "REFUSED at product: product_mismatch" in capsys.readouterr().out
    vlek = R / "trustee-milan-vlek"
    args = verify(
        "--report", vlek / "report.bin", "--cert", R / "trustee-milan-vcek/vcek.der", "--at", "2025-06-01"
    )
    assert main(args) == 1
    assert "signing_key_mismatch" in capsys.readouterr().out


def test_policy_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = R / "go-sev-guest-milan"  # policy 0xb0000: debug allowed
    base = ("--report", d / "report.bin", "--cert", d / "vcek.der", "--at", "2026-01-15", "--policy")
    strict = tmp_path / "strict.json"
    strict.write_text(
        json.dumps(
            {"min_tcb": {"milan": {"committed": {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}}}}
        )
    )
    assert main(verify(*base, strict, "--json")) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["verified"] is True and data["appraised"] is False
    assert data["refused"] == {
        "check": "appraisal",
        "reason": "guest_policy_refused",
        "detail": "policy.debug: not allowed",
    }
    lenient = tmp_path / "lenient.json"
    lenient.write_text(
        json.dumps({"allowed_policy_flags": ["smt", "debug"], "report_data": "0102030405" + "00" * 59})
    )
    assert main(verify(*base, lenient)) == 0
    assert capsys.readouterr().out.rstrip().endswith("report verified and appraised")


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = R / "virtee-sev-milan"
    base = ("--report", d / "report.bin", "--cert", d / "vcek.der")
    # A file that cannot be read or holds no valid policy: the command failed (1); bad option text: 2.
    assert main(verify("--report", tmp_path / "missing.bin", "--cert", d / "vcek.der")) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(verify(*base, "--at", "yesterday")) == 2
    assert "--at" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    for text in ("{", json.dumps({"allow_debug": True})):
        bad.write_text(text)
        assert main(verify(*base, "--policy", bad)) == 1
        assert "--policy" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["snp", "verify-report", "--report", str(d / "report.bin")])
    assert exited.value.code == 2


def test_emulated_root_only_with_trust_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = datetime.now(UTC) - timedelta(days=1)
    root = EmulatedSnpRoot.generate(Product.MILAN, key_size=2048, not_before=start)
    key = ec.generate_private_key(ec.SECP384R1())
    tcb = TcbVersion(Product.MILAN, 3, 0, 8, 115)
    chip = bytes(range(64))
    vcek = root.issue_vcek(key.public_key(), chip, tcb, not_before=start)
    raw = tcb.raw
    report = AttestationReport(version=2, chip_id=chip, reported_tcb=raw, committed_tcb=raw, current_tcb=raw,
                               launch_tcb=raw).signed(key)  # fmt: skip
    (tmp_path / "report.bin").write_bytes(report.to_bytes())
    (tmp_path / "vcek.pem").write_bytes(vcek.public_bytes(serialization.Encoding.PEM))
    pem = root.ark.public_bytes(serialization.Encoding.PEM) + root.ask.public_bytes(
        serialization.Encoding.PEM
    )
    (tmp_path / "root.pem").write_bytes(pem)
    base = ("--report", tmp_path / "report.bin", "--cert", tmp_path / "vcek.pem")
    assert main(verify(*base)) == 1  # the product comes from the issuer name; the issuer is not AMD's ASK
    assert "REFUSED at chain: wrong_issuer" in capsys.readouterr().out
    assert main(verify(*base, "--trust-root", tmp_path / "root.pem", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["root"] == str(tmp_path / "root.pem") and data["product"] == "milan"


def test_show_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snp", "show-report", "--report", str(R / "trustee-milan-vcek/report.bin")]) == 0
    out = capsys.readouterr().out
    assert "policy               0x3001f (smt)" in out and "TCBs not decoded" in out
    assert (
        main(
            ["snp", "show-report", "--report", str(R / "trustee-milan-vcek/report.bin"), "--product", "milan"]
        )
        == 0
    )
    assert (
        "current_tcb          0xce08000000000003 (bootloader=3 tee=0 snp=8 microcode=206)"
        in capsys.readouterr().out
    )
    assert main(["snp", "show-report", "--report", str(R / "trustee-milan-vlek/report.bin"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["product"] == "milan" and data["signing_key"] == "vlek" and data["vmpl"] == 1
    assert data["signature_r"].startswith("5f44947cee22")


def test_show_report_malformed_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 100)
    assert main(["snp", "show-report", "--report", str(bad)]) == 1  # the file is not a report: failed
    assert "report_size" in capsys.readouterr().err


def test_vcek_url(capsys: pytest.CaptureFixture[str]) -> None:
    report = str(R / "go-sev-guest-milan/report.bin")
    assert main(["snp", "vcek-url", "--report", report, "--product", "milan"]) == 0
    assert capsys.readouterr().out.strip().endswith("6b5d?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68")
    assert main(["snp", "vcek-url", "--report", report]) == 2
    assert "--product" in capsys.readouterr().err
    genoa = str(R / "trustee-genoa-e2e/report.bin")
    assert main(["snp", "vcek-url", "--report", genoa, "--kds-url", "http://127.0.0.1:9/"]) == 0
    assert capsys.readouterr().out.startswith("http://127.0.0.1:9/vcek/v1/Genoa/371c55d6")
    assert main(["snp", "vcek-url", "--report", str(R / "trustee-milan-vlek/report.bin")]) == 1
    assert "VLEK" in capsys.readouterr().err
