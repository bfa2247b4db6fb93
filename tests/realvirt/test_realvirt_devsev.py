"""DevSev through a real ioctl: `/dev/sev` as a FUSE file answered by the emulated firmware.

DevSev opens the path it is given and issues SEV_ISSUE_CMD with `fcntl.ioctl`; the kernel's FUSE
carries the 16-byte `struct sev_issue_cmd` both ways and the server (sevlaunch.realvirt.fusesev, its
own process) reads and writes the nested structures in DevSev's memory, as sev-dev.c does. The
server's layouts are written from psp-sev.h with `struct`, apart from DevSev's ctypes ones, so every
command here checks DevSev's structures against an independent reading of the header, and each result
against the same command on the emulator called directly.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.firmware import DevSev, EmulatedFirmware, FirmwareError, StatusCode, devsev
from sevlaunch.firmware.devsev import DeviceNotWritable
from sevlaunch.realvirt.fusesev import FuseSevDevice
from sevlaunch.sev.cert import Algorithm, SEVCertificate, Usage

pytestmark = pytest.mark.realvirt


def _fuse_usable() -> str | None:
    if os.geteuid() != 0:
        return "mounting FUSE without fusermount needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


@pytest.fixture(scope="module")
def chip(tmp_path_factory: pytest.TempPathFactory) -> EmulatedFirmware:
    reason = _fuse_usable()
    if reason is not None:
        pytest.skip(reason)
    chip = EmulatedFirmware(tmp_path_factory.mktemp("fusesev") / "chip")
    # Its platform keys exist from the first command on: make them now, so that a twin copied before
    # any other test ran holds the same ones (run alone, the ownership test copied a keyless chip).
    chip.platform_status()
    chip.pek_csr()
    return chip


@pytest.fixture
def twin(chip: EmulatedFirmware, tmp_path: Path) -> EmulatedFirmware:
    """An identical copy of the chip, on which the same commands run directly."""
    shutil.copytree(chip.state_dir, tmp_path / "twin")
    return EmulatedFirmware(tmp_path / "twin", create=False)


@pytest.fixture
def device(chip: EmulatedFirmware, tmp_path: Path) -> Iterator[FuseSevDevice]:
    with FuseSevDevice(chip.state_dir, tmp_path / "dev") as dev:
        yield dev


def owner_signed_pek(csr: bytes) -> tuple[bytes, bytes]:
    """An owner's OCA (self-signed) and the PEK of `csr` signed by it."""
    oca_key = ec.generate_private_key(ec.SECP384R1())
    oca = SEVCertificate.for_ec_key(
        usage=Usage.OCA,
        algorithm=Algorithm.ECDSA_SHA256,
        public_key=oca_key.public_key(),
        api_major=0,
        api_minor=24,
    ).sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, oca_key)
    pek = SEVCertificate.from_bytes(csr).sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, oca_key)
    return pek.to_bytes(), oca.to_bytes()


def test_read_commands_match_the_emulator(chip: EmulatedFirmware, device: FuseSevDevice) -> None:
    with DevSev(device.path) as sev:
        assert sev.platform_status() == chip.platform_status()
        assert bytes(sev.get_id()) == bytes(chip.get_id())
        assert sev.pdh_cert_export() == chip.pdh_cert_export()
        assert sev.pek_csr() == chip.pek_csr()


def test_a_firmware_refusal_is_eio_with_the_status(
    chip: EmulatedFirmware, twin: EmulatedFirmware, device: FuseSevDevice
) -> None:
    """The kernel path of a firmware error: ioctl fails with EIO and `error` holds the status."""
    pek, oca = owner_signed_pek(chip.pek_csr())
    cases = {
        "oca in the pek slot": (oca, oca),
        "truncated pek": (pek[:-1], oca),
    }
    with DevSev(device.path) as sev:
        for name, (p, o) in cases.items():
            with pytest.raises(FirmwareError) as direct:
                twin.pek_cert_import(p, o)
            with pytest.raises(FirmwareError) as through_kernel:
                sev.pek_cert_import(p, o)
            assert through_kernel.value.status == direct.value.status, name
            assert through_kernel.value.status in (StatusCode.INVALID_CERTIFICATE, StatusCode.INVALID_LENGTH)
            cause = through_kernel.value.__cause__
            assert isinstance(cause, OSError) and cause.errno == errno.EIO, name


def test_pek_cert_import_through_the_kernel_takes_ownership(
    chip: EmulatedFirmware, twin: EmulatedFirmware, device: FuseSevDevice
) -> None:
    with DevSev(device.path) as sev:
        pek, oca = owner_signed_pek(sev.pek_csr())
        sev.pek_cert_import(pek, oca)
        assert sev.platform_status().owned_externally and chip.platform_status().owned_externally
        twin.pek_cert_import(pek, oca)  # the same certificates, directly: the same platform
        assert sev.platform_status() == twin.platform_status()
        _pdh, chain = sev.pdh_cert_export()
        assert chain[0x824 : 2 * 0x824] == oca  # PEK‖OCA‖CEK: the owner's OCA is the platform's now
        # A second import is ALREADY_OWNED, through the kernel as directly; PEK_GEN frees the platform.
        pek2, oca2 = owner_signed_pek(sev.pek_csr())
        with pytest.raises(FirmwareError) as refused:
            sev.pek_cert_import(pek2, oca2)
        assert refused.value.status is StatusCode.ALREADY_OWNED
        old_pdh = sev.pdh_cert_export()[0]
        sev.pek_gen()
        sev.pdh_gen()
        assert not sev.platform_status().owned_externally
        assert sev.pdh_cert_export()[0] != old_pdh
        assert sev.pdh_cert_export() == chip.pdh_cert_export()


def test_get_id_renegotiates_its_length_through_the_kernel(
    chip: EmulatedFirmware, device: FuseSevDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel ABI by hand: GET_ID2 with 16 bytes of room fails EIO/INVALID_LENGTH and writes back
    # the 64 bytes the firmware needs.
    buf = ctypes.create_string_buffer(16)
    id2 = devsev.sev_user_data_get_id2(address=ctypes.addressof(buf), length=16)
    arg = devsev.sev_issue_cmd(cmd=devsev.SevCmd.GET_ID2, data=ctypes.addressof(id2), error=0)
    fd = os.open(device.path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as failed:
            fcntl.ioctl(fd, devsev.SEV_ISSUE_CMD, arg, True)
        assert failed.value.errno == errno.EIO
        assert arg.error == StatusCode.INVALID_LENGTH and id2.length == 64
        assert buf.raw == bytes(16)  # nothing written where it did not fit
    finally:
        os.close(fd)
    # DevSev's own retry, starting from a buffer too small for this chip's id.
    monkeypatch.setattr(devsev, "CHIP_ID_SIZE", 16)
    with DevSev(device.path) as sev:
        assert bytes(sev.get_id()) == bytes(chip.get_id())


def test_a_read_only_descriptor_gets_eperm_for_writing_commands(
    chip: EmulatedFirmware, tmp_path: Path
) -> None:
    with FuseSevDevice(chip.state_dir, tmp_path / "ro", read_only_node=True) as ro:
        with pytest.raises(PermissionError):
            os.open(ro.path, os.O_RDWR)  # the node refuses writers (EACCES), so DevSev opens it read-only
        before = chip.platform_status()
        with DevSev(ro.path) as sev:
            assert sev.platform_status() == before
            assert bytes(sev.get_id()) == bytes(chip.get_id())
            # The kernel's EPERM on a read-only descriptor arrives through the real ioctl and DevSev turns
            # it into its typed refusal naming the command (issue 12, item 9).
            for command in (sev.pek_gen, sev.pdh_gen, sev.factory_reset, sev.pek_csr):
                with pytest.raises(DeviceNotWritable) as refused:
                    command()
                assert refused.value.reason == "sev_device_read_only", command.__name__
            with pytest.raises(DeviceNotWritable) as refused:
                sev.pek_cert_import(b"p" * 0x824, b"o" * 0x824)
            assert refused.value.metadata["command"] == "PEK_CERT_IMPORT"
        assert chip.platform_status() == before


def test_other_ioctls_and_commands_are_einval(device: FuseSevDevice) -> None:
    fd = os.open(device.path, os.O_RDWR)
    try:
        arg = devsev.sev_issue_cmd(cmd=99, data=0, error=0)
        with pytest.raises(OSError) as unknown_command:
            fcntl.ioctl(fd, devsev.SEV_ISSUE_CMD, arg, True)
        assert unknown_command.value.errno == errno.EINVAL
        # _IOWR('S', 1, struct sev_issue_cmd): the right size and type, another number.
        other = (3 << 30) | (ctypes.sizeof(devsev.sev_issue_cmd) << 16) | (ord("S") << 8) | 0x1
        with pytest.raises(OSError) as unknown_ioctl:
            fcntl.ioctl(fd, other, devsev.sev_issue_cmd(cmd=1, data=0, error=0), True)
        assert unknown_ioctl.value.errno == errno.EINVAL
    finally:
        os.close(fd)
