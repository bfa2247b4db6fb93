"""The SEV-SNP certificate table: what a guest's extended report carries next to the report.

Format (GHCB specification, publication 56421, "SNP Extended Guest Request"): a table of 24-byte entries
`{guid[16], offset u32, length u32}` (little-endian integers) closed by an all-zero entry, then the
certificates; offsets count from the start of the table. The GUIDs are stored in RFC 4122 byte order, as
AMD's sev-guest tools (libuuid `uuid_parse`) write them. The host provisions the table (`snphost import`),
the guest reads it back through `/dev/sev-guest` SNP_GET_EXT_REPORT or configfs-tsm's `auxblob`, where the
kernel hands over the whole page-rounded buffer: trailing zero bytes after the certificates are allowed.

The parser is strict (deny by default): a missing terminator, an entry pointing into the table or past
the buffer, two entries with one GUID or overlapping certificates are all `MalformedInput`.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Self

from sevlaunch.sev.errors import MalformedInput, Reason

ENTRY_SIZE: Final = 24
PAGE_SIZE: Final = 4096
_ENTRY: Final = struct.Struct("<16sII")
_TERMINATOR: Final = bytes(ENTRY_SIZE)

# AMD's GUIDs for the certificates of the chain (GHCB spec 56421 and AMD's sev-guest tools).
VCEK_GUID: Final = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
ASK_GUID: Final = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID: Final = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
VLEK_GUID: Final = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
_NIL: Final = uuid.UUID(int=0)


@dataclass(frozen=True)
class CertTableEntry:
    """One certificate (usually DER) under its GUID."""

    guid: uuid.UUID
    data: bytes

    def __post_init__(self) -> None:
        if self.guid == _NIL:
            raise MalformedInput(Reason.BAD_FIELD, "the nil GUID is the table's terminator, not an entry")
        if not self.data:
            raise MalformedInput(Reason.BAD_LENGTH, f"certificate {self.guid} is empty")


@dataclass(frozen=True)
class CertTable:
    """An ordered certificate table; GUIDs are unique."""

    entries: tuple[CertTableEntry, ...] = ()

    def __post_init__(self) -> None:
        guids = [entry.guid for entry in self.entries]
        if len(set(guids)) != len(guids):
            raise MalformedInput(Reason.BAD_FIELD, "the certificate table names a GUID twice")

    @classmethod
    def of(cls, certificates: Iterable[tuple[uuid.UUID, bytes]]) -> Self:
        return cls(tuple(CertTableEntry(guid, data) for guid, data in certificates))

    def get(self, guid: uuid.UUID) -> bytes | None:
        for entry in self.entries:
            if entry.guid == guid:
                return entry.data
        return None

    @property
    def vcek(self) -> bytes | None:
        return self.get(VCEK_GUID)

    @property
    def vlek(self) -> bytes | None:
        return self.get(VLEK_GUID)

    @property
    def ask(self) -> bytes | None:
        return self.get(ASK_GUID)

    @property
    def ark(self) -> bytes | None:
        return self.get(ARK_GUID)

    def encoded_size(self) -> int:
        return (len(self.entries) + 1) * ENTRY_SIZE + sum(len(entry.data) for entry in self.entries)

    def to_bytes(self, *, pad_to_page: bool = False) -> bytes:
        """The table, its terminator, then the certificates in entry order. `pad_to_page` zero-fills to
        a whole number of 4 KiB pages, the unit in which the kernel and the GHCB exchange the buffer."""
        out = bytearray()
        offset = (len(self.entries) + 1) * ENTRY_SIZE
        for entry in self.entries:
            if offset + len(entry.data) > 0xFFFF_FFFF:
                raise MalformedInput(Reason.BAD_LENGTH, "certificate table larger than 4 GiB")
            out += _ENTRY.pack(entry.guid.bytes, offset, len(entry.data))
            offset += len(entry.data)
        out += _TERMINATOR
        for entry in self.entries:
            out += entry.data
        if pad_to_page and len(out) % PAGE_SIZE:
            out += bytes(PAGE_SIZE - len(out) % PAGE_SIZE)
        return bytes(out)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Parses a table; bytes after the certificates are ignored only when they are zero padding."""
        headers: list[tuple[uuid.UUID, int, int]] = []
        position = 0
        while True:
            if position + ENTRY_SIZE > len(raw):
                raise MalformedInput(Reason.TRUNCATED, "certificate table has no all-zero terminator entry")
            chunk = raw[position : position + ENTRY_SIZE]
            position += ENTRY_SIZE
            if chunk == _TERMINATOR:
                break
            guid_bytes, offset, length = _ENTRY.unpack(chunk)
            guid = uuid.UUID(bytes=guid_bytes)
            if guid == _NIL:
                raise MalformedInput(Reason.BAD_FIELD, "certificate table entry with a nil GUID")
            headers.append((guid, offset, length))
        table_end = position
        spans = sorted((offset, offset + length, guid) for guid, offset, length in headers)
        previous_end = table_end
        for start, end, guid in spans:
            if start < table_end:
                raise MalformedInput(Reason.BAD_FIELD, f"certificate {guid} points into the table")
            if end > len(raw):
                raise MalformedInput(Reason.TRUNCATED, f"certificate {guid} runs past the buffer")
            if start < previous_end:
                raise MalformedInput(Reason.BAD_FIELD, f"certificate {guid} overlaps another")
            previous_end = end
        if any(raw[previous_end:]):
            raise MalformedInput(Reason.BAD_FIELD, "non-zero bytes after the last certificate")
        return cls.of((guid, raw[offset : offset + length]) for guid, offset, length in headers)
