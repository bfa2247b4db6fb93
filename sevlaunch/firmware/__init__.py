"""The SEV firmware interface and its backends.

* `Firmware` / `LaunchFirmware`: the platform and launch commands (AMD publication 55766, chapters 5
  and 6), with `StatusCode` and `FirmwareError` for the firmware's status codes.
* `EmulatedFirmware`: a software PSP kept in a state directory, with its own emulated AMD root.
* `DevSev`: the real `/dev/sev` ioctl backend (platform commands only).
* `KDSServer` (in `sevlaunch.firmware.kds`): an emulated AMD KDS for emulated chips.
"""

from sevlaunch.firmware.devsev import DevSev
from sevlaunch.firmware.emulator import ChipConfig, EmulatedFirmware, EmulatedRoot, GuestState
from sevlaunch.firmware.interface import Firmware, LaunchFirmware, PlatformState, PlatformStatus
from sevlaunch.firmware.status import FirmwareError, StatusCode

__all__ = [
    "ChipConfig",
    "DevSev",
    "EmulatedFirmware",
    "EmulatedRoot",
    "Firmware",
    "FirmwareError",
    "GuestState",
    "LaunchFirmware",
    "PlatformState",
    "PlatformStatus",
    "StatusCode",
]
