"""DevSevSnp: the SNP host commands through SEV_ISSUE_CMD, against a fake kernel and against /dev/null.

The fake kernel reads and writes the caller's memory through the addresses in `sev_issue_cmd.data`, as
the PSP driver does, so these tests exercise the marshalling, not only the decoding. (That the bytes have
the kernel's layout is test_snp_kernel_layouts.py's job.)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import pickle
from dataclasses import replace

import pytest

from sevlaunch.firmware import FirmwareError, StatusCode
from sevlaunch.firmware.devsev import SEV_ISSUE_CMD, sev_issue_cmd
from sevlaunch.firmware.devsev_snp import (
    NO_FIRMWARE_CALL,
    WRAPPED_VLEK_HASHSTICK_SIZE,
    DeviceNotWritable,
    DevSevSnp,
    SnpCmd,
    SnpConfig,
    SnpPlatformState,
    SnpPlatformStatus,
    SnpUnsupported,
    sev_user_data_snp_vlek_load,
)
from sevlaunch.sev.errors import MalformedInput, Reason, SevError, Unsupported

STATUS = SnpPlatformStatus(
    api_major=1,
    api_minor=55,
    state=SnpPlatformState.INIT,
    is_rmp_initialized=True,
    build_id=21,
    mask_chip_id=False,
    mask_chip_key=False,
    vlek_en=True,
    feature_info=True,
    rapl_dis=False,
    ciphertext_hiding_cap=False,
    ciphertext_hiding_en=False,
    guest_count=3,
    current_tcb=0xDB18_0000_0000_0004,
    reported_tcb=0x1500_0000_0000_0003,
)
_WRITE_COMMANDS = {SnpCmd.COMMIT, SnpCmd.SET_CONFIG, SnpCmd.VLEK_LOAD}


class FakePsp:
    """Answers SEV_ISSUE_CMD like the PSP driver of Linux 6.11+: EPERM for a write command on a read-only
    descriptor, a firmware status in `error` with EIO, or the command's effect on the caller's buffer."""

    def __init__(self) -> None:
        self.status = STATUS
        self.firmware_status = 0
        self.errno_only: int | None = None
        self.config: SnpConfig | None = None
        self.commits = 0
        self.hashstick: bytes | None = None
        self.load_header: bytes | None = None

    def __call__(self, fd: int, request: int, arg: ctypes.Structure, mutate_flag: bool, /) -> int:
        assert request == SEV_ISSUE_CMD and mutate_flag
        assert isinstance(arg, sev_issue_cmd)
        if self.errno_only is not None:
            raise OSError(self.errno_only, os.strerror(self.errno_only))
        read_only = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        if arg.cmd in _WRITE_COMMANDS and read_only:
            raise OSError(errno.EPERM, "Operation not permitted")
        if self.firmware_status:
            arg.error = self.firmware_status
            raise OSError(errno.EIO, "Input/output error")
        if arg.cmd == SnpCmd.PLATFORM_STATUS:
            raw = self.status.to_bytes()
            ctypes.memmove(arg.data, raw, len(raw))
        elif arg.cmd == SnpCmd.COMMIT:
            assert arg.data == 0
            self.commits += 1
        elif arg.cmd == SnpCmd.SET_CONFIG:
            self.config = SnpConfig.from_bytes(ctypes.string_at(arg.data, 64))
        elif arg.cmd == SnpCmd.VLEK_LOAD:
            header = sev_user_data_snp_vlek_load.from_address(arg.data)
            if header.len != ctypes.sizeof(header) or header.vlek_wrapped_version != 0:
                raise OSError(errno.EINVAL, "Invalid argument")
            self.load_header = ctypes.string_at(arg.data, ctypes.sizeof(header))
            self.hashstick = ctypes.string_at(header.vlek_wrapped_address, WRAPPED_VLEK_HASHSTICK_SIZE)
        else:
            raise OSError(errno.EINVAL, "Invalid argument")
        return 0


@pytest.fixture
def psp() -> FakePsp:
    return FakePsp()


def test_platform_status_through_the_ioctl(psp: FakePsp) -> None:
    with DevSevSnp("/dev/null", ioctl=psp) as device:
        assert device.snp_platform_status() == STATUS


def test_platform_status_keeps_an_unknown_state_raw(psp: FakePsp) -> None:
    psp.status = replace(STATUS, state=7)
    with DevSevSnp("/dev/null", ioctl=psp) as device:
        assert device.snp_platform_status().state == 7


def test_commit_and_set_config_reach_the_kernel(psp: FakePsp) -> None:
    config = SnpConfig(reported_tcb=0x1500_0000_0000_0003, mask_chip_id=True)
    with DevSevSnp("/dev/null", ioctl=psp) as device:
        device.snp_commit()
        device.snp_set_config(config)
    assert psp.commits == 1 and psp.config == config


def test_vlek_load_passes_the_hashstick_by_address(psp: FakePsp) -> None:
    hashstick = bytes(range(256)) + bytes(range(176))
    with DevSevSnp("/dev/null", ioctl=psp) as device:
        device.snp_vlek_load(hashstick)
    assert psp.hashstick == hashstick
    assert psp.load_header is not None and psp.load_header[:8] == bytes([16, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("size", [0, 431, 433])
def test_vlek_load_refuses_a_wrong_size(psp: FakePsp, size: int) -> None:
    with DevSevSnp("/dev/null", ioctl=psp) as device, pytest.raises(MalformedInput) as exc:
        device.snp_vlek_load(bytes(size))
    assert exc.value.reason == Reason.BAD_LENGTH and psp.hashstick is None


@pytest.mark.parametrize(
    "status", [StatusCode.INVALID_PLATFORM_STATE, StatusCode.BAD_SVN, StatusCode.INVALID_KEY]
)
def test_firmware_status_is_a_firmware_error(psp: FakePsp, status: StatusCode) -> None:
    psp.firmware_status = int(status)
    with DevSevSnp("/dev/null", ioctl=psp) as device, pytest.raises(FirmwareError) as exc:
        device.snp_commit()
    assert exc.value.status is status and exc.value.command == "SNP_COMMIT"
    assert pickle.loads(pickle.dumps(exc.value)).status is status


def test_unknown_firmware_status_is_kept_raw(psp: FakePsp) -> None:
    psp.firmware_status = 0x3F
    with DevSevSnp("/dev/null", ioctl=psp) as device, pytest.raises(FirmwareError) as exc:
        device.snp_platform_status()
    assert exc.value.status == 0x3F and not isinstance(exc.value.status, StatusCode)


def test_no_firmware_call_falls_back_to_the_errno(psp: FakePsp) -> None:
    # SEV_RET_NO_FW_CALL (-1) is not a firmware status: the errno tells what went wrong.
    psp.firmware_status = NO_FIRMWARE_CALL
    psp_call = psp.__call__

    def fake(fd: int, request: int, arg: ctypes.Structure, mutate_flag: bool, /) -> int:
        try:
            return psp_call(fd, request, arg, mutate_flag)
        except OSError as exc:
            raise OSError(errno.EINVAL, "Invalid argument") from exc

    with DevSevSnp("/dev/null", ioctl=fake) as device, pytest.raises(SnpUnsupported):
        device.snp_platform_status()


def test_read_only_descriptor_is_a_typed_permission_error(psp: FakePsp) -> None:
    with DevSevSnp("/dev/null", ioctl=psp) as device:
        read_only = os.open("/dev/null", os.O_RDONLY)
        os.dup2(read_only, device.fileno())
        os.close(read_only)
        assert device.snp_platform_status() == STATUS  # reading needs no write access
        for command in (
            device.snp_commit,
            lambda: device.snp_set_config(SnpConfig(0)),
            lambda: device.snp_vlek_load(bytes(432)),
        ):
            with pytest.raises(DeviceNotWritable) as exc:
                command()
            assert isinstance(exc.value, PermissionError) and isinstance(exc.value, Unsupported)
            assert exc.value.reason == Reason.DEVICE_NOT_WRITABLE and "/dev/null" in str(exc.value)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP])
def test_kernel_without_snp_is_unsupported(psp: FakePsp, code: int) -> None:
    psp.errno_only = code
    with DevSevSnp("/dev/null", ioctl=psp) as device, pytest.raises(SnpUnsupported) as exc:
        device.snp_platform_status()
    assert exc.value.reason == Reason.KERNEL_UNSUPPORTED and "6.11" in str(exc.value)
    assert exc.value.command == "SNP_PLATFORM_STATUS"


def test_other_os_errors_pass_through(psp: FakePsp) -> None:
    psp.errno_only = errno.EFAULT
    with DevSevSnp("/dev/null", ioctl=psp) as device, pytest.raises(OSError) as exc:
        device.snp_platform_status()
    assert exc.value.errno == errno.EFAULT and not isinstance(exc.value, SevError)


def test_real_ioctl_on_a_non_sev_device_is_unsupported() -> None:
    # /dev/null answers any ioctl with ENOTTY, as a kernel without the SEV driver would.
    with DevSevSnp("/dev/null") as device:
        for command in (device.snp_platform_status, device.snp_commit):
            with pytest.raises(SnpUnsupported):
                command()


def test_closed_device_is_refused(psp: FakePsp) -> None:
    device = DevSevSnp("/dev/null", ioctl=psp)
    device.close()
    with pytest.raises(RuntimeError):
        device.snp_commit()
    assert repr(device) == "DevSevSnp(path='/dev/null')"


def test_status_and_config_round_trip_and_refuse_bad_bytes() -> None:
    assert SnpPlatformStatus.from_bytes(STATUS.to_bytes()) == STATUS
    config = SnpConfig(reported_tcb=(1 << 64) - 1, mask_chip_id=True, mask_chip_key=True)
    assert SnpConfig.from_bytes(config.to_bytes()) == config
    with pytest.raises(MalformedInput):
        SnpPlatformStatus.from_bytes(STATUS.to_bytes()[:-1])
    with pytest.raises(MalformedInput):
        SnpConfig.from_bytes(config.to_bytes() + b"\0")
    with pytest.raises(MalformedInput):
        SnpConfig.from_bytes(config.to_bytes()[:-1] + b"\x01")  # a reserved byte set
    with pytest.raises(MalformedInput):
        SnpConfig(reported_tcb=1 << 64)
