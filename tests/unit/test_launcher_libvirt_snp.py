"""The libvirt backend and SEV-SNP: libvirt before 10.5 (this host's is 9.0, as bookworm's) refuses an SNP
launch plainly before any XML reaches the daemon; from 10.5 (injected here: the test driver is what we
have) the XML goes to the daemon; and QEMU's report of a firmware refusal, as libvirt passes it on in a
start error, becomes `snp_launch_refused` naming the firmware's status."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from launcher_svc.adapters.libvirt_backend import (
    SNP_MIN_LIBVIRT,
    LibvirtHypervisor,
    libvirt_version_text,
    snp_start_error,
)
from launcher_svc.core.domain_xml import SnpLaunchParams, build_domain_xml
from launcher_svc.core.loader import LoaderType
from launcher_svc.core.preflight import read_firmware
from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.spec import GuestSpec
from sevlaunch.errors import FailedPrecondition, InvalidArgument, Unavailable
from sevlaunch.sev.technology import Technology

NAME = "sl-fedcba987654-snp"


def _hv(tmp_path: Path, version: int | None = None) -> LibvirtHypervisor:
    node = tmp_path / "node.xml"
    node.write_text("<node/>\n")
    return LibvirtHypervisor(f"test://{node}", libvirt_version=version)


def _snp_xml() -> str:
    spec = GuestSpec(
        name="snp",
        memory_mib=512,
        vcpus=1,
        firmware_path="/usr/share/OVMF/OVMF_CODE.fd",
        mode=Technology.SEV_SNP,
        policy=0x30000,
        vcpu_type="EPYC-v4",
    )
    params = SnpLaunchParams(51, 1, 0x30000, host_data=b"\x01" * 32)
    return build_domain_xml(
        spec, launch_id="fedcba9876543210" * 2, domain_name=NAME, sev=params, loader=LoaderType.ROM
    )


def _names(hv: LibvirtHypervisor) -> set[str]:
    return {d.name for d in hv.list_domains()}


def test_this_hosts_libvirt_is_too_old_for_snp_and_says_which_versions(tmp_path: Path) -> None:
    hv = _hv(tmp_path)
    try:
        found = hv.libvirt_version()
        assert found < SNP_MIN_LIBVIRT, "this test expects bookworm's libvirt 9.0"
        for call in (hv.snp_capabilities, lambda: hv.define(_snp_xml())):
            with pytest.raises(FailedPrecondition) as err:
                call()
            assert err.value.reason == LaunchReason.SNP_UNSUPPORTED_BY_LIBVIRT
            assert libvirt_version_text(found) in err.value.detail and "10.5.0" in err.value.detail
        assert NAME not in _names(hv)  # nothing was sent
        with pytest.raises(FailedPrecondition) as started:
            hv.start_snp(NAME, read_firmware("/usr/share/OVMF/OVMF_CODE.fd"))
        assert started.value.reason == LaunchReason.SNP_UNSUPPORTED_BY_LIBVIRT
    finally:
        hv.close()


@pytest.mark.parametrize(("version", "text"), [(9_000_000, "9.0.0"), (10_004_999, "10.4.999")])
def test_any_libvirt_before_10_5_refuses(version: int, text: str, tmp_path: Path) -> None:
    hv = _hv(tmp_path, version)
    try:
        with pytest.raises(FailedPrecondition) as err:
            hv.define(_snp_xml())
        assert err.value.reason == "snp_unsupported_by_libvirt" and f"libvirt {text} " in err.value.detail
        assert NAME not in _names(hv)
    finally:
        hv.close()


def test_from_10_5_the_xml_goes_to_the_daemon(tmp_path: Path) -> None:
    # The gate opens; the test driver, really 9.0, then rejects sev-snp with its own XML error: the
    # domain XML reached libvirt's parser, which is what a 10.5+ daemon would validate and keep.
    hv = _hv(tmp_path, SNP_MIN_LIBVIRT)
    try:
        with pytest.raises(InvalidArgument) as err:
            hv.define(_snp_xml())
        assert err.value.reason == "domain_xml_rejected" and "sev-snp" in err.value.detail
        # Past the version gate, a daemon that offers no SNP in its domain capabilities says so.
        with pytest.raises(FailedPrecondition) as caps:
            hv.snp_capabilities()
        assert caps.value.reason == "snp_unsupported"
    finally:
        hv.close()


def _libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    """A libvirtError as libvirt-python raises it: (code, domain, message, level, ...)."""
    exc = libvirt.libvirtError(message)
    exc.err = (code, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, "", "", "", 0, 0)
    return exc


@pytest.mark.parametrize(
    ("code", "message", "command", "status"),
    [
        # QEMU 9.1+ reports the refusal and exits while libvirt waits for it: libvirt's internal error.
        (
            libvirt.VIR_ERR_INTERNAL_ERROR,
            "internal error: QEMU unexpectedly closed the monitor (vm='sl-1-snp'): 2026-12-06T12:00:00Z"
            " qemu-system-x86_64: SNP_LAUNCH_FINISH ret=-5 fw_error=11 'Bad measurement'",
            "SNP_LAUNCH_FINISH",
            "BAD_MEASUREMENT",
        ),
        # the earlier patches' wording, with the function's name first
        (
            libvirt.VIR_ERR_OPERATION_FAILED,
            "operation failed: process exited while connecting to monitor: sev_snp_launch_finish:"
            " SNP_LAUNCH_FINISH ret=-5 fw_error=10 'Bad signature'",
            "SNP_LAUNCH_FINISH",
            "BAD_SIGNATURE",
        ),
        (
            libvirt.VIR_ERR_INTERNAL_ERROR,
            "internal error: qemu unexpectedly closed the monitor: SNP_LAUNCH_START ret=-5 fw_error=7"
            " 'Policy is not allowed'",
            "SNP_LAUNCH_START",
            "POLICY_FAILURE",
        ),
        (
            libvirt.VIR_ERR_INTERNAL_ERROR,
            "internal error: QEMU unexpectedly closed the monitor: SNP_LAUNCH_FINISH ret=-5 fw_error=30 'x'",
            "SNP_LAUNCH_FINISH",
            "0x1e",
        ),
    ],
    ids=["INTERNAL_ERROR-1-finish", "OPERATION_FAILED-9-finish", "INTERNAL_ERROR-1-start", "unknown-status"],
)
def test_a_firmware_refusal_inside_qemu_is_snp_launch_refused(
    code: int, message: str, command: str, status: str
) -> None:
    assert (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_ERR_OPERATION_FAILED) == (1, 9)
    err = snp_start_error(_libvirt_error(code, message))
    assert (type(err), err.reason) == (FailedPrecondition, "snp_launch_refused")
    assert err.metadata == {"firmware_status": status, "command": command}
    assert command in err.detail and status in err.detail


def test_other_start_errors_keep_libvirts_mapping() -> None:
    err = snp_start_error(_libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: no more memory"))
    assert (type(err), err.reason) == (Unavailable, "hypervisor_error")
    # libvirt's wrong-state errors have their own precise names (libvirt_errors.classify).
    err = snp_start_error(_libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, "domain is already running"))
    assert (type(err), err.reason) == (FailedPrecondition, "domain_already_running")
    err = snp_start_error(_libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, "some other invalid operation"))
    assert (type(err), err.reason) == (FailedPrecondition, "hypervisor_refused")
