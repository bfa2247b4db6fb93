"""libvirt's own `virt-qemu-sev-validate` (Debian libvirt-clients-qemu) on our launches.

An implementation of the owner's check that shares no code with sevlaunch: it reads the measurement
through the same libvirtd (launchSecurityInfo), computes the launch digest of the firmware it is given
and checks the measurement's HMAC with the TIK. It must agree with the owner: the attested launch's
measurement is good, the tampered firmware's is not (given the reference image, as an owner would).
It runs under Debian's python3 (it needs python3-libvirt and python3-lxml), not the test's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from realvirt_fixture import OVMF_2M, OVMF_4M, RealvirtHost, domain_xml, owner_session

from launcher_svc.adapters.libvirt_backend import LibvirtHypervisor
from launcher_svc.core.preflight import read_firmware
from sevlaunch.sev.digest import launch_digest
from sevlaunch.sev.measurement import LaunchMeasurement, verify_measurement
from sevlaunch.sev.session import LaunchSession

pytestmark = pytest.mark.realvirt

VALIDATE = Path("/usr/bin/virt-qemu-sev-validate")
SYSTEM_PYTHON = "/usr/bin/python3"


def _tool_missing() -> str | None:
    if not VALIDATE.is_file():
        return "virt-qemu-sev-validate not installed (Debian package libvirt-clients-qemu)"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import libvirt, lxml, cryptography"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return "virt-qemu-sev-validate needs python3-libvirt, python3-lxml and python3-cryptography"
    return None


def validate(
    host: RealvirtHost, domain: str, session: LaunchSession, tmp_path: Path, reference: Path
) -> subprocess.CompletedProcess[str]:
    tik, tek = tmp_path / f"{domain}.tik", tmp_path / f"{domain}.tek"
    for path, key in ((tik, session.keys.tik), (tek, session.keys.tek)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
    return subprocess.run(
        [
            SYSTEM_PYTHON, str(VALIDATE),
            "--connect", host.uri,
            "--domain", domain,
            "--tik", str(tik),
            "--tek", str(tek),
            # The reference image the owner trusts, not the path the domain XML names.
            "--firmware", str(reference),
            # It runs on the hypervisor host itself, which the tool rightly calls insecure.
            "--insecure",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
    )  # fmt: skip


def owner_accepts(hv: LibvirtHypervisor, name: str, session: LaunchSession, reference: Path) -> bool:
    info = hv.launch_security_info(name)
    try:
        verify_measurement(
            session.keys.tik,
            LaunchMeasurement.from_bytes(info.measurement),
            api_major=info.api_major,
            api_minor=info.api_minor,
            build_id=info.build_id,
            policy=info.policy,
            launch_digests=[launch_digest(reference.read_bytes(), mode="sev")],
        )
    except Exception:
        return False
    return True


@pytest.mark.parametrize("reference", [OVMF_4M, OVMF_2M], ids=["OVMF_CODE_4M", "OVMF_CODE_2M"])
def test_libvirts_validator_agrees_with_the_owner(
    realvirt_host: RealvirtHost, hv: LibvirtHypervisor, tmp_path: Path, reference: Path
) -> None:
    """Both images launch on read-only pflash; libvirt's tool measures the reference image as QEMU's
    pflash unit 0 and agrees with the owner's digest, for the genuine and the tampered launch."""
    reason = _tool_missing()
    if reason is not None:
        pytest.skip(reason)
    image = bytearray(reference.read_bytes())
    image[len(image) // 2] ^= 0x01
    tampered = tmp_path / f"{reference.stem}-tampered.fd"
    tampered.write_bytes(bytes(image))

    results = {}
    for guest, firmware in (("validated", reference), ("tamperedv", tampered)):
        session = owner_session(realvirt_host)
        name, xml = domain_xml(hv, session, firmware, guest)
        assert 'type="pflash"' in xml
        hv.define(xml)
        hv.start_paused(name, read_firmware(str(firmware)))
        tool = validate(realvirt_host, name, session, tmp_path, reference)
        results[guest] = (tool, owner_accepts(hv, name, session, reference))
        hv.destroy(name)

    good, owner_good = results["validated"]
    assert good.returncode == 0, good.stderr
    assert "OK: Looks good to me" in good.stdout
    assert owner_good is True
    bad, owner_bad = results["tamperedv"]
    assert bad.returncode != 0
    assert "Measurement does not match" in bad.stdout + bad.stderr
    assert owner_bad is False
