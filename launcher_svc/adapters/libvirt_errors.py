"""Precise reasons for the libvirt errors a real libvirtd returns on an SEV launch.

libvirt reports most of what goes wrong under QEMU as VIR_ERR_INTERNAL_ERROR, with QEMU's own text
in the message. These are the cases seen on a real libvirtd 9.0 with QEMU (tests/realvirt), each
turned into the reason a caller can act on; anything else keeps `libvirt_error`'s generic mapping.

* `... fw_error=<n> ...`: QEMU's wording when the SEV firmware refuses a command, at start
  (LAUNCH_START, "qemu unexpectedly closed the monitor") or on `sev-inject-launch-secret`
  ("unable to execute QEMU command"): the firmware's status, named as the emulated backend names it
  (`firmware_bad_measurement` for a secret packaged for another launch).
* "cannot limit locked memory": the host will not let QEMU lock guest memory (`<locked/>`: no
  CAP_SYS_RESOURCE or a low RLIMIT_MEMLOCK); SEV guest memory must not be swapped, so it is a host
  misconfiguration, not a transient failure.
* VIR_ERR_CONFIG_UNSUPPORTED "SEV launch security is not supported": this host's QEMU has no SEV.
* VIR_ERR_OPERATION_INVALID for a domain in the wrong state: "domain is not running" (measure, resume
  before start), "domain must be in a paused state" (a secret for a guest that already runs), "domain is
  already running" (a second resume).
* "SEV launch measurement is not available": QEMU is past LAUNCH_MEASURE's state (the guest runs).
* "could not load PC BIOS": QEMU cannot map the firmware image as `-bios` (libvirt's
  `<loader type='rom'>`), e.g. Debian's OVMF_CODE_4M.fd, whose size is not a multiple of 64 KiB.
  Preflight gives such an image pflash or refuses it (`launcher_svc.core.loader`); this names what
  still reaches QEMU, say an image replaced between preflight and start.
"""

from __future__ import annotations

import re

import libvirt

from launcher_svc.core.reasons import FIRMWARE_PREFIX, LaunchReason
from sevlaunch.errors import FailedPrecondition, ResourceExhausted, ServiceError
from sevlaunch.firmware.status import StatusCode

_FW_ERROR = re.compile(r"\bfw_error=(\d+)\b")
_WRONG_STATE = (
    ("domain is not running", LaunchReason.DOMAIN_NOT_RUNNING),
    ("domain must be in a paused state", LaunchReason.DOMAIN_NOT_PAUSED),
    ("domain is already running", LaunchReason.DOMAIN_ALREADY_RUNNING),
)


def classify(code: int, message: str, detail: str) -> ServiceError | None:
    """The precise error for a libvirt error code and message, or None when nothing more is known."""
    if code == libvirt.VIR_ERR_INTERNAL_ERROR:
        match = _FW_ERROR.search(message)
        if match is not None:
            value = int(match.group(1))
            try:
                name = StatusCode(value).name
            except ValueError:
                name = f"0x{value:02x}"
            meta = {"firmware_status": name}
            if value == StatusCode.RESOURCE_LIMIT:
                return ResourceExhausted(LaunchReason.FIRMWARE_RESOURCE_LIMIT, detail, metadata=meta)
            return FailedPrecondition(f"{FIRMWARE_PREFIX}{name.lower()}", detail, metadata=meta)
        if "cannot limit locked memory" in message:
            return FailedPrecondition(LaunchReason.LOCKED_MEMORY_REFUSED, detail)
        if "could not load PC BIOS" in message:
            return FailedPrecondition(LaunchReason.FIRMWARE_NOT_LOADABLE, detail)
        if "SEV launch measurement is not available" in message:
            return FailedPrecondition(LaunchReason.MEASUREMENT_UNAVAILABLE, detail)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        for text, reason in _WRONG_STATE:
            if text in message:
                return FailedPrecondition(reason, detail)
    if code == libvirt.VIR_ERR_CONFIG_UNSUPPORTED and "SEV launch security is not supported" in message:
        return FailedPrecondition(LaunchReason.SEV_UNSUPPORTED, detail)
    return None
