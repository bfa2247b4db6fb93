"""The SEV-SNP guest policy (u64) and the report's PLATFORM_INFO flags (SNP ABI, publication 56860:
"Guest Policy" and the ATTESTATION_REPORT's PLATFORM_INFO; PROTOCOL.md section 11).

Guest policy bits: 0-7 ABI_MINOR, 8-15 ABI_MAJOR, 16 SMT, 17 reserved and must be one, 18 MIGRATE_MA,
19 DEBUG, 20 SINGLE_SOCKET, 21 CXL_ALLOW, 22 MEM_AES_256_XTS, 23 RAPL_DIS, 24 CIPHERTEXT_HIDING,
25 PAGE_SWAP_DISABLE; 26-63 reserved, zero. The firmware refuses to launch a guest whose policy breaks
those rules, so a report carrying one is malformed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

from sevlaunch.sev.errors import MalformedInput
from sevlaunch.snp.errors import SnpReason


class PolicyFlag(IntFlag):
    """The single-bit guest policy flags, at their bit positions in the u64."""

    SMT = 1 << 16
    RESERVED_MBO = 1 << 17  # must be one
    MIGRATE_MA = 1 << 18
    DEBUG = 1 << 19
    SINGLE_SOCKET = 1 << 20
    CXL_ALLOW = 1 << 21
    MEM_AES_256_XTS = 1 << 22
    RAPL_DIS = 1 << 23
    CIPHERTEXT_HIDING = 1 << 24
    PAGE_SWAP_DISABLE = 1 << 25


ABI_MINOR_MASK = 0xFF
ABI_MAJOR_SHIFT = 8
DEFINED_POLICY_BITS = 0xFFFF | sum(f.value for f in PolicyFlag)
# The flag names a policy document may use (lower case), RESERVED_MBO excepted.
POLICY_FLAG_NAMES: dict[str, PolicyFlag] = {
    f.name.lower(): f for f in PolicyFlag if f is not PolicyFlag.RESERVED_MBO and f.name is not None
}


@dataclass(frozen=True)
class SnpGuestPolicy:
    """A decoded guest policy. `from_int` refuses a clear bit 17 or any reserved bit; `to_int` inverts it."""

    abi_minor: int = 0
    abi_major: int = 0
    flags: PolicyFlag = PolicyFlag.RESERVED_MBO

    def __post_init__(self) -> None:
        for name in ("abi_minor", "abi_major"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 0xFF:
                raise MalformedInput(SnpReason.BAD_GUEST_POLICY, f"policy.{name}: {value!r} is not a byte")
        flags = int(self.flags)
        if flags & ~(DEFINED_POLICY_BITS & ~0xFFFF):
            raise MalformedInput(SnpReason.BAD_GUEST_POLICY, f"policy.flags: {flags:#x} has bits of no flag")
        object.__setattr__(self, "flags", PolicyFlag(flags) | PolicyFlag.RESERVED_MBO)

    @classmethod
    def from_int(cls, value: int) -> SnpGuestPolicy:
        if not 0 <= value < 1 << 64:
            raise MalformedInput(SnpReason.BAD_GUEST_POLICY, f"policy: {value} is not a u64")
        if not value & PolicyFlag.RESERVED_MBO:
            raise MalformedInput(SnpReason.BAD_GUEST_POLICY, f"policy: bit 17 must be one ({value:#x})")
        reserved = value & ~DEFINED_POLICY_BITS
        if reserved:
            raise MalformedInput(
                SnpReason.BAD_GUEST_POLICY, f"policy: reserved bit(s) {reserved:#x} set ({value:#x})"
            )
        return cls(
            abi_minor=value & ABI_MINOR_MASK,
            abi_major=(value >> ABI_MAJOR_SHIFT) & 0xFF,
            flags=PolicyFlag(value & ~0xFFFF),
        )

    def to_int(self) -> int:
        return int(self.flags) | self.abi_major << ABI_MAJOR_SHIFT | self.abi_minor

    @property
    def abi(self) -> tuple[int, int]:
        """(major, minor): the least firmware ABI version the guest accepts."""
        return (self.abi_major, self.abi_minor)

    def __contains__(self, flag: PolicyFlag) -> bool:
        return flag in self.flags

    @property
    def smt(self) -> bool:
        return PolicyFlag.SMT in self.flags

    @property
    def migrate_ma(self) -> bool:
        return PolicyFlag.MIGRATE_MA in self.flags

    @property
    def debug(self) -> bool:
        return PolicyFlag.DEBUG in self.flags

    @property
    def single_socket(self) -> bool:
        return PolicyFlag.SINGLE_SOCKET in self.flags

    def flag_names(self) -> list[str]:
        return [name for name, flag in POLICY_FLAG_NAMES.items() if flag in self.flags]

    def as_json(self) -> dict[str, object]:
        return {
            "raw": f"{self.to_int():#x}",
            "abi": f"{self.abi_major}.{self.abi_minor}",
            "flags": self.flag_names(),
        }


class PlatformInfo(IntFlag):
    """PLATFORM_INFO of the report: the platform's state when the report was made."""

    SMT_EN = 1 << 0
    TSME_EN = 1 << 1
    ECC_EN = 1 << 2
    RAPL_DIS = 1 << 3
    CIPHERTEXT_HIDING_EN = 1 << 4
    ALIAS_CHECK_COMPLETE = 1 << 5
    TIO_EN = 1 << 7


PLATFORM_INFO_NAMES: dict[str, PlatformInfo] = {f.name.lower(): f for f in PlatformInfo if f.name is not None}


def platform_info_names(value: int) -> list[str]:
    """The defined flags set in a PLATFORM_INFO value; undefined bits appear as 'bit N'."""
    names = [name for name, flag in PLATFORM_INFO_NAMES.items() if value & flag]
    defined = sum(f.value for f in PlatformInfo)
    names += [f"bit {i}" for i in range(64) if value >> i & 1 and not defined >> i & 1]
    return names
