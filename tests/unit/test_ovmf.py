"""OVMF footer GUID table (PROTOCOL.md §7), against Debian's real images, the AmdSev fixture, and
sev-snp-measure's own parser as an independent oracle."""

from __future__ import annotations

import struct
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sevsnpmeasure.ovmf import OVMF as OracleOVMF

from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.sev.ovmf import (
    FOOTER_GUID,
    OVMF,
    SEV_ES_RESET_BLOCK_GUID,
    SEV_HASH_TABLE_GUID,
    SEV_SECRET_AREA_GUID,
    FooterEntry,
    FooterTable,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "measurement"
AMDSEV = VECTORS / "ovmf_AmdSev_suffix.bin"
OVMFX64 = VECTORS / "ovmf_OvmfX64_suffix.bin"
SEVCTL_OVMF = "OVMF.amdsev.fd_trimmed_edk2-ovmf-20220126gitbb1bba3d77-4.el9"
DEBIAN_IMAGES = [
    Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
    Path("/usr/share/OVMF/OVMF_CODE.fd"),
    Path("/usr/share/ovmf/OVMF.fd"),
]


def _image(table: FooterTable, *, prefix: bytes = bytes(4096)) -> bytes:
    # The 32 bytes after the footer hold the reset vector; their content does not matter here.
    return prefix + table.to_bytes() + b"\xeb" * 32


@pytest.mark.parametrize("path", [*DEBIAN_IMAGES, AMDSEV, OVMFX64], ids=lambda p: p.name)
def test_matches_sev_snp_measure_parser(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} not installed (Debian package ovmf)")
    image = path.read_bytes()
    ours = OVMF.from_bytes(image)
    oracle = OracleOVMF(str(path))
    assert ours.table is not None
    assert ours.table.entries, "every edk2 OvmfPkg build has a footer table"
    for entry in ours.table.entries:
        assert oracle.table_item(str(entry.guid)) == entry.data
    assert ours.sev_es_reset_eip == oracle.sev_es_reset_eip()
    assert (ours.hashes_table is not None) == oracle.is_sev_hashes_table_supported()
    assert ours.gpa == oracle.gpa() == (1 << 32) - len(image)


@pytest.mark.parametrize("path", DEBIAN_IMAGES, ids=lambda p: p.name)
def test_debian_images_declare_zero_areas(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} not installed (Debian package ovmf)")
    ovmf = OVMF.from_bytes(path.read_bytes())
    assert ovmf.table is not None
    # The entries exist, with base and size zero: PROTOCOL.md §7 says they must read as absent.
    assert ovmf.table.get(SEV_SECRET_AREA_GUID) == bytes(8)
    assert ovmf.table.get(SEV_HASH_TABLE_GUID) == bytes(8)
    assert ovmf.secret_area is None
    assert ovmf.hashes_table is None
    assert ovmf.sev_es_reset_eip is not None
    # The reset block points into OVMF's SEC area at 8 MiB (CS base 0x800000), where APs start.
    assert ovmf.sev_es_reset_eip & 0xFFFF0000 == 0x00800000


# PROTOCOL.md §7 gives 0x80c000/0x80cc00: those are the RHEL 9 build's (sevctl's trimmed image); the
# edk2-stable202405 AmdSev suffix declares its areas 16 KiB higher. Both read the same with sev-snp-measure.
@pytest.mark.parametrize(
    ("path", "secret", "hashes"),
    [
        (AMDSEV, (0x810000, 0xC00), (0x810C00, 0x400)),
        (VECTORS / "sevctl" / SEVCTL_OVMF, (0x80C000, 0xC00), (0x80CC00, 0x400)),
    ],
    ids=["edk2-stable202405", "rhel9"],
)
def test_amdsev_fixture_areas(path: Path, secret: tuple[int, int], hashes: tuple[int, int]) -> None:
    raw = path.read_bytes()
    ovmf = OVMF.from_bytes(raw)
    assert ovmf.secret_area == secret
    assert ovmf.hashes_table == hashes
    assert ovmf.sev_es_reset_eip == 0x80B004
    assert ovmf.size == 4096
    # The same numbers, found by searching the raw bytes for the entries' GUIDs.
    for guid, area in ((SEV_SECRET_AREA_GUID, secret), (SEV_HASH_TABLE_GUID, hashes)):
        at = raw.rindex(guid.bytes_le)
        assert struct.unpack_from("<IIH", raw, at - 10) == (*area, 8 + 18)


def test_footer_table_round_trip_real_fixture() -> None:
    image = AMDSEV.read_bytes()
    table = FooterTable.from_image(image)
    assert table is not None
    encoded = table.to_bytes()
    # The table ends 32 bytes before the image end, byte for byte.
    assert image[-32 - len(encoded) : -32] == encoded


def test_image_without_footer_has_nothing() -> None:
    ovmf = OVMF.from_bytes(bytes(8192))
    assert ovmf.table is None
    assert (ovmf.sev_es_reset_eip, ovmf.secret_area, ovmf.hashes_table) == (None, None, None)


def test_entries_walked_in_image_order() -> None:
    table = FooterTable(
        entries=(
            FooterEntry(SEV_HASH_TABLE_GUID, struct.pack("<II", 0x1000, 0x400)),
            FooterEntry(SEV_SECRET_AREA_GUID, struct.pack("<II", 0x2000, 0xC00)),
            FooterEntry(SEV_ES_RESET_BLOCK_GUID, struct.pack("<I", 0x12345678)),
        )
    )
    ovmf = OVMF.from_bytes(_image(table))
    assert ovmf.table == table
    assert ovmf.hashes_table == (0x1000, 0x400)
    assert ovmf.secret_area == (0x2000, 0xC00)
    assert ovmf.sev_es_reset_eip == 0x12345678


def test_zero_reset_block_reads_as_absent() -> None:
    table = FooterTable(entries=(FooterEntry(SEV_ES_RESET_BLOCK_GUID, bytes(4)),))
    assert OVMF.from_bytes(_image(table)).sev_es_reset_eip is None


def test_too_short_image() -> None:
    with pytest.raises(MalformedInput) as exc:
        OVMF.from_bytes(bytes(49))
    assert exc.value.reason is Reason.TRUNCATED


def test_table_length_beyond_image() -> None:
    image = bytearray(_image(FooterTable(entries=()), prefix=b""))
    struct.pack_into("<H", image, len(image) - 50, 0xFFFF)
    with pytest.raises(MalformedInput) as exc:
        OVMF.from_bytes(bytes(image))
    assert exc.value.reason is Reason.BAD_LENGTH


def test_table_length_below_footer_header() -> None:
    image = bytearray(_image(FooterTable(entries=())))
    struct.pack_into("<H", image, len(image) - 50, 10)
    with pytest.raises(MalformedInput) as exc:
        OVMF.from_bytes(bytes(image))
    assert exc.value.reason is Reason.BAD_LENGTH


@pytest.mark.parametrize("length", [0, 17, 0x1000])
def test_entry_length_out_of_range(length: int) -> None:
    table = FooterTable(entries=(FooterEntry(SEV_ES_RESET_BLOCK_GUID, struct.pack("<I", 0x80B004)),))
    image = bytearray(_image(table))
    entry_length_at = len(image) - 50 - 18
    assert struct.unpack_from("<H", image, entry_length_at) == (22,)
    struct.pack_into("<H", image, entry_length_at, length)
    with pytest.raises(MalformedInput) as exc:
        OVMF.from_bytes(bytes(image))
    assert exc.value.reason is Reason.BAD_LENGTH


def test_short_entries_are_malformed() -> None:
    for guid, size in ((SEV_ES_RESET_BLOCK_GUID, 2), (SEV_SECRET_AREA_GUID, 4), (SEV_HASH_TABLE_GUID, 7)):
        image = _image(FooterTable(entries=(FooterEntry(guid, bytes(range(1, size + 1))),)))
        with pytest.raises(MalformedInput) as exc:
            OVMF.from_bytes(image)
        assert exc.value.reason is Reason.TRUNCATED


def test_duplicate_guid_is_refused() -> None:
    one = FooterEntry(SEV_ES_RESET_BLOCK_GUID, struct.pack("<I", 0x80B004))
    image = one.to_bytes() * 2 + struct.pack("<H", 2 * 22 + 18) + FOOTER_GUID.bytes_le + bytes(32)
    with pytest.raises(MalformedInput) as exc:
        OVMF.from_bytes(image)
    assert exc.value.reason is Reason.BAD_FIELD


_entries = st.lists(st.tuples(st.uuids(), st.binary(max_size=40)), max_size=6, unique_by=lambda t: t[0]).map(
    lambda items: FooterTable(entries=tuple(FooterEntry(g, d) for g, d in items))
)


@settings(deadline=None, max_examples=60)
@given(table=_entries, prefix=st.binary(max_size=64))
def test_round_trip_any_table(table: FooterTable, prefix: bytes) -> None:
    assert FooterTable.from_image(_image(table, prefix=prefix)) == table


@settings(deadline=None, max_examples=200)
@given(data=st.binary(max_size=600))
def test_random_bytes_parse_or_raise_malformed(data: bytes) -> None:
    try:
        OVMF.from_bytes(data)
    except MalformedInput:
        pass


_FIXTURE = AMDSEV.read_bytes()


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.integers(1, 300), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 4096 - 60),
)
def test_mangled_real_footer_parses_or_raises_malformed(flips: list[tuple[int, int]], cut: int) -> None:
    """Corrupt bytes near the footer (where the table lives), and cut the image from the front."""
    image = bytearray(_FIXTURE)
    for back, value in flips:
        image[-back] = value
    try:
        parsed = OVMF.from_bytes(bytes(image[cut:]))
    except MalformedInput:
        return
    # Anything returned is a well-formed view: areas are non-zero and the reset EIP too.
    for area in (parsed.secret_area, parsed.hashes_table):
        assert area is None or (area[0] and area[1])
    assert parsed.sev_es_reset_eip != 0


@settings(deadline=None, max_examples=50)
@given(cut=st.integers(0, 4096))
def test_truncated_from_the_end(cut: int) -> None:
    """An image cut short at its end loses the footer: no table, or a clear error when too short."""
    try:
        parsed = OVMF.from_bytes(_FIXTURE[: 4096 - cut] if cut else _FIXTURE)
    except MalformedInput as exc:
        assert exc.reason is Reason.TRUNCATED
        return
    assert (parsed.table is None) == (cut != 0)


def test_unrelated_entries_are_kept() -> None:
    guid = UUID(int=uuid4().int)
    table = FooterTable(entries=(FooterEntry(guid, b"hello"),))
    ovmf = OVMF.from_bytes(_image(table))
    assert ovmf.table is not None and ovmf.table.get(guid) == b"hello"
    assert ovmf.sev_es_reset_eip is None
