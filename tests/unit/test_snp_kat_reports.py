"""Every `kat-snp.json` case of kinds report_verify, vek_chain_verify, vek_extensions and report_fields
(tests/vectors/snp/README.md): real reports and VCEK/VLEK chains from virtee/sev, go-sev-guest and trustee,
Milan/Genoa/Turin, the expired VLEK, the invalid VCEKs and the forged chain with AMD's names."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sevlaunch.sev.errors import SevError, VerificationFailed
from sevlaunch.snp.appraisal import verify_attestation
from sevlaunch.snp.certs import load_certificate, load_certificates, vek_extensions, verify_vek_chain
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.report import AttestationReport
from sevlaunch.snp.tcb import Product

SNP = Path(__file__).resolve().parents[1] / "vectors" / "snp"
CASES: list[dict[str, Any]] = json.loads((SNP / "kat-snp.json").read_text())

# The check each negative case must fail at, in our reasons (the README: "your verifier should just fail";
# we hold it to the matching reason so a case cannot pass by failing for an unrelated cause).
EXPECTED_REASONS = {
    "report_signature": {SnpReason.BAD_REPORT_SIGNATURE, SnpReason.BAD_REPORT},
    "report_size": {SnpReason.BAD_REPORT},
    "vcek_signature": {SnpReason.BAD_CERT_SIGNATURE},
    "vlek_validity": {SnpReason.CERT_NOT_VALID},
    "vcek_validity": {SnpReason.CERT_NOT_VALID},
    "signing_key": {SnpReason.SIGNING_KEY_MISMATCH},
    "vek_issuer": {SnpReason.WRONG_ISSUER},
    "product": {SnpReason.WRONG_ISSUER, SnpReason.PRODUCT_MISMATCH},
    "ark_pin": {SnpReason.UNTRUSTED_ARK},
    "ask": {SnpReason.WRONG_ISSUER},
    "": {SnpReason.BAD_REPORT_SIGNATURE},  # plain "fail": the signature's r flipped
}


def cases(*kinds: str) -> list[Any]:
    return [pytest.param(c, id=c["id"]) for c in CASES if c["kind"] in kinds]


def test_case_counts_match_the_readme() -> None:
    counts = {k: sum(c["kind"] == k for c in CASES) for k in ("report_verify", "vek_chain_verify")}
    assert counts == {"report_verify": 29, "vek_chain_verify": 11}
    assert sum(c["kind"] == "vek_extensions" for c in CASES) == 8
    assert sum(c["kind"] == "report_fields" for c in CASES) == 5


def at_of(inputs: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(inputs["at"]).replace(tzinfo=UTC)


def run_case(case: dict[str, Any]) -> None:
    inputs = case["inputs"]
    vek = load_certificate((SNP / inputs["vek"]).read_bytes())
    chain = load_certificates((SNP / inputs["chain"]).read_bytes()) if "chain" in inputs else ()
    product = Product(inputs["product"])
    if case["kind"] == "vek_chain_verify":
        verified = verify_vek_chain(vek, product, at=at_of(inputs), chain=chain)
        assert verified.product is product
        return
    data = bytearray((SNP / inputs["report"]).read_bytes())
    for offset in inputs.get("flip_bytes", []):
        data[offset] ^= inputs["flip_mask"]
    if "truncate_to" in inputs:
        del data[inputs["truncate_to"] :]
    report, verified = verify_attestation(bytes(data), vek, product, at=at_of(inputs), chain=chain)
    assert report.to_bytes() == bytes(data)
    assert verified.tcb == report.tcbs(product).reported


@pytest.mark.parametrize("case", cases("report_verify", "vek_chain_verify"))
def test_verify_cases(case: dict[str, Any]) -> None:
    expected: str = case["expected"]
    if expected == "ok":
        run_case(case)
        return
    with pytest.raises(SevError) as caught:
        run_case(case)
    check = expected.removeprefix("fail").removeprefix(":")
    assert caught.value.reason in EXPECTED_REASONS[check], caught.value
    assert caught.value.detail  # every refusal says what it refused


def test_forged_chain_is_refused_by_key_not_name() -> None:
    forged = SNP / "reports/forged-milan-amd-names"
    chain = load_certificates((forged / "chain.pem").read_bytes())
    real = load_certificates((SNP / "roots/milan/ark.pem").read_bytes())[0]
    assert chain[1].subject == real.subject  # the forger copied AMD's names exactly...
    with pytest.raises(VerificationFailed) as caught:
        verify_vek_chain(
            load_certificate((forged / "vcek.der").read_bytes()),
            Product.MILAN,
            at=datetime(2026, 1, 15),
            chain=chain,
        )
    assert caught.value.reason is SnpReason.UNTRUSTED_ARK and "ark_pin" in caught.value.detail


@pytest.mark.parametrize("case", cases("vek_extensions"))
def test_vek_extensions(case: dict[str, Any]) -> None:
    ext = vek_extensions(load_certificate((SNP / case["inputs"]["vek"]).read_bytes()))
    expected = case["expected"]
    for name in ("bootloader", "tee", "snp", "microcode"):
        assert getattr(ext, name) == expected[name], name
    assert ext.fmc == expected.get("fmc")
    assert (ext.hwid.hex() if ext.hwid is not None else None) == expected["hwid"]


@pytest.mark.parametrize("case", cases("report_fields"))
def test_report_fields(case: dict[str, Any]) -> None:
    raw = (SNP / case["inputs"]["report"]).read_bytes()
    report = AttestationReport.from_bytes(raw)
    product = Product(case["inputs"]["product"])
    tcbs = report.tcbs(report.product(product))
    for key, want in case["expected"].items():
        if key in ("sig_r", "sig_s"):
            value = report.signature_r if key == "sig_r" else report.signature_s
            assert value == int(want, 16), key
            assert report.as_json()["signature_" + key[-1]] == want.rjust(96, "0")
        elif key.endswith(".raw"):
            assert getattr(report, key.removesuffix(".raw")) == want, key
        elif "." in key:
            field, component = key.split(".")
            assert getattr(getattr(tcbs, field.removesuffix("_tcb")), component) == want, key
        elif key == "signing_key":
            assert int(report.signing_key) == want
        else:
            value = getattr(report, key)
            assert (value.hex() if isinstance(value, bytes) else value) == want, key
    assert report.to_bytes() == raw
