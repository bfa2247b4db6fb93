"""DevSev: the ctypes structures against the kernel ABI, and the ioctl path.

Expected sizes and offsets are written from include/uapi/linux/psp-sev.h (every struct is
`__attribute__((packed))`), not computed from the ctypes definitions under test.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from sevlaunch.firmware import DevSev, Firmware, PlatformStatus, devsev

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
        assert len(chip_id) == 64 and any(chip_id)
        pdh, chain = device.pdh_cert_export()
        assert len(pdh) == devsev.SEV_CERT_SIZE and len(chain) == 3 * devsev.SEV_CERT_SIZE
