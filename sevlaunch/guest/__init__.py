"""The guest side of SEV-SNP attestation: asking the firmware for a report from inside the guest.

* `GuestReportSource`: `get_report(report_data, vmpl) -> GuestReport(report, cert_table)`.
* `ConfigfsTsmSource`: configfs-tsm (`/sys/kernel/config/tsm/report/`, Linux 6.7+).
* `DevSevGuest`: `/dev/sev-guest` SNP_GET_REPORT / SNP_GET_EXT_REPORT.
The certificate table format itself is `sevlaunch.snp.certtable` (pure, shared with the host side).
"""

from sevlaunch.guest.configfs_tsm import ConfigfsTsmSource, TsmTree
from sevlaunch.guest.devsevguest import DevSevGuest
from sevlaunch.guest.source import (
    ConcurrentWriter,
    GuestInterfaceUnavailable,
    GuestReport,
    GuestReportSource,
    HypervisorRefused,
)

__all__ = [
    "ConcurrentWriter",
    "ConfigfsTsmSource",
    "DevSevGuest",
    "GuestInterfaceUnavailable",
    "GuestReport",
    "GuestReportSource",
    "HypervisorRefused",
    "TsmTree",
]
