"""OVMF's SEV metadata: the guest memory an SEV-SNP firmware image asks the VMM to prepare before launch.

An SNP-capable image (edk2 `OvmfPkg/ResetVector/X64/OvmfSevMetadata.asm`, COCONUT-SVSM's stage 1)
points at it from its footer GUID table (`sevlaunch.sev.ovmf.FooterTable`): the entry
`dc886566-984a-4798-a75e-5585a7bf67cc` holds a u32, the metadata's offset counted back from the end of
the image. There::

    0x00  "ASEV"
    0x04  u32 size      header and every section descriptor: 16 + 12 * num_items
    0x08  u32 version   1
    0x0c  u32 num_items
    0x10  num_items x { u32 gpa, u32 size, u32 type }

QEMU (`target/i386/sev.c`, `snp_populate_metadata_pages`) turns each section into SNP_LAUNCH_UPDATE
pages of a type chosen by the section type; `launch_digest` does the same. Everything here is pure: it
takes the image bytes and keeps none of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from uuid import UUID

from sevlaunch.sev.errors import MalformedInput, Unsupported
from sevlaunch.sev.ovmf import FOUR_GIB, SEV_ES_RESET_BLOCK_GUID, SEV_HASH_TABLE_GUID, FooterTable
from sevlaunch.snp.errors import SnpReason

SEV_METADATA_GUID = UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
# COCONUT-SVSM's image: the u32 offset of its entry point from the image's base address.
SVSM_INFO_GUID = UUID("a789a612-0597-4c4b-a49f-cbb1fe9d1ddd")

PAGE_SIZE = 4096
METADATA_SIGNATURE = b"ASEV"
METADATA_VERSION = 1

_HEADER = struct.Struct("<4sIII")
_SECTION = struct.Struct("<III")
_U32 = struct.Struct("<I")


class SectionType(IntEnum):
    """`OvmfSevMetadataSectionType` (edk2 `OvmfPkg/Include/WorkArea.h` and the metadata assembly)."""

    SNP_SEC_MEM = 1  # memory the firmware's SEC phase uses: pre-validated zero pages
    SNP_SECRETS = 2  # the page the PSP fills with the VM platform communication keys
    CPUID = 3  # the page the PSP fills with the CPUID values it checked
    SVSM_CAA = 4  # the SVSM calling area: zero pages
    SNP_KERNEL_HASHES = 0x10  # the page holding QEMU's kernel hashes table (AmdSev builds)


@dataclass(frozen=True)
class MetadataSection:
    """One section descriptor: a page-aligned guest physical range below 4 GiB and what it is for."""

    gpa: int
    size: int
    section_type: SectionType

    def __post_init__(self) -> None:
        if not 0 <= self.gpa < FOUR_GIB or not 0 < self.size <= FOUR_GIB - self.gpa:
            raise MalformedInput(
                SnpReason.BAD_SEV_METADATA,
                f"SEV metadata section {self.gpa:#x}+{self.size:#x} is not a non-empty range below 4 GiB",
            )
        # SNP_LAUNCH_UPDATE works on whole pages: an unaligned section cannot be launched.
        if self.gpa % PAGE_SIZE or self.size % PAGE_SIZE:
            raise MalformedInput(
                SnpReason.BAD_SEV_METADATA,
                f"SEV metadata section {self.gpa:#x}+{self.size:#x} is not page-aligned",
            )

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def to_bytes(self) -> bytes:
        return _SECTION.pack(self.gpa, self.size, self.section_type)

    @classmethod
    def from_bytes(cls, data: bytes) -> MetadataSection:
        if len(data) != _SECTION.size:
            raise MalformedInput(
                SnpReason.BAD_SEV_METADATA, f"a section descriptor is {_SECTION.size} bytes, got {len(data)}"
            )
        gpa, size, kind = _SECTION.unpack(data)
        try:
            section_type = SectionType(kind)
        except ValueError:
            raise Unsupported(
                SnpReason.UNKNOWN_SECTION_TYPE, f"SEV metadata section type {kind:#x} is not known"
            ) from None
        return cls(gpa=gpa, size=size, section_type=section_type)


@dataclass(frozen=True)
class SevMetadata:
    """The whole metadata block: its sections in image order (QEMU launches them in that order)."""

    sections: tuple[MetadataSection, ...]

    @property
    def size(self) -> int:
        return _HEADER.size + len(self.sections) * _SECTION.size

    def has(self, section_type: SectionType) -> bool:
        return any(s.section_type is section_type for s in self.sections)

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(METADATA_SIGNATURE, self.size, METADATA_VERSION, len(self.sections))
        return header + b"".join(s.to_bytes() for s in self.sections)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> SevMetadata:
        """Parses a metadata block that starts at `data[0]`; bytes after its declared size are not read."""
        if len(data) < _HEADER.size:
            raise MalformedInput(
                SnpReason.BAD_SEV_METADATA, f"SEV metadata header needs {_HEADER.size} bytes, got {len(data)}"
            )
        signature, size, version, count = _HEADER.unpack_from(data)
        if signature != METADATA_SIGNATURE:
            raise MalformedInput(SnpReason.BAD_SEV_METADATA, "SEV metadata signature is not 'ASEV'")
        if version != METADATA_VERSION:
            raise Unsupported(SnpReason.BAD_SEV_METADATA, f"SEV metadata version {version} (only 1 is known)")
        # edk2 and COCONUT-SVSM declare exactly the header and the descriptors; any other size means the
        # descriptors could be read two ways.
        if size != _HEADER.size + count * _SECTION.size:
            raise MalformedInput(
                SnpReason.BAD_SEV_METADATA, f"SEV metadata size {size} does not match {count} sections"
            )
        if size > len(data):
            raise MalformedInput(
                SnpReason.BAD_SEV_METADATA, f"SEV metadata of {size} bytes overruns the image"
            )
        sections = tuple(
            MetadataSection.from_bytes(bytes(data[at : at + _SECTION.size]))
            for at in range(_HEADER.size, size, _SECTION.size)
        )
        return cls(sections=sections)


def _u32_entry(table: FooterTable, guid: UUID, what: str) -> int | None:
    data = table.get(guid)
    if data is None:
        return None
    if len(data) < _U32.size:
        raise MalformedInput(SnpReason.BAD_FIRMWARE_IMAGE, f"footer {what} entry holds {len(data)} bytes")
    value: int = _U32.unpack_from(data)[0]
    return value


@dataclass(frozen=True)
class SnpFirmware:
    """What an image (OVMF, or a COCONUT-SVSM image) declares for an SEV-SNP launch.

    * `gpa`: where the image is mapped; it ends at `end_at` (4 GiB for OVMF's pflash).
    * `sev_es_reset_eip`: the footer's SEV-ES reset block value, the AP start address, None if absent.
    * `hashes_table_gpa`: the footer's SEV hash table address, None if absent or zero.
    * `svsm_info`: COCONUT-SVSM's entry point offset from `gpa`, None if absent.
    * `metadata`: the SEV metadata, None if the image has none (a plain OvmfPkgX64 build with SMM).
    """

    size: int
    gpa: int
    sev_es_reset_eip: int | None
    hashes_table_gpa: int | None
    svsm_info: int | None
    metadata: SevMetadata | None

    @property
    def sections(self) -> tuple[MetadataSection, ...]:
        return () if self.metadata is None else self.metadata.sections

    @classmethod
    def from_bytes(cls, image: bytes, *, end_at: int = FOUR_GIB) -> SnpFirmware:
        size = len(image)
        # The image is measured page by page: a partial page cannot be handed to SNP_LAUNCH_UPDATE.
        if size == 0 or size % PAGE_SIZE:
            raise MalformedInput(
                SnpReason.BAD_FIRMWARE_IMAGE, f"firmware image of {size} bytes is not whole 4 KiB pages"
            )
        if not size <= end_at <= FOUR_GIB or end_at % PAGE_SIZE:
            raise MalformedInput(
                SnpReason.BAD_FIRMWARE_IMAGE,
                f"a {size}-byte image cannot end at {end_at:#x} (page-aligned, at most 4 GiB)",
            )
        table = FooterTable.from_image(image)
        if table is None:
            return cls(size, end_at - size, None, None, None, None)
        metadata = None
        offset = _u32_entry(table, SEV_METADATA_GUID, "SEV metadata")
        if offset is not None:
            if not _HEADER.size <= offset <= size:
                raise MalformedInput(
                    SnpReason.BAD_SEV_METADATA,
                    f"SEV metadata offset {offset:#x} from the end lies outside the {size}-byte image",
                )
            metadata = SevMetadata.from_bytes(memoryview(image)[size - offset :])
        hashes = _u32_entry(table, SEV_HASH_TABLE_GUID, "SEV hash table")
        return cls(
            size=size,
            gpa=end_at - size,
            sev_es_reset_eip=_u32_entry(table, SEV_ES_RESET_BLOCK_GUID, "SEV-ES reset block"),
            hashes_table_gpa=hashes or None,
            svsm_info=_u32_entry(table, SVSM_INFO_GUID, "SVSM info"),
            metadata=metadata,
        )
