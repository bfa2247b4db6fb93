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

from sevlaunch.sev.errors import MalformedInput, Reason

FOOTER_GUID = UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_ES_RESET_BLOCK_GUID = UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_SECRET_AREA_GUID = UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
SEV_HASH_TABLE_GUID = UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")

# The pflash holding the code sits right below 4 GiB (QEMU maps unit 0 so that it ends there).
FOUR_GIB = 1 << 32
# The last 32 bytes of the image hold the reset vector, not the table.
_RESET_VECTOR_AREA = 32
# Every entry and the footer itself end with u16 length | GUID.
ENTRY_HEADER_SIZE = 2 + 16
# Footer header plus the reset vector area: the smallest image that can hold a table at all.
_MIN_IMAGE = ENTRY_HEADER_SIZE + _RESET_VECTOR_AREA

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U32_PAIR = struct.Struct("<II")


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
        seen: set[UUID] = set()
        for entry in self.entries:
            # QEMU takes the first match walking backwards and sev-snp-measure the last one: an image
            # with duplicates would be measured differently by different tools, so refuse it.
            if entry.guid in seen:
                raise MalformedInput(Reason.BAD_FIELD, f"footer table has entry {entry.guid} twice")
            seen.add(entry.guid)
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
        size = len(image)
        if size < _MIN_IMAGE:
            raise MalformedInput(
                Reason.TRUNCATED, f"firmware image of {size} bytes is too short to hold an OVMF footer"
            )
        view = memoryview(image)
        guid_at = size - _RESET_VECTOR_AREA - 16
        if bytes(view[guid_at : guid_at + 16]) != FOOTER_GUID.bytes_le:
            return None
        (table_length,) = _U16.unpack_from(view, guid_at - 2)
        footer_at = guid_at - 2
        body_length = table_length - ENTRY_HEADER_SIZE
        if body_length < 0 or body_length > footer_at:
            raise MalformedInput(
                Reason.BAD_LENGTH,
                f"OVMF footer table length {table_length} does not fit the {size}-byte image",
            )
        body = bytes(view[footer_at - body_length : footer_at])
        return cls._parse_body(body)

    @classmethod
    def _parse_body(cls, body: bytes) -> FooterTable:
        walked: list[FooterEntry] = []
        end = len(body)
        # Like QEMU, stop once fewer bytes than an entry header remain: edk2 never leaves any, and a
        # stray tail cannot be read as an entry without guessing.
        while end >= ENTRY_HEADER_SIZE:
            guid = UUID(bytes_le=body[end - 16 : end])
            (length,) = _U16.unpack_from(body, end - ENTRY_HEADER_SIZE)
            if length < ENTRY_HEADER_SIZE or length > end:
                raise MalformedInput(
                    Reason.BAD_LENGTH,
                    f"OVMF footer entry {guid} has length {length}, outside {ENTRY_HEADER_SIZE}..{end}",
                )
            walked.append(FooterEntry(guid=guid, data=body[end - length : end - ENTRY_HEADER_SIZE]))
            end -= length
        return cls(entries=tuple(reversed(walked)))


def _u32_field(table: FooterTable, guid: UUID, what: str) -> int | None:
    data = table.get(guid)
    if data is None:
        return None
    if len(data) < _U32.size:
        raise MalformedInput(Reason.TRUNCATED, f"OVMF {what} entry holds {len(data)} bytes, needs 4")
    value: int = _U32.unpack_from(data)[0]
    return value


def _area(table: FooterTable, guid: UUID, what: str) -> tuple[int, int] | None:
    data = table.get(guid)
    if data is None:
        return None
    if len(data) < _U32_PAIR.size:
        raise MalformedInput(Reason.TRUNCATED, f"OVMF {what} entry holds {len(data)} bytes, needs 8")
    base, size = _U32_PAIR.unpack_from(data)
    # Generic OvmfX64 builds (Debian's) declare the entries with zeros: QEMU treats that as absent.
    if base == 0 or size == 0:
        return None
    return base, size


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
        reset = _u32_field(table, SEV_ES_RESET_BLOCK_GUID, "SEV-ES reset block")
        return cls(
            size=len(image),
            table=table,
            sev_es_reset_eip=reset or None,
            secret_area=_area(table, SEV_SECRET_AREA_GUID, "secret area"),
            hashes_table=_area(table, SEV_HASH_TABLE_GUID, "hashes table"),
        )
