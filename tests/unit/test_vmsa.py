"""SEV-ES VMSAs: sevctl's real pages (legacy layout) byte for byte, and sev-snp-measure's (init2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sevsnpmeasure import vcpu_types
from sevsnpmeasure.vmm_types import VMMType
from sevsnpmeasure.vmsa import VMSA as OracleVMSA

from sevlaunch.sev import vmsa as vmsa_module
from sevlaunch.sev.errors import MalformedInput, Reason, Unsupported
from sevlaunch.sev.ovmf import OVMF
from sevlaunch.sev.vmsa import (
    BSP_RESET_EIP,
    VCPU_TYPES,
    VMSA,
    VMSA_SIZE,
    Segment,
    VMSALayout,
    build_vmsa,
    cpu_signature,
    vcpu_signature,
)

SEVCTL = Path(__file__).resolve().parents[1] / "vectors" / "measurement" / "sevctl"
SEVCTL_OVMF = SEVCTL / "OVMF.amdsev.fd_trimmed_edk2-ovmf-20220126gitbb1bba3d77-4.el9"


def test_vcpu_type_names_match_sev_snp_measure() -> None:
    assert set(VCPU_TYPES) == set(vcpu_types.CPU_SIGS)
    for name, sig in vcpu_types.CPU_SIGS.items():
        assert vcpu_signature(name) == sig, name


def test_known_signatures() -> None:
    # CPUID(1).EAX as real parts report it: Naples 0x00800f12, Rome 0x00830f10, Milan 0x00a00f11.
    assert vcpu_signature("EPYC") == 0x00800F12
    assert vcpu_signature("EPYC-Rome") == 0x00830F10
    assert vcpu_signature("EPYC-Milan") == 0x00A00F11
    assert vcpu_signature("EPYC-Genoa") == 0x00A10F10
    assert vcpu_signature(family=6, model=0x55, stepping=4) == 0x00050654


@settings(deadline=None, max_examples=100)
@given(family=st.integers(0, 0x10E), model=st.integers(0, 255), stepping=st.integers(0, 15))
def test_family_model_stepping_matches_oracle(family: int, model: int, stepping: int) -> None:
    assert vcpu_signature(family=family, model=model, stepping=stepping) == vcpu_types.cpu_sig(
        family, model, stepping
    )


@pytest.mark.parametrize(
    ("family", "model", "stepping"), [(-1, 0, 0), (0x10F, 0, 0), (25, 256, 0), (25, 1, 16)]
)
def test_signature_out_of_range(family: int, model: int, stepping: int) -> None:
    with pytest.raises(MalformedInput) as exc:
        cpu_signature(family, model, stepping)
    assert exc.value.reason is Reason.BAD_FIELD


def test_unknown_vcpu_type() -> None:
    with pytest.raises(Unsupported) as exc:
        vcpu_signature("EPYC-Bogus")
    assert exc.value.reason is Reason.UNKNOWN_VCPU_TYPE


def test_vcpu_signature_misuse() -> None:
    with pytest.raises(TypeError):
        vcpu_signature("EPYC", family=23)
    with pytest.raises(TypeError):
        vcpu_signature(family=23, model=1)


@pytest.fixture(scope="module")
def sevctl_ap_eip() -> int:
    eip = OVMF.from_bytes(SEVCTL_OVMF.read_bytes()).sev_es_reset_eip
    assert eip is not None
    return eip


def test_legacy_layout_equals_sevctl_pages(sevctl_ap_eip: int) -> None:
    """sevctl `vmsa build --family 25 --model 1 --stepping 1 --userspace qemu`, CPU 0 and CPU 1."""
    sig = vcpu_signature(family=25, model=1, stepping=1)
    bsp = build_vmsa(eip=None, vcpu_sig=sig, layout=VMSALayout.legacy, bsp=True)
    ap = build_vmsa(eip=sevctl_ap_eip, vcpu_sig=sig, layout=VMSALayout.legacy, bsp=False)
    assert bsp == (SEVCTL / "vmsa0.bin").read_bytes()
    assert ap == (SEVCTL / "vmsa1.bin").read_bytes()


def test_init2_differs_from_legacy_only_in_mxcsr_and_fcw(sevctl_ap_eip: int) -> None:
    sig = vcpu_signature(family=25, model=1, stepping=1)
    for bsp, page in ((True, "vmsa0.bin"), (False, "vmsa1.bin")):
        legacy = (SEVCTL / page).read_bytes()
        init2 = build_vmsa(eip=sevctl_ap_eip, vcpu_sig=sig, layout=VMSALayout.init2, bsp=bsp)
        differing = [i for i in range(VMSA_SIZE) if legacy[i] != init2[i]]
        assert differing == [0x408, 0x409, 0x410, 0x411]  # MXCSR 0x1f80 @0x408, x87 FCW 0x037f @0x410
        parsed = VMSA.from_bytes(init2)
        assert (parsed.mxcsr, parsed.x87_fcw) == (0x1F80, 0x037F)
        assert dataclasses.replace(parsed, mxcsr=0, x87_fcw=0).to_bytes() == legacy


def test_sevctl_page_fields() -> None:
    parsed = VMSA.from_bytes((SEVCTL / "vmsa1.bin").read_bytes())
    assert parsed.cs == Segment(selector=0xF000, attrib=0x9B, limit=0xFFFF, base=0x00800000)
    assert parsed.rip == 0xB004
    assert parsed.rdx == vcpu_signature("EPYC-Milan")
    assert parsed.g_pat == 0x0007040600070406


@pytest.mark.parametrize("name", ["EPYC", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa"])
@pytest.mark.parametrize("ap_eip", [0x80B004, 0x808004, 0xFFFFF000])
def test_init2_equals_sev_snp_measure(name: str, ap_eip: int) -> None:
    sig = vcpu_signature(name)
    # sev-snp-measure's QEMU model with sev_features 0 (what it uses for SEV-ES).
    oracle_bsp = bytes(OracleVMSA.build_save_area(0xFFFFFFF0, 0, sig, VMMType.QEMU))
    oracle_ap = bytes(OracleVMSA.build_save_area(ap_eip, 0, sig, VMMType.QEMU))
    assert build_vmsa(eip=ap_eip, vcpu_sig=sig, layout=VMSALayout.init2, bsp=True) == oracle_bsp
    assert build_vmsa(eip=ap_eip, vcpu_sig=sig, layout=VMSALayout.init2, bsp=False) == oracle_ap


def test_bsp_starts_at_reset_vector() -> None:
    parsed = VMSA.from_bytes(build_vmsa(eip=None, vcpu_sig=1, bsp=True))
    assert parsed.cs.base + parsed.rip == BSP_RESET_EIP
    assert parsed.cs.selector == 0xF000


def test_ap_needs_eip() -> None:
    with pytest.raises(TypeError):
        build_vmsa(eip=None, vcpu_sig=1, bsp=False)


@pytest.mark.parametrize(("eip", "sig"), [(1 << 32, 0), (-1, 0), (0, 1 << 32)])
def test_out_of_range_registers(eip: int, sig: int) -> None:
    with pytest.raises(MalformedInput):
        VMSA.reset_state(eip=eip, vcpu_sig=sig, layout=VMSALayout.init2)


def test_every_field_has_an_offset() -> None:
    names = {f.name for f in dataclasses.fields(VMSA)}
    assert names == set(vmsa_module._SEGMENT_OFFSETS) | set(vmsa_module._SCALAR_FIELDS)


@settings(deadline=None, max_examples=40)
@given(
    eip=st.integers(0, 0xFFFFFFFF),
    sig=st.integers(0, 0xFFFFFFFF),
    layout=st.sampled_from(list(VMSALayout)),
    features=st.integers(0, 0xFF),
)
def test_round_trip(eip: int, sig: int, layout: VMSALayout, features: int) -> None:
    vmsa = VMSA.reset_state(eip=eip, vcpu_sig=sig, layout=layout, sev_features=features)
    page = vmsa.to_bytes()
    assert len(page) == VMSA_SIZE
    assert VMSA.from_bytes(page) == vmsa


@pytest.mark.parametrize("offset", [0x0C8, 0x180, 0x3F8, 0x500, 0xFFF])
def test_unmodelled_state_is_refused(offset: int) -> None:
    page = bytearray((SEVCTL / "vmsa0.bin").read_bytes())
    page[offset] = 1
    with pytest.raises(MalformedInput) as exc:
        VMSA.from_bytes(bytes(page))
    assert exc.value.reason is Reason.BAD_FIELD


@pytest.mark.parametrize("length", [0, 4095, 4097])
def test_wrong_page_size(length: int) -> None:
    with pytest.raises(MalformedInput) as exc:
        VMSA.from_bytes(bytes(length))
    assert exc.value.reason is Reason.BAD_LENGTH
