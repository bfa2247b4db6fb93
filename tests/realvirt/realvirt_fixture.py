"""Shared pieces of the real-virtualisation suite (`-m realvirt`): a private libvirtd and virtlogd,
real QEMU under TCG behind the SEV stand-in, and the emulated firmware that plays the PSP.

The session starts one daemon pair (`sevlaunch.realvirt.daemon`) in its own mount namespace and stops
it at the end; it installs nothing. Tests are skipped, with the reason, only when a binary is missing
(`./run` installs the packages) or when not root (a root libvirtd and a mount namespace need root).
The stand-in reads its configuration at every QEMU start, so a test can point it at another chip
(`RealvirtHost.use_chip`) without libvirt re-probing the binary.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from launcher_svc.adapters.libvirt_backend import LibvirtHypervisor
from launcher_svc.core.domain_xml import SevLaunchParams, build_domain_xml, domain_name_for
from launcher_svc.core.loader import LoaderType, choose_loader
from launcher_svc.core.spec import PathPolicy, create_spec
from sevlaunch.firmware import EmulatedFirmware
from sevlaunch.realvirt.daemon import PrivateLibvirt, missing_binaries
from sevlaunch.realvirt.standin import StandinConfig
from sevlaunch.sev.chain import CertificateChain, load_roots_file, verify_chain
from sevlaunch.sev.session import LaunchSession, create_session
from sevlaunch.sev.technology import Technology

#: Debian's split OVMF code images: both go on read-only pflash (`launcher_svc.core.loader`). The 4 MiB
#: one (3.5 MiB minus 16 KiB) is the demo's default; as `-bios` QEMU would refuse it.
OVMF_2M = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_4M = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
CBITPOS = 51
REDUCED_PHYS_BITS = 1


def skip_reason() -> str | None:
    missing = missing_binaries()
    if missing:
        return "real libvirt/QEMU not installed: " + ", ".join(missing)
    if os.geteuid() != 0:
        return "a private root libvirtd in a mount namespace needs root"
    for image in (OVMF_2M, OVMF_4M):
        if not image.is_file():
            return f"no {image} (Debian package ovmf)"
    return None


@dataclass
class RealvirtHost:
    daemon: PrivateLibvirt
    config_path: Path
    config: StandinConfig
    chip: EmulatedFirmware

    @property
    def uri(self) -> str:
        return self.daemon.uri

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    def use_chip(self, chip_dir: Path) -> EmulatedFirmware:
        """Points the stand-in's launches at another emulated chip (the one a demo's platform_svc serves).
        libvirt's probe answers (its domain capabilities' PDH and chip id) stay the session chip's."""
        self.config = StandinConfig(**{**self.config.__dict__, "chip_dir": str(chip_dir)})
        self.config_path.write_text(self.config.to_json())
        self.chip = EmulatedFirmware(chip_dir, create=False)
        return self.chip

    def serial_log(self, domain: str) -> Path:
        return self.run_dir / f"{domain}.serial.log"

    def wait_serial(self, domain: str, text: bytes, timeout: float = 90.0) -> float:
        """Seconds until `text` shows on the guest's serial console; fails with the log's tail."""
        start = time.monotonic()
        path = self.serial_log(domain)
        while time.monotonic() - start < timeout:
            if path.exists() and text in path.read_bytes():
                return time.monotonic() - start
            time.sleep(0.05)
        tail = path.read_bytes()[-400:] if path.exists() else b"(no serial log)"
        raise AssertionError(f"{text!r} not on {domain}'s console after {timeout}s: {tail!r}")


POLICY = 0x0003  # NODBG | NOKS
#: Debian's OVMF declares no secret area; the demo's address (sevlaunch.demo.env.SECRET_GPA).
SECRET_GPA = 0x80C000
#: What OVMF prints once its UEFI shell runs (the boot manager falls through to it: no disks).
SHELL_BANNER = b"UEFI Interactive Shell"


def owner_session(host: RealvirtHost) -> LaunchSession:
    chain = CertificateChain.from_full_bytes(host.chip.full_chain())
    verified = verify_chain(chain, extra_roots=[load_roots_file(host.chip.ask_ark(), "emulated")])
    return create_session(verified.chain.pdh, POLICY)


def domain_xml(
    hv: LibvirtHypervisor,
    session: LaunchSession,
    firmware: Path,
    guest: str,
    *,
    mode: Technology = Technology.SEV,
    policy: int = POLICY,
    vcpu_type: str | None = None,
    loader: LoaderType | None = None,
) -> tuple[str, str]:
    """The launcher's own domain XML for one guest (256 MiB, one vCPU); the loader is the one the
    launcher's preflight chooses for the image unless `loader` forces another."""
    caps = hv.sev_capabilities()
    spec = create_spec(
        name=guest,
        memory_mib=256,
        vcpus=1,
        firmware_path=str(firmware),
        mode=mode,
        policy=policy,
        paths=PathPolicy((str(firmware.parent),)),
        vcpu_type=vcpu_type,
    )
    launch_id = uuid.uuid4().hex
    name = domain_name_for(launch_id, guest)
    sev = SevLaunchParams(
        caps.cbitpos, caps.reduced_phys_bits, policy, session.godh.to_bytes(), session.blob.to_bytes()
    )
    if loader is None:
        loader = choose_loader(firmware.read_bytes(), mode)
    return name, build_domain_xml(spec, launch_id=launch_id, domain_name=name, sev=sev, loader=loader)
