"""The guest policy, a u32 fixed at LAUNCH_START (PROTOCOL.md §8; AMD SEV API spec, "Guest Policy").

The firmware enforces it for the guest's whole life and folds it into policy_mac and the measurement, so a
host cannot change it without the owner noticing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag

from sevlaunch.sev.errors import MalformedInput, Reason

_U32_MAX = 0xFFFF_FFFF
_API_MAJOR_SHIFT = 16
_API_MINOR_SHIFT = 24


class PolicyFlags(IntFlag):
    NODBG = 1 << 0  # debugging of the guest is forbidden
    NOKS = 1 << 1  # no sharing of keys with other guests
    ES = 1 << 2  # SEV-ES is required
    NOSEND = 1 << 3  # the guest may not be sent (migrated) to another platform
    DOMAIN = 1 << 4  # may be sent only to a platform in the same domain
    SEV = 1 << 5  # may be sent only to a platform that supports SEV


# Bits 6..15 are reserved by the spec; the firmware rejects a policy that sets them.
_FLAG_MASK = int(
    PolicyFlags.NODBG
    | PolicyFlags.NOKS
    | PolicyFlags.ES
    | PolicyFlags.NOSEND
    | PolicyFlags.DOMAIN
    | PolicyFlags.SEV
)
_RESERVED_MASK = 0x0000_FFFF & ~_FLAG_MASK


@dataclass(frozen=True)
class GuestPolicy:
    """A guest policy value (u32). Construction rejects values that do not fit or set reserved bits."""

    value: int

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise TypeError("a guest policy is an int")
        if not 0 <= self.value <= _U32_MAX:
            raise MalformedInput(Reason.BAD_FIELD, f"guest policy {self.value:#x} does not fit in 32 bits")
        if self.value & _RESERVED_MASK:
            raise MalformedInput(
                Reason.BAD_FIELD,
                f"guest policy {self.value:#x} sets reserved bits {self.value & _RESERVED_MASK:#x}",
            )

    @classmethod
    def from_flags(cls, flags: PolicyFlags, *, api_major_min: int = 0, api_minor_min: int = 0) -> GuestPolicy:
        for name, part in (("api_major_min", api_major_min), ("api_minor_min", api_minor_min)):
            if not 0 <= part <= 0xFF:
                raise MalformedInput(Reason.BAD_FIELD, f"{name} must be 0..255, got {part}")
        return cls(int(flags) | api_major_min << _API_MAJOR_SHIFT | api_minor_min << _API_MINOR_SHIFT)

    @classmethod
    def from_bytes(cls, data: bytes) -> GuestPolicy:
        if len(data) != 4:
            raise MalformedInput(Reason.BAD_LENGTH, f"a guest policy is 4 bytes, got {len(data)}")
        return cls(struct.unpack("<I", data)[0])

    def to_bytes(self) -> bytes:
        return struct.pack("<I", self.value)

    @property
    def flags(self) -> PolicyFlags:
        return PolicyFlags(self.value & _FLAG_MASK)

    @property
    def api_major_min(self) -> int:
        return (self.value >> _API_MAJOR_SHIFT) & 0xFF

    @property
    def api_minor_min(self) -> int:
        return (self.value >> _API_MINOR_SHIFT) & 0xFF

    @property
    def allows_debug(self) -> bool:
        return PolicyFlags.NODBG not in self.flags

    @property
    def allows_key_sharing(self) -> bool:
        return PolicyFlags.NOKS not in self.flags

    @property
    def requires_es(self) -> bool:
        return PolicyFlags.ES in self.flags

    @property
    def allows_send(self) -> bool:
        return PolicyFlags.NOSEND not in self.flags

    def firmware_allowed(self, api_major: int, api_minor: int) -> bool:
        """Whether a firmware of this API version satisfies the policy's minimum version."""
        return (api_major, api_minor) >= (self.api_major_min, self.api_minor_min)

    def describe(self) -> str:
        """A one-line human summary, e.g. '0x00000003: NODBG|NOKS, min API 0.0'."""
        names = [flag.name for flag in PolicyFlags if flag in self.flags and flag.name is not None]
        return (
            f"{self.value:#010x}: {'|'.join(names) or 'no flags'}, "
            f"min API {self.api_major_min}.{self.api_minor_min}"
        )

    def __int__(self) -> int:
        return self.value
