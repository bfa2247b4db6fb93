"""A complete attested launch driven directly against the emulated firmware with the protocol library.

Owner and firmware each do their part with real bytes: the owner verifies the exported chain against
the emulated root, makes a session for the PDH, checks the measurement against the launch digest it
computes from Debian's OVMF, and packages a secret table; the firmware plays QEMU's LAUNCH_* sequence.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sevlaunch.firmware import EmulatedFirmware, EmulatedRoot, FirmwareError, PlatformState, StatusCode
from sevlaunch.sev.chain import CertificateChain, load_roots_file, verify_chain
from sevlaunch.sev.digest import launch_digest, launch_updates
from sevlaunch.sev.measurement import LaunchMeasurement, verify_measurement
from sevlaunch.sev.report import AttestationReport
from sevlaunch.sev.secret import SecretEntry, SecretTable, package_secret
from sevlaunch.sev.session import create_session
from sevlaunch.sev.vmsa import vcpu_signature

OVMF_PATH = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
# Debian's generic OVMF declares no secret area (PROTOCOL.md section 7): inject at an explicit
# address, as libvirt's sev-secret-set-address does.
SECRET_GPA = 0x80_0000

pytestmark = pytest.mark.skipif(not OVMF_PATH.exists(), reason="Debian package `ovmf` is not installed")


@pytest.fixture(scope="module")
def chip(emulated_root: EmulatedRoot, tmp_path_factory: pytest.TempPathFactory) -> EmulatedFirmware:
    return EmulatedFirmware(tmp_path_factory.mktemp("psp") / "chip", root=emulated_root)


@pytest.fixture(scope="module")
def ovmf() -> bytes:
    return OVMF_PATH.read_bytes()


def attested_launch(
    chip: EmulatedFirmware,
    ovmf: bytes,
    *,
    policy: int,
    mode: str,
    vcpus: int = 1,
    vcpu_sig: int | None = None,
) -> None:
    # Owner: trust the platform only through the emulated root it was given explicitly.
    chain = CertificateChain.from_full_bytes(chip.full_chain())
    verified = verify_chain(chain, extra_roots=[load_roots_file(chip.ask_ark(), "emulated")])
    session = create_session(verified.chain.pdh, policy)

    # Firmware (QEMU's part): LAUNCH_START, LAUNCH_UPDATE_DATA/VMSA, LAUNCH_MEASURE.
    handle = chip.launch_start(session.godh.to_bytes(), session.blob.to_bytes(), policy)
    updates = launch_updates(ovmf, mode=mode, vcpus=vcpus, vcpu_sig=vcpu_sig)  # type: ignore[arg-type]
    for update in updates:
        if update.kind == "data":
            assert update.gpa is not None
            chip.launch_update_data(handle, update.gpa, update.data)
        else:
            chip.launch_update_vmsa(handle, update.data)
    measurement = LaunchMeasurement.from_bytes(chip.launch_measure(handle))
    status = chip.platform_status()
    assert status.state is PlatformState.WORKING

    # Owner: the measurement must be explained by the digest it computes itself from the image.
    expected = launch_digest(ovmf, mode=mode, vcpus=vcpus, vcpu_sig=vcpu_sig)  # type: ignore[arg-type]
    matched = verify_measurement(
        session.keys.tik,
        measurement,
        api_major=status.api_major,
        api_minor=status.api_minor,
        build_id=status.build,
        policy=policy,
        launch_digests=[expected],
    )
    assert matched == expected
    table = SecretTable.of([SecretEntry.disk_passphrase(b"luks passphrase\0")])
    header, payload = package_secret(session.keys, measurement.measure, table.to_bytes())

    # A second line of evidence: the PEK-signed report shows the same digest in clear.
    report = AttestationReport.from_bytes(chip.attestation(handle, measurement.mnonce))
    report.verify(verified.chain.pek)
    assert report.launch_digest == expected and report.policy == policy

    # Firmware: LAUNCH_SECRET, LAUNCH_FINISH.
    chip.launch_secret(handle, header.to_bytes(), payload, SECRET_GPA)
    chip.launch_finish(handle)

    # The guest sees the secret table where it was injected, and its firmware where QEMU mapped it.
    seen = chip.read_guest_memory(handle, SECRET_GPA, len(payload))
    assert SecretTable.from_bytes(seen) == table
    first = updates[0]
    assert first.gpa is not None
    assert chip.read_guest_memory(handle, first.gpa + len(ovmf) - 4096, 4096) == ovmf[-4096:]
    with pytest.raises(FirmwareError) as exc:
        chip.launch_secret(handle, header.to_bytes(), payload, SECRET_GPA)
    assert exc.value.status is StatusCode.INVALID_GUEST_STATE
    chip.decommission(handle)


def test_sev_launch_with_debian_ovmf(chip: EmulatedFirmware, ovmf: bytes) -> None:
    attested_launch(chip, ovmf, policy=0x0003, mode="sev")
    assert chip.platform_status().guest_count == 0


def test_sev_es_launch_with_four_vcpus(chip: EmulatedFirmware, ovmf: bytes) -> None:
    attested_launch(chip, ovmf, policy=0x0007, mode="sev-es", vcpus=4, vcpu_sig=vcpu_signature("EPYC-v4"))
    assert chip.platform_status().guest_count == 0
