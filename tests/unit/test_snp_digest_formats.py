"""The binary formats under the SNP launch digest: OVMF's SEV metadata, PAGE_INFO, launch updates and the
SNP VMSAs (byte for byte against sev-snp-measure's), with Hypothesis on every parser."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vcpu_types import CPU_SIGS
from sevsnpmeasure.vmm_types import VMMType
from sevsnpmeasure.vmsa import VMSA as OracleVMSA
from sevsnpmeasure.vmsa import VMSA_SVSM as OracleSvsmVMSA

from sevlaunch.sev.errors import MalformedInput, SevError, Unsupported
from sevlaunch.sev.ovmf import FooterEntry, FooterTable
from sevlaunch.sev.vmsa import VMSA
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.gctx import (
    PAGE_INFO_SIZE,
    VMSA_GPA,
    ZERO_DIGEST,
    LaunchPlan,
    LaunchUpdate,
    PageInfo,
    PageType,
    digest_updates,
    extend,
)
from sevlaunch.snp.launch_digest import launch_digest
from sevlaunch.snp.metadata import (
    SEV_METADATA_GUID,
    MetadataSection,
    SectionType,
    SevMetadata,
    SnpFirmware,
)
from sevlaunch.snp.vmsa import GuestFeature, VmmType, snp_vmsa_pages, svsm_vmsa

SNP = Path(__file__).resolve().parents[1] / "vectors" / "snp"
AMDSEV = SNP / "measurement" / "ovmf_AmdSev_suffix.bin"
SVSM = SNP / "measurement" / "svsm.bin"

# ------------------------------------------------------------------------------------ SEV metadata


def test_amdsev_metadata_parses_and_writes_back() -> None:
    image = AMDSEV.read_bytes()
    firmware = SnpFirmware.from_bytes(image)
    assert firmware.gpa == 0xFFFFF000 and firmware.sev_es_reset_eip == 0x80B004
    assert firmware.hashes_table_gpa == 0x810C00 and firmware.svsm_info is None
    assert firmware.metadata is not None
    assert [(s.gpa, s.size, s.section_type) for s in firmware.sections] == [
        (0x800000, 0x9000, SectionType.SNP_SEC_MEM),
        (0x80A000, 0x3000, SectionType.SNP_SEC_MEM),
        (0x80D000, 0x1000, SectionType.SNP_SECRETS),
        (0x80E000, 0x1000, SectionType.CPUID),
        (0x80F000, 0x1000, SectionType.SVSM_CAA),
        (0x810000, 0x1000, SectionType.SNP_KERNEL_HASHES),
        (0x811000, 0xF000, SectionType.SNP_SEC_MEM),
    ]
    blob = firmware.metadata.to_bytes()
    offset = struct.unpack("<I", FooterTable.from_image(image).get(SEV_METADATA_GUID)[:4])  # type: ignore[index]
    start = len(image) - offset[0]
    assert image[start : start + len(blob)] == blob
    assert SevMetadata.from_bytes(blob) == firmware.metadata


def test_svsm_image_placement() -> None:
    svsm = SVSM.read_bytes()
    firmware = SnpFirmware.from_bytes(svsm, end_at=0xFFC84000 - 540672)
    assert firmware.gpa == 0xFFAEA000 and firmware.svsm_info == 0
    assert firmware.metadata is not None and firmware.metadata.has(SectionType.CPUID)


def _metadata(sections: list[tuple[int, int, int]], *, signature: bytes = b"ASEV", version: int = 1) -> bytes:
    body = b"".join(struct.pack("<III", *s) for s in sections)
    return struct.pack("<4sIII", signature, 16 + len(body), version, len(sections)) + body


def test_metadata_refusals() -> None:
    good = [(0x800000, 0x1000, 1)]
    assert SevMetadata.from_bytes(_metadata(good)).sections == (
        MetadataSection(0x800000, 0x1000, SectionType(1)),
    )
    cases: list[tuple[bytes, type[SevError]]] = [
        (_metadata(good, signature=b"XSEV"), MalformedInput),
        (_metadata(good, version=2), Unsupported),
        (_metadata([(0x800000, 0x1000, 7)]), Unsupported),
        (_metadata([(0x800800, 0x1000, 1)]), MalformedInput),  # unaligned
        (_metadata([(0x800000, 0x800, 1)]), MalformedInput),
        (_metadata([(0x800000, 0, 1)]), MalformedInput),
        (_metadata([(0xFFFFF000, 0x2000, 1)]), MalformedInput),  # beyond 4 GiB
        (_metadata(good)[:-1], MalformedInput),
        (_metadata(good)[:10], MalformedInput),
    ]
    for blob, error in cases:
        with pytest.raises(error):
            SevMetadata.from_bytes(blob)
    wrong_size = bytearray(_metadata(good))
    wrong_size[4] += 12
    with pytest.raises(MalformedInput):
        SevMetadata.from_bytes(bytes(wrong_size) + bytes(12))


def _image_with(entries: list[FooterEntry], tail: bytes = b"", size: int = 0x2000) -> bytes:
    table = FooterTable(tuple(entries)).to_bytes()
    body = tail + table + bytes(32)
    return bytes(size - len(body)) + body


def test_metadata_offset_outside_the_image_is_refused() -> None:
    for offset in (0, 8, 0x2001, 0xFFFFFFFF):
        image = _image_with([FooterEntry(SEV_METADATA_GUID, struct.pack("<I", offset))])
        with pytest.raises(MalformedInput):
            SnpFirmware.from_bytes(image)


def test_image_size_and_placement_are_checked() -> None:
    for image, end_at in (
        (b"", 1 << 32),
        (bytes(4095), 1 << 32),
        (bytes(4096), 0x800),
        (bytes(4096), 0x1000_0800),
    ):
        with pytest.raises(MalformedInput) as exc:
            SnpFirmware.from_bytes(image, end_at=end_at)
        assert exc.value.reason is SnpReason.BAD_FIRMWARE_IMAGE
    plain = SnpFirmware.from_bytes(bytes(8192))  # no footer: a plain image, no metadata
    assert plain.metadata is None and plain.sev_es_reset_eip is None and plain.gpa == (1 << 32) - 8192


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_metadata_parser_fuzz(data: bytes) -> None:
    try:
        parsed = SevMetadata.from_bytes(data)
    except (MalformedInput, Unsupported):
        return
    assert data.startswith(parsed.to_bytes())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 0xFFFFF), st.integers(1, 0x100), st.sampled_from([1, 2, 3, 4, 0x10])),
        max_size=12,
    )
)
def test_metadata_round_trip(raw: list[tuple[int, int, int]]) -> None:
    sections = []
    for page, pages, kind in raw:
        if (page + pages) * 0x1000 <= 1 << 32:
            sections.append(MetadataSection(page * 0x1000, pages * 0x1000, SectionType(kind)))
    metadata = SevMetadata(tuple(sections))
    assert SevMetadata.from_bytes(metadata.to_bytes()) == metadata


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=3 * 4096), st.integers(0, 3))
def test_firmware_parser_random_bytes(data: bytes, pad_pages: int) -> None:
    image = data + bytes(-len(data) % 4096) if pad_pages else data
    try:
        SnpFirmware.from_bytes(image)
    except SevError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), min_size=1, max_size=8), st.data())
def test_firmware_parser_mutated_real_image(flips: list[tuple[int, int]], data: st.DataObject) -> None:
    """Byte changes in the real image's footer and metadata: a digest or a typed error, nothing else."""
    image = bytearray(AMDSEV.read_bytes())
    for offset, mask in flips:
        # Aim most flips at the footer table and the metadata (the last ~1.4 KiB).
        at = 4096 - 1 - (offset % 1400) if data.draw(st.booleans()) else offset
        image[at] ^= mask
    try:
        launch_digest(bytes(image), vcpus=2, vcpu_sig=CPU_SIGS["EPYC-v4"], kernel=b"k")
    except SevError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4096 * 3), st.binary(min_size=1, max_size=64))
def test_firmware_parser_truncated_and_oversized(cut: int, extra: bytes) -> None:
    image = AMDSEV.read_bytes()
    for candidate in (image[:-cut] if cut < len(image) else b"", image + extra, extra + image):
        try:
            SnpFirmware.from_bytes(candidate)
        except SevError:
            continue


# ------------------------------------------------------------------------------- PAGE_INFO, updates


def test_page_info_layout() -> None:
    info = PageInfo(digest_cur=b"\x11" * 48, contents=b"\x22" * 48, page_type=PageType.CPUID, gpa=0x80E000)
    blob = info.to_bytes()
    assert len(blob) == PAGE_INFO_SIZE == 0x70
    assert blob[:48] == b"\x11" * 48 and blob[48:96] == b"\x22" * 48
    assert struct.unpack_from("<HBBBBBBQ", blob, 0x60) == (0x70, 6, 0, 0, 0, 0, 0, 0x80E000)
    assert PageInfo.from_bytes(blob) == info
    assert info.next_digest() == hashlib.sha384(blob).digest()


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=0x90))
def test_page_info_parser_fuzz(data: bytes) -> None:
    try:
        info = PageInfo.from_bytes(data)
    except MalformedInput as exc:
        assert exc.reason is SnpReason.BAD_PAGE_INFO
        return
    assert info.to_bytes() == data


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=PAGE_INFO_SIZE, max_size=PAGE_INFO_SIZE))
def test_page_info_parser_fixed_size_fuzz(data: bytes) -> None:
    blob = bytearray(data)
    struct.pack_into("<H", blob, 0x60, 0x70)
    blob[0x62] = 1 + blob[0x62] % 6
    blob[0x63] &= 1
    blob[0x67] = 0
    blob[0x68] &= 0  # GPA page-aligned
    blob[0x69] &= 0xF0
    info = PageInfo.from_bytes(bytes(blob))
    assert info.to_bytes() == bytes(blob)


def test_launch_update_checks() -> None:
    page = bytes(4096)
    bad = [
        lambda: LaunchUpdate(PageType.NORMAL, 0x1000, None),
        lambda: LaunchUpdate(PageType.NORMAL, 0x1000, page[:100], 100),
        lambda: LaunchUpdate(PageType.ZERO, 0x1000, page),
        lambda: LaunchUpdate(PageType.ZERO, 0x1800),
        lambda: LaunchUpdate(PageType.ZERO, 0x1000, None, -4096),
        lambda: LaunchUpdate(PageType.NORMAL, 0x1000, b""),
        lambda: LaunchUpdate(7, 0x1000),  # type: ignore[arg-type]
        lambda: LaunchUpdate(PageType.VMSA, 0x1000, page),
        lambda: LaunchUpdate(PageType.VMSA, VMSA_GPA, page * 2, 8192),
        lambda: LaunchUpdate(PageType.SECRETS, (1 << 64) - 0x1000, None, 0x2000),
    ]
    for make in bad:
        with pytest.raises(MalformedInput):
            make()
    with pytest.raises(MalformedInput):
        LaunchPlan((), seed=b"short")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(PageType)),
            st.integers(0, 0xFFFFF),
            st.integers(1, 3),
            st.binary(max_size=16),
        ),
        max_size=6,
    ),
    st.binary(min_size=48, max_size=48),
)
def test_fast_loop_equals_page_by_page(raw: list[tuple[PageType, int, int, bytes]], seed: bytes) -> None:
    updates = []
    for kind, page, count, fill in raw:
        if kind is PageType.VMSA:
            updates.append(LaunchUpdate(kind, VMSA_GPA, (fill * 4096)[:4096].ljust(4096, b"\x01")))
        elif kind is PageType.NORMAL:
            updates.append(
                LaunchUpdate(kind, page << 12, (fill * 4096 * count)[: 4096 * count].ljust(4096 * count))
            )
        else:
            updates.append(LaunchUpdate(kind, page << 12, None, count * 4096))
    plan = LaunchPlan(tuple(updates), seed=seed)
    slow = seed
    for update in updates:
        for gpa, contents in update.pages():
            slow = extend(slow, update.page_type, gpa, contents)
    assert digest_updates(updates, seed=seed) == slow == plan.digest()
    assert plan.matches(slow) and not plan.matches(ZERO_DIGEST if slow != ZERO_DIGEST else b"\x01" * 48)


# --------------------------------------------------------------------------------------- VMSAs


@pytest.mark.parametrize("vmm", list(VmmType))
@pytest.mark.parametrize("vcpu_type", ["EPYC", "EPYC-Milan", "EPYC-Genoa", "EPYC-Turin"])
@pytest.mark.parametrize("features", [0x1, 0x21, 0xFFFF])
def test_snp_vmsas_equal_sev_snp_measure_byte_for_byte(vmm: VmmType, vcpu_type: str, features: int) -> None:
    sig = CPU_SIGS[vcpu_type]
    ap_eip = 0x80B004
    ours = snp_vmsa_pages(vcpus=3, ap_eip=ap_eip, vcpu_sig=sig, guest_features=features, vmm_type=vmm)
    theirs = list(OracleVMSA(SevMode.SEV_SNP, ap_eip, sig, features, VMMType[vmm.value]).pages(3))
    assert ours == theirs
    assert ours[0] != ours[1] and ours[1] == ours[2]  # BSP and APs start at different addresses
    bsp, ap = VMSA.from_bytes(ours[0]), VMSA.from_bytes(ours[1])
    assert (bsp.rip, bsp.cs.base, ap.rip, ap.cs.base) == (0xFFF0, 0xFFFF0000, 0xB004, 0x800000)
    assert bsp.sev_features == features


def test_svsm_vmsa_equals_sev_snp_measure() -> None:
    sig = CPU_SIGS["EPYC-v4"]
    ours = svsm_vmsa(eip=0xFFAEA000, vcpu_sig=sig).to_bytes()
    theirs = next(iter(OracleSvsmVMSA(0xFFAEA000, sig).pages(1)))
    assert ours == theirs


def test_vmsa_refusals() -> None:
    sig = CPU_SIGS["EPYC-v4"]
    with pytest.raises(MalformedInput):
        snp_vmsa_pages(vcpus=1, ap_eip=0x1000, vcpu_sig=sig, guest_features=1 << 64, vmm_type=VmmType.QEMU)
    with pytest.raises(MalformedInput):
        snp_vmsa_pages(
            vcpus=1,
            ap_eip=0x1000,
            vcpu_sig=sig,
            guest_features=GuestFeature.DEBUG_SWAP,
            vmm_type=VmmType.QEMU,
        )
    with pytest.raises(MalformedInput):
        snp_vmsa_pages(vcpus=4097, ap_eip=0x1000, vcpu_sig=sig, guest_features=1, vmm_type=VmmType.QEMU)
    with pytest.raises(Unsupported) as no_ap:
        snp_vmsa_pages(vcpus=2, ap_eip=0, vcpu_sig=sig, guest_features=1, vmm_type=VmmType.QEMU)
    assert no_ap.value.reason is SnpReason.NO_SEV_ES_RESET_BLOCK
    # One vCPU needs no AP start address; EC2 and GCE need no vCPU signature.
    snp_vmsa_pages(vcpus=1, ap_eip=None, vcpu_sig=sig, guest_features=1, vmm_type=VmmType.QEMU)
    snp_vmsa_pages(vcpus=2, ap_eip=0x1000, vcpu_sig=None, guest_features=1, vmm_type=VmmType.GCE)
    assert VmmType.parse("EC2") is VmmType.EC2 and VmmType.parse("qemu") is VmmType.QEMU


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=16))
def test_section_descriptor_fuzz(data: bytes) -> None:
    try:
        section = MetadataSection.from_bytes(data)
    except (MalformedInput, Unsupported):
        return
    assert section.to_bytes() == data
