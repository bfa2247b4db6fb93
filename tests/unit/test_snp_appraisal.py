"""Report verification against a cached VCEK/VLEK (the report's TCB and chip id against the certificate),
and appraisal: every refusal is typed and names its field."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from sevlaunch.sev.errors import MalformedInput, SevError, VerificationFailed
from sevlaunch.snp.appraisal import AppraisalPolicy, MinimumTcb, appraise, verify_attestation, verify_report
from sevlaunch.snp.certs import load_certificate, verify_vek_chain
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.policy import PlatformInfo, PolicyFlag
from sevlaunch.snp.report import AttestationReport, SigningKey
from sevlaunch.snp.tcb import Product, TcbVersion

SNP = Path(__file__).resolve().parents[1] / "vectors" / "snp"
NOW = datetime(2026, 6, 1, tzinfo=UTC)
START = NOW - timedelta(days=30)
CHIP = bytes(range(1, 65))
TCB = TcbVersion(Product.GENOA, bootloader=9, tee=0, snp=21, microcode=72)
TURIN_TCB = TcbVersion(Product.TURIN, bootloader=1, tee=2, snp=3, microcode=4, fmc=5)


@pytest.fixture(scope="module")
def genoa() -> EmulatedSnpRoot:
    return EmulatedSnpRoot.generate(Product.GENOA, key_size=2048, not_before=START)


@pytest.fixture(scope="module")
def vcek_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def genoa_report(**changes: Any) -> AttestationReport:
    fields: dict[str, Any] = {
        "version": 3,
        "cpuid_fam_id": 0x19,
        "cpuid_mod_id": 0x11,
        "cpuid_step": 1,
        "policy": 0x30000,
        "chip_id": CHIP,
        "reported_tcb": TCB.raw,
        "committed_tcb": TCB.raw,
        "current_tcb": TCB.raw,
        "launch_tcb": TCB.raw,
        "current_major": 1,
        "current_minor": 55,
        "current_build": 40,
        "committed_major": 1,
        "committed_minor": 55,
        "committed_build": 40,
        "platform_info": 0x25,
        "measurement": b"\x42" * 48,
        "host_data": b"\x43" * 32,
        "report_data": b"\x44" * 64,
    }
    fields.update(changes)
    return AttestationReport(**fields)


def signed(report: AttestationReport, key: ec.EllipticCurvePrivateKey) -> bytes:
    return report.signed(key).to_bytes()


def verified_vcek(
    root: EmulatedSnpRoot, key: ec.EllipticCurvePrivateKey, tcb: TcbVersion = TCB, chip: bytes = CHIP
) -> Any:
    cert = root.issue_vcek(key.public_key(), chip, tcb, not_before=START)
    return verify_vek_chain(cert, tcb.product, at=NOW, extra_roots=[root.trusted_root()])


# -- verify_report: the report against its certificate -------------------------------------------------


def test_emulated_report_verifies(genoa: EmulatedSnpRoot, vcek_key: ec.EllipticCurvePrivateKey) -> None:
    vek = verified_vcek(genoa, vcek_key)
    report = verify_report(signed(genoa_report(), vcek_key), vek)
    assert report.measurement == b"\x42" * 48
    appraise(report, AppraisalPolicy(measurement=b"\x42" * 48, host_data=b"\x43" * 32))


def test_report_tcb_must_equal_the_vcek(genoa: EmulatedSnpRoot, vcek_key: ec.EllipticCurvePrivateKey) -> None:
    vek = verified_vcek(genoa, vcek_key)
    higher = dataclasses.replace(TCB, microcode=73)
    with pytest.raises(VerificationFailed) as caught:
        verify_report(signed(genoa_report(reported_tcb=higher.raw), vcek_key), vek)
    assert caught.value.reason is SnpReason.TCB_MISMATCH and "microcode 73 vs 72" in caught.value.detail


def test_chip_id_must_equal_the_hwid(genoa: EmulatedSnpRoot, vcek_key: ec.EllipticCurvePrivateKey) -> None:
    vek = verified_vcek(genoa, vcek_key)
    for chip in (bytes(64), b"\x01" + CHIP[1:][::-1]):
        with pytest.raises(VerificationFailed) as caught:
            verify_report(signed(genoa_report(chip_id=chip), vcek_key), vek)
        assert caught.value.reason is SnpReason.CHIP_ID_MISMATCH and "chip_id" in caught.value.detail


def test_turin_compares_8_byte_hwid(vcek_key: ec.EllipticCurvePrivateKey) -> None:
    turin = EmulatedSnpRoot.generate(Product.TURIN, key_size=2048, not_before=START)
    vek = verified_vcek(turin, vcek_key, tcb=TURIN_TCB, chip=CHIP[:8])
    chip = CHIP[:8] + bytes(56)
    tcb = TURIN_TCB.raw
    report = genoa_report(
        version=5, cpuid_fam_id=0x1A, cpuid_mod_id=0x02, chip_id=chip,
        reported_tcb=tcb, committed_tcb=tcb, current_tcb=tcb, launch_tcb=tcb,
    )  # fmt: skip
    assert verify_report(signed(report, vcek_key), vek).product() is Product.TURIN
    with pytest.raises(VerificationFailed, match="chip_id"):
        verify_report(signed(dataclasses.replace(report, chip_id=b"\xff" + chip[1:]), vcek_key), vek)


def test_vlek_report_may_mask_the_chip(genoa: EmulatedSnpRoot) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = genoa.issue_vlek(key.public_key(), TCB, "cloud.example", not_before=START)
    vek = verify_vek_chain(cert, Product.GENOA, at=NOW, extra_roots=[genoa.trusted_root()])
    report = verify_report(signed(genoa_report(signing_key=SigningKey.VLEK, chip_id=bytes(64)), key), vek)
    assert report.chip_id_masked
    with pytest.raises(VerificationFailed) as caught:  # VCEK only, by default
        appraise(report, AppraisalPolicy())
    assert caught.value.reason is SnpReason.SIGNING_KEY_REFUSED
    appraise(report, AppraisalPolicy(signing_keys=frozenset({SigningKey.VLEK})))
    with pytest.raises(VerificationFailed, match="masked"):
        appraise(
            report, AppraisalPolicy(signing_keys=frozenset({SigningKey.VLEK}), chip_ids=frozenset({CHIP}))
        )
    with pytest.raises(VerificationFailed) as caught:
        verify_report(signed(genoa_report(chip_id=bytes(64)), key), vek)  # says VCEK, signed by the VLEK
    assert caught.value.reason is SnpReason.SIGNING_KEY_MISMATCH


def test_product_must_agree(genoa: EmulatedSnpRoot, vcek_key: ec.EllipticCurvePrivateKey) -> None:
    vek = verified_vcek(genoa, vcek_key)
    data = signed(genoa_report(), vcek_key)
    with pytest.raises(VerificationFailed) as caught:
        verify_report(data, vek, product=Product.MILAN)
    assert caught.value.reason is SnpReason.PRODUCT_MISMATCH
    milan_cpuid = signed(genoa_report(cpuid_mod_id=0x01), vcek_key)
    with pytest.raises(VerificationFailed) as caught:
        verify_report(milan_cpuid, vek)
    assert caught.value.reason is SnpReason.PRODUCT_MISMATCH and "CPUID" in caught.value.detail


def test_vek_validity_rechecked_per_report(
    genoa: EmulatedSnpRoot, vcek_key: ec.EllipticCurvePrivateKey
) -> None:
    vek = verified_vcek(genoa, vcek_key)
    data = signed(genoa_report(), vcek_key)
    verify_report(data, vek, at=NOW + timedelta(days=365))
    with pytest.raises(VerificationFailed, match="vcek_validity"):
        verify_report(data, vek, at=NOW + timedelta(days=20 * 365))


def test_real_reports_cold_path() -> None:
    d = SNP / "reports/trustee-milan-vlek"
    vlek = load_certificate((d / "vlek.der").read_bytes())
    report, vek = verify_attestation(
        (d / "report.bin").read_bytes(), vlek, Product.MILAN, at=datetime(2025, 6, 1)
    )
    assert vek.extensions.csp_id == "CN=cc-us-east-2.amazonaws.com" and report.vmpl == 1
    policy = AppraisalPolicy(signing_keys=frozenset({SigningKey.VLEK}), max_vmpl=1)
    with pytest.raises(VerificationFailed) as caught:  # committed 1.55.29 TCB ucode 219 < current 220
        appraise(report, policy)
    assert caught.value.reason is SnpReason.PROVISIONAL_FIRMWARE
    appraise(report, dataclasses.replace(policy, allow_provisional_firmware=True))


# -- appraisal refusals --------------------------------------------------------------------------------


def refusal(report: AttestationReport, policy: AppraisalPolicy) -> VerificationFailed:
    with pytest.raises(VerificationFailed) as caught:
        appraise(report, policy)
    assert caught.value.detail
    return caught.value


def test_default_policy_accepts_a_plain_report() -> None:
    appraise(genoa_report(), AppraisalPolicy())


def test_debug_and_migration_agent_refused_unless_allowed() -> None:
    for flag, name in ((PolicyFlag.DEBUG, "policy.debug"), (PolicyFlag.MIGRATE_MA, "policy.migrate_ma")):
        report = genoa_report(policy=0x30000 | flag)
        error = refusal(report, AppraisalPolicy())
        assert error.reason is SnpReason.GUEST_POLICY_REFUSED and name in error.detail
        allowed = AppraisalPolicy(allowed_policy_flags=AppraisalPolicy().allowed_policy_flags | flag)
        appraise(report, allowed)


def test_required_policy_flags_and_abi() -> None:
    report = genoa_report(policy=0x30000 | (1 << 8) | 51)  # ABI 1.51
    error = refusal(report, AppraisalPolicy(required_policy_flags=PolicyFlag.SINGLE_SOCKET))
    assert "policy.single_socket" in error.detail
    appraise(report, AppraisalPolicy(min_abi=(1, 51)))
    assert "policy.abi" in refusal(report, AppraisalPolicy(min_abi=(1, 52))).detail
    with pytest.raises(MalformedInput, match="bit 17"):
        appraise(genoa_report(policy=0x10000), AppraisalPolicy())


def test_vmpl_version_and_svn() -> None:
    assert refusal(genoa_report(vmpl=1), AppraisalPolicy()).reason is SnpReason.VMPL_REFUSED
    appraise(genoa_report(vmpl=1), AppraisalPolicy(max_vmpl=1))
    error = refusal(genoa_report(), AppraisalPolicy(report_versions=frozenset({5})))
    assert error.reason is SnpReason.VERSION_REFUSED and "version" in error.detail
    error = refusal(genoa_report(guest_svn=2), AppraisalPolicy(min_guest_svn=3))
    assert error.reason is SnpReason.GUEST_SVN_TOO_LOW


def test_platform_info() -> None:
    error = refusal(genoa_report(), AppraisalPolicy(refused_platform_info=PlatformInfo.SMT_EN))
    assert error.reason is SnpReason.PLATFORM_INFO_REFUSED and "smt_en" in error.detail
    error = refusal(genoa_report(), AppraisalPolicy(required_platform_info=PlatformInfo.TSME_EN))
    assert "tsme_en" in error.detail


def test_tcb_minimums_per_product() -> None:
    report = genoa_report()
    appraise(
        report, AppraisalPolicy(min_tcb={Product.GENOA: MinimumTcb(reported=TCB, committed=TCB, launch=TCB)})
    )
    appraise(
        report,
        AppraisalPolicy(
            min_tcb={Product.MILAN: MinimumTcb(reported=TcbVersion(Product.MILAN, 99, 0, 99, 255))}
        ),
    )
    above = dataclasses.replace(TCB, snp=22)
    for kind in ("reported", "committed", "launch"):
        error = refusal(report, AppraisalPolicy(min_tcb={Product.GENOA: MinimumTcb(**{kind: above})}))
        assert error.reason is SnpReason.TCB_TOO_LOW and error.detail == f"{kind}_tcb: snp 21<22"


def test_launch_tcb_checked_even_when_reported_is_high() -> None:
    launch = dataclasses.replace(TCB, microcode=50)
    report = genoa_report(launch_tcb=launch.raw)
    error = refusal(report, AppraisalPolicy(min_tcb={Product.GENOA: MinimumTcb(reported=TCB, launch=TCB)}))
    assert error.detail == "launch_tcb: microcode 50<72"


def test_tcb_order_and_provisional_firmware() -> None:
    low = dataclasses.replace(TCB, snp=20)
    error = refusal(genoa_report(committed_tcb=low.raw, current_tcb=low.raw), AppraisalPolicy())
    assert error.reason is SnpReason.TCB_ORDER and "reported_tcb" in error.detail
    error = refusal(genoa_report(current_tcb=low.raw), AppraisalPolicy())
    assert error.reason is SnpReason.TCB_ORDER and "current_tcb" in error.detail
    newer = dataclasses.replace(TCB, microcode=80)
    provisional = genoa_report(current_tcb=newer.raw, current_build=41)
    assert refusal(provisional, AppraisalPolicy()).reason is SnpReason.PROVISIONAL_FIRMWARE
    appraise(provisional, AppraisalPolicy(allow_provisional_firmware=True))
    error = refusal(genoa_report(), AppraisalPolicy(min_firmware=(1, 55, 41)))
    assert error.reason is SnpReason.TCB_TOO_LOW and "committed_version" in error.detail


def test_chip_ids() -> None:
    appraise(genoa_report(), AppraisalPolicy(chip_ids=frozenset({CHIP})))
    error = refusal(genoa_report(), AppraisalPolicy(chip_ids=frozenset({bytes(64), b"\x09" * 64})))
    assert error.reason is SnpReason.CHIP_ID_REFUSED


@pytest.mark.parametrize(
    ("name", "size"),
    [("measurement", 48), ("host_data", 32), ("report_data", 64), ("id_key_digest", 48),
     ("author_key_digest", 48), ("family_id", 16), ("image_id", 16)],
)  # fmt: skip
def test_expected_fields(name: str, size: int) -> None:
    report = genoa_report()
    appraise(report, AppraisalPolicy(**{name: getattr(report, name)}))
    error = refusal(report, AppraisalPolicy(**{name: b"\x99" * size}))
    assert error.reason is SnpReason.FIELD_MISMATCH and error.detail.startswith(f"{name}:")
    with pytest.raises(MalformedInput, match=name):
        AppraisalPolicy(**{name: b"\x99" * (size - 1)})


# -- policy documents ----------------------------------------------------------------------------------


def test_policy_from_json() -> None:
    policy = AppraisalPolicy.from_json(
        {
            "report_versions": [3, 5],
            "signing_keys": ["vcek", "VLEK"],
            "max_vmpl": 1,
            "allowed_policy_flags": ["smt", "debug"],
            "required_policy_flags": ["single_socket"],
            "min_abi": "1.51",
            "refused_platform_info": ["smt_en"],
            "min_tcb": {"genoa": {"committed": {"bootloader": 9, "tee": 0, "snp": 21, "microcode": 72}}},
            "allow_provisional_firmware": True,
            "min_firmware": "1.55.0",
            "chip_ids": [CHIP.hex()],
            "min_guest_svn": 2,
            "measurement": "42" * 48,
        }
    )
    assert policy.signing_keys == {SigningKey.VCEK, SigningKey.VLEK} and policy.min_abi == (1, 51)
    assert policy.allowed_policy_flags == PolicyFlag.SMT | PolicyFlag.DEBUG
    assert policy.min_tcb[Product.GENOA].committed == TCB and policy.min_firmware == (1, 55, 0)
    assert AppraisalPolicy.from_json({}) == AppraisalPolicy()


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"allow_debug": True},  # unknown keys refused: a typo must not weaken the policy
        {"report_versions": [1]},
        {"signing_keys": ["ask"]},
        {"max_vmpl": 4},
        {"allowed_policy_flags": ["reserved_mbo"]},
        {"min_abi": "1"},
        {"min_firmware": "1.2.x"},
        {"chip_ids": ["zz"]},
        {"chip_ids": ["00"]},
        {"measurement": "00"},
        {"min_tcb": {"rome": {}}},
        {"min_tcb": {"milan": {"reported": {"bootloader": 1}}}},
        {"min_tcb": {"milan": {"current": {}}}},
        {"allow_provisional_firmware": "yes"},
        {"min_guest_svn": -1},
    ],
)
def test_bad_policy_documents(document: object) -> None:
    with pytest.raises(MalformedInput) as caught:
        AppraisalPolicy.from_json(document)
    assert caught.value.reason in (SnpReason.BAD_APPRAISAL_POLICY,)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
KEYS = st.sampled_from(
    ["report_versions", "signing_keys", "max_vmpl", "allowed_policy_flags", "min_abi", "min_tcb", "chip_ids",
     "measurement", "min_firmware", "refused_platform_info", "allow_provisional_firmware"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, JSON, max_size=4) | JSON)
def test_random_policy_documents(document: object) -> None:
    try:
        policy = AppraisalPolicy.from_json(document)
    except SevError as exc:
        assert exc.reason is SnpReason.BAD_APPRAISAL_POLICY
        return
    try:
        appraise(genoa_report(), policy)
    except VerificationFailed:
        pass
