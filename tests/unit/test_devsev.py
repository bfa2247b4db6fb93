"""DevSev: the ctypes structures against the kernel ABI, and the ioctl path.

Expected sizes and offsets are written from include/uapi/linux/psp-sev.h (every struct is
`__attribute__((packed))`), not computed from the ctypes definitions under test.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

import grpc
import pytest

from sevlaunch.firmware import DevSev, Firmware, FirmwareError, PlatformStatus, StatusCode, devsev
from sevlaunch.rpc.errors import map_exception
from sevlaunch.sev.errors import Reason, Unsupported

# struct name -> (size, {field: offset})
KERNEL_ABI = {
    "sev_issue_cmd": (16, {"cmd": 0, "data": 4, "error": 12}),
    "sev_user_data_status": (
        12,
        {"api_major": 0, "api_minor": 1, "state": 2, "flags": 3, "build": 7, "guest_count": 8},
    ),
    "sev_user_data_pek_csr": (12, {"address": 0, "length": 8}),
    "sev_user_data_pek_cert_import": (
        24,
        {"pek_cert_address": 0, "pek_cert_len": 8, "oca_cert_address": 12, "oca_cert_len": 20},
    ),
    "sev_user_data_pdh_cert_export": (
        24,
        {"pdh_cert_address": 0, "pdh_cert_len": 8, "cert_chain_address": 12, "cert_chain_len": 20},
    ),
    "sev_user_data_get_id": (128, {"socket1": 0, "socket2": 64}),
    "sev_user_data_get_id2": (12, {"address": 0, "length": 8}),
}


@pytest.mark.parametrize("name", sorted(KERNEL_ABI))
def test_struct_matches_kernel_abi(name: str) -> None:
    size, offsets = KERNEL_ABI[name]
    struct_type = getattr(devsev, name)
    assert ctypes.sizeof(struct_type) == size
    assert [f[0] for f in struct_type._fields_] == list(offsets)
    for field, offset in offsets.items():
        assert getattr(struct_type, field).offset == offset, field


def test_ioctl_number_and_command_ids() -> None:
    # _IOWR('S', 0x0, struct sev_issue_cmd): dir 3 << 30 | size 16 << 16 | 'S' << 8 | 0
    assert devsev.SEV_ISSUE_CMD == 0xC0105300
    ids = devsev.SevCmd
    assert (ids.FACTORY_RESET, ids.PLATFORM_STATUS, ids.PEK_GEN, ids.PEK_CSR, ids.PDH_GEN) == (0, 1, 2, 3, 4)
    assert (ids.PDH_CERT_EXPORT, ids.PEK_CERT_IMPORT, ids.GET_ID, ids.GET_ID2) == (5, 6, 7, 8)


def test_status_struct_decodes_like_platform_status() -> None:
    raw = bytes([1, 55, 1]) + (0x100).to_bytes(4, "little") + bytes([21]) + (7).to_bytes(4, "little")
    struct_value = devsev.sev_user_data_status.from_buffer_copy(raw)
    assert (struct_value.api_major, struct_value.api_minor, struct_value.build) == (1, 55, 21)
    assert struct_value.flags == 0x100 and struct_value.guest_count == 7
    status = PlatformStatus.from_bytes(raw)
    assert status.es_enabled and not status.owned_externally and status.guest_count == 7


def test_ioctl_on_a_non_sev_device_raises_os_error() -> None:
    # /dev/null accepts open() but not SEV_ISSUE_CMD: the error surfaces as the OS error, not a status.
    with DevSev("/dev/null") as device:
        with pytest.raises(OSError) as exc:
            device.platform_status()
        assert exc.value.errno == errno.ENOTTY
        # GET_ID2 fails with ENOTTY, so get_id falls back to GET_ID, which fails the same way.
        with pytest.raises(OSError):
            device.get_id()


def test_launch_commands_go_through_kvm() -> None:
    with DevSev("/dev/null") as device:
        assert isinstance(device, Firmware)
        for call in (
            lambda: device.launch_start(b"", b"", 0),
            lambda: device.launch_measure(1),
            lambda: device.launch_secret(1, b"", b"", 0),
            lambda: device.decommission(1),
        ):
            with pytest.raises(NotImplementedError, match="KVM"):
                call()


def test_closed_device_is_refused() -> None:
    device = DevSev("/dev/null")
    device.close()
    with pytest.raises(RuntimeError):
        device.pdh_gen()
    assert "dev/null" in repr(device)


@pytest.mark.hw
def test_read_only_commands_on_real_hardware(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("--run-hw", default=False):
        pytest.skip("hardware test: pass --run-hw on a host with /dev/sev")
    if not os.path.exists("/dev/sev"):
        pytest.skip("no /dev/sev on this host")
    with DevSev() as device:
        status = device.platform_status()
        assert (status.api_major, status.api_minor) >= (0, 14)
        chip_id = device.get_id()
        # 64 bytes on today's firmware; a firmware may ask for more (GET_ID2 renegotiates the length).
        assert len(chip_id) >= 64 and any(chip_id)
        pdh, chain = device.pdh_cert_export()
        assert len(pdh) == devsev.SEV_CERT_SIZE and len(chain) == 3 * devsev.SEV_CERT_SIZE


# ------------------------------------------------------------------ a scripted kernel (sev-dev.c)


class ScriptedKernel(DevSev):
    """`DevSev` over a fake `sev_ioctl` that behaves as drivers/crypto/ccp/sev-dev.c does: EPERM for a
    descriptor without write access, ENOTSUPP for GET_ID/GET_ID2 before API 0.16, INVALID_LENGTH with
    the wanted length written back for a GET_ID2 buffer that is too small."""

    def __init__(
        self, *, writable: bool, initialised: bool = False, api: tuple[int, int] = (1, 55), id_len: int = 64
    ) -> None:
        super().__init__("/dev/null")
        self.writable = writable
        self.initialised = initialised
        self.api = api
        self.chip_id = bytes((i * 7 + 1) & 0xFF for i in range(id_len))
        self.calls: list[int] = []

    def _ioctl(self, fd: int, request: int, arg: Any, mutate: bool) -> Any:
        assert request == devsev.SEV_ISSUE_CMD and mutate
        cmd = devsev.SevCmd
        self.calls.append(arg.cmd)
        needs_write = {cmd.FACTORY_RESET, cmd.PEK_GEN, cmd.PDH_GEN, cmd.PEK_CSR, cmd.PEK_CERT_IMPORT}
        if arg.cmd in needs_write and not self.writable:
            raise OSError(errno.EPERM, "Operation not permitted")
        if arg.cmd == cmd.PDH_CERT_EXPORT and not self.initialised and not self.writable:
            raise OSError(errno.EPERM, "Operation not permitted")
        if arg.cmd in (cmd.GET_ID, cmd.GET_ID2) and self.api < (0, 16):
            raise OSError(devsev.ENOTSUPP, "Unknown error 524")
        if arg.cmd == cmd.GET_ID2:
            req = devsev.sev_user_data_get_id2.from_address(arg.data)
            wanted = len(self.chip_id)
            if req.length < wanted:
                req.length = wanted
                arg.error = StatusCode.INVALID_LENGTH
                raise OSError(errno.EIO, "Input/output error")
            ctypes.memmove(req.address, self.chip_id, wanted)
            req.length = wanted
            return 0
        if arg.cmd in (cmd.PEK_GEN, cmd.PDH_GEN):
            return 0
        raise AssertionError(f"command {arg.cmd} not scripted")


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda d: d.pek_csr(), "PEK_CSR"),
        (lambda d: d.pdh_cert_export(), "PDH_CERT_EXPORT"),
        (lambda d: d.pek_gen(), "PEK_GEN"),
        (lambda d: d.pdh_gen(), "PDH_GEN"),
        (lambda d: d.factory_reset(), "FACTORY_RESET"),
        (lambda d: d.pek_cert_import(b"p", b"o"), "PEK_CERT_IMPORT"),
    ],
)
def test_read_only_device_fd_refusal_is_a_typed_error(call: Any, name: str) -> None:
    with ScriptedKernel(writable=False) as device:
        with pytest.raises(devsev.DeviceNotWritable) as err:
            call(device)
    assert err.value.reason == "sev_device_read_only" and name in err.value.detail
    mapped = map_exception(err.value, "r1")
    assert (mapped.code, mapped.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "sev_device_read_only")
    assert mapped.metadata["command"] == name


def test_read_only_fd_still_serves_status_and_id() -> None:
    with ScriptedKernel(writable=False) as device:
        assert len(device.get_id()) == 64


def test_firmware_before_api_0_16_get_id_is_unsupported_not_a_fallback() -> None:
    with ScriptedKernel(writable=True, api=(0, 15)) as device:
        with pytest.raises(Unsupported) as err:
            device.get_id()
    assert err.value.reason is Reason.API_TOO_OLD
    assert device.calls == [devsev.SevCmd.GET_ID2]  # GET_ID would be refused alike: not tried
    mapped = map_exception(err.value, "r1")
    assert mapped.code is grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("id_len", [64, 80, 128])
def test_firmware_asking_for_a_longer_chip_id_buffer_gets_it(id_len: int) -> None:
    with ScriptedKernel(writable=True, id_len=id_len) as device:
        chip_id = device.get_id()
    assert chip_id == device.chip_id and len(chip_id) == id_len
    expected_calls = 1 if id_len <= devsev.CHIP_ID_SIZE else 2
    assert device.calls == [devsev.SevCmd.GET_ID2] * expected_calls


def test_absurd_chip_id_length_is_refused() -> None:
    with ScriptedKernel(writable=True, id_len=devsev.MAX_CHIP_ID_SIZE + 1) as device:
        with pytest.raises(FirmwareError) as err:
            device.get_id()
    assert err.value.status is StatusCode.INVALID_LENGTH
    assert device.calls == [devsev.SevCmd.GET_ID2]


def test_kernel_without_get_id2_falls_back_to_get_id_only_on_einval() -> None:
    assert errno.EOPNOTSUPP != devsev.ENOTSUPP  # the driver's "not supported" is ENOTSUPP, not EOPNOTSUPP

    class OldKernel(ScriptedKernel):
        def _ioctl(self, fd: int, request: int, arg: Any, mutate: bool) -> Any:
            if arg.cmd == devsev.SevCmd.GET_ID2:
                self.calls.append(arg.cmd)
                raise OSError(errno.EINVAL, "Invalid argument")  # cmd > SEV_MAX before Linux 5.3
            if arg.cmd == devsev.SevCmd.GET_ID:
                self.calls.append(arg.cmd)
                ctypes.memmove(arg.data, bytes(range(1, 129)), 128)
                return 0
            return super()._ioctl(fd, request, arg, mutate)

    with OldKernel(writable=True) as device:
        assert device.get_id() == bytes(range(1, 65))
    assert device.calls == [devsev.SevCmd.GET_ID2, devsev.SevCmd.GET_ID]
