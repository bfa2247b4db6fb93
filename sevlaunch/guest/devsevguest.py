"""Attestation reports through `/dev/sev-guest` (SNP_GET_REPORT, SNP_GET_EXT_REPORT).

The structures mirror include/uapi/linux/sev-guest.h (natural alignment, no packing);
tests/unit/test_snp_kernel_layouts.py compiles that header and checks sizes, offsets and the ioctl
numbers against these. The driver returns the firmware's MSG_REPORT_RSP in `snp_report_resp.data`
(SNP ABI 56860, MSG_REPORT_RSP): status u32 @0x0, report_size u32 @0x4, 24 reserved bytes, the report @0x20.

For an extended report the guest passes a page-aligned buffer for the host's certificate table; when it
is too small the hypervisor answers VMM error INVALID_LEN and the kernel writes the length it needs back
into `certs_len`, so the request is repeated once with a buffer that large.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Final

from sevlaunch.firmware.devfile import DeviceFile
from sevlaunch.firmware.status import FirmwareError
from sevlaunch.guest.source import (
    REPORT_DATA_SIZE,
    GuestInterfaceUnavailable,
    GuestReport,
    HypervisorRefused,
    check_report,
    check_request,
)
from sevlaunch.linux_ioctl import IoctlFn, iowr, system_ioctl
from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.snp.certtable import PAGE_SIZE

REPORT_RESP_DATA_SIZE: Final = 4000
MSG_VERSION: Final = 1  # the only guest message version of SNP ABI 1.x; the driver refuses 0
# The driver's cap on the certificate buffer (SEV_FW_BLOB_MAX_SIZE in drivers/virt/coco/sev-guest).
MAX_CERTS_LEN: Final = 0x4000
DEFAULT_CERTS_LEN: Final = 2 * PAGE_SIZE  # the VCEK, ASK and ARK of a typical host fit in two pages

# GHCB VMM errors in exitinfo2[63:32] (sev-guest.h SNP_GUEST_VMM_ERR_*).
VMM_ERR_INVALID_LEN: Final = 1
VMM_ERR_BUSY: Final = 2

_MSG_REPORT_RSP: Final = struct.Struct("<II24x")
# MSG_REPORT_RSP status values (56860): other values are passed on as they are.
MSG_REPORT_RSP_SUCCESS: Final = 0x00
MSG_REPORT_RSP_INVALID_PARAMETERS: Final = 0x16
MSG_REPORT_RSP_INVALID_KEY_SELECTION: Final = 0x27


class snp_report_req(ctypes.Structure):
    _fields_ = (
        ("user_data", ctypes.c_uint8 * REPORT_DATA_SIZE),
        ("vmpl", ctypes.c_uint32),
        ("rsvd", ctypes.c_uint8 * 28),
    )


class snp_report_resp(ctypes.Structure):
    _fields_ = (("data", ctypes.c_uint8 * REPORT_RESP_DATA_SIZE),)


class _snp_guest_errors(ctypes.Structure):
    _fields_ = (("fw_error", ctypes.c_uint32), ("vmm_error", ctypes.c_uint32))


class _snp_guest_exitinfo(ctypes.Union):
    _anonymous_ = ("errors",)
    _fields_ = (("exitinfo2", ctypes.c_uint64), ("errors", _snp_guest_errors))


class snp_guest_request_ioctl(ctypes.Structure):
    _anonymous_ = ("exitinfo",)
    _fields_ = (
        ("msg_version", ctypes.c_uint8),
        ("req_data", ctypes.c_uint64),
        ("resp_data", ctypes.c_uint64),
        ("exitinfo", _snp_guest_exitinfo),
    )


class snp_ext_report_req(ctypes.Structure):
    _fields_ = (
        ("data", snp_report_req),
        ("certs_address", ctypes.c_uint64),
        ("certs_len", ctypes.c_uint32),
    )


SNP_GET_REPORT: Final = iowr("S", 0x0, ctypes.sizeof(snp_guest_request_ioctl))
SNP_GET_EXT_REPORT: Final = iowr("S", 0x2, ctypes.sizeof(snp_guest_request_ioctl))


def decode_report_response(data: bytes) -> bytes:
    """The report inside a MSG_REPORT_RSP; a status other than success is a `FirmwareError`."""
    if len(data) < _MSG_REPORT_RSP.size:
        raise MalformedInput(Reason.TRUNCATED, "MSG_REPORT_RSP shorter than its header")
    status, size = _MSG_REPORT_RSP.unpack_from(data)
    if status != MSG_REPORT_RSP_SUCCESS:
        # 0x16 and 0x27 share their values with StatusCode's INVALID_PARAM and INVALID_KEY.
        raise FirmwareError(status, "MSG_REPORT_REQ")
    if size > len(data) - _MSG_REPORT_RSP.size:
        raise MalformedInput(Reason.TRUNCATED, f"MSG_REPORT_RSP report_size {size:#x} exceeds the response")
    return check_report(bytes(data[_MSG_REPORT_RSP.size : _MSG_REPORT_RSP.size + size]))


def encode_report_response(report: bytes, status: int = MSG_REPORT_RSP_SUCCESS) -> bytes:
    """A MSG_REPORT_RSP as the firmware lays it out, padded to `snp_report_resp` (for emulated guests)."""
    body = _MSG_REPORT_RSP.pack(status, len(report) if status == MSG_REPORT_RSP_SUCCESS else 0)
    body += report if status == MSG_REPORT_RSP_SUCCESS else b""
    if len(body) > REPORT_RESP_DATA_SIZE:
        raise MalformedInput(Reason.BAD_LENGTH, "report larger than snp_report_resp")
    return body + bytes(REPORT_RESP_DATA_SIZE - len(body))


class DevSevGuest(DeviceFile):
    """A `GuestReportSource` over `/dev/sev-guest`. `ioctl` defaults to the system call (tests pass a
    fake kernel); `certs_len` is the first certificate buffer offered, `max_certs_len` the most this
    source will allocate when the host asks for more."""

    def __init__(
        self,
        path: str = "/dev/sev-guest",
        *,
        ioctl: IoctlFn = system_ioctl,
        certs_len: int = DEFAULT_CERTS_LEN,
        max_certs_len: int = MAX_CERTS_LEN,
    ) -> None:
        if certs_len <= 0 or certs_len % PAGE_SIZE or max_certs_len < certs_len:
            raise ValueError("certs_len must be whole pages and at most max_certs_len")
        self.path = path
        self._ioctl = ioctl
        self.certs_len = certs_len
        self.max_certs_len = max_certs_len
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            detail = f"no {path}: not an SEV-SNP guest, or sev-guest not loaded"
            raise GuestInterfaceUnavailable(detail) from exc

    def _request(self, request: int, name: str, req: ctypes.Structure, resp: snp_report_resp) -> None:
        fd = self._open_fd()
        arg = snp_guest_request_ioctl(
            msg_version=MSG_VERSION, req_data=ctypes.addressof(req), resp_data=ctypes.addressof(resp)
        )
        try:
            self._ioctl(fd, request, arg, True)
        except OSError as exc:
            if arg.vmm_error:
                raise HypervisorRefused(arg.vmm_error, f"{name}: VMM error {arg.vmm_error}") from exc
            if arg.fw_error:
                raise FirmwareError(arg.fw_error, name) from exc
            if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENODEV):
                raise GuestInterfaceUnavailable(f"{self.path} does not answer {name}") from exc
            raise

    @staticmethod
    def _report_req(report_data: bytes, vmpl: int) -> snp_report_req:
        check_request(report_data, vmpl)
        req = snp_report_req(vmpl=vmpl)
        ctypes.memmove(req.user_data, report_data, REPORT_DATA_SIZE)
        return req

    def report(self, report_data: bytes, vmpl: int) -> bytes:
        """SNP_GET_REPORT: the report alone."""
        req = self._report_req(report_data, vmpl)
        resp = snp_report_resp()
        self._request(SNP_GET_REPORT, "SNP_GET_REPORT", req, resp)
        return decode_report_response(bytes(resp.data))

    def extended_report(self, report_data: bytes, vmpl: int) -> GuestReport:
        """SNP_GET_EXT_REPORT: the report and the host's certificate table (None when the host has none)."""
        ext = snp_ext_report_req(data=self._report_req(report_data, vmpl))
        offered = self.certs_len
        for _ in range(2):
            certs = ctypes.create_string_buffer(offered)
            ext.certs_address = ctypes.addressof(certs)
            ext.certs_len = offered
            resp = snp_report_resp()
            try:
                self._request(SNP_GET_EXT_REPORT, "SNP_GET_EXT_REPORT", ext, resp)
            except HypervisorRefused as exc:
                needed = int(ext.certs_len)
                if exc.vmm_error != VMM_ERR_INVALID_LEN:
                    raise
                if needed <= offered or needed > self.max_certs_len or needed % PAGE_SIZE:
                    raise HypervisorRefused(
                        exc.vmm_error, f"host asks for a {needed}-byte certificate buffer after {offered}"
                    ) from exc
                offered = needed
                continue
            report = decode_report_response(bytes(resp.data))
            table = certs.raw
            return GuestReport(report, table if any(table) else None)
        raise HypervisorRefused(VMM_ERR_INVALID_LEN, "host refused the certificate buffer it asked for")

    def get_report(self, report_data: bytes, vmpl: int) -> GuestReport:
        return self.extended_report(report_data, vmpl)
