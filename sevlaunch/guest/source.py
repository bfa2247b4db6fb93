"""What every source of a guest's SNP attestation report offers, and the errors they share.

Implementations: `ConfigfsTsmSource` (configfs-tsm, Linux 6.7+), `DevSevGuest` (`/dev/sev-guest`), and the
emulated guest of `sevlaunch guest attest`. The report is the firmware's 0x4A0 bytes, opaque here:
`sevlaunch.snp` parses and verifies it. The certificate table, when the host provisioned one, is the raw
buffer the kernel returned (`sevlaunch.snp.certtable.CertTable.from_bytes` reads it).
"""

from __future__ import annotations

from typing import Final, NamedTuple, Protocol, runtime_checkable

from sevlaunch.sev.errors import MalformedInput, Reason, SevError, Unsupported

REPORT_DATA_SIZE: Final = 64
REPORT_SIZE: Final = 0x4A0
MAX_VMPL: Final = 3


class GuestReport(NamedTuple):
    report: bytes
    cert_table: bytes | None


@runtime_checkable
class GuestReportSource(Protocol):
    def get_report(self, report_data: bytes, vmpl: int) -> GuestReport:
        """A report binding `report_data` (64 bytes) at privilege level `vmpl` (0-3), with the host's
        certificate table when there is one."""
        ...


class GuestInterfaceUnavailable(Unsupported):
    """This guest has no such interface: no configfs-tsm, a TSM that is not SEV's, no /dev/sev-guest."""

    def __init__(self, detail: str) -> None:
        super().__init__(Reason.KERNEL_UNSUPPORTED, detail)


class HypervisorRefused(SevError):
    """The hypervisor answered the guest request with a GHCB VMM error (busy, or a certificate buffer it
    still finds too small)."""

    def __init__(self, vmm_error: int, detail: str) -> None:
        self.vmm_error = vmm_error
        super().__init__(Reason.HYPERVISOR_REFUSED, detail)


class ConcurrentWriter(SevError):
    """Another process wrote the configfs-tsm entry while this one was requesting its report."""

    def __init__(self, detail: str) -> None:
        super().__init__(Reason.CONCURRENT_WRITER, detail)


def check_request(report_data: bytes, vmpl: int) -> None:
    if len(report_data) != REPORT_DATA_SIZE:
        raise MalformedInput(Reason.BAD_LENGTH, f"REPORT_DATA is 64 bytes, got {len(report_data)}")
    if not 0 <= vmpl <= MAX_VMPL:
        raise MalformedInput(Reason.BAD_FIELD, f"VMPL is 0 to {MAX_VMPL}, got {vmpl}")


def check_report(report: bytes) -> bytes:
    if len(report) != REPORT_SIZE:
        raise MalformedInput(Reason.BAD_LENGTH, f"an SNP report is 0x4a0 bytes, got {len(report):#x}")
    return report
