"""Status codes, FirmwareError and the PLATFORM_STATUS encoding."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from sevlaunch.firmware import FirmwareError, PlatformState, PlatformStatus, StatusCode
from sevlaunch.sev.errors import MalformedInput, Reason, SevError

PSP_SEV_H = Path("/usr/include/linux/psp-sev.h")

# The kernel's spellings of the same codes (include/uapi/linux/psp-sev.h, sev_ret_code), typos included.
KERNEL_NAMES = {
    "SEV_RET_SUCCESS": StatusCode.SUCCESS,
    "SEV_RET_INVALID_PLATFORM_STATE": StatusCode.INVALID_PLATFORM_STATE,
    "SEV_RET_INVALID_GUEST_STATE": StatusCode.INVALID_GUEST_STATE,
    "SEV_RET_INAVLID_CONFIG": StatusCode.INVALID_CONFIG,
    "SEV_RET_INVALID_LEN": StatusCode.INVALID_LENGTH,
    "SEV_RET_ALREADY_OWNED": StatusCode.ALREADY_OWNED,
    "SEV_RET_INVALID_CERTIFICATE": StatusCode.INVALID_CERTIFICATE,
    "SEV_RET_POLICY_FAILURE": StatusCode.POLICY_FAILURE,
    "SEV_RET_INACTIVE": StatusCode.INACTIVE,
    "SEV_RET_INVALID_ADDRESS": StatusCode.INVALID_ADDRESS,
    "SEV_RET_BAD_SIGNATURE": StatusCode.BAD_SIGNATURE,
    "SEV_RET_BAD_MEASUREMENT": StatusCode.BAD_MEASUREMENT,
    "SEV_RET_ASID_OWNED": StatusCode.ASID_OWNED,
    "SEV_RET_INVALID_ASID": StatusCode.INVALID_ASID,
    "SEV_RET_WBINVD_REQUIRED": StatusCode.WBINVD_REQUIRED,
    "SEV_RET_DFFLUSH_REQUIRED": StatusCode.DF_FLUSH_REQUIRED,
    "SEV_RET_INVALID_GUEST": StatusCode.INVALID_GUEST,
    "SEV_RET_INVALID_COMMAND": StatusCode.INVALID_COMMAND,
    "SEV_RET_ACTIVE": StatusCode.ACTIVE,
    "SEV_RET_HWSEV_RET_PLATFORM": StatusCode.HWERROR_PLATFORM,
    "SEV_RET_HWSEV_RET_UNSAFE": StatusCode.HWERROR_UNSAFE,
    "SEV_RET_UNSUPPORTED": StatusCode.UNSUPPORTED,
    "SEV_RET_INVALID_PARAM": StatusCode.INVALID_PARAM,
    "SEV_RET_RESOURCE_LIMIT": StatusCode.RESOURCE_LIMIT,
    "SEV_RET_SECURE_DATA_INVALID": StatusCode.SECURE_DATA_INVALID,
}


def test_status_codes_have_the_spec_values() -> None:
    # PROTOCOL.md section 9 lists the codes 0x00..0x18 in order; SEV-SNP (56860) continues at 0x19,
    # leaving 0x1E unassigned.
    assert [int(c) for c in StatusCode] == [*range(0x1E), *range(0x1F, 0x28)]
    assert int(StatusCode.RESOURCE_LIMIT) == 0x17 and int(StatusCode.BAD_MEASUREMENT) == 0x0B


@pytest.mark.skipif(not PSP_SEV_H.exists(), reason="kernel UAPI headers (linux-libc-dev) not installed")
def test_status_codes_match_the_kernel_enum() -> None:
    text = PSP_SEV_H.read_text()
    body = text[text.index("SEV_RET_SUCCESS") : text.index("SEV_RET_MAX")]
    names = re.findall(r"(SEV_RET_\w+)", body)
    # The enum counts up from SEV_RET_SUCCESS = 0.
    assert {name: i for i, name in enumerate(names)} == {k: int(v) for k, v in KERNEL_NAMES.items()}


def test_firmware_error_carries_status_and_command() -> None:
    err = FirmwareError(StatusCode.INVALID_GUEST_STATE, "LAUNCH_SECRET", "guest is RUNNING")
    assert isinstance(err, SevError)
    assert err.status is StatusCode.INVALID_GUEST_STATE
    assert err.command == "LAUNCH_SECRET"
    assert "LAUNCH_SECRET failed with INVALID_GUEST_STATE" in str(err)
    assert FirmwareError(StatusCode.BAD_MEASUREMENT, "LAUNCH_START").reason is Reason.MEASUREMENT_MISMATCH


def test_unknown_status_is_kept_raw() -> None:
    err = FirmwareError(0x99, "PDH_GEN")
    assert err.status == 0x99 and not isinstance(err.status, StatusCode)
    assert "0x99" in str(err)
    # A known value given as int becomes the enum.
    assert FirmwareError(0x17, "LAUNCH_START").status is StatusCode.RESOURCE_LIMIT


def test_firmware_error_pickles() -> None:
    err = FirmwareError(StatusCode.POLICY_FAILURE, "LAUNCH_START", "policy_mac mismatch")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.status, copy.command, str(copy)) == (err.status, err.command, str(err))


def test_platform_status_layout() -> None:
    status = PlatformStatus(
        api_major=0,
        api_minor=24,
        state=PlatformState.WORKING,
        owned_externally=True,
        es_enabled=True,
        build=15,
        guest_count=3,
    )
    raw = status.to_bytes()
    # api_major, api_minor, state, flags u32 (bit0 owner, bit8 ES), build, guest_count u32
    assert raw == bytes([0, 24, 2]) + (0x101).to_bytes(4, "little") + bytes([15]) + (3).to_bytes(4, "little")
    assert PlatformStatus.from_bytes(raw) == status
    assert status.api_version == (0, 24)


def test_platform_status_rejects_bad_input() -> None:
    with pytest.raises(MalformedInput) as exc:
        PlatformStatus.from_bytes(bytes(11))
    assert exc.value.reason is Reason.BAD_LENGTH
    with pytest.raises(MalformedInput) as exc:
        PlatformStatus.from_bytes(bytes([0, 24, 7]) + bytes(9))
    assert exc.value.reason is Reason.BAD_FIELD
    with pytest.raises(ValueError):
        PlatformStatus(
            api_major=256,
            api_minor=0,
            state=PlatformState.INIT,
            owned_externally=False,
            es_enabled=False,
            build=0,
            guest_count=0,
        )
