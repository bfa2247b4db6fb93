"""The launch secret (PROTOCOL.md §6; AMD SEV API spec §6.6, "LAUNCH_SECRET").

After it verified the measurement, the owner encrypts a secret under the TEK and MACs it under the TIK;
the firmware decrypts it straight into guest memory, where the host never sees it. The plaintext is,
for OVMF and Linux's `efi_secret`, a GUID-keyed secret table.
"""

from __future__ import annotations

import hmac
import secrets
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from sevlaunch.sev.errors import MalformedInput, Reason, Unsupported, VerificationFailed
from sevlaunch.sev.kdf import aes128_ctr, hmac_sha256
from sevlaunch.sev.session import TransportKeys
from sevlaunch.sev.types import Measure

SECRET_TABLE_GUID = uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")
# A LUKS passphrase for the guest's disk; grub and cryptsetup expect it NUL terminated.
DISK_PASSPHRASE_GUID = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")

_GUID_SIZE = 16
_ENTRY_HEADER_SIZE = _GUID_SIZE + 4
_TABLE_ALIGN = 16
SECRET_HEADER_SIZE = 52
SECRET_IV_SIZE = 16
SECRET_MAC_SIZE = 32
# The MAC message opens with the channel context byte of a secret (AMD-ASPFW sev_channel.c).
_SECRET_CTX = 0x01
# The MAC message's fixed head: ctx u8 ‖ flags u32 ‖ iv[16] ‖ guest_len u32 ‖ trans_len u32.
_MAC_HEAD = struct.Struct("<BI16sII")
# Firmware from API 0.17 on binds the secret to the launch by MACing the measure too; older firmware
# (Naples API <= 0.16) does not (sev-tool create_launch_secret_header; kat.json
# launch-secret-mac-api-version-rule).
API_WITH_MEASURE_IN_SECRET_MAC = (0, 17)
# The secret area OVMF AmdSev builds reserve by default (PROTOCOL.md §6).
DEFAULT_SECRET_AREA_SIZE = 3072


def _pad16(length: int) -> int:
    return -(-length // _TABLE_ALIGN) * _TABLE_ALIGN


@dataclass(frozen=True)
class SecretEntry:
    """One secret of the table: a GUID the guest looks it up by, and its bytes (never shown)."""

    guid: uuid.UUID
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.guid, uuid.UUID) or not isinstance(self.data, bytes):
            raise TypeError("a secret entry is a uuid.UUID and bytes")
        if _ENTRY_HEADER_SIZE + len(self.data) > 0xFFFF_FFFF:
            raise MalformedInput(Reason.BAD_LENGTH, "secret entry too large")

    @classmethod
    def disk_passphrase(cls, passphrase: bytes) -> SecretEntry:
        """The well-known LUKS passphrase entry, NUL terminated as its readers expect."""
        return cls(DISK_PASSPHRASE_GUID, passphrase if passphrase.endswith(b"\x00") else passphrase + b"\x00")

    def __repr__(self) -> str:
        return f"SecretEntry(guid={self.guid}, data=<{len(self.data)} bytes hidden>)"

    __str__ = __repr__


@dataclass(frozen=True)
class SecretTable:
    """The OVMF secret table: GUID ‖ u32 length ‖ entries {GUID ‖ u32 (20 + len) ‖ data}, padded to 16.

    GUIDs are serialised in `bytes_le` order. The length field excludes the padding.
    """

    entries: tuple[SecretEntry, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.entries, tuple) or not all(isinstance(e, SecretEntry) for e in self.entries):
            raise TypeError("SecretTable.entries is a tuple of SecretEntry")
        guids = [entry.guid for entry in self.entries]
        if len(set(guids)) != len(guids):
            # A guest looks a secret up by GUID: two entries with one GUID make the lookup ambiguous.
            raise MalformedInput(Reason.BAD_FIELD, "secret table has duplicate GUIDs")
        if self.unpadded_length > 0xFFFF_FFFF:
            raise MalformedInput(Reason.BAD_LENGTH, "secret table too large")

    @classmethod
    def of(cls, entries: Sequence[SecretEntry]) -> SecretTable:
        return cls(tuple(entries))

    @property
    def unpadded_length(self) -> int:
        return _ENTRY_HEADER_SIZE + sum(_ENTRY_HEADER_SIZE + len(entry.data) for entry in self.entries)

    def get(self, guid: uuid.UUID) -> bytes | None:
        for entry in self.entries:
            if entry.guid == guid:
                return entry.data
        return None

    def to_bytes(self) -> bytes:
        out = bytearray(SECRET_TABLE_GUID.bytes_le + struct.pack("<I", self.unpadded_length))
        for entry in self.entries:
            out += entry.guid.bytes_le + struct.pack("<I", _ENTRY_HEADER_SIZE + len(entry.data)) + entry.data
        out += bytes(_pad16(len(out)) - len(out))
        return bytes(out)

    def require_fits(self, area_size: int = DEFAULT_SECRET_AREA_SIZE) -> None:
        """Raises Unsupported(SECRET_TOO_LARGE) when the padded table exceeds the guest's secret area."""
        size = _pad16(self.unpadded_length)
        if size > area_size:
            raise Unsupported(
                Reason.SECRET_TOO_LARGE, f"secret table is {size} bytes, the secret area {area_size}"
            )

    @classmethod
    def from_bytes(cls, data: bytes) -> SecretTable:
        """Parses a table, padded (as the guest receives it) or not; the padding must be zeros."""
        data = bytes(data)
        if len(data) < _ENTRY_HEADER_SIZE:
            raise MalformedInput(
                Reason.TRUNCATED, f"secret table needs {_ENTRY_HEADER_SIZE} bytes, got {len(data)}"
            )
        if data[:_GUID_SIZE] != SECRET_TABLE_GUID.bytes_le:
            raise MalformedInput(Reason.BAD_FIELD, "not a secret table (wrong header GUID)")
        (total,) = struct.unpack_from("<I", data, _GUID_SIZE)
        if total < _ENTRY_HEADER_SIZE or total > len(data):
            raise MalformedInput(
                Reason.TRUNCATED, f"secret table length {total} does not fit {len(data)} bytes"
            )
        if len(data) > _pad16(total) or any(data[total:]):
            raise MalformedInput(Reason.BAD_LENGTH, "secret table has bytes beyond its length and padding")
        entries: list[SecretEntry] = []
        offset = _ENTRY_HEADER_SIZE
        while offset < total:
            if total - offset < _ENTRY_HEADER_SIZE:
                raise MalformedInput(Reason.TRUNCATED, f"secret entry header truncated at offset {offset}")
            guid = uuid.UUID(bytes_le=data[offset : offset + _GUID_SIZE])
            (length,) = struct.unpack_from("<I", data, offset + _GUID_SIZE)
            if length < _ENTRY_HEADER_SIZE or length > total - offset:
                raise MalformedInput(
                    Reason.BAD_LENGTH, f"secret entry length {length} at offset {offset} is invalid"
                )
            entries.append(SecretEntry(guid, data[offset + _ENTRY_HEADER_SIZE : offset + length]))
            offset += length
        return cls(tuple(entries))


@dataclass(frozen=True)
class SecretHeader:
    """The 52-byte LAUNCH_SECRET packet header: u32 flags ‖ iv[16] ‖ mac[32] (base64 in libvirt/QMP)."""

    flags: int
    iv: bytes
    mac: bytes

    def __post_init__(self) -> None:
        if (
            isinstance(self.flags, bool)
            or not isinstance(self.flags, int)
            or not 0 <= self.flags <= 0xFFFF_FFFF
        ):
            raise MalformedInput(Reason.BAD_FIELD, "secret header flags must be a u32")
        if not isinstance(self.iv, bytes) or not isinstance(self.mac, bytes):
            raise TypeError("secret header iv and mac are bytes")
        if len(self.iv) != SECRET_IV_SIZE or len(self.mac) != SECRET_MAC_SIZE:
            raise MalformedInput(Reason.BAD_LENGTH, "secret header iv is 16 and mac 32 bytes")

    @classmethod
    def _unchecked(cls, flags: int, iv: bytes, mac: bytes) -> SecretHeader:
        """A header of values package_secret itself made (flags 0, its checked IV, a fresh MAC): the
        checks of __post_init__ would only repeat what is known. Never for values from outside."""
        header = object.__new__(cls)
        object.__setattr__(header, "flags", flags)
        object.__setattr__(header, "iv", iv)
        object.__setattr__(header, "mac", mac)
        return header

    @classmethod
    def from_bytes(cls, data: bytes) -> SecretHeader:
        if len(data) != SECRET_HEADER_SIZE:
            raise MalformedInput(
                Reason.TRUNCATED if len(data) < SECRET_HEADER_SIZE else Reason.BAD_LENGTH,
                f"a secret header is {SECRET_HEADER_SIZE} bytes, got {len(data)}",
            )
        data = bytes(data)
        (flags,) = struct.unpack_from("<I", data, 0)
        return cls(flags, data[4:20], data[20:52])

    def to_bytes(self) -> bytes:
        return struct.pack("<I", self.flags) + self.iv + self.mac


def _binds_measure(api_major: int | None, api_minor: int | None) -> bool:
    if api_major is None and api_minor is None:
        return True
    if api_major is None or api_minor is None:
        raise TypeError("give both api_major and api_minor, or neither")
    return (api_major, api_minor) >= API_WITH_MEASURE_IN_SECRET_MAC


def _secret_mac(
    tik: bytes, measure: bytes, flags: int, iv: bytes, payload: bytes, *, bind_measure: bool
) -> bytes:
    """`iv` and `flags` are already checked (a SecretHeader's, or package_secret's own); `measure` is not."""
    if len(measure) != 32:
        raise MalformedInput(Reason.BAD_LENGTH, f"measure must be 32 bytes, got {len(measure)}")
    # ctx ‖ flags ‖ iv ‖ guest_len ‖ trans_len ‖ payload [‖ measure]. guest_len and trans_len are equal:
    # the payload is decrypted in place, nothing is compressed.
    head = _MAC_HEAD.pack(_SECRET_CTX, flags, iv, len(payload), len(payload))
    if bind_measure:
        return hmac_sha256(tik, head, payload, measure)
    return hmac_sha256(tik, head, payload)


def package_secret(
    keys: TransportKeys,
    measure: Measure | bytes,
    plaintext: bytes,
    *,
    iv: bytes | None = None,
    api_major: int | None = None,
    api_minor: int | None = None,
) -> tuple[SecretHeader, bytes]:
    """Encrypts `plaintext` for LAUNCH_SECRET: (header, payload = AES-128-CTR(TEK, iv, plaintext)).

    The MAC covers the measure of the verified launch, so the secret opens only in that launch, when the
    firmware API is 0.17 or later; give the platform's api_major/api_minor for older firmware (< 0.17),
    whose MAC leaves the measure out. Without a version, the 0.17-and-later rule applies.
    """
    if not plaintext:
        raise MalformedInput(Reason.BAD_LENGTH, "a launch secret cannot be empty")
    bind = _binds_measure(api_major, api_minor)
    if iv is None:
        iv = secrets.token_bytes(SECRET_IV_SIZE)
    else:  # the caller's IV (tests, known answers): checked, and held as bytes by the header
        if len(iv) != SECRET_IV_SIZE:
            raise MalformedInput(Reason.BAD_LENGTH, f"secret IV must be 16 bytes, got {len(iv)}")
        iv = bytes(iv)
    payload = aes128_ctr(keys.tek, iv, plaintext)
    mac = _secret_mac(keys.tik, measure, 0, iv, payload, bind_measure=bind)
    return SecretHeader._unchecked(0, iv, mac), payload


def open_secret(
    keys: TransportKeys,
    measure: Measure | bytes,
    header: SecretHeader,
    payload: bytes,
    *,
    api_major: int | None = None,
    api_minor: int | None = None,
) -> bytes:
    """The firmware's side of LAUNCH_SECRET: checks the MAC (constant time), then decrypts."""
    if header.flags != 0:
        # Bit 0 (COMPRESSED) is the only flag the spec defines, and no firmware implements it.
        raise Unsupported(Reason.BAD_FIELD, f"secret header flags {header.flags:#x} are not supported")
    if not payload:
        raise MalformedInput(Reason.BAD_LENGTH, "a launch secret cannot be empty")
    expected = _secret_mac(
        keys.tik, measure, header.flags, header.iv, payload, bind_measure=_binds_measure(api_major, api_minor)
    )
    if not hmac.compare_digest(expected, header.mac):
        raise VerificationFailed(
            Reason.BAD_SECRET_MAC, "launch secret MAC does not match (wrong keys or measure)"
        )
    return aes128_ctr(keys.tek, header.iv, payload)
