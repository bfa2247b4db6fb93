"""The SEV kernel hashes table (PROTOCOL.md §5), against sev-snp-measure's table and sevctl's KAT."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sevsnpmeasure.sev_hashes import SevHashes

from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.sev.kernel_hashes import (
    PADDED_TABLE_LENGTH,
    TABLE_LENGTH,
    KernelHashes,
    build_hashes_table,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
KAT = {case["id"]: case for case in json.loads((VECTORS / "kat.json").read_text())["cases"]}


def test_layout_offsets() -> None:
    kernel, initrd, cmdline = b"kernel bytes", b"initrd bytes", "root=/dev/vda console=ttyS0"
    table = build_hashes_table(kernel, initrd, cmdline)
    assert (TABLE_LENGTH, PADDED_TABLE_LENGTH, len(table)) == (168, 176, 176)
    assert table[:16] == UUID("9438d606-4f22-4cc9-b479-a793d411fd21").bytes_le
    assert struct.unpack_from("<H", table, 16) == (168,)
    expected = [
        ("97d02dd8-bd20-4c94-aa78-e7714d36ab2a", cmdline.encode() + b"\0"),
        ("44baf731-3a2f-4bd7-9af1-41e29169781d", initrd),
        ("4de79437-abd2-427f-b835-d5b172d2045b", kernel),
    ]
    for index, (guid, content) in enumerate(expected):
        at = 18 + 50 * index
        assert table[at : at + 16] == UUID(guid).bytes_le
        assert struct.unpack_from("<H", table, at + 16) == (50,)
        assert table[at + 18 : at + 50] == hashlib.sha256(content).digest()
    assert table[168:] == bytes(8)


def test_sevctl_kernel_hashes_kat() -> None:
    """sevctl's measurement-build case: SHA-256(firmware || table) is the launch digest."""
    case = KAT["sevctl-measurement-build-kernel-hashes"]
    inputs = case["inputs"]
    table = build_hashes_table(
        (VECTORS / inputs["kernel_file"]).read_bytes(),
        (VECTORS / inputs["initrd_file"]).read_bytes(),
        inputs["cmdline"],
    )
    assert len(table) == case["derived"]["kernel_table_len"]
    firmware = (VECTORS / inputs["firmware_file"]).read_bytes()
    assert hashlib.sha256(firmware + table).hexdigest() == case["derived"]["launch_digest_hex"]


def _oracle_table(tmp_path: Path, kernel: bytes, initrd: bytes | None, cmdline: str | None) -> bytes:
    (tmp_path / "k").write_bytes(kernel)
    initrd_path = ""
    if initrd is not None:
        (tmp_path / "i").write_bytes(initrd)
        initrd_path = str(tmp_path / "i")
    table: bytes = SevHashes(str(tmp_path / "k"), initrd_path, cmdline or "").construct_table()
    return table


@settings(deadline=None, max_examples=25)
@given(
    kernel=st.binary(max_size=300),
    initrd=st.none() | st.binary(min_size=1, max_size=300),
    cmdline=st.none()
    | st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40),
)
def test_matches_sev_snp_measure(
    tmp_path_factory: pytest.TempPathFactory, kernel: bytes, initrd: bytes | None, cmdline: str | None
) -> None:
    tmp_path = tmp_path_factory.mktemp("hashes")
    table = build_hashes_table(kernel, initrd, cmdline)
    assert table == _oracle_table(tmp_path, kernel, initrd, cmdline)
    assert KernelHashes.from_bytes(table) == KernelHashes.compute(kernel, initrd, cmdline)


def test_absent_and_empty_inputs_hash_the_same() -> None:
    # QEMU passes "" when -append is absent and hands over no initrd bytes when -initrd is absent.
    assert build_hashes_table(b"k", None, None) == build_hashes_table(b"k", b"", "")
    assert KernelHashes.compute(b"k").cmdline_hash == hashlib.sha256(b"\0").digest()
    assert build_hashes_table(b"k", None, b"x") == build_hashes_table(b"k", None, "x")


def test_cmdline_with_a_lone_surrogate_is_a_typed_error() -> None:
    with pytest.raises(MalformedInput) as exc:
        KernelHashes.compute(b"k", None, "console=\ud800")
    assert exc.value.reason == Reason.BAD_ENCODING


def test_nul_in_cmdline_is_refused() -> None:
    with pytest.raises(MalformedInput) as exc:
        build_hashes_table(b"k", None, "a\0b")
    assert exc.value.reason is Reason.BAD_FIELD


def test_from_bytes_unpadded() -> None:
    hashes = KernelHashes.compute(b"k", b"i", "c")
    assert KernelHashes.from_bytes(hashes.to_bytes()[:168]) == hashes


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (0, Reason.BAD_FIELD),  # header GUID
        (16, Reason.BAD_LENGTH),  # table length
        (18, Reason.BAD_FIELD),  # first entry GUID
        (34, Reason.BAD_FIELD),  # first entry length
        (18 + 50 + 16, Reason.BAD_FIELD),  # second entry length
        (170, Reason.BAD_FIELD),  # padding
    ],
)
def test_from_bytes_rejects_corruption(offset: int, reason: Reason) -> None:
    table = bytearray(build_hashes_table(b"k", b"i", "c"))
    table[offset] ^= 0x40
    with pytest.raises(MalformedInput) as exc:
        KernelHashes.from_bytes(bytes(table))
    assert exc.value.reason is reason


def test_swapped_entries_are_refused() -> None:
    table = build_hashes_table(b"k", b"i", "c")
    swapped = table[:18] + table[68:118] + table[18:68] + table[118:]
    with pytest.raises(MalformedInput):
        KernelHashes.from_bytes(swapped)


@pytest.mark.parametrize("length", [0, 167, 169, 175, 177, 352])
def test_from_bytes_wrong_length(length: int) -> None:
    with pytest.raises(MalformedInput) as exc:
        KernelHashes.from_bytes(bytes(length))
    assert exc.value.reason is Reason.BAD_LENGTH


def test_hash_lengths_checked() -> None:
    with pytest.raises(MalformedInput):
        KernelHashes(cmdline_hash=bytes(31), initrd_hash=bytes(32), kernel_hash=bytes(32))
