"""The firmware interface shared by the real `/dev/sev` backend and the emulator.

`Firmware` holds the platform commands of the SEV API (publication 55766, chapter 5 "Platform Management
API") as Linux exposes them through `/dev/sev`; `LaunchFirmware` adds the guest launch commands
(55766 chapter 6 "Guest Management API"), which on a real host QEMU issues through KVM. Both are
structural protocols, so a service can hold either backend.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, runtime_checkable

from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.sev.types import ChipId

PLATFORM_STATUS_SIZE = 12
# struct sev_user_data_status (psp-sev.h), packed: api_major u8, api_minor u8, state u8, flags u32,
# build u8, guest_count u32.
_STATUS = struct.Struct("<BBBIBI")
assert _STATUS.size == PLATFORM_STATUS_SIZE

# PLATFORM_STATUS flags (55766 section 5 "PLATFORM_STATUS": OWNER is bit 0 of byte 3, CONFIG.ES bit 0
# of the next byte; Linux's u32 `flags` starting at byte 3 sees them as bit 0 and bit 8).
FLAG_OWNED_EXTERNALLY = 0x0001
FLAG_CONFIG_ES = 0x0100  # SEV_STATUS_FLAGS_CONFIG_ES


class PlatformState(IntEnum):
    """The platform state machine (55766 section 5.1.2)."""

    UNINIT = 0
    INIT = 1
    WORKING = 2


@dataclass(frozen=True, kw_only=True)
class PlatformStatus:
    """The PLATFORM_STATUS result, kept apart from its 12-byte ioctl encoding (STYLE.md rule 2)."""

    api_major: int
    api_minor: int
    state: PlatformState
    owned_externally: bool
    es_enabled: bool
    build: int
    guest_count: int

    def __post_init__(self) -> None:
        for name in ("api_major", "api_minor", "build"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                raise ValueError(f"{name} must fit in a byte, got {value}")
        if not 0 <= self.guest_count <= 0xFFFFFFFF:
            raise ValueError(f"guest_count must fit in 32 bits, got {self.guest_count}")

    @property
    def api_version(self) -> tuple[int, int]:
        return (self.api_major, self.api_minor)

    @property
    def flags(self) -> int:
        """The flags word as PLATFORM_STATUS reports it (Linux's u32 view, see FLAG_*)."""
        return (FLAG_OWNED_EXTERNALLY if self.owned_externally else 0) | (
            FLAG_CONFIG_ES if self.es_enabled else 0
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PlatformStatus:
        if len(data) != PLATFORM_STATUS_SIZE:
            raise MalformedInput(
                Reason.BAD_LENGTH, f"PLATFORM_STATUS is {PLATFORM_STATUS_SIZE} bytes, got {len(data)}"
            )
        api_major, api_minor, state, flags, build, guest_count = _STATUS.unpack(data)
        try:
            platform_state = PlatformState(state)
        except ValueError:
            raise MalformedInput(Reason.BAD_FIELD, f"unknown platform state {state}") from None
        return cls(
            api_major=api_major,
            api_minor=api_minor,
            state=platform_state,
            owned_externally=bool(flags & FLAG_OWNED_EXTERNALLY),
            es_enabled=bool(flags & FLAG_CONFIG_ES),
            build=build,
            guest_count=guest_count,
        )

    def to_bytes(self) -> bytes:
        return _STATUS.pack(
            self.api_major, self.api_minor, int(self.state), self.flags, self.build, self.guest_count
        )


@runtime_checkable
class Firmware(Protocol):
    """Platform commands (55766 chapter 5), as `/dev/sev` offers them."""

    def platform_status(self) -> PlatformStatus: ...

    def pek_gen(self) -> None: ...

    def pek_csr(self) -> bytes: ...

    def pek_cert_import(self, pek: bytes, oca: bytes) -> None: ...

    def pdh_gen(self) -> None: ...

    def pdh_cert_export(self) -> tuple[bytes, bytes]:
        """(PDH, PEK‖OCA‖CEK); the CEK as the firmware holds it, without the ASK signature."""
        ...

    def get_id(self) -> ChipId: ...

    def factory_reset(self) -> None: ...


@runtime_checkable
class LaunchFirmware(Firmware, Protocol):
    """Platform commands plus the launch commands (55766 chapter 6) that QEMU issues through KVM."""

    def launch_start(self, godh: bytes, session: bytes, policy: int) -> int: ...

    def launch_update_data(self, handle: int, gpa: int, data: bytes) -> None: ...

    def launch_update_vmsa(self, handle: int, data: bytes) -> None: ...

    def launch_measure(self, handle: int) -> bytes:
        """measure[32] ‖ mnonce[16]."""
        ...

    def launch_secret(self, handle: int, header: bytes, payload: bytes, gpa: int) -> None: ...

    def launch_finish(self, handle: int) -> None: ...

    def attestation(self, handle: int, mnonce: bytes) -> bytes: ...

    def decommission(self, handle: int) -> None: ...
