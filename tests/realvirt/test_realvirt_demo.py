"""The SEV demo's two launches through the three services, a real libvirtd and real QEMU (TCG).

The demo's own wiring (`sevlaunch.demo.DemoEnvironment`: dev certificates, emulated chip and KDS, signed
reference values, owner, platform and launcher processes over mTLS) with the launcher on
`--hypervisor libvirt` at the private daemon; the stand-in plays QEMU's SEV part on the demo's chip.
Checked apart from what the services report: libvirt's own view of the domains, the guest's serial
console (OVMF's shell), the secret table in the running guest's RAM (libvirt memoryPeek) against what
the chip decrypted, and the chip's guest contexts.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from realvirt_fixture import OVMF_2M, RealvirtHost

from sevlaunch.demo import DemoEnvironment
from sevlaunch.demo.env import DEFAULT_FIRMWARE, SECRET_GPA
from sevlaunch.sev.secret import DISK_PASSPHRASE_GUID, SecretTable

pytestmark = pytest.mark.realvirt

SHELL_BANNER = b"UEFI Interactive Shell"


@pytest.mark.parametrize("firmware", [DEFAULT_FIRMWARE, OVMF_2M], ids=["demo-default-4M", "OVMF_CODE_2M"])
def test_demo_attested_and_tampered_launches_on_real_libvirt(
    realvirt_host: RealvirtHost, tmp_path: Path, firmware: Path
) -> None:
    """Debian's OVMF_CODE_4M.fd, the demo's default, and the 2 MiB image: each a split code image the
    launcher puts on read-only, stateless pflash; the live domain shows that loader."""
    env = DemoEnvironment(
        firmware=firmware,
        workdir=tmp_path / "demo",
        hypervisor_args=[
            "--hypervisor", "libvirt",
            "--libvirt-uri", realvirt_host.uri,
            "--test-host-unlocked-memory",
            "--test-host-asids", "16:16",
        ],
    )  # fmt: skip
    conn = libvirt.open(realvirt_host.uri)
    session_chip = realvirt_host.chip.state_dir
    try:
        env.prepare()
        chip = realvirt_host.use_chip(env.chip_dir)
        env.start()
        env.configure_owner()

        attested = env.launch("attested", env.firmware)
        assert attested.outcome == "running", (attested.phase, attested.reason, attested.detail)
        assert attested.matched_digest == env.reference_digest.hex()
        assert attested.manifest_id == env.manifest_id
        assert attested.guests_after == attested.guests_before + 1
        dom = conn.lookupByName(attested.domain_name)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        loader = ET.fromstring(dom.XMLDesc(0)).find("os/loader")
        assert loader is not None and (loader.text, loader.get("type")) == (str(firmware), "pflash")
        realvirt_host.wait_serial(attested.domain_name, SHELL_BANNER)
        # The secret the owner released is in the running guest's RAM, read through libvirt and QEMU,
        # and is what the chip decrypted for this launch.
        handle = json.loads((realvirt_host.run_dir / f"{attested.domain_name}.json").read_text())["handle"]
        header = chip.read_guest_memory(handle, SECRET_GPA, 20)
        padded = (int.from_bytes(header[16:20], "little") + 15) // 16 * 16
        decrypted = chip.read_guest_memory(handle, SECRET_GPA, padded)
        table = SecretTable.from_bytes(decrypted)
        assert table.get(DISK_PASSPHRASE_GUID)
        in_guest = dom.memoryPeek(SECRET_GPA, padded, libvirt.VIR_MEMORY_PHYSICAL)
        assert in_guest == decrypted

        tampered = env.launch("tampered", env.tampered_firmware)
        assert (tampered.outcome, tampered.phase, tampered.reason) == (
            "refused",
            "SECRET_RELEASED",
            "measurement_mismatch",
        ), tampered.detail
        assert tampered.launcher_state == "FAILED"
        # Measured by the chip through the real QEMU path, and differently from the attested launch.
        assert tampered.measurement is not None and attested.measurement is not None
        assert tampered.measurement[:64] != attested.measurement[:64]
        assert tampered.matched_digest is None
        assert tampered.guests_after == tampered.guests_before
        with pytest.raises(libvirt.libvirtError) as gone:
            conn.lookupByName(tampered.domain_name)
        assert gone.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN

        env.destroy(attested.launch_id)
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(attested.domain_name)
        assert env.guest_count() == attested.guests_before
    finally:
        conn.close()
        env.close()
        realvirt_host.use_chip(session_chip)
