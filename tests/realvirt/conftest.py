"""The real-virtualisation suite (`-m realvirt`): one private libvirtd + virtlogd for the session.

See realvirt_fixture.py for what runs and when the suite is skipped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import libvirt
import pytest
from realvirt_fixture import CBITPOS, REDUCED_PHYS_BITS, RealvirtHost, skip_reason

from launcher_svc.adapters.libvirt_backend import LibvirtHypervisor
from sevlaunch.firmware import EmulatedFirmware, EmulatedRoot
from sevlaunch.realvirt.daemon import PrivateLibvirt
from sevlaunch.realvirt.standin import StandinConfig, write_wrapper


@pytest.fixture(scope="session")
def realvirt_host(
    tmp_path_factory: pytest.TempPathFactory, emulated_root: EmulatedRoot
) -> Iterator[RealvirtHost]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("realvirt")
    chip_dir = base / "chip"
    chip = EmulatedFirmware(chip_dir, root=emulated_root)
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    config = StandinConfig(
        qemu=os.path.realpath(qemu),
        chip_dir=str(chip_dir),
        run_dir=str(base / "standin"),
        cbitpos=CBITPOS,
        reduced_phys_bits=REDUCED_PHYS_BITS,
    )
    config_path = base / "standin.json"
    config_path.write_text(config.to_json())
    write_wrapper(base / "bin", config_path)
    daemon = PrivateLibvirt(base / "libvirt", emulator_dir=base / "bin").start()
    try:
        # libvirt probes the stand-in once and keeps what it answered (PDH, chip id) for the session:
        # probe now, while the stand-in serves the session's chip.
        conn = libvirt.open(daemon.uri)
        try:
            conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
        finally:
            conn.close()
        yield RealvirtHost(daemon=daemon, config_path=config_path, config=config, chip=chip)
    finally:
        daemon.stop()


@pytest.fixture
def hv(realvirt_host: RealvirtHost) -> Iterator[LibvirtHypervisor]:
    # This host lacks CAP_SYS_RESOURCE, so QEMU cannot lock guest memory (see the locked-memory test).
    backend = LibvirtHypervisor(realvirt_host.uri, lock_memory=False)
    yield backend
    for dom in backend.list_domains():
        backend.destroy(dom.name)
    backend.close()
