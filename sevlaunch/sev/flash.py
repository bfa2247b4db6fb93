"""The firmware volume header at the start of an OVMF flash image, and what it says about the image.

An edk2 flash device image is a run of firmware volumes, each opening with an
EFI_FIRMWARE_VOLUME_HEADER (UEFI PI specification, volume 3, section 3.2.1)::

    0x00  ZeroVector[16]
    0x10  FileSystemGuid (16, little-endian GUID)
    0x20  FvLength (u64)
    0x28  Signature (u32, "_FVH")
    0x2C  Attributes (u32)
    0x30  HeaderLength (u16)
    0x32  Checksum (u16: the header's u16 words sum to zero)
    0x34  ExtHeaderOffset (u16)
    0x36  Reserved (u8)
    0x37  Revision (u8)
    0x38  BlockMap: (NumBlocks u32, Length u32) pairs, ended by (0, 0)

Which volume comes first tells how the image is meant to be loaded. OVMF keeps its variable store at
offset 0 of the flash device (`VARS_OFFSET = 0` in OvmfPkg's fdf includes), a volume whose
FileSystemGuid is EFI_SYSTEM_NV_DATA_FV_GUID:
* a *combined* image (OVMF.fd, and the AmdSev build `OvmfPkg/AmdSev/AmdSevX64.dsc`) opens with it:
  code and variables in one file, meant for `-bios` (QEMU's ROM, measured whole under SEV);
* a *split* code image (OVMF_CODE*.fd) opens with the code volume (FileSystemGuid
  EFI_FIRMWARE_FILE_SYSTEM2_GUID); its variables live in a separate OVMF_VARS*.fd, pflash unit 1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from uuid import UUID

from sevlaunch.sev.errors import MalformedInput, Reason

FV_SIGNATURE = b"_FVH"
#: EFI_SYSTEM_NV_DATA_FV_GUID: the volume holding the UEFI variable store.
NV_DATA_FV_GUID = UUID("fff12b8d-7696-4c8b-a985-2747075b4f50")
#: EFI_FIRMWARE_FILE_SYSTEM2_GUID: an ordinary code volume.
FFS2_GUID = UUID("8c8ce578-8a3d-4f1c-9935-896185c32dd3")
#: EFI_FIRMWARE_FILE_SYSTEM3_GUID: a code volume that may hold files larger than 16 MiB.
FFS3_GUID = UUID("5473c07a-3dcb-4dca-bd6f-1e9689e7349a")

_FIXED = struct.Struct("<16s16sQ4sIHHHBB")
_BLOCK = struct.Struct("<II")
FIXED_HEADER_SIZE = _FIXED.size  # 0x38
#: A header longer than this is not an OVMF volume header (OVMF's have one or two block map entries).
MAX_HEADER_LENGTH = 0x1000


def _checksum(header: bytes) -> int:
    """The u16 that makes the header's u16 words sum to zero (the Checksum field counted as zero)."""
    words: tuple[int, ...] = struct.unpack_from(f"<{len(header) // 2}H", header)
    return -sum(words) & 0xFFFF


@dataclass(frozen=True)
class FirmwareVolumeHeader:
    """EFI_FIRMWARE_VOLUME_HEADER. `block_map` excludes the (0, 0) terminator."""

    file_system_guid: UUID
    fv_length: int
    attributes: int
    block_map: tuple[tuple[int, int], ...]
    ext_header_offset: int = 0
    revision: int = 2
    zero_vector: bytes = field(default=bytes(16), repr=False)

    def __post_init__(self) -> None:
        if len(self.zero_vector) != 16:
            raise MalformedInput(Reason.BAD_LENGTH, "the zero vector is 16 bytes")
        if not self.block_map:
            raise MalformedInput(Reason.BAD_LENGTH, "a firmware volume has at least one block run")

    @property
    def header_length(self) -> int:
        return FIXED_HEADER_SIZE + _BLOCK.size * (len(self.block_map) + 1)

    def to_bytes(self) -> bytes:
        blocks = b"".join(_BLOCK.pack(n, size) for n, size in self.block_map) + _BLOCK.pack(0, 0)

        def pack(checksum: int) -> bytes:
            fixed = _FIXED.pack(
                self.zero_vector,
                self.file_system_guid.bytes_le,
                self.fv_length,
                FV_SIGNATURE,
                self.attributes,
                self.header_length,
                checksum,
                self.ext_header_offset,
                0,
                self.revision,
            )
            return fixed + blocks

        return pack(_checksum(pack(0)))

    @classmethod
    def from_bytes(cls, data: bytes) -> FirmwareVolumeHeader:
        """Parses the header at the start of `data` (the rest is ignored)."""
        if len(data) < FIXED_HEADER_SIZE:
            raise MalformedInput(Reason.TRUNCATED, "shorter than a firmware volume header")
        zero, guid, fv_length, sig, attributes, hlen, _csum, ext, _res, rev = _FIXED.unpack_from(data)
        if sig != FV_SIGNATURE:
            raise MalformedInput(Reason.BAD_FIELD, "no firmware volume signature")
        if hlen < FIXED_HEADER_SIZE + _BLOCK.size or hlen > MAX_HEADER_LENGTH or hlen % _BLOCK.size:
            raise MalformedInput(Reason.BAD_LENGTH, f"firmware volume header length {hlen}")
        if len(data) < hlen:
            raise MalformedInput(Reason.TRUNCATED, "firmware volume header cut short")
        if _checksum(bytes(data[:hlen])) != 0:
            raise MalformedInput(Reason.BAD_FIELD, "firmware volume header checksum")
        blocks: list[tuple[int, int]] = []
        for off in range(FIXED_HEADER_SIZE, hlen, _BLOCK.size):
            n, size = _BLOCK.unpack_from(data, off)
            if (n, size) == (0, 0):
                if off + _BLOCK.size != hlen:
                    raise MalformedInput(Reason.BAD_LENGTH, "block map ends before the header does")
                break
            blocks.append((n, size))
        else:
            raise MalformedInput(Reason.BAD_LENGTH, "block map has no terminator")
        return cls(
            file_system_guid=UUID(bytes_le=guid),
            fv_length=fv_length,
            attributes=attributes,
            block_map=tuple(blocks),
            ext_header_offset=ext,
            revision=rev,
            zero_vector=zero,
        )


def first_volume(image: bytes) -> FirmwareVolumeHeader | None:
    """The header of the volume at offset 0, or None when the image does not open with one."""
    try:
        return FirmwareVolumeHeader.from_bytes(image[:MAX_HEADER_LENGTH])
    except MalformedInput:
        return None


def holds_variable_store(image: bytes) -> bool:
    """True for a combined image (variable store inside, at offset 0), False for a split code image."""
    fv = first_volume(image)
    return fv is not None and fv.file_system_guid == NV_DATA_FV_GUID
