"""The loader choice (`launcher_svc.core.loader`) and the firmware volume header it reads
(`sevlaunch.sev.flash`), against Debian's real OVMF images and images built from them.

A combined image is built the way edk2 lays out OVMF.fd: the variable store volume at offset 0, the
code after it (Debian's OVMF_VARS*.fd followed by OVMF_CODE*.fd is exactly that layout)."""

from __future__ import annotations

import struct
from pathlib import Path
from uuid import UUID

import pytest

from launcher_svc.core.loader import LoaderType, choose_loader, loadable_problem
from launcher_svc.core.preflight import preflight
from launcher_svc.core.spec import GuestSpec
from sevlaunch.errors import FailedPrecondition
from sevlaunch.sev.digest import launch_digest
from sevlaunch.sev.errors import MalformedInput
from sevlaunch.sev.flash import (
    FFS2_GUID,
    NV_DATA_FV_GUID,
    FirmwareVolumeHeader,
    first_volume,
    holds_variable_store,
)
from sevlaunch.sev.technology import Technology

OVMF_DIR = Path("/usr/share/OVMF")
CODE_4M = OVMF_DIR / "OVMF_CODE_4M.fd"
CODE_2M = OVMF_DIR / "OVMF_CODE.fd"
VARS_4M = OVMF_DIR / "OVMF_VARS_4M.fd"
VARS_2M = OVMF_DIR / "OVMF_VARS.fd"
SPLIT = [CODE_4M, CODE_2M]


def _combined(code: Path, vars_: Path) -> bytes:
    return vars_.read_bytes() + code.read_bytes()


@pytest.mark.parametrize("path", [CODE_4M, CODE_2M, VARS_4M, VARS_2M], ids=lambda p: p.name)
def test_debian_volume_headers_parse_and_write_back_byte_for_byte(path: Path) -> None:
    data = path.read_bytes()
    fv = first_volume(data)
    assert fv is not None
    assert fv.to_bytes() == data[: fv.header_length]
    assert FirmwareVolumeHeader.from_bytes(fv.to_bytes()) == fv
    # Debian's images are 4 KiB blocks; the volume covers what its block map says.
    assert all(size == 4096 for _, size in fv.block_map)
    assert fv.fv_length == sum(n * size for n, size in fv.block_map)
    expected = NV_DATA_FV_GUID if "VARS" in path.name else FFS2_GUID
    assert fv.file_system_guid == expected


def test_a_written_header_round_trips_with_its_checksum() -> None:
    fv = FirmwareVolumeHeader(
        file_system_guid=NV_DATA_FV_GUID, fv_length=0x84000, attributes=0x4FEFF, block_map=((0x84, 0x1000),)
    )
    raw = fv.to_bytes()
    assert len(raw) == fv.header_length == 0x48
    assert raw[0x28:0x2C] == b"_FVH"
    assert sum(struct.unpack(f"<{len(raw) // 2}H", raw)) & 0xFFFF == 0
    assert FirmwareVolumeHeader.from_bytes(raw + b"\xff" * 64) == fv


def _corrupt(offset: int, value: bytes) -> bytes:
    raw = bytearray(VARS_4M.read_bytes()[:0x48])
    raw[offset : offset + len(value)] = value
    return bytes(raw)


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"", "truncated"),
        (VARS_4M.read_bytes()[:0x37], "truncated"),
        (_corrupt(0x28, b"_FVX"), "signature"),
        (_corrupt(0x30, struct.pack("<H", 0x30)), "header length"),
        (_corrupt(0x30, struct.pack("<H", 0x2000)), "header length"),
        (_corrupt(0x20, b"\x01"), "checksum"),
        (VARS_4M.read_bytes()[:0x40], "cut short"),
    ],
)
def test_malformed_headers_are_typed_errors(raw: bytes, what: str) -> None:
    with pytest.raises(MalformedInput):
        FirmwareVolumeHeader.from_bytes(raw)
    assert first_volume(raw) is None
    assert not holds_variable_store(raw)


def test_a_block_map_without_terminator_is_refused() -> None:
    fv = FirmwareVolumeHeader(
        file_system_guid=FFS2_GUID, fv_length=0x2000, attributes=0, block_map=((1, 0x1000), (1, 0x1000))
    )
    raw = bytearray(fv.to_bytes())
    raw[-8:] = struct.pack("<II", 1, 1)  # the terminator overwritten, checksum fixed up below
    raw[0x32:0x34] = b"\0\0"
    words = sum(struct.unpack(f"<{len(raw) // 2}H", raw))
    raw[0x32:0x34] = struct.pack("<H", -words & 0xFFFF)
    with pytest.raises(MalformedInput, match="terminator"):
        FirmwareVolumeHeader.from_bytes(bytes(raw))


@pytest.mark.parametrize("code", SPLIT, ids=lambda p: p.name)
def test_a_split_code_image_goes_on_pflash_for_sev_and_sev_es(code: Path) -> None:
    data = code.read_bytes()
    assert not holds_variable_store(data)
    for mode in (Technology.SEV, Technology.SEV_ES):
        assert choose_loader(data, mode) is LoaderType.PFLASH
        assert loadable_problem(len(data), LoaderType.PFLASH) is None


@pytest.mark.parametrize(("code", "vars_"), [(CODE_4M, VARS_4M), (CODE_2M, VARS_2M)], ids=["4M", "2M"])
def test_a_combined_image_is_a_rom(code: Path, vars_: Path) -> None:
    data = _combined(code, vars_)
    assert holds_variable_store(data)
    assert len(data) in (4 << 20, 2 << 20)
    for mode in Technology:
        assert choose_loader(data, mode) is LoaderType.ROM
    assert loadable_problem(len(data), LoaderType.ROM) is None


@pytest.mark.parametrize("code", SPLIT, ids=lambda p: p.name)
def test_snp_always_loads_a_rom(code: Path) -> None:
    assert choose_loader(code.read_bytes(), Technology.SEV_SNP) is LoaderType.ROM


def test_an_image_without_a_volume_header_is_code_for_pflash() -> None:
    # No variable store at offset 0 means nothing for QEMU to keep apart: read-only pflash.
    assert choose_loader(b"\x90" * 0x10000, Technology.SEV) is LoaderType.PFLASH


def test_what_qemu_cannot_load_is_named() -> None:
    size_4m = CODE_4M.stat().st_size
    assert size_4m % (64 << 10) != 0 and size_4m % (4 << 10) == 0
    problem = loadable_problem(size_4m, LoaderType.ROM)
    assert problem is not None and "64 KiB" in problem
    assert loadable_problem(size_4m, LoaderType.PFLASH) is None
    assert loadable_problem(4096 + 1, LoaderType.PFLASH) is not None
    assert loadable_problem(0, LoaderType.PFLASH) is not None
    assert loadable_problem(0, LoaderType.ROM) is not None


def test_the_launch_digest_is_the_image_s_for_either_loader() -> None:
    """QEMU measures pflash unit 0 and a `-bios` ROM the same way (LAUNCH_UPDATE_DATA of the whole
    image, ending at 4 GiB); with stateless pflash there is no unit 1, so nothing else is measured. The
    digest the owner computes depends on the image bytes alone, never on the loader."""
    code = CODE_4M.read_bytes()
    combined = _combined(CODE_4M, VARS_4M)
    assert launch_digest(code, mode="sev") != launch_digest(combined, mode="sev")
    assert launch_digest(code, mode="sev") == launch_digest(bytes(code), mode="sev")


def _spec(firmware: Path, mode: Technology = Technology.SEV) -> GuestSpec:
    return GuestSpec(
        name="g",
        memory_mib=256,
        vcpus=1,
        firmware_path=str(firmware),
        mode=mode,
        policy=0x3 if mode is Technology.SEV else 0x30000,
        launch_without_secret=True,
    )


@pytest.mark.parametrize("code", SPLIT, ids=lambda p: p.name)
def test_preflight_chooses_pflash_for_the_demo_firmware(code: Path) -> None:
    pre = preflight(_spec(code), secret_gpa=0x80C000)
    assert pre.loader is LoaderType.PFLASH
    assert pre.firmware.data == code.read_bytes()


def test_preflight_chooses_rom_for_a_combined_image(tmp_path: Path) -> None:
    image = tmp_path / "OVMF.fd"
    image.write_bytes(_combined(CODE_4M, VARS_4M))
    assert preflight(_spec(image), secret_gpa=0x80C000).loader is LoaderType.ROM


def test_preflight_refuses_a_combined_image_qemu_cannot_map(tmp_path: Path) -> None:
    image = tmp_path / "OVMF-odd.fd"
    image.write_bytes(_combined(CODE_4M, VARS_4M)[: -(16 << 10)])
    with pytest.raises(FailedPrecondition) as err:
        preflight(_spec(image), secret_gpa=0x80C000)
    assert err.value.reason == "firmware_not_loadable"


def test_preflight_of_an_snp_guest_loads_a_rom() -> None:
    pre = preflight(_spec(CODE_2M, Technology.SEV_SNP), secret_gpa=None)
    assert pre.loader is LoaderType.ROM


def test_guids_are_the_pi_specifications() -> None:
    assert NV_DATA_FV_GUID == UUID("fff12b8d-7696-4c8b-a985-2747075b4f50")
    assert FFS2_GUID == UUID("8c8ce578-8a3d-4f1c-9935-896185c32dd3")
