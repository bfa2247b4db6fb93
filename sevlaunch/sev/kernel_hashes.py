"""The SEV kernel hashes table that QEMU writes for `kernel-hashes=on` (PROTOCOL.md §5).

QEMU `target/i386/sev.c` (`SevHashTable`, `PaddedSevHashTable`, `sev_add_kernel_loader_hashes`)::

    0x00  GUID 9438d606-4f22-4cc9-b479-a793d411fd21 (bytes_le)
    0x10  u16 length = 168 (the unpadded table)
    0x12  cmdline entry: GUID | u16 50 | SHA-256(cmdline + NUL)
    0x44  initrd  entry: GUID | u16 50 | SHA-256(initrd, or of nothing)
    0x76  kernel  entry: GUID | u16 50 | SHA-256(kernel)
    0xa8  zero padding to 176 bytes: LAUNCH_UPDATE_DATA lengths must be multiples of 16

OVMF's AmdSev build (`BlobVerifierLibSevHashes`) finds each entry by GUID and checks the blob it
loaded against it; the table is measured into the launch digest right after the firmware.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from uuid import UUID

from sevlaunch.sev.errors import MalformedInput, Reason

HASH_TABLE_HEADER_GUID = UUID("9438d606-4f22-4cc9-b479-a793d411fd21")
CMDLINE_ENTRY_GUID = UUID("97d02dd8-bd20-4c94-aa78-e7714d36ab2a")
INITRD_ENTRY_GUID = UUID("44baf731-3a2f-4bd7-9af1-41e29169781d")
KERNEL_ENTRY_GUID = UUID("4de79437-abd2-427f-b835-d5b172d2045b")

_HEADER = struct.Struct("<16sH")
_ENTRY = struct.Struct("<16sH32s")
TABLE_LENGTH = _HEADER.size + 3 * _ENTRY.size  # 168
PADDED_TABLE_LENGTH = (TABLE_LENGTH + 15) & ~15  # 176

# QEMU lays the entries out in this order; OVMF looks them up by GUID, but the measurement is of bytes.
_ORDER = (CMDLINE_ENTRY_GUID, INITRD_ENTRY_GUID, KERNEL_ENTRY_GUID)


@dataclass(frozen=True)
class KernelHashes:
    """The three SHA-256 values of the table, in the table's binary form via `to_bytes`/`from_bytes`."""

    cmdline_hash: bytes
    initrd_hash: bytes
    kernel_hash: bytes

    def __post_init__(self) -> None:
        for name in ("cmdline_hash", "initrd_hash", "kernel_hash"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise MalformedInput(Reason.BAD_LENGTH, f"{name} must be 32 bytes")

    @classmethod
    def compute(
        cls, kernel: bytes, initrd: bytes | None = None, cmdline: str | bytes | None = None
    ) -> KernelHashes:
        """Hashes what QEMU hands the guest over fw_cfg: the kernel file, the initrd file (nothing when
        absent), and the command line with its terminating NUL (just the NUL when absent)."""
        try:
            raw_cmdline = cmdline.encode() if isinstance(cmdline, str) else (cmdline or b"")
        except UnicodeEncodeError:
            # A lone surrogate (from a mis-decoded file name, say) has no UTF-8 form QEMU could pass on.
            raise MalformedInput(Reason.BAD_ENCODING, "kernel command line is not valid Unicode") from None
        if b"\x00" in raw_cmdline:
            raise MalformedInput(Reason.BAD_FIELD, "kernel command line contains a NUL byte")
        return cls(
            cmdline_hash=hashlib.sha256(raw_cmdline + b"\x00").digest(),
            initrd_hash=hashlib.sha256(initrd or b"").digest(),
            kernel_hash=hashlib.sha256(kernel).digest(),
        )

    def to_bytes(self) -> bytes:
        """The padded table (176 bytes), exactly as QEMU writes and measures it."""
        hashes = (self.cmdline_hash, self.initrd_hash, self.kernel_hash)
        parts = [_HEADER.pack(HASH_TABLE_HEADER_GUID.bytes_le, TABLE_LENGTH)]
        parts += [_ENTRY.pack(g.bytes_le, _ENTRY.size, h) for g, h in zip(_ORDER, hashes, strict=True)]
        return b"".join(parts).ljust(PADDED_TABLE_LENGTH, b"\x00")

    @classmethod
    def from_bytes(cls, data: bytes) -> KernelHashes:
        """Parses a padded (176-byte) or unpadded (168-byte) table, checking every GUID and length."""
        if len(data) not in (TABLE_LENGTH, PADDED_TABLE_LENGTH):
            raise MalformedInput(
                Reason.BAD_LENGTH,
                f"kernel hashes table must be {TABLE_LENGTH} or {PADDED_TABLE_LENGTH} bytes, got {len(data)}",
            )
        guid, length = _HEADER.unpack_from(data)
        if guid != HASH_TABLE_HEADER_GUID.bytes_le:
            raise MalformedInput(Reason.BAD_FIELD, "kernel hashes table header GUID is wrong")
        if length != TABLE_LENGTH:
            raise MalformedInput(Reason.BAD_LENGTH, f"kernel hashes table length field {length}")
        if any(data[TABLE_LENGTH:]):
            raise MalformedInput(Reason.BAD_FIELD, "kernel hashes table padding is not zero")
        hashes: list[bytes] = []
        for index, expected in enumerate(_ORDER):
            guid, length, digest = _ENTRY.unpack_from(data, _HEADER.size + index * _ENTRY.size)
            if guid != expected.bytes_le or length != _ENTRY.size:
                raise MalformedInput(Reason.BAD_FIELD, f"kernel hashes table entry {index} is not {expected}")
            hashes.append(digest)
        return cls(cmdline_hash=hashes[0], initrd_hash=hashes[1], kernel_hash=hashes[2])


def build_hashes_table(
    kernel: bytes, initrd: bytes | None = None, cmdline: str | bytes | None = None
) -> bytes:
    """The padded 176-byte table QEMU measures for this kernel, initrd and command line."""
    return KernelHashes.compute(kernel, initrd, cmdline).to_bytes()
