"""The byte-level walk of the OVMF footer GUID table (PROTOCOL.md §7), for `sevlaunch.sev.ovmf`.

`ovmf.FooterTable` and `ovmf.OVMF` are the model; this is the parse and its checks, on GUIDs as their
16 `bytes_le` bytes, with nothing but `struct` under it, so that a plain SEV launch digest (which needs
the checks but none of the model) starts without `dataclasses` and `uuid`. Layout and rules: see ovmf.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

from sevlaunch.sev.errors import MalformedInput, Reason

# The GUIDs as they sit in the image (UUID.bytes_le); ovmf builds its UUID constants from these.
FOOTER_GUID_LE = bytes.fromhex("de82b596b21ff745baeaa366c55a082d")
SEV_ES_RESET_BLOCK_GUID_LE = bytes.fromhex("de71f7007e1acb4f890e68c77e2fb44e")
SEV_SECRET_AREA_GUID_LE = bytes.fromhex("61b32e4c9b7dc34c8081127c90d3d294")
SEV_HASH_TABLE_GUID_LE = bytes.fromhex("1f3755723b3a044b927b1da6efa8d454")

# The pflash holding the code sits right below 4 GiB (QEMU maps unit 0 so that it ends there).
FOUR_GIB = 1 << 32
# The last 32 bytes of the image hold the reset vector, not the table.
RESET_VECTOR_AREA = 32
# Every entry and the footer itself end with u16 length | GUID.
ENTRY_HEADER_SIZE = 2 + 16
# Footer header plus the reset vector area: the smallest image that can hold a table at all.
MIN_IMAGE = ENTRY_HEADER_SIZE + RESET_VECTOR_AREA

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U32_PAIR = struct.Struct("<II")
_GUID_FIELDS = struct.Struct("<IHH")


def guid_text(le: bytes) -> str:
    """The canonical text of a GUID given as its 16 `bytes_le` bytes (what `str(UUID(bytes_le=le))` is)."""
    first, second, third = _GUID_FIELDS.unpack_from(le)
    tail = le[8:].hex()
    return f"{first:08x}-{second:04x}-{third:04x}-{tail[:4]}-{tail[4:]}"


def walk(image: bytes) -> list[tuple[bytes, bytes]] | None:
    """The table's entries as (GUID bytes_le, data), in image order; None when the image has no footer
    GUID. Every length is checked, and a GUID given twice is refused."""
    size = len(image)
    if size < MIN_IMAGE:
        raise MalformedInput(
            Reason.TRUNCATED, f"firmware image of {size} bytes is too short to hold an OVMF footer"
        )
    view = memoryview(image)
    guid_at = size - RESET_VECTOR_AREA - 16
    if bytes(view[guid_at : guid_at + 16]) != FOOTER_GUID_LE:
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
    walked: list[tuple[bytes, bytes]] = []
    end = len(body)
    # Like QEMU, stop once fewer bytes than an entry header remain: edk2 never leaves any, and a
    # stray tail cannot be read as an entry without guessing.
    while end >= ENTRY_HEADER_SIZE:
        guid = body[end - 16 : end]
        (length,) = _U16.unpack_from(body, end - ENTRY_HEADER_SIZE)
        if length < ENTRY_HEADER_SIZE or length > end:
            raise MalformedInput(
                Reason.BAD_LENGTH,
                f"OVMF footer entry {guid_text(guid)} has length {length}, "
                f"outside {ENTRY_HEADER_SIZE}..{end}",
            )
        walked.append((guid, body[end - length : end - ENTRY_HEADER_SIZE]))
        end -= length
    walked.reverse()
    check_unique(guid for guid, _ in walked)
    return walked


def check_unique(guids: Iterable[bytes]) -> None:
    """QEMU takes the first match walking backwards and sev-snp-measure the last one: an image with
    duplicates would be measured differently by different tools, so it is refused."""
    seen: set[bytes] = set()
    for guid in guids:
        if guid in seen:
            raise MalformedInput(Reason.BAD_FIELD, f"footer table has entry {guid_text(guid)} twice")
        seen.add(guid)


def find(entries: list[tuple[bytes, bytes]], guid: bytes) -> bytes | None:
    for entry_guid, data in entries:
        if entry_guid == guid:
            return data
    return None


def u32_field(data: bytes | None, what: str) -> int | None:
    """An entry holding a u32 (the SEV-ES reset block); None when absent."""
    if data is None:
        return None
    if len(data) < _U32.size:
        raise MalformedInput(Reason.TRUNCATED, f"OVMF {what} entry holds {len(data)} bytes, needs 4")
    value: int = _U32.unpack_from(data)[0]
    return value


def area(data: bytes | None, what: str) -> tuple[int, int] | None:
    """An entry holding a (base, size) guest physical range; None when absent or zero."""
    if data is None:
        return None
    if len(data) < _U32_PAIR.size:
        raise MalformedInput(Reason.TRUNCATED, f"OVMF {what} entry holds {len(data)} bytes, needs 8")
    base, size = _U32_PAIR.unpack_from(data)
    # Generic OvmfX64 builds (Debian's) declare the entries with zeros: QEMU treats that as absent.
    if base == 0 or size == 0:
        return None
    return base, size


def declared_by(
    get: Callable[[bytes], bytes | None],
) -> tuple[int | None, tuple[int, int] | None, tuple[int, int] | None]:
    """What a table declares for SEV, `get` giving an entry's data by GUID: (SEV-ES reset EIP, None when
    absent or zero; secret area; hashes table), every entry checked."""
    reset = u32_field(get(SEV_ES_RESET_BLOCK_GUID_LE), "SEV-ES reset block")
    return (
        reset or None,
        area(get(SEV_SECRET_AREA_GUID_LE), "secret area"),
        area(get(SEV_HASH_TABLE_GUID_LE), "hashes table"),
    )


def check_image(image: bytes) -> None:
    """Every check `ovmf.OVMF.from_bytes` makes of an image, without building the model."""
    entries = walk(image)
    if entries is not None:
        declared_by(lambda guid: find(entries, guid))
