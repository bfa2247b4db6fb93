"""SEV-SNP launches on the emulated hypervisor: the launcher core drives the emulated firmware's
SNP_LAUNCH_START/UPDATE/FINISH with the owner's ID block, ID auth and HOST_DATA, over Debian's real
2 MiB OVMF (which has SEV metadata). The owner here is a test double that knows the launch digest from
the offline computation (its "reference value") and attests the guest through the guest-request
channel the emulated hypervisor gives each running SNP guest."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fakes.snp import SNP_POLICY, FakeSnpPlatform, authorization

from launcher_svc.adapters.emulated import EmulatedHypervisor
from launcher_svc.adapters.sqlite_store import LaunchStore
from launcher_svc.core.launcher import Launcher, LauncherConfig
from launcher_svc.core.ports import (
    AttestationState,
    AttestationVerdict,
    OwnerSession,
    ReleasedSecret,
    SnpAuthorization,
    SnpLaunchConfig,
    SnpPlatformEvidence,
)
from launcher_svc.core.spec import GuestSpec
from launcher_svc.core.state import LaunchRecord, Phase
from sevlaunch.firmware import EmulatedFirmware
from sevlaunch.sev.kernel_hashes import KernelHashes
from sevlaunch.sev.technology import Technology
from sevlaunch.sev.vmsa import vcpu_signature
from sevlaunch.snp.idblock import IdAuth
from sevlaunch.snp.launch_digest import launch_digest
from sevlaunch.snp.report import AttestationReport

OVMF_2M = Path("/usr/share/OVMF/OVMF_CODE.fd")
# The last 4 KiB of an AmdSevX64 build: SEV metadata with an SNP_KERNEL_HASHES page.
AMDSEV = Path(__file__).resolve().parents[1] / "vectors" / "snp" / "measurement" / "ovmf_AmdSev_suffix.bin"
VCPU_TYPE = "EPYC-Genoa"
REPORT_DATA = bytes(range(64))


def _genuine() -> bytes:
    if not OVMF_2M.is_file():
        pytest.fail(f"{OVMF_2M} is missing: install Debian's ovmf package (./run does)")
    return OVMF_2M.read_bytes()


def _expected_digest(vcpus: int) -> bytes:
    """The owner's reference value: computed offline from the genuine image, not from what the host loads."""
    return bytes(launch_digest(_genuine(), vcpus=vcpus, vcpu_sig=vcpu_signature(VCPU_TYPE)))


@dataclass
class AttestingOwner:
    """Authorises with `auth`; when asked for the verdict, attests the guest through its channel: a report
    whose MEASUREMENT, HOST_DATA and ID key digest are the authorised ones is RELEASED."""

    auth: SnpAuthorization
    hv: EmulatedHypervisor | None = None
    domain: str = ""
    reports: list[AttestationReport] = field(default_factory=list)
    configs: list[SnpLaunchConfig] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)

    async def open_session(self, endpoint: str, **kwargs: Any) -> OwnerSession:
        raise AssertionError("no SEV session in an SNP launch")

    async def release_secret(self, endpoint: str, **kwargs: Any) -> ReleasedSecret:
        raise AssertionError("no secret through the launcher in an SNP launch")

    async def authorize_snp_launch(
        self, endpoint: str, *, workload_id: str, platform: SnpPlatformEvidence, config: SnpLaunchConfig
    ) -> SnpAuthorization:
        self.configs.append(config)
        return self.auth

    async def snp_attestation(self, endpoint: str, *, authorization_id: str) -> AttestationVerdict:
        assert self.hv is not None and authorization_id == self.auth.authorization_id
        channel = self.hv.snp_guest(self.domain)
        assert channel.init_data == self.auth.init_data  # what the guest reads hashes to HOST_DATA
        report = AttestationReport.from_bytes(channel.source.get_report(REPORT_DATA, 0).report)
        self.reports.append(report)
        block_digest = self.auth.id_block[:48]
        if (
            report.measurement == block_digest
            and report.host_data == self.auth.host_data
            and report.id_key_digest == IdAuth.from_bytes(self.auth.id_auth).id_key_digest
            and report.report_data == REPORT_DATA
        ):
            return AttestationVerdict(AttestationState.RELEASED)
        return AttestationVerdict(
            AttestationState.REFUSED, "measurement_mismatch", "not the authorised guest"
        )

    async def revoke_snp_authorization(self, endpoint: str, *, authorization_id: str) -> None:
        self.revoked.append(authorization_id)

    async def close(self) -> None:
        pass


@pytest.fixture
def chip(tmp_path: Path, emulated_root: Any, emulated_snp_root: Any) -> EmulatedFirmware:
    return EmulatedFirmware(tmp_path / "chip", root=emulated_root, snp_root=emulated_snp_root)


def _launch(
    tmp_path: Path,
    chip: EmulatedFirmware,
    image: Path,
    vcpus: int = 2,
    digest: bytes | None = None,
    **spec_kw: Any,
) -> tuple[LaunchRecord, list[Any], EmulatedHypervisor, AttestingOwner]:
    hv = EmulatedHypervisor(chip, tmp_path / "domains")
    owner = AttestingOwner(authorization(digest or _expected_digest(vcpus)), hv=hv)
    core = Launcher(
        hypervisor=hv,
        store=LaunchStore(str(tmp_path / "launcher.db")),
        platform=FakeSnpPlatform(),
        owners=owner,
        config=LauncherConfig(reconcile_interval=0, attestation_poll=0.01),
    )
    spec = GuestSpec(
        name="snp",
        memory_mib=512,
        vcpus=vcpus,
        firmware_path=str(image),
        mode=Technology.SEV_SNP,
        policy=SNP_POLICY,
        vcpu_type=VCPU_TYPE,
        **spec_kw,
    )

    async def main() -> tuple[LaunchRecord, list[Any]]:
        await core.start()
        try:
            rec, events = await core.launch(spec, owner_endpoint="o:1", workload_id="w", requested_by="c")
            owner.domain = rec.domain_name
            seen = [e async for e in events]
            return core.store.get(rec.launch_id), seen
        finally:
            await core.stop()

    rec, events = asyncio.run(main())
    return rec, events, hv, owner


def test_an_snp_launch_of_debians_ovmf_runs_with_the_offline_digest(
    tmp_path: Path, chip: EmulatedFirmware
) -> None:
    rec, events, hv, owner = _launch(tmp_path, chip, OVMF_2M)
    assert [e.phase for e in events] == [
        Phase.CHAIN_FETCHED,
        Phase.AUTHORIZED,
        Phase.DEFINED,
        Phase.STARTED,
        Phase.RUNNING,
    ], events[-1]
    assert rec.state is Phase.RUNNING and rec.attested
    # The firmware's digest, replayed page by page from the launch plan, is the offline one.
    assert hv.snp_launch_digest(rec.domain_name) == _expected_digest(2)
    (report,) = owner.reports
    assert report.measurement == _expected_digest(2)
    assert report.host_data == hashlib.sha256(owner.auth.init_data).digest()
    assert report.policy == SNP_POLICY and report.family_id == b"F" * 16 and report.author_key_en
    (info,) = hv.list_domains()
    assert (info.snp, info.sev, info.sev_es, info.state.value) == (True, True, True, "running")
    # The guest keeps attesting after RUNNING; destroying it frees its firmware guest context.
    assert hv.snp_guest(rec.domain_name).source.get_report(REPORT_DATA, 0).report
    assert chip.snp_guest_handles() != []
    assert hv.destroy(rec.domain_name)
    assert chip.snp_guest_handles() == [] and hv.list_domains() == []


def test_a_tampered_image_is_refused_at_snp_launch_finish_and_destroyed(
    tmp_path: Path, chip: EmulatedFirmware
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    tampered = images / "OVMF_CODE.fd"
    data = bytearray(_genuine())
    data[0x10000] ^= 0xFF  # in the firmware volume, far from the metadata and the reset vector
    tampered.write_bytes(bytes(data))

    rec, events, hv, owner = _launch(tmp_path, chip, tampered)
    failed = events[-1]
    assert [e.phase for e in events[:-1]] == [Phase.CHAIN_FETCHED, Phase.AUTHORIZED, Phase.DEFINED]
    assert (failed.phase, failed.failed_phase, failed.reason) == (
        Phase.FAILED,
        Phase.STARTED,
        "snp_launch_refused",
    )
    assert "SNP_LAUNCH_FINISH" in failed.detail and "BAD_MEASUREMENT" in failed.detail
    assert (rec.state, rec.reason) == (Phase.FAILED, "snp_launch_refused")
    assert owner.reports == []  # never ran, never attested
    assert hv.list_domains() == [] and chip.snp_guest_handles() == []
    assert list((tmp_path / "domains").glob("*.json")) == []


def test_an_snp_domain_survives_a_backend_restart_as_an_snp_domain(
    tmp_path: Path, chip: EmulatedFirmware
) -> None:
    rec, _events, hv, _owner = _launch(tmp_path, chip, OVMF_2M, vcpus=1)
    hv.close()
    again = EmulatedHypervisor(chip, tmp_path / "domains")
    try:
        (info,) = again.list_domains()
        assert (info.name, info.snp, info.sev_es, info.launch_id) == (
            rec.domain_name,
            True,
            True,
            rec.launch_id,
        )
        assert again.snp_launch_digest(rec.domain_name) == _expected_digest(1)
        assert again.destroy(rec.domain_name)
        assert chip.snp_guest_handles() == []
    finally:
        again.close()


def test_a_kernel_boot_is_measured_through_the_kernel_hashes_page(
    tmp_path: Path, chip: EmulatedFirmware
) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"\x7fkernel" * 5000)
    initrd.write_bytes(b"initrd" * 3000)
    cmdline = "console=ttyS0 root=/dev/vda1"
    # QEMU loads SNP firmware as `-bios`, in whole 64 KiB blocks: the 4 KiB suffix below erased flash
    # (0xff), where the SEV metadata, found from the image's end, stays valid.
    padded = tmp_path / "OVMF-AmdSev.fd"
    padded.write_bytes(b"\xff" * (60 << 10) + AMDSEV.read_bytes())
    image = padded.read_bytes()
    digest = bytes(
        launch_digest(
            image,
            vcpus=1,
            vcpu_sig=vcpu_signature(VCPU_TYPE),
            kernel=kernel.read_bytes(),
            initrd=initrd.read_bytes(),
            cmdline=cmdline,
        )
    )
    assert digest != bytes(launch_digest(image, vcpus=1, vcpu_sig=vcpu_signature(VCPU_TYPE)))
    rec, events, hv, owner = _launch(
        tmp_path,
        chip,
        padded,
        vcpus=1,
        digest=digest,
        kernel_path=str(kernel),
        initrd_path=str(initrd),
        cmdline=cmdline,
    )
    assert rec.state is Phase.RUNNING, events[-1]
    (config,) = owner.configs
    assert config.kernel_hashes == KernelHashes.compute(kernel.read_bytes(), initrd.read_bytes(), cmdline)
    assert hv.snp_launch_digest(rec.domain_name) == digest == owner.reports[0].measurement
    assert hv.destroy(rec.domain_name)
