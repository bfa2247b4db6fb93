"""The guest's report sources: configfs-tsm over fake configfs trees, /dev/sev-guest over a fake driver.

The fake configfs tree is a real directory in tmp_path, written and read by the production `TsmTree`;
the subclass only adds what the kernel does on top of the files (attributes appearing on mkdir, the
generation counter, a report produced from what was actually written to `inblob`). The fake sev-guest
driver reads the request and writes the response through the addresses in the ioctl argument.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.guest import (
    ConcurrentWriter,
    ConfigfsTsmSource,
    DevSevGuest,
    GuestInterfaceUnavailable,
    GuestReport,
    GuestReportSource,
    HypervisorRefused,
    TsmTree,
)
from sevlaunch.guest import devsevguest as dsg
from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.snp.certtable import ARK_GUID, ASK_GUID, PAGE_SIZE, VCEK_GUID, CertTable

REPORT_DATA = bytes(range(64))
CERTS = CertTable.of([(VCEK_GUID, b"v" * 1300), (ASK_GUID, b"s" * 1600), (ARK_GUID, b"r" * 1600)])


def fake_report(report_data: bytes, vmpl: int) -> bytes:
    """A stand-in report (not a real one: these tests never parse it) that shows what the kernel got:
    VMPL at 0x30 and REPORT_DATA at 0x50, where SNP reports keep them."""
    report = bytearray(0x4A0)
    report[0x30] = vmpl
    report[0x50:0x90] = report_data
    return bytes(report)


# -- configfs-tsm -----------------------------------------------------------------------------------


class FakeConfigfs(TsmTree):
    def __init__(
        self,
        root: Path,
        *,
        provider: str = "sev_guest",
        certs: bytes = b"",
        races: int = 0,
        floor: int | None = None,
        make_report: Callable[[bytes, int], bytes] = fake_report,
    ) -> None:
        super().__init__(root)
        self.provider, self.certs, self.races, self.floor = provider, certs, races, floor
        self.make_report = make_report
        self.created: list[str] = []
        self.removed: list[str] = []

    def create(self, name: str) -> None:
        super().create(name)
        self.created.append(name)
        entry = self.root / name
        (entry / "provider").write_text(self.provider + "\n")
        for attribute in ("privlevel", "inblob", "outblob", "auxblob"):
            (entry / attribute).write_bytes(b"")
        if self.floor is not None:
            (entry / "privlevel_floor").write_text(f"{self.floor}\n")
        (entry / "generation").write_text("0\n")

    def write(self, name: str, attribute: str, data: bytes) -> None:
        super().write(name, attribute, data)
        entry = self.root / name
        generation = int((entry / "generation").read_text()) + 1
        if attribute == "inblob":
            written = (entry / "inblob").read_bytes()
            vmpl = int((entry / "privlevel").read_text())
            if self.races:  # another process writes its own inblob before this one reads outblob
                self.races -= 1
                generation += 1
                written = bytes(64)
            (entry / "outblob").write_bytes(self.make_report(written, vmpl))
            (entry / "auxblob").write_bytes(self.certs)
        (entry / "generation").write_text(f"{generation}\n")

    def remove(self, name: str) -> None:
        for attribute in (self.root / name).iterdir():
            attribute.unlink()
        super().remove(name)
        self.removed.append(name)


@pytest.fixture
def report_root(tmp_path: Path) -> Path:
    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)
    return root


def test_configfs_report_and_certificates(report_root: Path) -> None:
    tree = FakeConfigfs(report_root, certs=CERTS.to_bytes(pad_to_page=True))
    source = ConfigfsTsmSource(tree)
    assert isinstance(source, GuestReportSource)
    report, table = source.get_report(REPORT_DATA, 2)
    assert report == fake_report(REPORT_DATA, 2)
    assert table is not None and CertTable.from_bytes(table) == CERTS
    # One entry, under a name of its own, gone afterwards.
    assert tree.created == tree.removed and len(tree.created) == 1
    assert tree.created[0].startswith("sevlaunch-") and list(report_root.iterdir()) == []


def test_configfs_without_certificates_gives_none(report_root: Path) -> None:
    assert ConfigfsTsmSource(FakeConfigfs(report_root)).get_report(REPORT_DATA, 0) == GuestReport(
        fake_report(REPORT_DATA, 0), None
    )


def test_configfs_concurrent_writer_is_retried(report_root: Path) -> None:
    tree = FakeConfigfs(report_root, races=2)
    report, _ = ConfigfsTsmSource(tree, attempts=3).get_report(REPORT_DATA, 1)
    # The report that came back is the one for this caller's REPORT_DATA, not the other writer's.
    assert report == fake_report(REPORT_DATA, 1)
    assert list(report_root.iterdir()) == []


def test_configfs_persistent_concurrent_writer_fails_typed(report_root: Path) -> None:
    tree = FakeConfigfs(report_root, races=10)
    with pytest.raises(ConcurrentWriter) as exc:
        ConfigfsTsmSource(tree, attempts=3).get_report(REPORT_DATA, 0)
    assert exc.value.reason == Reason.CONCURRENT_WRITER and tree.races == 7
    assert list(report_root.iterdir()) == []


def test_configfs_missing_tsm_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(GuestInterfaceUnavailable) as exc:
        ConfigfsTsmSource(tmp_path / "no" / "tsm" / "report").get_report(REPORT_DATA, 0)
    assert exc.value.reason == Reason.KERNEL_UNSUPPORTED and "configfs-tsm" in str(exc.value)


def test_configfs_other_provider_is_unavailable(report_root: Path) -> None:
    tree = FakeConfigfs(report_root, provider="tdx_guest")
    with pytest.raises(GuestInterfaceUnavailable, match="tdx_guest"):
        ConfigfsTsmSource(tree).get_report(REPORT_DATA, 0)
    assert list(report_root.iterdir()) == []


def test_configfs_entry_without_attributes_is_unavailable(report_root: Path) -> None:
    # A plain directory, no kernel behind it: the production tree creates, reads, and cleans up.
    with pytest.raises(GuestInterfaceUnavailable, match="provider"):
        ConfigfsTsmSource(report_root).get_report(REPORT_DATA, 0)
    assert list(report_root.iterdir()) == []


def test_configfs_privlevel_below_floor_is_refused(report_root: Path) -> None:
    with pytest.raises(MalformedInput, match="floor"):
        ConfigfsTsmSource(FakeConfigfs(report_root, floor=1)).get_report(REPORT_DATA, 0)
    report, _ = ConfigfsTsmSource(FakeConfigfs(report_root, floor=1)).get_report(REPORT_DATA, 1)
    assert report[0x30] == 1


def test_configfs_wrong_report_size_is_refused(report_root: Path) -> None:
    tree = FakeConfigfs(report_root, make_report=lambda data, vmpl: fake_report(data, vmpl)[:-1])
    with pytest.raises(MalformedInput) as exc:
        ConfigfsTsmSource(tree).get_report(REPORT_DATA, 0)
    assert exc.value.reason == Reason.BAD_LENGTH and list(report_root.iterdir()) == []


@pytest.mark.parametrize(
    ("data", "vmpl"), [(bytes(63), 0), (bytes(65), 0), (REPORT_DATA, 4), (REPORT_DATA, -1)]
)
def test_bad_requests_are_refused_before_any_io(report_root: Path, data: bytes, vmpl: int) -> None:
    tree = FakeConfigfs(report_root)
    with pytest.raises(MalformedInput):
        ConfigfsTsmSource(tree).get_report(data, vmpl)
    assert tree.created == []


# -- /dev/sev-guest ---------------------------------------------------------------------------------


class FakeSevGuest:
    """The sev-guest driver: copies the request in, the MSG_REPORT_RSP and certificates out, and reports
    failures in exitinfo2 as the driver does (EIO with fw_error / vmm_error)."""

    def __init__(self, certs: bytes = b"") -> None:
        self.certs = certs
        self.msg_status = 0
        self.fw_error = 0
        self.vmm_error = 0
        self.ask_for: int | None = None  # a misbehaving host: always asks for this many bytes
        self.offered: list[int] = []
        self.make_report: Callable[[bytes, int], bytes] = fake_report
        self.last_request: bytes = b""

    def __call__(self, fd: int, request: int, arg: ctypes.Structure, mutate_flag: bool, /) -> int:
        assert isinstance(arg, dsg.snp_guest_request_ioctl) and mutate_flag
        assert arg.msg_version == 1 and arg.exitinfo2 == 0
        if request == dsg.SNP_GET_EXT_REPORT:
            ext = dsg.snp_ext_report_req.from_address(arg.req_data)
            req = ext.data
            self.offered.append(ext.certs_len)
            needed = self.ask_for or -(-len(self.certs) // PAGE_SIZE) * PAGE_SIZE
            if self.certs and (self.ask_for is not None or ext.certs_len < needed):
                ext.certs_len = needed
                arg.vmm_error = dsg.VMM_ERR_INVALID_LEN
                raise OSError(errno.EIO, "Input/output error")
            assert len(self.certs) <= ext.certs_len  # a driver never writes past the buffer
            ctypes.memmove(ext.certs_address, self.certs, len(self.certs))
        else:
            assert request == dsg.SNP_GET_REPORT
            req = dsg.snp_report_req.from_address(arg.req_data)
        self.last_request = bytes(req)
        if self.fw_error or self.vmm_error:
            arg.fw_error, arg.vmm_error = self.fw_error, self.vmm_error
            raise OSError(errno.EIO, "Input/output error")
        report = self.make_report(bytes(req.user_data), req.vmpl)
        response = dsg.encode_report_response(report, self.msg_status)
        ctypes.memmove(arg.resp_data, response, len(response))
        return 0


def test_sev_guest_plain_report() -> None:
    driver = FakeSevGuest()
    with DevSevGuest("/dev/null", ioctl=driver) as device:
        assert device.report(REPORT_DATA, 3) == fake_report(REPORT_DATA, 3)
    assert driver.last_request == REPORT_DATA + (3).to_bytes(4, "little") + bytes(28)


def test_sev_guest_extended_report_with_certificates() -> None:
    driver = FakeSevGuest(CERTS.to_bytes())
    with DevSevGuest("/dev/null", ioctl=driver) as device:
        assert isinstance(device, GuestReportSource)
        report, table = device.get_report(REPORT_DATA, 0)
    assert report == fake_report(REPORT_DATA, 0)
    assert table is not None and CertTable.from_bytes(table) == CERTS
    assert driver.offered == [dsg.DEFAULT_CERTS_LEN]


def test_sev_guest_too_small_certificate_buffer_is_renegotiated() -> None:
    big = CertTable.of([(VCEK_GUID, b"v" * 5000), (ASK_GUID, b"s" * 3000), (ARK_GUID, b"r" * 3000)])
    driver = FakeSevGuest(big.to_bytes())
    with DevSevGuest("/dev/null", ioctl=driver, certs_len=PAGE_SIZE) as device:
        _, table = device.extended_report(REPORT_DATA, 0)
    assert driver.offered == [PAGE_SIZE, 3 * PAGE_SIZE]
    assert table is not None and CertTable.from_bytes(table) == big


@pytest.mark.parametrize("ask_for", [dsg.MAX_CERTS_LEN + PAGE_SIZE, PAGE_SIZE, 2 * PAGE_SIZE + 1])
def test_sev_guest_unreasonable_buffer_demand_is_refused(ask_for: int) -> None:
    # More than the driver's cap, no more than was offered, or not whole pages.
    driver = FakeSevGuest(CERTS.to_bytes())
    driver.ask_for = ask_for
    with (
        DevSevGuest("/dev/null", ioctl=driver, certs_len=PAGE_SIZE) as device,
        pytest.raises(HypervisorRefused) as exc,
    ):
        device.extended_report(REPORT_DATA, 0)
    assert exc.value.vmm_error == dsg.VMM_ERR_INVALID_LEN and exc.value.reason == Reason.HYPERVISOR_REFUSED
    assert len(driver.offered) == 1


def test_sev_guest_host_that_keeps_asking_is_refused() -> None:
    driver = FakeSevGuest(CERTS.to_bytes())

    def growing(fd: int, request: int, arg: ctypes.Structure, mutate_flag: bool, /) -> int:
        driver.ask_for = (len(driver.offered) + 2) * PAGE_SIZE
        return driver(fd, request, arg, mutate_flag)

    with (
        DevSevGuest("/dev/null", ioctl=growing, certs_len=PAGE_SIZE) as device,
        pytest.raises(HypervisorRefused),
    ):
        device.extended_report(REPORT_DATA, 0)
    assert driver.offered == [PAGE_SIZE, 2 * PAGE_SIZE]


def test_sev_guest_without_host_certificates_gives_none() -> None:
    with DevSevGuest("/dev/null", ioctl=FakeSevGuest()) as device:
        assert device.get_report(REPORT_DATA, 0) == GuestReport(fake_report(REPORT_DATA, 0), None)


@pytest.mark.parametrize(
    ("status", "code"), [(0x16, StatusCode.INVALID_PARAM), (0x27, StatusCode.INVALID_KEY), (0x3F, 0x3F)]
)
def test_sev_guest_report_response_status(status: int, code: int) -> None:
    driver = FakeSevGuest()
    driver.msg_status = status
    with DevSevGuest("/dev/null", ioctl=driver) as device, pytest.raises(FirmwareError) as exc:
        device.report(REPORT_DATA, 0)
    assert exc.value.status == code and exc.value.command == "MSG_REPORT_REQ"


def test_sev_guest_firmware_and_vmm_errors() -> None:
    driver = FakeSevGuest()
    driver.fw_error = int(StatusCode.INVALID_PARAM)
    with DevSevGuest("/dev/null", ioctl=driver) as device, pytest.raises(FirmwareError) as fw:
        device.report(REPORT_DATA, 0)
    assert fw.value.status is StatusCode.INVALID_PARAM and fw.value.command == "SNP_GET_REPORT"
    driver.fw_error, driver.vmm_error = 0, dsg.VMM_ERR_BUSY
    with DevSevGuest("/dev/null", ioctl=driver) as device, pytest.raises(HypervisorRefused) as vmm:
        device.extended_report(REPORT_DATA, 0)
    assert vmm.value.vmm_error == dsg.VMM_ERR_BUSY


def test_sev_guest_report_of_the_wrong_size_is_refused() -> None:
    driver = FakeSevGuest()
    driver.make_report = lambda data, vmpl: fake_report(data, vmpl) + bytes(16)
    with DevSevGuest("/dev/null", ioctl=driver) as device, pytest.raises(MalformedInput):
        device.report(REPORT_DATA, 0)


def test_report_response_codec() -> None:
    report = fake_report(REPORT_DATA, 1)
    encoded = dsg.encode_report_response(report)
    assert len(encoded) == dsg.REPORT_RESP_DATA_SIZE and encoded[:8] == bytes([0, 0, 0, 0, 0xA0, 4, 0, 0])
    assert dsg.decode_report_response(encoded) == report
    with pytest.raises(MalformedInput):
        dsg.decode_report_response(encoded[:16])
    with pytest.raises(MalformedInput):
        dsg.decode_report_response(encoded[:0x100])  # report_size beyond the bytes given


def test_sev_guest_without_the_device_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(GuestInterfaceUnavailable):
        DevSevGuest(str(tmp_path / "sev-guest"))
    # /dev/null answers the real ioctl with ENOTTY, as a kernel without the driver would.
    with DevSevGuest("/dev/null") as device, pytest.raises(GuestInterfaceUnavailable):
        device.report(REPORT_DATA, 0)


def test_sev_guest_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        DevSevGuest("/dev/null", certs_len=100)
    with pytest.raises(ValueError):
        DevSevGuest("/dev/null", certs_len=2 * dsg.MAX_CERTS_LEN)
    device = DevSevGuest("/dev/null", ioctl=FakeSevGuest())
    with pytest.raises(MalformedInput):
        device.report(bytes(10), 0)
    device.close()
    with pytest.raises(RuntimeError):
        device.report(REPORT_DATA, 0)
    assert repr(device) == "DevSevGuest(path='/dev/null')"


class StuckEntries(FakeConfigfs):
    """An entry that cannot be removed (EBUSY), to see which error the caller gets."""

    def remove(self, name: str) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy")


def test_configfs_cleanup_failure_never_hides_the_first_error(report_root: Path) -> None:
    with pytest.raises(GuestInterfaceUnavailable):
        ConfigfsTsmSource(StuckEntries(report_root, provider="tdx_guest")).get_report(REPORT_DATA, 0)
    # Without an earlier error, the stuck entry is reported.
    with pytest.raises(OSError) as exc:
        ConfigfsTsmSource(StuckEntries(report_root)).get_report(REPORT_DATA, 0)
    assert exc.value.errno == errno.EBUSY
