"""The SEV-SNP host commands of `/dev/sev` (Linux 6.11 and later).

`SNP_PLATFORM_STATUS`, `SNP_COMMIT`, `SNP_SET_CONFIG` and `SNP_VLEK_LOAD` go through the same
`SEV_ISSUE_CMD` ioctl as the SEV platform commands of `DevSev`. The structures mirror upstream
include/uapi/linux/psp-sev.h (all `__packed`, hence `_pack_ = 1`; the flag words are C bit fields, which
ctypes lays out as GCC does on x86-64). tests/unit/test_snp_kernel_layouts.py compiles the header and
checks every size, offset and bit position here against the compiler's.

Failures are typed: a firmware status is a `FirmwareError`; `EPERM` (a command that needs the node
opened for writing) is `DeviceNotWritable`; a kernel that does not know the command, or whose SNP is not
initialised, answers `EINVAL`/`ENOTTY` and becomes `SnpUnsupported`.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Self

from sevlaunch.firmware.devsev import SEV_ISSUE_CMD, DeviceNotWritable, DevSev, sev_issue_cmd
from sevlaunch.firmware.status import FirmwareError
from sevlaunch.linux_ioctl import IoctlFn, system_ioctl
from sevlaunch.sev.errors import MalformedInput, Reason, Unsupported


class SnpCmd:
    """The SNP entries of psp-sev.h's command `enum` (the kernel's ids, not the firmware's)."""

    PLATFORM_STATUS: Final = 9
    COMMIT: Final = 10
    SET_CONFIG: Final = 11
    VLEK_LOAD: Final = 12


_COMMAND_NAMES: Final = {
    SnpCmd.PLATFORM_STATUS: "SNP_PLATFORM_STATUS",
    SnpCmd.COMMIT: "SNP_COMMIT",
    SnpCmd.SET_CONFIG: "SNP_SET_CONFIG",
    SnpCmd.VLEK_LOAD: "SNP_VLEK_LOAD",
}

# sev_ret_code's SEV_RET_NO_FW_CALL (-1 in a u32): the kernel failed before reaching the firmware, so the
# errno, not `error`, tells what happened.
NO_FIRMWARE_CALL: Final = 0xFFFF_FFFF

WRAPPED_VLEK_HASHSTICK_SIZE: Final = 432  # SNP ABI 56860, SNP_VLEK_LOAD; opaque bytes from AMD's KDS
VLEK_WRAPPED_VERSION: Final = 0  # the only version the firmware (and the kernel) accept


class sev_user_data_snp_status(ctypes.Structure):
    _pack_ = 1
    _fields_ = (
        ("api_major", ctypes.c_uint8),
        ("api_minor", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("is_rmp_initialized", ctypes.c_uint8, 1),
        ("rsvd", ctypes.c_uint8, 7),
        ("build_id", ctypes.c_uint32),
        ("mask_chip_id", ctypes.c_uint32, 1),
        ("mask_chip_key", ctypes.c_uint32, 1),
        ("vlek_en", ctypes.c_uint32, 1),
        ("feature_info", ctypes.c_uint32, 1),
        ("rapl_dis", ctypes.c_uint32, 1),
        ("ciphertext_hiding_cap", ctypes.c_uint32, 1),
        ("ciphertext_hiding_en", ctypes.c_uint32, 1),
        ("rsvd1", ctypes.c_uint32, 25),
        ("guest_count", ctypes.c_uint32),
        ("current_tcb_version", ctypes.c_uint64),
        ("reported_tcb_version", ctypes.c_uint64),
    )


class sev_user_data_snp_config(ctypes.Structure):
    _pack_ = 1
    _fields_ = (
        ("reported_tcb", ctypes.c_uint64),
        ("mask_chip_id", ctypes.c_uint32, 1),
        ("mask_chip_key", ctypes.c_uint32, 1),
        ("rsvd", ctypes.c_uint32, 30),
        ("rsvd1", ctypes.c_uint8 * 52),
    )


class sev_user_data_snp_vlek_load(ctypes.Structure):
    _pack_ = 1
    _fields_ = (
        ("len", ctypes.c_uint32),
        ("vlek_wrapped_version", ctypes.c_uint8),
        ("rsvd", ctypes.c_uint8 * 3),
        ("vlek_wrapped_address", ctypes.c_uint64),
    )


class sev_user_data_snp_wrapped_vlek_hashstick(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("data", ctypes.c_uint8 * WRAPPED_VLEK_HASHSTICK_SIZE),)


SNP_STATUS_SIZE: Final = ctypes.sizeof(sev_user_data_snp_status)
SNP_CONFIG_SIZE: Final = ctypes.sizeof(sev_user_data_snp_config)


class SnpPlatformState(IntEnum):
    """SNP_PLATFORM_STATUS `state` (56860, SNP_PLATFORM_STATUS)."""

    UNINIT = 0
    INIT = 1


class SnpUnsupported(Unsupported):
    """The kernel refused an SNP command as unknown (before Linux 6.11) or SNP is not initialised."""

    def __init__(self, command: str, detail: str) -> None:
        self.command = command
        super().__init__(Reason.KERNEL_UNSUPPORTED, f"{command}: {detail}")


def _exact(raw: bytes, size: int, what: str) -> None:
    if len(raw) != size:
        raise MalformedInput(Reason.BAD_LENGTH, f"{what} is {size} bytes, got {len(raw)}")


@dataclass(frozen=True)
class SnpPlatformStatus:
    """The answer of SNP_PLATFORM_STATUS. TCB versions are kept as the firmware's raw u64 (their layout
    depends on the product: Turin adds an FMC byte); `state` is the raw int when not a known state."""

    api_major: int
    api_minor: int
    state: SnpPlatformState | int
    is_rmp_initialized: bool
    build_id: int
    mask_chip_id: bool
    mask_chip_key: bool
    vlek_en: bool
    feature_info: bool
    rapl_dis: bool
    ciphertext_hiding_cap: bool
    ciphertext_hiding_en: bool
    guest_count: int
    current_tcb: int
    reported_tcb: int

    @classmethod
    def from_struct(cls, raw: sev_user_data_snp_status) -> Self:
        try:
            state: SnpPlatformState | int = SnpPlatformState(raw.state)
        except ValueError:
            state = int(raw.state)
        return cls(
            api_major=int(raw.api_major),
            api_minor=int(raw.api_minor),
            state=state,
            is_rmp_initialized=bool(raw.is_rmp_initialized),
            build_id=int(raw.build_id),
            mask_chip_id=bool(raw.mask_chip_id),
            mask_chip_key=bool(raw.mask_chip_key),
            vlek_en=bool(raw.vlek_en),
            feature_info=bool(raw.feature_info),
            rapl_dis=bool(raw.rapl_dis),
            ciphertext_hiding_cap=bool(raw.ciphertext_hiding_cap),
            ciphertext_hiding_en=bool(raw.ciphertext_hiding_en),
            guest_count=int(raw.guest_count),
            current_tcb=int(raw.current_tcb_version),
            reported_tcb=int(raw.reported_tcb_version),
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Decodes the kernel's 32-byte structure. Reserved bits are ignored: newer firmware sets flags
        this table does not know yet."""
        _exact(raw, SNP_STATUS_SIZE, "sev_user_data_snp_status")
        return cls.from_struct(sev_user_data_snp_status.from_buffer_copy(raw))

    def to_struct(self) -> sev_user_data_snp_status:
        return sev_user_data_snp_status(
            api_major=self.api_major,
            api_minor=self.api_minor,
            state=int(self.state),
            is_rmp_initialized=self.is_rmp_initialized,
            build_id=self.build_id,
            mask_chip_id=self.mask_chip_id,
            mask_chip_key=self.mask_chip_key,
            vlek_en=self.vlek_en,
            feature_info=self.feature_info,
            rapl_dis=self.rapl_dis,
            ciphertext_hiding_cap=self.ciphertext_hiding_cap,
            ciphertext_hiding_en=self.ciphertext_hiding_en,
            guest_count=self.guest_count,
            current_tcb_version=self.current_tcb,
            reported_tcb_version=self.reported_tcb,
        )

    def to_bytes(self) -> bytes:
        """The kernel's encoding, e.g. for an emulated `/dev/sev`."""
        return bytes(self.to_struct())


@dataclass(frozen=True)
class SnpConfig:
    """SNP_SET_CONFIG's input: the TCB to put in reports and the chip-id / chip-key masking."""

    reported_tcb: int
    mask_chip_id: bool = False
    mask_chip_key: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.reported_tcb < 1 << 64:
            raise MalformedInput(Reason.BAD_FIELD, "reported_tcb is a u64")

    def to_struct(self) -> sev_user_data_snp_config:
        return sev_user_data_snp_config(
            reported_tcb=self.reported_tcb, mask_chip_id=self.mask_chip_id, mask_chip_key=self.mask_chip_key
        )

    def to_bytes(self) -> bytes:
        return bytes(self.to_struct())

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Decodes a 64-byte config; the firmware requires the reserved bits and bytes to be zero, and so
        does this parser."""
        _exact(raw, SNP_CONFIG_SIZE, "sev_user_data_snp_config")
        value = sev_user_data_snp_config.from_buffer_copy(raw)
        if value.rsvd or any(value.rsvd1):
            raise MalformedInput(Reason.BAD_FIELD, "sev_user_data_snp_config reserved bits are not zero")
        return cls(int(value.reported_tcb), bool(value.mask_chip_id), bool(value.mask_chip_key))


_UNSUPPORTED_ERRNOS: Final = frozenset({errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENODEV})


class DevSevSnp(DevSev):
    """`DevSev` with the SEV-SNP host commands.

    SNP_PLATFORM_STATUS works on a read-only descriptor; SNP_SET_CONFIG and SNP_VLEK_LOAD need a writable
    one (the kernel's EPERM becomes `DeviceNotWritable`). `ioctl` defaults to the real system call; tests
    pass a fake kernel.
    """

    def __init__(self, path: str = "/dev/sev", *, ioctl: IoctlFn = system_ioctl) -> None:
        super().__init__(path)
        self._snp_ioctl = ioctl

    def fileno(self) -> int:
        return self._fd

    def _issue_snp(self, cmd: int, data: ctypes.Structure | None) -> None:
        name = _COMMAND_NAMES[cmd]
        fd = self._open_fd()
        arg = sev_issue_cmd(cmd=cmd, data=ctypes.addressof(data) if data is not None else 0, error=0)
        try:
            self._snp_ioctl(fd, SEV_ISSUE_CMD, arg, True)
        except OSError as exc:
            if arg.error and arg.error != NO_FIRMWARE_CALL:
                raise FirmwareError(arg.error, name) from exc
            if exc.errno == errno.EPERM:
                raise DeviceNotWritable(name, self.path) from exc
            if exc.errno in _UNSUPPORTED_ERRNOS:
                raise SnpUnsupported(
                    name,
                    f"refused with {errno.errorcode.get(exc.errno or 0, exc.errno)}: "
                    "the kernel predates the SNP host commands (Linux 6.11) or SNP is not initialised",
                ) from exc
            raise
        if arg.error and arg.error != NO_FIRMWARE_CALL:
            raise FirmwareError(arg.error, name)

    def snp_platform_status(self) -> SnpPlatformStatus:
        status = sev_user_data_snp_status()
        self._issue_snp(SnpCmd.PLATFORM_STATUS, status)
        return SnpPlatformStatus.from_struct(status)

    def snp_commit(self) -> None:
        """Makes the current TCB the committed one (the firmware then refuses rollback below it)."""
        self._issue_snp(SnpCmd.COMMIT, None)

    def snp_set_config(self, config: SnpConfig) -> None:
        self._issue_snp(SnpCmd.SET_CONFIG, config.to_struct())

    def snp_vlek_load(self, wrapped_hashstick: bytes) -> None:
        """Loads a VLEK: `wrapped_hashstick` is the 432-byte blob AMD's KDS wraps for this chip (the firmware
        unwraps it with a chip key, so the blob itself is not secret)."""
        _exact(wrapped_hashstick, WRAPPED_VLEK_HASHSTICK_SIZE, "wrapped VLEK hashstick")
        hashstick = sev_user_data_snp_wrapped_vlek_hashstick.from_buffer_copy(wrapped_hashstick)
        load = sev_user_data_snp_vlek_load(
            len=ctypes.sizeof(sev_user_data_snp_vlek_load),
            vlek_wrapped_version=VLEK_WRAPPED_VERSION,
            vlek_wrapped_address=ctypes.addressof(hashstick),
        )
        self._issue_snp(SnpCmd.VLEK_LOAD, load)
