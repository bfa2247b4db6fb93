"""The launcher's test-host settings for a real libvirtd whose QEMU is the SEV stand-in, and the precise
reasons for the libvirt errors a real daemon returned (tests/realvirt saw each message quoted here).

Production stays as it was: without the flags the XML keeps `<locked/>` and ASID counts come from
libvirt; with them, a host that has /dev/sev refuses to start.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from launcher_svc import server
from launcher_svc.adapters import libvirt_errors
from launcher_svc.adapters.libvirt_backend import without_locked_memory
from launcher_svc.core.domain_xml import SevLaunchParams, build_domain_xml
from launcher_svc.core.loader import LoaderType
from launcher_svc.core.spec import PathPolicy, create_spec
from sevlaunch.errors import FailedPrecondition, ResourceExhausted
from sevlaunch.sev.technology import Technology

OVMF = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--tls-dir", str(tmp_path), "--db", str(tmp_path / "l.db"), *extra]


def _config(tmp_path: Path, *extra: str) -> server.LauncherServerConfig:
    return server.config_from_args(server.build_parser().parse_args(_args(tmp_path, *extra)))


def test_production_defaults_lock_memory_and_take_asids_from_libvirt(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert cfg.test_host_unlocked_memory is False and cfg.test_host_asids is None


def test_test_host_flags_on_a_host_without_dev_sev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "SEV_DEVICE", str(tmp_path / "no-sev-here"))
    cfg = _config(tmp_path, "--test-host-unlocked-memory", "--test-host-asids", "16:8")
    assert cfg.test_host_unlocked_memory is True
    assert cfg.test_host_asids == (16, 8)


@pytest.mark.parametrize(
    "flags", [["--test-host-unlocked-memory"], ["--test-host-asids", "16:16"]], ids=["memory", "asids"]
)
def test_test_host_flags_are_refused_on_a_real_sev_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str]
) -> None:
    device = tmp_path / "sev"
    device.write_bytes(b"")
    monkeypatch.setattr(server, "SEV_DEVICE", str(device))
    with pytest.raises(ValueError, match=f"{flags[0]} refused: .* real SEV host"):
        _config(tmp_path, *flags)


def test_test_host_flags_need_the_libvirt_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "SEV_DEVICE", str(tmp_path / "no-sev-here"))
    with pytest.raises(ValueError, match="--hypervisor libvirt only"):
        _config(tmp_path, "--hypervisor", "emulated", "--test-host-unlocked-memory")


@pytest.mark.parametrize("value", ["16", "0:0", "-1:4", "x:1", "2000:1"])
def test_bad_asid_counts_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setattr(server, "SEV_DEVICE", str(tmp_path / "no-sev-here"))
    with pytest.raises(ValueError):
        _config(tmp_path, f"--test-host-asids={value}")


@pytest.mark.skipif(not OVMF.is_file(), reason="Debian package ovmf is not installed")
def test_without_locked_memory_drops_only_the_lock() -> None:
    spec = create_spec(
        name="g",
        memory_mib=256,
        vcpus=1,
        firmware_path=str(OVMF),
        mode=Technology.SEV,
        policy=3,
        paths=PathPolicy(("/usr/share/OVMF",)),
    )
    xml = build_domain_xml(
        spec,
        launch_id="a" * 32,
        domain_name="sl-g",
        sev=SevLaunchParams(51, 1, 3, b"godh", b"session"),
        loader=LoaderType.PFLASH,
    )
    assert ET.fromstring(xml).find("memoryBacking/locked") is not None  # production keeps it
    stripped = ET.fromstring(without_locked_memory(xml))
    assert stripped.find("memoryBacking") is None
    # Everything else is unchanged, our launch metadata included.
    original = ET.fromstring(xml)
    original.remove(original.find("memoryBacking"))  # type: ignore[arg-type]
    assert ET.tostring(stripped) == ET.tostring(original)


# Messages as the real libvirtd 9.0 returned them in tests/realvirt.
INJECT_FOREIGN = (
    "internal error: unable to execute QEMU command 'sev-inject-launch-secret': "
    "SEV: failed to inject secret ret=-5 fw_error=11 'BAD_MEASUREMENT'"
)
START_FOREIGN = (
    "internal error: qemu unexpectedly closed the monitor: qemu-system-x86_64: "
    "SEV: LAUNCH_START ret=-5 fw_error=11 'BAD_MEASUREMENT'"
)
LOCKED = (
    "internal error: Process exited prior to exec: libvirt:  error : cannot limit locked memory of "
    "process 20632 to 9007199254740991: Operation not permitted"
)
NO_BIOS = (
    "internal error: qemu unexpectedly closed the monitor: qemu: could not load PC BIOS "
    "'/usr/share/OVMF/OVMF_CODE_4M.fd'"
)
NO_MEASUREMENT = (
    "internal error: unable to execute QEMU command 'query-sev-launch-measure': "
    "SEV launch measurement is not available"
)
NOT_RUNNING = "Requested operation is not valid: domain is not running"
NOT_PAUSED = "Requested operation is not valid: domain must be in a paused state"
ALREADY_RUNNING = "Requested operation is not valid: domain is already running"
NO_SEV = "unsupported configuration: SEV launch security is not supported with this QEMU binary"


@pytest.mark.parametrize(
    ("code", "message", "reason", "status"),
    [
        (libvirt.VIR_ERR_INTERNAL_ERROR, INJECT_FOREIGN, "firmware_bad_measurement", "BAD_MEASUREMENT"),
        (
            libvirt.VIR_ERR_INTERNAL_ERROR,
            START_FOREIGN,
            "firmware_bad_measurement",
            "BAD_MEASUREMENT",
        ),
        (libvirt.VIR_ERR_INTERNAL_ERROR, LOCKED, "locked_memory_refused", None),
        (libvirt.VIR_ERR_INTERNAL_ERROR, NO_BIOS, "firmware_not_loadable", None),
        (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, NO_SEV, "sev_unsupported", None),
        (libvirt.VIR_ERR_INTERNAL_ERROR, NO_MEASUREMENT, "measurement_unavailable", None),
        (libvirt.VIR_ERR_OPERATION_INVALID, NOT_RUNNING, "domain_not_running", None),
        (libvirt.VIR_ERR_OPERATION_INVALID, NOT_PAUSED, "domain_not_paused", None),
        (libvirt.VIR_ERR_OPERATION_INVALID, ALREADY_RUNNING, "domain_already_running", None),
    ],
    ids=[
        "inject-bad-measurement",
        "start-foreign-session",
        "locked-memory",
        "ovmf-4m-as-bios",
        "qemu-without-sev",
        "measure-after-finish",
        "not-running",
        "secret-while-running",
        "second-resume",
    ],
)
def test_real_libvirt_errors_have_precise_reasons(
    code: int, message: str, reason: str, status: str | None
) -> None:
    err = libvirt_errors.classify(code, message, f"what: {message}")
    assert isinstance(err, FailedPrecondition)
    assert err.reason == reason
    assert err.metadata.get("firmware_status") == status


def test_firmware_resource_limit_is_resource_exhausted() -> None:
    err = libvirt_errors.classify(
        libvirt.VIR_ERR_INTERNAL_ERROR, "SEV: LAUNCH_START ret=-5 fw_error=23 'x'", "d"
    )
    assert isinstance(err, ResourceExhausted) and err.reason == "firmware_resource_limit"


def test_other_errors_keep_the_generic_mapping() -> None:
    assert (
        libvirt_errors.classify(libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: something else", "d") is None
    )
    assert libvirt_errors.classify(libvirt.VIR_ERR_OPERATION_INVALID, "fw_error=11", "d") is None
