"""The OVMF footer GUID table: where a firmware image tells the VMM about its SEV needs (PROTOCOL.md §7).

The table sits at the very end of the image, just below the 32 bytes of the x86 reset vector area::

    ... entry_1 | entry_0 | u16 table_length | footer GUID (16) | 32 bytes reset vector
                                             ^ image_size - 48
                          ^ image_size - 50

`table_length` counts every entry plus the 18-byte footer header (u16 + GUID). Each entry is
`data | u16 length | GUID`, with `length` covering the data and its 18-byte header, so the table is
walked backwards from the footer (edk2 `OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm`, QEMU
`hw/i386/pc_sysfw_ovmf.c:pc_system_parse_ovmf_flash`).

An image without the footer GUID is still a valid SEV firmware: it is measured as plain data, it just
offers no SEV-ES reset block, secret area or hashes table. A footer whose lengths do not add up is
`MalformedInput`: QEMU would refuse it ("OVMF table has invalid size").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from uuid import UUID

from sevlaunch.sev import footer
from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.sev.footer import ENTRY_HEADER_SIZE as ENTRY_HEADER_SIZE
from sevlaunch.sev.footer import FOUR_GIB as FOUR_GIB

FOOTER_GUID = UUID(bytes_le=footer.FOOTER_GUID_LE)  # 96b582de-1fb2-45f7-baea-a366c55a082d
SEV_ES_RESET_BLOCK_GUID = UUID(bytes_le=footer.SEV_ES_RESET_BLOCK_GUID_LE)  # 00f771de-1a7e-4fcb-...
SEV_SECRET_AREA_GUID = UUID(bytes_le=footer.SEV_SECRET_AREA_GUID_LE)  # 4c2eb361-7d9b-4cc3-...
SEV_HASH_TABLE_GUID = UUID(bytes_le=footer.SEV_HASH_TABLE_GUID_LE)  # 7255371f-3a3b-4b04-...


_U16 = struct.Struct("<H")


@dataclass(frozen=True)
class FooterEntry:
    """One entry of the footer table: `data | u16 length | GUID` (length includes the 18-byte header)."""

    guid: UUID
    data: bytes

    def __post_init__(self) -> None:
        if len(self.data) + ENTRY_HEADER_SIZE > 0xFFFF:
            raise MalformedInput(Reason.BAD_LENGTH, f"footer entry {self.guid} data too long")

    def to_bytes(self) -> bytes:
        return self.data + _U16.pack(len(self.data) + ENTRY_HEADER_SIZE) + self.guid.bytes_le


@dataclass(frozen=True)
class FooterTable:
    """The whole table, entries in image order (lowest address first, so the last is walked first)."""

    entries: tuple[FooterEntry, ...]

    def __post_init__(self) -> None:
        footer.check_unique(entry.guid.bytes_le for entry in self.entries)
        if self._length() > 0xFFFF:
            raise MalformedInput(Reason.BAD_LENGTH, "footer table longer than 65535 bytes")

    def _length(self) -> int:
        return sum(len(e.data) + ENTRY_HEADER_SIZE for e in self.entries) + ENTRY_HEADER_SIZE

    def to_bytes(self) -> bytes:
        """The table as it sits in the image, ending where the 32-byte reset vector area begins."""
        body = b"".join(e.to_bytes() for e in self.entries)
        return body + _U16.pack(self._length()) + FOOTER_GUID.bytes_le

    def get(self, guid: UUID) -> bytes | None:
        for entry in self.entries:
            if entry.guid == guid:
                return entry.data
        return None

    @classmethod
    def from_image(cls, image: bytes) -> FooterTable | None:
        """Parses the table at the end of a firmware image; None when the image has no footer GUID."""
        walked = footer.walk(image)
        if walked is None:
            return None
        return cls(entries=tuple(FooterEntry(guid=UUID(bytes_le=guid), data=data) for guid, data in walked))


@dataclass(frozen=True)
class OVMF:
    """What a firmware image declares for SEV. The image bytes themselves are not kept (no copy).

    * `sev_es_reset_eip`: the AP reset address (CS base in bits 31..16, IP in 15..0), None if absent
      or zero (QEMU refuses SEV-ES with a zero reset address).
    * `secret_area`, `hashes_table`: `(base, size)` guest physical ranges, None if absent or zero.
    """

    size: int
    table: FooterTable | None
    sev_es_reset_eip: int | None
    secret_area: tuple[int, int] | None
    hashes_table: tuple[int, int] | None

    @property
    def gpa(self) -> int:
        """Where the image is mapped: it ends at 4 GiB, like QEMU's pflash unit 0."""
        return FOUR_GIB - self.size

    @classmethod
    def from_bytes(cls, image: bytes) -> OVMF:
        table = FooterTable.from_image(image)
        if table is None:
            return cls(
                size=len(image), table=None, sev_es_reset_eip=None, secret_area=None, hashes_table=None
            )
        reset, secret_area, hashes_table = footer.declared_by(lambda le: table.get(UUID(bytes_le=le)))
        return cls(
            size=len(image),
            table=table,
            sev_es_reset_eip=reset,
            secret_area=secret_area,
            hashes_table=hashes_table,
        )
