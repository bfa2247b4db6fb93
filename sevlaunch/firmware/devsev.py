"""The real backend: platform commands through the Linux `/dev/sev` ioctl.

The structures mirror include/uapi/linux/psp-sev.h byte for byte (all `__attribute__((packed))`, so
`_pack_ = 1` here); tests/unit/test_devsev.py checks every size and offset against that header.
Launch commands are not reachable here: on a real host QEMU issues them through KVM
(`KVM_MEMORY_ENCRYPT_OP`), so `DevSev` only implements the `Firmware` protocol.

What the kernel driver (drivers/crypto/ccp/sev-dev.c, `sev_ioctl`) adds to the firmware's own statuses:
* EPERM on a descriptor opened without write access, for FACTORY_RESET, PEK_GEN, PDH_GEN, PEK_CSR and
  PEK_CERT_IMPORT always, and for PDH_CERT_EXPORT whenever the platform is not yet in INIT (the driver
  would have to INIT it first, which kernels that leave the PSP uninitialised at boot do on demand):
  `DeviceNotWritable`, never a bare OSError.
* ENOTSUPP (524, a kernel-internal errno that reaches user space as is) for GET_ID and GET_ID2 on
  firmware older than API 0.16: `Unsupported(API_TOO_OLD)`. EINVAL for a command number the kernel does
  not know (GET_ID2 before Linux 5.3), where GET_ID is the fallback.
* Variable-length outputs (GET_ID2's chip id) come back as INVALID_LENGTH with the length the firmware
  wants written into the request; the call is repeated once with a buffer that large.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import Any, Final

from sevlaunch.errors import FailedPrecondition
from sevlaunch.firmware.devfile import DeviceFile
from sevlaunch.firmware.interface import PLATFORM_STATUS_SIZE, PlatformStatus
from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.sev.errors import Reason, Unsupported
from sevlaunch.sev.types import ChipId

SEV_CERT_SIZE: Final = 0x824  # one SEV certificate (55766 appendix C)
CHIP_ID_SIZE: Final = 64
#: The most GET_ID2 may ask for: the ID is 64 bytes per socket today; anything near a page is nonsense.
MAX_CHIP_ID_SIZE: Final = 4096
#: Linux's ENOTSUPP (include/linux/errno.h): not in Python's errno module, user space sees the number.
ENOTSUPP: Final = 524


class DeviceNotWritable(FailedPrecondition):
    """The kernel refused a command because the `/dev/sev` descriptor is not open for writing."""

    def __init__(self, command: str, path: str) -> None:
        super().__init__(
            "sev_device_read_only",
            f"{command} needs {path} opened for writing and the kernel refused it (EPERM): give the "
            "service write access to the device",
            metadata={"command": command},
        )


class SevCmd:
    """`enum` of platform command ids in psp-sev.h (not the firmware's own command ids)."""

    FACTORY_RESET: Final = 0
    PLATFORM_STATUS: Final = 1
    PEK_GEN: Final = 2
    PEK_CSR: Final = 3
    PDH_GEN: Final = 4
    PDH_CERT_EXPORT: Final = 5
    PEK_CERT_IMPORT: Final = 6
    GET_ID: Final = 7
    GET_ID2: Final = 8


class sev_issue_cmd(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("cmd", ctypes.c_uint32), ("data", ctypes.c_uint64), ("error", ctypes.c_uint32))


class sev_user_data_status(ctypes.Structure):
    _pack_ = 1
    _fields_ = (
        ("api_major", ctypes.c_uint8),
        ("api_minor", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
        ("build", ctypes.c_uint8),
        ("guest_count", ctypes.c_uint32),
    )


class sev_user_data_pek_csr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("address", ctypes.c_uint64), ("length", ctypes.c_uint32))


class sev_user_data_pek_cert_import(ctypes.Structure):
    _pack_ = 1
    _fields_ = (
        ("pek_cert_address", ctypes.c_uint64),
        ("pek_cert_len", ctypes.c_uint32),
        ("oca_cert_address", ctypes.c_uint64),
        ("oca_cert_len", ctypes.c_uint32),
    )


class sev_user_data_pdh_cert_export(ctypes.Structure):
    _pack_ = 1
    _fields_ = (
        ("pdh_cert_address", ctypes.c_uint64),
        ("pdh_cert_len", ctypes.c_uint32),
        ("cert_chain_address", ctypes.c_uint64),
        ("cert_chain_len", ctypes.c_uint32),
    )


class sev_user_data_get_id(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("socket1", ctypes.c_uint8 * 64), ("socket2", ctypes.c_uint8 * 64))


class sev_user_data_get_id2(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("address", ctypes.c_uint64), ("length", ctypes.c_uint32))


def _ioc(direction: int, ioc_type: int, number: int, size: int) -> int:
    # asm-generic/ioctl.h: dir(2 bits) << 30 | size(14) << 16 | type(8) << 8 | nr(8)
    return (direction << 30) | (size << 16) | (ioc_type << 8) | number


_IOC_READ_WRITE: Final = 3
SEV_ISSUE_CMD: Final = _ioc(_IOC_READ_WRITE, ord("S"), 0x0, ctypes.sizeof(sev_issue_cmd))
assert SEV_ISSUE_CMD == 0xC0105300

_COMMAND_NAMES: Final = {
    SevCmd.FACTORY_RESET: "FACTORY_RESET",
    SevCmd.PLATFORM_STATUS: "PLATFORM_STATUS",
    SevCmd.PEK_GEN: "PEK_GEN",
    SevCmd.PEK_CSR: "PEK_CSR",
    SevCmd.PDH_GEN: "PDH_GEN",
    SevCmd.PDH_CERT_EXPORT: "PDH_CERT_EXPORT",
    SevCmd.PEK_CERT_IMPORT: "PEK_CERT_IMPORT",
    SevCmd.GET_ID: "GET_ID",
    SevCmd.GET_ID2: "GET_ID2",
}


class DevSev(DeviceFile):
    """The platform commands of a real AMD SEV host through `/dev/sev`.

    The node is opened read-write when possible, read-only as a fallback (`writable` says which): with
    a read-only descriptor PLATFORM_STATUS and GET_ID work, PDH_CERT_EXPORT only once the platform is in
    INIT, and every other command raises `DeviceNotWritable` (module docstring).
    """

    def __init__(self, path: str = "/dev/sev") -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            self.writable = True
        except PermissionError:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.writable = False

    def _issue(self, cmd: int, data: ctypes.Structure | None) -> None:
        """SEV_ISSUE_CMD; a firmware status other than SUCCESS raises FirmwareError."""
        fd = self._open_fd()
        arg = sev_issue_cmd(cmd=cmd, data=ctypes.addressof(data) if data is not None else 0, error=0)
        name = _COMMAND_NAMES.get(cmd, str(cmd))
        try:
            self._ioctl(fd, SEV_ISSUE_CMD, arg, True)
        except OSError as exc:
            # The kernel copies the firmware status back even when the ioctl fails (-EIO).
            if arg.error:
                raise FirmwareError(arg.error, name) from exc
            if exc.errno == errno.EPERM:
                raise DeviceNotWritable(name, self.path) from None
            if exc.errno == ENOTSUPP:
                raise Unsupported(
                    Reason.API_TOO_OLD, f"{name}: the kernel refused it for firmware before SEV API 0.16"
                ) from None
            raise
        if arg.error:
            raise FirmwareError(arg.error, name)

    def _ioctl(self, fd: int, request: int, arg: Any, mutate: bool) -> Any:
        """The system call; a seam where the unit tests put a scripted kernel."""
        return fcntl.ioctl(fd, request, arg, mutate)

    # -- Firmware protocol -------------------------------------------------------------------------

    def platform_status(self) -> PlatformStatus:
        status = sev_user_data_status()
        self._issue(SevCmd.PLATFORM_STATUS, status)
        return PlatformStatus.from_bytes(ctypes.string_at(ctypes.addressof(status), PLATFORM_STATUS_SIZE))

    def pek_gen(self) -> None:
        self._issue(SevCmd.PEK_GEN, None)

    def pdh_gen(self) -> None:
        self._issue(SevCmd.PDH_GEN, None)

    def factory_reset(self) -> None:
        self._issue(SevCmd.FACTORY_RESET, None)

    def pek_csr(self) -> bytes:
        buf = ctypes.create_string_buffer(SEV_CERT_SIZE)
        csr = sev_user_data_pek_csr(address=ctypes.addressof(buf), length=SEV_CERT_SIZE)
        self._issue(SevCmd.PEK_CSR, csr)
        return buf.raw[: csr.length]

    def pek_cert_import(self, pek: bytes, oca: bytes) -> None:
        pek_buf = ctypes.create_string_buffer(pek, len(pek))
        oca_buf = ctypes.create_string_buffer(oca, len(oca))
        data = sev_user_data_pek_cert_import(
            pek_cert_address=ctypes.addressof(pek_buf),
            pek_cert_len=len(pek),
            oca_cert_address=ctypes.addressof(oca_buf),
            oca_cert_len=len(oca),
        )
        self._issue(SevCmd.PEK_CERT_IMPORT, data)

    def pdh_cert_export(self) -> tuple[bytes, bytes]:
        pdh = ctypes.create_string_buffer(SEV_CERT_SIZE)
        chain = ctypes.create_string_buffer(3 * SEV_CERT_SIZE)  # PEK‖OCA‖CEK (55766 PDH_CERT_EXPORT)
        data = sev_user_data_pdh_cert_export(
            pdh_cert_address=ctypes.addressof(pdh),
            pdh_cert_len=SEV_CERT_SIZE,
            cert_chain_address=ctypes.addressof(chain),
            cert_chain_len=3 * SEV_CERT_SIZE,
        )
        self._issue(SevCmd.PDH_CERT_EXPORT, data)
        return pdh.raw[: data.pdh_cert_len], chain.raw[: data.cert_chain_len]

    def get_id(self) -> ChipId:
        """GET_ID2 (Linux 5.3+), falling back to the deprecated fixed-size GET_ID on older kernels.

        The ID's length is the firmware's to say: 64 bytes today, but a firmware wanting more answers
        INVALID_LENGTH with the length it needs, and the call is repeated once with that buffer."""
        buf = ctypes.create_string_buffer(CHIP_ID_SIZE)
        id2 = sev_user_data_get_id2(address=ctypes.addressof(buf), length=CHIP_ID_SIZE)
        try:
            self._issue(SevCmd.GET_ID2, id2)
        except FirmwareError as exc:
            if exc.status != StatusCode.INVALID_LENGTH:
                raise
            wanted = int(id2.length)
            if not len(buf) < wanted <= MAX_CHIP_ID_SIZE:
                raise FirmwareError(
                    StatusCode.INVALID_LENGTH, "GET_ID2", f"the firmware asked for a {wanted}-byte buffer"
                ) from None
            buf = ctypes.create_string_buffer(wanted)
            id2 = sev_user_data_get_id2(address=ctypes.addressof(buf), length=wanted)
            self._issue(SevCmd.GET_ID2, id2)
        except OSError as exc:
            # EINVAL: a kernel without GET_ID2; ENOTTY: not a SEV device at all (GET_ID fails too).
            if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                raise
            legacy = sev_user_data_get_id()
            self._issue(SevCmd.GET_ID, legacy)
            return ChipId(bytes(legacy.socket1))
        return ChipId(buf.raw[: min(int(id2.length), len(buf))])

    # -- launch commands: not on /dev/sev -----------------------------------------------------------

    def _via_kvm(self, command: str) -> NotImplementedError:
        return NotImplementedError(
            f"{command} is not a /dev/sev command: on a real host QEMU issues it through KVM "
            "(KVM_MEMORY_ENCRYPT_OP); use the libvirt hypervisor backend"
        )

    def launch_start(self, godh: bytes, session: bytes, policy: int) -> int:
        raise self._via_kvm("LAUNCH_START")

    def launch_update_data(self, handle: int, gpa: int, data: bytes) -> None:
        raise self._via_kvm("LAUNCH_UPDATE_DATA")

    def launch_update_vmsa(self, handle: int, data: bytes) -> None:
        raise self._via_kvm("LAUNCH_UPDATE_VMSA")

    def launch_measure(self, handle: int) -> bytes:
        raise self._via_kvm("LAUNCH_MEASURE")

    def launch_secret(self, handle: int, header: bytes, payload: bytes, gpa: int) -> None:
        raise self._via_kvm("LAUNCH_SECRET")

    def launch_finish(self, handle: int) -> None:
        raise self._via_kvm("LAUNCH_FINISH")

    def attestation(self, handle: int, mnonce: bytes) -> bytes:
        raise self._via_kvm("ATTESTATION")

    def decommission(self, handle: int) -> None:
        raise self._via_kvm("DECOMMISSION")
