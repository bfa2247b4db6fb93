"""The launcher's `LibvirtHypervisor` against a real libvirtd and real QEMU (TCG), SEV from the stand-in.

The domain XML is the launcher's own (`build_domain_xml`), the owner's part is the protocol library's
(session for the chip's PDH, measurement check against the launch digest of the image, secret bound to
the measure). What only a real daemon can show, each test checks independently of the stand-in:
libvirt's domain state, the measurement against the owner's own digest, the secret table read back
from guest RAM through libvirt's memoryPeek (QEMU's `pmemsave`), OVMF's shell text on the serial
console, and the chip's guest count after destroy.
"""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest
from realvirt_fixture import (
    OVMF_2M,
    OVMF_4M,
    POLICY,
    SECRET_GPA,
    SHELL_BANNER,
    RealvirtHost,
    domain_xml,
    owner_session,
)

from launcher_svc.adapters.libvirt_backend import LibvirtHypervisor
from launcher_svc.core.loader import LoaderType, choose_loader
from launcher_svc.core.preflight import FirmwareImage, SecretArea, read_firmware
from sevlaunch.errors import FailedPrecondition, ServiceError
from sevlaunch.firmware import EmulatedRoot, FirmwareError, StatusCode
from sevlaunch.sev.chain import CertificateChain, load_roots_file, verify_chain
from sevlaunch.sev.digest import launch_digest
from sevlaunch.sev.errors import VerificationFailed
from sevlaunch.sev.measurement import LaunchMeasurement, verify_measurement
from sevlaunch.sev.policy import PolicyFlags
from sevlaunch.sev.secret import DEFAULT_SECRET_AREA_SIZE, SecretEntry, SecretTable, package_secret
from sevlaunch.sev.session import create_session
from sevlaunch.sev.technology import Technology

pytestmark = pytest.mark.realvirt


def _firmware(image: Path = OVMF_2M) -> FirmwareImage:
    # The libvirt backend hands QEMU the loader the domain XML names; this is what preflight read of it.
    return read_firmware(str(image))


#: Both of Debian's split code images, each on read-only pflash unit 0; the 4 MiB one is the demo's.
IMAGES = pytest.mark.parametrize("image", [OVMF_4M, OVMF_2M], ids=["OVMF_CODE_4M", "OVMF_CODE_2M"])


def _area() -> SecretArea:
    # Debian's OVMF declares no secret area: the configured address, as the launcher's --secret-gpa.
    return SecretArea(SECRET_GPA, DEFAULT_SECRET_AREA_SIZE, declared=False)


def test_sev_capabilities_come_from_the_chip_through_libvirt(
    realvirt_host: RealvirtHost, hv: LibvirtHypervisor
) -> None:
    caps = hv.sev_capabilities()
    assert (caps.cbitpos, caps.reduced_phys_bits) == (51, 1)
    conn = libvirt.open(realvirt_host.uri)
    try:
        info = conn.getSEVInfo()
    finally:
        conn.close()
    pdh, _chain = realvirt_host.chip.pdh_cert_export()
    assert base64.b64decode(info["pdh"]) == pdh
    assert base64.b64decode(info["cpu0-id"]) == bytes(realvirt_host.chip.get_id())


@pytest.mark.parametrize(
    ("image", "loader"),
    [(OVMF_4M, "pflash"), (OVMF_2M, "pflash"), (None, "rom")],
    ids=["OVMF_CODE_4M-pflash", "OVMF_CODE_2M-pflash", "combined-4M-rom"],
)
def test_attested_launch_boots_ovmf_with_the_secret_in_guest_ram(
    realvirt_host: RealvirtHost, hv: LibvirtHypervisor, tmp_path: Path, image: Path | None, loader: str
) -> None:
    """Each loader through real QEMU: Debian's split code images on read-only pflash, and a combined
    image (OVMF_VARS_4M.fd then OVMF_CODE_4M.fd, edk2's OVMF.fd layout, 4 MiB) as `-bios`. The owner's
    digest is of the image either way, and the chip agrees."""
    if image is None:
        image = tmp_path / "OVMF.fd"
        image.write_bytes((OVMF_4M.parent / "OVMF_VARS_4M.fd").read_bytes() + OVMF_4M.read_bytes())
    chip = realvirt_host.chip
    guests_before = chip.platform_status().guest_count
    session = owner_session(realvirt_host)
    name, xml = domain_xml(hv, session, image, "attested")
    assert f'type="{loader}"' in xml and "<nvram" not in xml

    hv.define(xml)
    hv.start_paused(name, _firmware(image))
    dom_state = libvirt.open(realvirt_host.uri)
    try:
        dom = dom_state.lookupByName(name)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED

        info = hv.launch_security_info(name)
        measurement = LaunchMeasurement.from_bytes(info.measurement)
        # The owner's digest of the code image alone: QEMU measures pflash unit 0, and there is no unit 1.
        expected = launch_digest(image.read_bytes(), mode="sev")
        matched = verify_measurement(
            session.keys.tik,
            measurement,
            api_major=info.api_major,
            api_minor=info.api_minor,
            build_id=info.build_id,
            policy=info.policy,
            launch_digests=[expected],
        )
        assert matched == expected and info.policy == POLICY

        table = SecretTable.of([SecretEntry.disk_passphrase(b"realvirt passphrase\0")])
        header, payload = package_secret(session.keys, measurement.measure, table.to_bytes())
        hv.inject_secret(name, header.to_bytes(), payload, _area())
        # Read back through libvirt and QEMU (pmemsave), not through the stand-in.
        seen = dom.memoryPeek(SECRET_GPA, len(payload), libvirt.VIR_MEMORY_PHYSICAL)
        assert SecretTable.from_bytes(seen) == table

        hv.resume(name)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        realvirt_host.wait_serial(name, SHELL_BANNER)
    finally:
        dom_state.close()
    assert hv.destroy(name) is True
    assert name not in {d.name for d in hv.list_domains()}
    assert chip.platform_status().guest_count == guests_before


@IMAGES
def test_tampered_firmware_is_refused_by_the_owner_and_destroyed(
    realvirt_host: RealvirtHost, hv: LibvirtHypervisor, tmp_path: Path, image: Path
) -> None:
    chip = realvirt_host.chip
    guests_before = chip.platform_status().guest_count
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered = tmp_path / f"{image.stem}-tampered.fd"
    tampered.write_bytes(bytes(data))
    session = owner_session(realvirt_host)
    name, xml = domain_xml(hv, session, tampered, "tampered")
    hv.define(xml)
    hv.start_paused(name, _firmware(tampered))
    info = hv.launch_security_info(name)
    with pytest.raises(VerificationFailed):
        verify_measurement(
            session.keys.tik,
            LaunchMeasurement.from_bytes(info.measurement),
            api_major=info.api_major,
            api_minor=info.api_minor,
            build_id=info.build_id,
            policy=info.policy,
            launch_digests=[launch_digest(image.read_bytes(), mode="sev")],
        )
    # What the chip measured is the tampered image's own digest: the stand-in read pflash unit 0's file.
    assert verify_measurement(
        session.keys.tik,
        LaunchMeasurement.from_bytes(info.measurement),
        api_major=info.api_major,
        api_minor=info.api_minor,
        build_id=info.build_id,
        policy=info.policy,
        launch_digests=[launch_digest(bytes(data), mode="sev")],
    ) == launch_digest(bytes(data), mode="sev")
    assert chip.platform_status().guest_count == guests_before + 1
    assert hv.destroy(name) is True
    assert chip.platform_status().guest_count == guests_before
    assert (
        not realvirt_host.serial_log(name).exists()
        or SHELL_BANNER not in realvirt_host.serial_log(name).read_bytes()
    )


def test_a_secret_for_another_launch_is_refused_with_the_firmware_status(
    realvirt_host: RealvirtHost, hv: LibvirtHypervisor
) -> None:
    """libvirt reports QEMU's refusal as VIR_ERR_INTERNAL_ERROR; the backend reads the firmware status
    QEMU put in the message (fw_error=11, BAD_MEASUREMENT) and names it."""
    sessions = [owner_session(realvirt_host), owner_session(realvirt_host)]
    names = []
    for n, session in enumerate(sessions):
        name, xml = domain_xml(hv, session, OVMF_2M, f"pair{n}")
        hv.define(xml)
        hv.start_paused(name, _firmware())
        names.append(name)
    first = LaunchMeasurement.from_bytes(hv.launch_security_info(names[0]).measurement)
    table = SecretTable.of([SecretEntry.disk_passphrase(b"for the first launch only\0")])
    # Packaged for launch 0 (its keys and measure), injected into launch 1.
    header, payload = package_secret(sessions[0].keys, first.measure, table.to_bytes())
    conn = libvirt.open(realvirt_host.uri)
    try:
        dom = conn.lookupByName(names[1])
        params = {
            libvirt.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_HEADER: __import__("base64")
            .b64encode(header.to_bytes())
            .decode(),
            libvirt.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET: base64.b64encode(payload).decode(),
            libvirt.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_SET_ADDRESS: SECRET_GPA,
        }
        with pytest.raises(libvirt.libvirtError) as raw:
            dom.setLaunchSecurityState(params, 0)
        assert raw.value.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR
    finally:
        conn.close()
    with pytest.raises(ServiceError) as typed:
        hv.inject_secret(names[1], header.to_bytes(), payload, _area())
    assert isinstance(typed.value, FailedPrecondition)
    assert typed.value.reason == "firmware_bad_measurement"
    for name in names:
        hv.destroy(name)


def _has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 24))  # CAP_SYS_RESOURCE
    return False


def test_locked_memory_on_a_host_that_cannot_lock_it_is_a_precise_refusal(
    realvirt_host: RealvirtHost,
) -> None:
    """The production XML keeps `<locked/>`. Without CAP_SYS_RESOURCE libvirt cannot raise QEMU's
    RLIMIT_MEMLOCK: VIR_ERR_INTERNAL_ERROR "cannot limit locked memory", named locked_memory_refused."""
    production = LibvirtHypervisor(realvirt_host.uri)
    try:
        name, xml = domain_xml(production, owner_session(realvirt_host), OVMF_2M, "locked")
        assert "<locked />" in xml or "<locked/>" in xml
        production.define(xml)
        if _has_cap_sys_resource():
            production.start_paused(name, _firmware())  # a host that can lock memory starts it
        else:
            conn = libvirt.open(realvirt_host.uri)
            try:
                with pytest.raises(libvirt.libvirtError) as raw:
                    conn.lookupByName(name).createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
                assert raw.value.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR
            finally:
                conn.close()
            with pytest.raises(FailedPrecondition) as typed:
                production.start_paused(name, _firmware())
            assert typed.value.reason == "locked_memory_refused"
        production.destroy(name)
    finally:
        production.close()


def test_a_qemu_without_sev_is_named_sev_unsupported(
    realvirt_host: RealvirtHost, hv: LibvirtHypervisor
) -> None:
    """The real QEMU binary, probed by libvirt directly (no stand-in), answers query-sev-capabilities
    "SEV is not enabled in KVM": libvirt refuses the domain with VIR_ERR_CONFIG_UNSUPPORTED."""
    _name, xml = domain_xml(hv, owner_session(realvirt_host), OVMF_2M, "nosev")
    real_qemu = realvirt_host.config.qemu
    xml = xml.replace("<devices>", f"<devices><emulator>{real_qemu}</emulator>", 1)
    conn = libvirt.open(realvirt_host.uri)
    try:
        with pytest.raises(libvirt.libvirtError) as raw:
            conn.defineXML(xml)
        assert raw.value.get_error_code() == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
    finally:
        conn.close()
    with pytest.raises(FailedPrecondition) as typed:
        hv.define(xml)
    assert typed.value.reason == "sev_unsupported"


def test_a_session_for_another_chip_is_refused_at_launch_start(
    realvirt_host: RealvirtHost, hv: LibvirtHypervisor, tmp_path: Path, emulated_root: EmulatedRoot
) -> None:
    """A GODH and session made for another chip's PDH: the firmware refuses LAUNCH_START, QEMU exits,
    libvirt says VIR_ERR_INTERNAL_ERROR with QEMU's fw_error; the backend names the firmware status."""
    from sevlaunch.firmware import EmulatedFirmware

    other = EmulatedFirmware(tmp_path / "other-chip", root=emulated_root)  # another chip, same AMD root
    chain = CertificateChain.from_full_bytes(other.full_chain())
    verified = verify_chain(chain, extra_roots=[load_roots_file(other.ask_ark(), "emulated")])
    session = create_session(verified.chain.pdh, POLICY)
    guests_before = realvirt_host.chip.platform_status().guest_count
    name, xml = domain_xml(hv, session, OVMF_2M, "foreign")
    hv.define(xml)
    # What the chip says to this session when asked directly (it creates no guest on a refusal).
    with pytest.raises(FirmwareError) as direct:
        realvirt_host.chip.launch_start(session.godh.to_bytes(), session.blob.to_bytes(), POLICY)
    with pytest.raises(FailedPrecondition) as typed:
        hv.start_paused(name, _firmware())
    assert isinstance(direct.value.status, StatusCode)
    assert typed.value.reason == f"firmware_{direct.value.status.name.lower()}"
    assert typed.value.metadata["firmware_status"] == direct.value.status.name
    assert realvirt_host.chip.platform_status().guest_count == guests_before
    hv.destroy(name)


def test_the_4m_ovmf_qemu_refused_as_bios_launches_from_pflash(
    realvirt_host: RealvirtHost, hv: LibvirtHypervisor
) -> None:
    """Debian's 4 MiB OVMF (3.5 MiB - 16 KiB) is not whole 64 KiB blocks: as `-bios` (`<loader
    type='rom'>`, what the launcher used to write) real QEMU refuses it, VIR_ERR_INTERNAL_ERROR "could
    not load PC BIOS", named firmware_not_loadable, and the launch context QEMU's SEV part had opened is
    gone again. On read-only, stateless pflash (the launcher's choice for a split code image) the same
    image starts paused, measures to the owner's digest and boots to OVMF's shell."""
    guests_before = realvirt_host.chip.platform_status().guest_count
    session = owner_session(realvirt_host)
    name, xml = domain_xml(hv, session, OVMF_4M, "ovmf4m-rom", loader=LoaderType.ROM)
    hv.define(xml)
    conn = libvirt.open(realvirt_host.uri)
    try:
        with pytest.raises(libvirt.libvirtError) as raw:
            conn.lookupByName(name).createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        assert raw.value.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR
        assert "could not load PC BIOS" in str(raw.value)
    finally:
        conn.close()
    with pytest.raises(FailedPrecondition) as typed:
        hv.start_paused(name, _firmware(OVMF_4M))
    assert typed.value.reason == "firmware_not_loadable"
    assert realvirt_host.chip.platform_status().guest_count == guests_before
    hv.destroy(name)

    assert choose_loader(OVMF_4M.read_bytes(), Technology.SEV) is LoaderType.PFLASH
    name, xml = domain_xml(hv, session, OVMF_4M, "ovmf4m")
    hv.define(xml)
    hv.start_paused(name, _firmware(OVMF_4M))
    info = hv.launch_security_info(name)
    expected = launch_digest(OVMF_4M.read_bytes(), mode="sev")
    assert (
        verify_measurement(
            session.keys.tik,
            LaunchMeasurement.from_bytes(info.measurement),
            api_major=info.api_major,
            api_minor=info.api_minor,
            build_id=info.build_id,
            policy=info.policy,
            launch_digests=[expected],
        )
        == expected
    )
    conn = libvirt.open(realvirt_host.uri)
    try:
        live = ET.fromstring(conn.lookupByName(name).XMLDesc(0))
    finally:
        conn.close()
    # libvirt kept the loader as written and added no NVRAM store of its own.
    loader = live.find("os/loader")
    assert loader is not None and loader.text == str(OVMF_4M)
    assert (loader.get("type"), loader.get("readonly"), loader.get("stateless")) == ("pflash", "yes", "yes")
    assert live.find("os/nvram") is None
    hv.resume(name)
    realvirt_host.wait_serial(name, SHELL_BANNER)
    assert hv.destroy(name) is True
    assert realvirt_host.chip.platform_status().guest_count == guests_before


def test_sev_es_needs_a_cpu_model_this_tcg_host_cannot_run(
    realvirt_host: RealvirtHost, hv: LibvirtHypervisor
) -> None:
    """SEV-ES measures the VMSA of a pinned CPU model (EPYC-v4 → libvirt's EPYC). The stand-in's QEMU
    runs TCG, whose CPU lacks EPYC's features: the real libvirt lists EPYC usable='no' and the launcher
    refuses before defining anything (on an SEV-ES host libvirt lists it usable)."""
    name, xml = domain_xml(
        hv,
        owner_session(realvirt_host),
        OVMF_2M,
        "es",
        mode=Technology.SEV_ES,
        policy=POLICY | PolicyFlags.ES,
        vcpu_type="EPYC-v4",
    )
    with pytest.raises(FailedPrecondition) as typed:
        hv.define(xml)
    assert typed.value.reason == "unsupported_vcpu_type"
    assert "EPYC" in typed.value.detail
    assert name not in {d.name for d in hv.list_domains()}


def test_calls_in_the_wrong_domain_state_are_named(
    realvirt_host: RealvirtHost, hv: LibvirtHypervisor
) -> None:
    """What libvirt and QEMU answer to calls out of the launch's order, and the reason each becomes."""
    name, xml = domain_xml(hv, owner_session(realvirt_host), OVMF_2M, "order")
    hv.define(xml)
    conn = libvirt.open(realvirt_host.uri)
    dom = conn.lookupByName(name)
    secret = {
        libvirt.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_HEADER: base64.b64encode(bytes(52)).decode(),
        libvirt.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET: base64.b64encode(bytes(32)).decode(),
        libvirt.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_SET_ADDRESS: SECRET_GPA,
    }

    def refused(
        raw_call: Callable[[], object], typed_call: Callable[[], object], code: int, reason: str
    ) -> None:
        with pytest.raises(libvirt.libvirtError) as raw:
            raw_call()
        assert raw.value.get_error_code() == code
        with pytest.raises(FailedPrecondition) as typed:
            typed_call()
        assert typed.value.reason == reason

    try:
        not_running = libvirt.VIR_ERR_OPERATION_INVALID
        refused(lambda: dom.launchSecurityInfo(0), lambda: hv.launch_security_info(name), not_running,
                "domain_not_running")  # fmt: skip
        refused(dom.resume, lambda: hv.resume(name), not_running, "domain_not_running")
        hv.start_paused(name, _firmware())
        hv.resume(name)  # LAUNCH_FINISH without a secret: allowed (a launch_without_secret guest)
        refused(lambda: dom.launchSecurityInfo(0), lambda: hv.launch_security_info(name),
                libvirt.VIR_ERR_INTERNAL_ERROR, "measurement_unavailable")  # fmt: skip
        refused(lambda: dom.setLaunchSecurityState(secret, 0),
                lambda: hv.inject_secret(name, bytes(52), bytes(32), _area()),
                libvirt.VIR_ERR_OPERATION_INVALID, "domain_not_paused")  # fmt: skip
        refused(
            dom.resume, lambda: hv.resume(name), libvirt.VIR_ERR_OPERATION_INVALID, "domain_already_running"
        )
    finally:
        conn.close()
        hv.destroy(name)
