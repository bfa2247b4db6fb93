"""TCB versions per product, the 64-bit guest policy and the platform info flags; KDS addresses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevlaunch.sev.errors import MalformedInput, SevError, Unsupported
from sevlaunch.snp.kds import (
    hwid_hex,
    report_vcek_url,
    vcek_cert_chain_url,
    vcek_crl_url,
    vcek_url,
    vlek_cert_chain_url,
    vlek_crl_url,
)
from sevlaunch.snp.policy import PlatformInfo, PolicyFlag, SnpGuestPolicy, platform_info_names
from sevlaunch.snp.report import AttestationReport
from sevlaunch.snp.tcb import Product, TcbVersion, product_from_cpuid

SNP = Path(__file__).resolve().parents[1] / "vectors" / "snp"


# -- TCB versions ------------------------------------------------------------------------------------


def test_milan_genoa_layout() -> None:
    # virtee-sev-milan's REPORTED_TCB: bootloader 3, TEE 0, SNP 8 (byte 6), microcode 115 (byte 7)
    tcb = TcbVersion.from_raw(8288875114175397891, Product.MILAN)
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode, tcb.fmc) == (3, 0, 8, 115, None)
    assert tcb.raw == 8288875114175397891
    assert TcbVersion.from_raw(tcb.raw, Product.GENOA).components() == tcb.components()


def test_turin_layout() -> None:
    tcb = TcbVersion(Product.TURIN, bootloader=2, tee=3, snp=4, microcode=5, fmc=1)
    assert tcb.raw.to_bytes(8, "little") == bytes([1, 2, 3, 4, 0, 0, 0, 5])
    assert TcbVersion.from_raw(tcb.raw, Product.TURIN) == tcb
    assert list(tcb.components()) == ["fmc", "bootloader", "tee", "snp", "microcode"]
    assert TcbVersion(Product.TURIN, 0, 0, 0, 0).fmc == 0
    with pytest.raises(MalformedInput, match="no FMC"):
        TcbVersion(Product.MILAN, 0, 0, 0, 0, fmc=1)


@pytest.mark.parametrize(("product", "byte"), [(Product.MILAN, 2), (Product.GENOA, 5), (Product.TURIN, 4)])
def test_reserved_bytes_refused(product: Product, byte: int) -> None:
    with pytest.raises(MalformedInput, match="reserved"):
        TcbVersion.from_raw(1 << (8 * byte), product, field="launch_tcb")


def test_component_wise_order() -> None:
    low = TcbVersion(Product.MILAN, 3, 0, 8, 115)
    high = TcbVersion(Product.MILAN, 3, 0, 10, 169)
    mixed = TcbVersion(Product.MILAN, 4, 0, 7, 200)  # above in bootloader, below in SNP
    assert high.meets(low) and not low.meets(high) and low <= high and high >= low
    assert not mixed.meets(low) and not low.meets(mixed) and not mixed <= low and not low <= mixed
    assert mixed.shortfall(low) == ["snp 7<8"]
    assert low.meets(low)
    with pytest.raises(Unsupported):
        low.meets(TcbVersion(Product.TURIN, 0, 0, 0, 0))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, (1 << 64) - 1), st.sampled_from(list(Product)))
def test_from_raw_never_crashes(raw: int, product: Product) -> None:
    try:
        tcb = TcbVersion.from_raw(raw, product)
    except MalformedInput:
        return
    assert tcb.raw == raw


def test_tcb_json() -> None:
    tcb = TcbVersion.from_json(
        {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}, Product.MILAN, field="x"
    )
    assert tcb == TcbVersion(Product.MILAN, 3, 0, 8, 115)
    assert TcbVersion.from_json(tcb.as_json(), Product.MILAN, field="x") == tcb
    for bad in ({"bootloader": 3}, {"bootloader": 256, "tee": 0, "snp": 0, "microcode": 0}, [], {"fmc": 1}):
        with pytest.raises(MalformedInput, match="x"):
            TcbVersion.from_json(bad, Product.MILAN, field="x")


def test_products() -> None:
    assert product_from_cpuid(0x19, 0x01) is Product.MILAN
    assert product_from_cpuid(0x19, 0x11) is Product.GENOA
    assert product_from_cpuid(0x19, 0xA0) is Product.GENOA
    assert product_from_cpuid(0x1A, 0x02) is Product.TURIN
    assert product_from_cpuid(0x17, 0x31) is None  # Rome: no SEV-SNP
    assert Product.parse(" Turin ") is Product.TURIN and Product.GENOA.kds_name == "Genoa"
    with pytest.raises(Unsupported):
        Product.parse("rome")


# -- guest policy and platform info ---------------------------------------------------------------


def test_policy_bits() -> None:
    assert PolicyFlag.SMT == 1 << 16 and PolicyFlag.RESERVED_MBO == 1 << 17
    assert PolicyFlag.MIGRATE_MA == 1 << 18 and PolicyFlag.DEBUG == 1 << 19
    assert PolicyFlag.SINGLE_SOCKET == 1 << 20 and PolicyFlag.CXL_ALLOW == 1 << 21
    assert PolicyFlag.MEM_AES_256_XTS == 1 << 22 and PolicyFlag.RAPL_DIS == 1 << 23
    assert PolicyFlag.CIPHERTEXT_HIDING == 1 << 24 and PolicyFlag.PAGE_SWAP_DISABLE == 1 << 25
    policy = SnpGuestPolicy.from_int(0x3001F)  # trustee-milan-vcek: ABI 0.31, SMT
    assert (policy.abi_major, policy.abi_minor, policy.smt, policy.debug) == (0, 31, True, False)
    debug = SnpGuestPolicy.from_int(0xB0000)  # go-sev-guest-milan
    assert debug.debug and debug.flag_names() == ["smt", "debug"]
    assert SnpGuestPolicy(abi_major=1, abi_minor=51, flags=PolicyFlag.SMT).to_int() == 0x30133


@settings(max_examples=300, deadline=None)
@given(st.integers(0, (1 << 64) - 1))
def test_policy_round_trip_or_typed_error(value: int) -> None:
    try:
        policy = SnpGuestPolicy.from_int(value)
    except MalformedInput as exc:
        assert "policy" in exc.detail
        assert not value & (1 << 17) or value >> 26
        return
    assert policy.to_int() == value


def test_policy_refusals_name_the_bit() -> None:
    with pytest.raises(MalformedInput, match="bit 17"):
        SnpGuestPolicy.from_int(0x10000)
    with pytest.raises(MalformedInput, match="reserved bit"):
        SnpGuestPolicy.from_int(0x30000 | 1 << 26)


def test_platform_info() -> None:
    assert platform_info_names(0x27) == ["smt_en", "tsme_en", "ecc_en", "alias_check_complete"]
    assert platform_info_names(0x1 | 1 << 40) == ["smt_en", "bit 40"]
    assert PlatformInfo.TIO_EN == 1 << 7 and PlatformInfo.CIPHERTEXT_HIDING_EN == 1 << 4


# -- KDS addresses ------------------------------------------------------------------------------------


def test_go_sev_guest_vcek_url() -> None:
    report = AttestationReport.from_bytes((SNP / "reports/go-sev-guest-milan/report.bin").read_bytes())
    url = report_vcek_url(report, Product.MILAN)
    assert url.startswith("https://kdsintf.amd.com/vcek/v1/Milan/3ac3fe21")
    assert url.endswith("6b5d?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68")  # go-sev-guest verify_test.go:788
    assert len(url.split("/")[-1].split("?")[0]) == 128


def test_turin_vcek_url_uses_8_byte_hwid_and_fmc() -> None:
    tcb = TcbVersion(Product.TURIN, bootloader=1, tee=1, snp=4, microcode=82, fmc=1)
    chip = bytes.fromhex("6bb1229b7692b710") + bytes(56)
    assert vcek_url(chip, tcb, base_url="http://127.0.0.1:8080/") == (
        "http://127.0.0.1:8080/vcek/v1/Turin/6bb1229b7692b710?blSPL=1&teeSPL=1&snpSPL=4&ucodeSPL=82&fmcSPL=1"
    )
    assert hwid_hex(chip[:8], Product.TURIN) == "6bb1229b7692b710"


def test_genoa_report_url_from_cpuid() -> None:
    report = AttestationReport.from_bytes((SNP / "reports/trustee-genoa-e2e/report.bin").read_bytes())
    assert report_vcek_url(report).startswith("https://kdsintf.amd.com/vcek/v1/Genoa/371c55d6")


def test_chain_and_crl_urls() -> None:
    assert vcek_cert_chain_url(Product.MILAN) == "https://kdsintf.amd.com/vcek/v1/Milan/cert_chain"
    assert vcek_crl_url(Product.GENOA) == "https://kdsintf.amd.com/vcek/v1/Genoa/crl"
    assert vlek_cert_chain_url(Product.TURIN) == "https://kdsintf.amd.com/vlek/v1/Turin/cert_chain"
    assert (
        vlek_crl_url(Product.MILAN, base_url="https://kds.example/")
        == "https://kds.example/vlek/v1/Milan/crl"
    )


def test_masked_or_wrong_size_chip_id_refused() -> None:
    tcb = TcbVersion(Product.MILAN, 3, 0, 8, 115)
    with pytest.raises(MalformedInput, match="masked"):
        vcek_url(bytes(64), tcb)
    with pytest.raises(MalformedInput, match="chip_id"):
        vcek_url(b"\x01" * 8, tcb)
    vlek = AttestationReport.from_bytes((SNP / "reports/trustee-milan-vlek/report.bin").read_bytes())
    with pytest.raises(SevError):
        report_vcek_url(vlek)


def test_policy_flags_must_be_flags() -> None:
    with pytest.raises(MalformedInput, match=r"policy\.flags"):
        SnpGuestPolicy(flags=PolicyFlag(1 << 30))
    with pytest.raises(MalformedInput, match=r"policy\.flags"):
        SnpGuestPolicy(flags=PolicyFlag(0x1F))  # ABI bits are abi_minor/abi_major, not flags
    with pytest.raises(MalformedInput, match="abi_major"):
        SnpGuestPolicy(abi_major=256)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["bootloader", "tee", "snp", "microcode", "fmc", "raw", "x"]),
        st.integers(-2, 300) | st.booleans() | st.none() | st.text(max_size=3),
        max_size=7,
    )
    | st.lists(st.integers(), max_size=3)
    | st.none(),
    st.sampled_from(list(Product)),
)
def test_tcb_from_json_never_crashes(data: object, product: Product) -> None:
    try:
        tcb = TcbVersion.from_json(data, product, field="min")
    except MalformedInput as exc:
        assert exc.detail.startswith("min")
        return
    assert isinstance(data, dict) and tcb.components() == {k: data.get(k, 0) for k in tcb.components()}
