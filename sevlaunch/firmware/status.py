"""Firmware status codes and the one error that carries them.

The values are the SEV API's status codes (publication 55766, section 4.4 "Status Codes"), which Linux
passes through unchanged in `struct sev_issue_cmd.error` (include/uapi/linux/psp-sev.h, `sev_ret_code`).
"""

from __future__ import annotations

from enum import IntEnum

from sevlaunch.sev.errors import Reason, SevError


class StatusCode(IntEnum):
    """SEV firmware status codes (55766 section 4.4; PROTOCOL.md section 9), then SEV-SNP's (56860)."""

    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LENGTH = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DF_FLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWERROR_PLATFORM = 0x13
    HWERROR_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18
    # SEV-SNP firmware (ABI publication 56860, "Status Codes"); 0x1E is not assigned.
    INVALID_PAGE_SIZE = 0x19
    INVALID_PAGE_STATE = 0x1A
    INVALID_MDATA_ENTRY = 0x1B
    INVALID_PAGE_OWNER = 0x1C
    AEAD_OFLOW = 0x1D
    RING_BUFFER_EXIT = 0x1F
    RMP_INIT_REQUIRED = 0x20
    BAD_SVN = 0x21
    BAD_VERSION = 0x22
    SHUTDOWN_REQUIRED = 0x23
    UPDATE_FAILED = 0x24
    RESTORE_REQUIRED = 0x25
    RMP_INITIALIZATION_FAILED = 0x26
    INVALID_KEY = 0x27


def to_status(value: int) -> StatusCode | int:
    """The `StatusCode` for a known value; an unknown one is kept as the raw int (STYLE.md rule 5)."""
    try:
        return StatusCode(value)
    except ValueError:
        return int(value)


# The protocol-level Reason closest to a status, for callers that only look at `SevError.reason`.
# Every other status is FIRMWARE_STATUS; `.status` is always the precise answer.
_REASONS: dict[int, Reason] = {
    StatusCode.BAD_SIGNATURE: Reason.BAD_SIGNATURE,
    StatusCode.BAD_MEASUREMENT: Reason.MEASUREMENT_MISMATCH,
    StatusCode.POLICY_FAILURE: Reason.POLICY_NOT_ALLOWED,
    StatusCode.INVALID_LENGTH: Reason.BAD_LENGTH,
}
_DEFAULT_REASON = Reason.FIRMWARE_STATUS


class FirmwareError(SevError):
    """A firmware command that ended with a status other than SUCCESS.

    `status` is a `StatusCode`, or the raw int when the firmware returned a code this table does not
    know. `command` names the SEV command (e.g. "LAUNCH_START"). The message never holds key material.
    """

    def __init__(self, status: StatusCode | int, command: str, detail: str = "") -> None:
        self.status: StatusCode | int = to_status(int(status))
        self.command = command
        name = self.status.name if isinstance(self.status, StatusCode) else f"0x{self.status:02x}"
        text = f"{command} failed with {name}" + (f": {detail}" if detail else "")
        super().__init__(_REASONS.get(int(self.status), _DEFAULT_REASON), text)

    def __reduce__(self) -> tuple[object, ...]:
        # Keeps the error picklable (multiprocessing, tests) despite the custom constructor.
        return (_rebuild, (int(self.status), self.command, self._detail_only))

    @property
    def _detail_only(self) -> str:
        name = self.status.name if isinstance(self.status, StatusCode) else f"0x{self.status:02x}"
        prefix = f"{self.command} failed with {name}: "
        return self.detail[len(prefix) :] if self.detail.startswith(prefix) else ""


def _rebuild(status: int, command: str, detail: str) -> FirmwareError:
    return FirmwareError(status, command, detail)
