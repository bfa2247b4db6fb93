"""The emulated firmware's SEV-SNP launch: the digest built page by page equals the protocol core's offline
digest for every page type, the ID block is checked as the firmware does, and the guest's report verifies
with `sevlaunch.snp` only when the emulated root is trusted explicitly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.firmware.emulator import ChipConfig, EmulatedFirmware, EmulatedRoot
from sevlaunch.firmware.emulator.commands.snp_guest import (
    KEY_SEL_VCEK,
    KEY_SEL_VLEK,
    EmulatedSnpGuest,
    encode_report_request,
)
from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.guest.devsevguest import REPORT_RESP_DATA_SIZE
from sevlaunch.guest.source import GuestReportSource
from sevlaunch.sev.errors import VerificationFailed
from sevlaunch.sev.vmsa import vcpu_signature
from sevlaunch.snp.appraisal import verify_attestation
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.gctx import PAGE_SIZE, LaunchPlan, PageType
from sevlaunch.snp.idblock import IdBlock, key_digest, sign_id_block
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.launch_digest import launch_plan
from sevlaunch.snp.report import AttestationReport, SigningKey
from sevlaunch.snp.tcb import Product

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "snp" / "measurement"
DEBIAN_4M = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
DEBIAN_2M = Path("/usr/share/OVMF/OVMF_CODE.fd")
GENOA_SIG = vcpu_signature("EPYC-Genoa")
POLICY = 0x30000


def _read(path: Path) -> bytes:
    if not path.exists():
        pytest.fail(f"{path} is missing: install Debian's ovmf package (./run does)")
    return path.read_bytes()


@pytest.fixture
def chip(tmp_path: Path, emulated_root: EmulatedRoot, emulated_snp_root: EmulatedSnpRoot) -> EmulatedFirmware:
    return EmulatedFirmware(tmp_path / "chip", root=emulated_root, snp_root=emulated_snp_root)


def _pages(plan: LaunchPlan) -> Iterator[tuple[PageType, int, bytes | None]]:
    for update in plan.updates:
        for gpa, page in update.pages():
            yield update.page_type, gpa, page


def _launch(fw: EmulatedFirmware, plan: LaunchPlan, policy: int = POLICY) -> int:
    """SNP_LAUNCH_START then one SNP_LAUNCH_UPDATE per page of the core's plan, checking the firmware's
    digest against the core's PAGE_INFO chain after every page."""
    handle = fw.snp_launch_start(policy)
    infos = plan.page_infos()
    for page_type, gpa, page in _pages(plan):
        fw.snp_launch_update(handle, gpa, page_type, page)
        assert fw.snp_launch_digest(handle) == next(infos).next_digest()
    assert next(infos, None) is None
    return handle


def _vcek(fw: EmulatedFirmware) -> x509.Certificate:
    return x509.load_der_x509_certificate(fw.snp_vcek_der())


def test_a_report_verifies_only_with_the_emulated_root_trusted_explicitly(chip: EmulatedFirmware) -> None:
    plan = launch_plan(_read(DEBIAN_4M), vcpus=2, vcpu_sig=GENOA_SIG)
    handle = _launch(chip, plan)
    host_data = bytes(range(32))
    chip.snp_launch_finish(handle, host_data=host_data)
    source = EmulatedSnpGuest(chip, handle)
    assert isinstance(source, GuestReportSource)
    nonce = b"\x5a" * 64
    raw = source.get_report(nonce, 0).report

    with pytest.raises(VerificationFailed) as refused:
        verify_attestation(raw, _vcek(chip), Product.GENOA, at=datetime.now(UTC))
    assert refused.value.reason is SnpReason.WRONG_ISSUER
    # Nor does the KDS's cert chain make it trusted: its ARK is not AMD's pinned one.
    chain = x509.load_pem_x509_certificates(chip.snp_cert_chain_pem())
    with pytest.raises(VerificationFailed) as untrusted:
        verify_attestation(raw, _vcek(chip), Product.GENOA, at=datetime.now(UTC), chain=chain)
    assert untrusted.value.reason is SnpReason.UNTRUSTED_ARK

    report, vek = verify_attestation(
        raw,
        _vcek(chip),
        Product.GENOA,
        at=datetime.now(UTC),
        chain=chain,
        extra_roots=[chip.snp_trusted_root()],
    )
    assert (
        report.measurement
        == plan.digest()
        == launch_plan(_read(DEBIAN_4M), vcpus=2, vcpu_sig=GENOA_SIG).digest()
    )
    assert report.version == 3 and report.product() is Product.GENOA
    assert (report.report_data, report.host_data, report.vmpl, report.policy) == (nonce, host_data, 0, POLICY)
    assert report.chip_id == bytes(chip.get_id()) and vek.extensions.hwid == report.chip_id
    status = chip.snp_platform_status()
    assert (report.current_tcb, report.reported_tcb, report.launch_tcb) == (
        status.current_tcb,
        status.reported_tcb,
        status.current_tcb,
    )
    assert report.signing_key is SigningKey.VCEK and report.id_key_digest == bytes(48)


@pytest.mark.parametrize(
    ("firmware", "vmm", "kernel"),
    [
        pytest.param(DEBIAN_2M, "QEMU", False, id="debian-2m-qemu"),  # NORMAL, ZERO, SECRETS, CPUID, VMSA
        pytest.param(DEBIAN_2M, "GCE", False, id="debian-2m-gce"),  # UNMEASURED instead of ZERO
        pytest.param(VECTORS / "ovmf_AmdSev_suffix.bin", "QEMU", True, id="amdsev-kernel-hashes"),
    ],
)
def test_every_page_type_replays_to_the_offline_digest(
    chip: EmulatedFirmware, firmware: Path, vmm: str, kernel: bool
) -> None:
    extra = {"kernel": b"vmlinuz", "initrd": b"initrd", "cmdline": "console=ttyS0"} if kernel else {}
    sig = None if vmm == "GCE" else GENOA_SIG
    plan = launch_plan(_read(firmware), vcpus=3, vcpu_sig=sig, vmm_type=vmm, **extra)  # type: ignore[arg-type]
    kinds = {u.page_type for u in plan.updates}
    assert {PageType.NORMAL, PageType.VMSA, PageType.SECRETS, PageType.CPUID} <= kinds
    assert (PageType.UNMEASURED if vmm == "GCE" else PageType.ZERO) in kinds
    handle = _launch(chip, plan)
    chip.snp_launch_finish(handle)
    info = chip.snp_guest_info(handle)
    assert info["vmsas"] == 3 and info["pages"] == sum(u.page_count for u in plan.updates)
    report = AttestationReport.from_bytes(chip.snp_guest_report(handle, bytes(64)))
    assert report.measurement == plan.digest()


def test_a_whole_range_per_command_gives_the_same_digest(chip: EmulatedFirmware) -> None:
    plan = launch_plan(_read(DEBIAN_2M), vcpus=1, vcpu_sig=GENOA_SIG)
    handle = chip.snp_launch_start(POLICY)
    for update in plan.updates:
        chip.snp_launch_update(handle, update.gpa, update.page_type, update.data, length=update.length)
    assert chip.snp_launch_digest(handle) == plan.digest()


# -- SNP_LAUNCH_FINISH and the ID block ----------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def launched(chip: EmulatedFirmware) -> tuple[EmulatedFirmware, int, bytes]:
    plan = launch_plan(_read(DEBIAN_4M), vcpus=1, vcpu_sig=GENOA_SIG)
    handle = chip.snp_launch_start(POLICY)
    for update in plan.updates:
        chip.snp_launch_update(handle, update.gpa, update.page_type, update.data)
    return chip, handle, plan.digest()


def test_a_signed_id_block_lands_in_the_report(launched: tuple[EmulatedFirmware, int, bytes]) -> None:
    fw, handle, digest = launched
    id_key, author_key = _key(), _key()
    block = IdBlock(launch_digest=digest, family_id=b"F" * 16, image_id=b"I" * 16, guest_svn=7, policy=POLICY)
    auth = sign_id_block(block, id_key, author_key)
    fw.snp_launch_finish(handle, id_block=block.to_bytes(), id_auth=auth.to_bytes(), author_key_en=True)
    report = AttestationReport.from_bytes(fw.snp_guest_report(handle, bytes(64)))
    assert (report.family_id, report.image_id, report.guest_svn) == (b"F" * 16, b"I" * 16, 7)
    assert report.id_key_digest == key_digest(id_key) and report.author_key_digest == key_digest(author_key)
    assert report.author_key_en


def test_the_author_key_is_optional(launched: tuple[EmulatedFirmware, int, bytes]) -> None:
    fw, handle, digest = launched
    id_key = _key()
    block = IdBlock(launch_digest=digest, policy=POLICY)
    fw.snp_launch_finish(
        handle, id_block=block.to_bytes(), id_auth=sign_id_block(block, id_key, None).to_bytes()
    )
    report = AttestationReport.from_bytes(fw.snp_guest_report(handle, bytes(64)))
    assert report.id_key_digest == key_digest(id_key)
    assert report.author_key_digest == bytes(48) and not report.author_key_en


def _refused(fw: EmulatedFirmware, handle: int, **kwargs: object) -> StatusCode | int:
    with pytest.raises(FirmwareError) as err:
        fw.snp_launch_finish(handle, **kwargs)  # type: ignore[arg-type]
    assert err.value.command == "SNP_LAUNCH_FINISH"
    # A refused SNP_LAUNCH_FINISH changes nothing: the guest is still launching.
    assert fw.snp_guest_info(handle)["state"] == "LAUNCH"
    return err.value.status


def test_launch_finish_refuses_with_the_firmwares_status(
    launched: tuple[EmulatedFirmware, int, bytes],
) -> None:
    fw, handle, digest = launched
    id_key, author_key = _key(), _key()
    good = IdBlock(launch_digest=digest, policy=POLICY)
    auth = sign_id_block(good, id_key, author_key).to_bytes()

    tampered = bytearray(good.to_bytes())
    tampered[0x40] ^= 1  # IMAGE_ID: the signature no longer covers these bytes
    assert _refused(fw, handle, id_block=bytes(tampered), id_auth=auth) is StatusCode.BAD_SIGNATURE

    wrong_digest = replace(good, launch_digest=bytes(48))
    signed = sign_id_block(wrong_digest, id_key, author_key).to_bytes()
    assert (
        _refused(fw, handle, id_block=wrong_digest.to_bytes(), id_auth=signed) is StatusCode.BAD_MEASUREMENT
    )

    wrong_policy = replace(good, policy=POLICY | 1 << 19)  # DEBUG
    signed = sign_id_block(wrong_policy, id_key, author_key).to_bytes()
    assert _refused(fw, handle, id_block=wrong_policy.to_bytes(), id_auth=signed) is StatusCode.POLICY_FAILURE

    # AUTHOR_KEY_EN with an ID auth that carries no author key, or whose author did not sign the ID key.
    no_author = sign_id_block(good, id_key, None).to_bytes()
    assert (
        _refused(fw, handle, id_block=good.to_bytes(), id_auth=no_author, author_key_en=True)
        is StatusCode.BAD_SIGNATURE
    )
    forged = bytearray(auth)
    forged[0x680] ^= 1  # ID_KEY_SIG's R
    assert (
        _refused(fw, handle, id_block=good.to_bytes(), id_auth=bytes(forged), author_key_en=True)
        is StatusCode.BAD_SIGNATURE
    )
    assert _refused(fw, handle, id_block=good.to_bytes()) is StatusCode.INVALID_PARAM
    assert _refused(fw, handle, id_block=good.to_bytes()[:-1], id_auth=auth) is StatusCode.INVALID_PARAM
    assert _refused(fw, handle, host_data=bytes(31)) is StatusCode.INVALID_LENGTH

    fw.snp_launch_finish(handle, id_block=good.to_bytes(), id_auth=auth, author_key_en=True)
    assert fw.snp_guest_info(handle)["state"] == "RUNNING"
    with pytest.raises(FirmwareError) as again:
        fw.snp_launch_finish(handle)
    assert again.value.status is StatusCode.INVALID_GUEST_STATE


# -- SNP_LAUNCH_START and SNP_LAUNCH_UPDATE refusals ---------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "why"),
    [
        (0x10000, "bit 17 must be one"),
        (0x30000 | 1 << 40, "reserved bit"),
        (0x30000 | 2 << 8, "ABI 2.0 above the firmware's 1.55"),
        (0x20000, "SMT disallowed on an SMT platform"),
        (0x30000 | 1 << 22, "AES-256-XTS before Turin"),
        (0x30000 | 1 << 23, "RAPL not disabled"),
        (0x30000 | 1 << 24, "no ciphertext hiding"),
    ],
)
def test_launch_start_refuses_a_policy_the_platform_cannot_honour(
    chip: EmulatedFirmware, policy: int, why: str
) -> None:
    with pytest.raises(FirmwareError) as err:
        chip.snp_launch_start(policy)
    assert err.value.status is StatusCode.POLICY_FAILURE, why
    assert chip.snp_guest_handles() == []


def test_single_socket_smt_and_asids_follow_the_chip_configuration(
    tmp_path: Path, emulated_root: EmulatedRoot, emulated_snp_root: EmulatedSnpRoot
) -> None:
    config = ChipConfig(smt=False, sockets=2, max_es_guests=2)
    fw = EmulatedFirmware(tmp_path / "c", config=config, root=emulated_root, snp_root=emulated_snp_root)
    with pytest.raises(FirmwareError) as err:
        fw.snp_launch_start(0x20000 | 1 << 20)
    assert err.value.status is StatusCode.POLICY_FAILURE
    first, second = fw.snp_launch_start(0x20000), fw.snp_launch_start(0x30000)
    with pytest.raises(FirmwareError) as full:
        fw.snp_launch_start(0x20000)
    assert full.value.status is StatusCode.RESOURCE_LIMIT
    assert {fw.snp_guest_info(h)["asid"] for h in (first, second)} == {1, 2}
    assert fw.platform_status().guest_count == 2 and fw.snp_platform_status().guest_count == 2
    fw.snp_decommission(first)
    assert fw.snp_guest_info(fw.snp_launch_start(0x20000))["asid"] == 1


def test_launch_update_refusals(chip: EmulatedFirmware) -> None:
    handle = chip.snp_launch_start(POLICY)
    page = bytes(PAGE_SIZE)
    cases = [
        ((handle, 0x1000, PageType.NORMAL, page[:-16]), StatusCode.INVALID_LENGTH),
        ((handle, 0x1010, PageType.NORMAL, page), StatusCode.INVALID_ADDRESS),
        ((handle, 0x1000, 9, page), StatusCode.INVALID_PARAM),
        ((handle, 0x1000, PageType.NORMAL, None), StatusCode.INVALID_PARAM),
        ((handle + 100, 0x1000, PageType.NORMAL, page), StatusCode.INVALID_GUEST),
    ]
    for args, status in cases:
        with pytest.raises(FirmwareError) as err:
            chip.snp_launch_update(*args)
        assert err.value.status is status, args
    assert chip.snp_launch_digest(handle) == bytes(48)
    chip.snp_launch_finish(handle)
    with pytest.raises(FirmwareError) as late:
        chip.snp_launch_update(handle, 0x1000, PageType.NORMAL, page)
    assert late.value.status is StatusCode.INVALID_GUEST_STATE


# -- the guest request ----------------------------------------------------------------------------------


def test_guest_request_statuses(launched: tuple[EmulatedFirmware, int, bytes]) -> None:
    fw, handle, _ = launched
    with pytest.raises(FirmwareError) as early:
        fw.snp_guest_report(handle, bytes(64))
    assert early.value.status is StatusCode.INVALID_GUEST_STATE
    fw.snp_launch_finish(handle)
    response = fw.snp_guest_request(handle, encode_report_request(bytes(64), 4))
    assert len(response) == REPORT_RESP_DATA_SIZE and response[:8] == (0x16).to_bytes(4, "little") + bytes(4)
    for vmpl, key_sel, status in ((4, 0, StatusCode.INVALID_PARAM), (0, 3, StatusCode.INVALID_PARAM),
                                  (0, KEY_SEL_VLEK, StatusCode.INVALID_KEY)):  # fmt: skip
        with pytest.raises(FirmwareError) as err:
            fw.snp_guest_report(handle, bytes(64), vmpl, key_sel=key_sel)
        assert err.value.status is status
    reserved = bytearray(encode_report_request(bytes(64)))
    reserved[0x50] = 1
    assert fw.snp_guest_request(handle, bytes(reserved))[:4] == (0x16).to_bytes(4, "little")
    report = AttestationReport.from_bytes(fw.snp_guest_report(handle, b"\1" * 64, 2, key_sel=KEY_SEL_VCEK))
    assert report.vmpl == 2 and report.report_data == b"\1" * 64
    with pytest.raises(FirmwareError) as short:
        fw.snp_guest_request(handle, bytes(95))
    assert short.value.status is StatusCode.INVALID_LENGTH


def test_the_vlek_signs_reports_once_loaded(
    launched: tuple[EmulatedFirmware, int, bytes], tmp_path: Path, emulated_root: EmulatedRoot
) -> None:
    fw, handle, _ = launched
    fw.snp_launch_finish(handle)
    stick = fw.snp_vlek_hashstick("example-cloud")
    # Another chip under the same AMD roots: the stick is wrapped for `fw` alone.
    foreign = EmulatedFirmware(tmp_path / "other", root=emulated_root, snp_root=fw._snp_root)
    with pytest.raises(FirmwareError) as err:
        foreign.snp_vlek_load(stick)
    assert err.value.status is StatusCode.INVALID_KEY
    fw.snp_vlek_load(stick)
    assert fw.snp_platform_status().vlek_en
    raw = fw.snp_guest_report(handle, bytes(64))
    assert AttestationReport.from_bytes(raw).signing_key is SigningKey.VLEK
    vlek = x509.load_der_x509_certificate(fw.snp_vlek_der())
    chain = x509.load_pem_x509_certificates(fw.snp_cert_chain_pem(vlek=True))
    _, vek = verify_attestation(
        raw, vlek, Product.GENOA, at=datetime.now(UTC), chain=chain, extra_roots=[fw.snp_trusted_root()]
    )
    assert vek.extensions.csp_id == "example-cloud"
    vcek_report = fw.snp_guest_report(handle, bytes(64), key_sel=KEY_SEL_VCEK)
    verify_attestation(
        vcek_report, _vcek(fw), Product.GENOA, at=datetime.now(UTC), extra_roots=[fw.snp_trusted_root()]
    )


@pytest.mark.parametrize(("product", "version"), [(Product.TURIN, 5), (Product.MILAN, 2)])
def test_the_product_decides_report_version_and_tcb_layout(
    tmp_path: Path, emulated_root: EmulatedRoot, product: Product, version: int
) -> None:
    root = EmulatedSnpRoot.generate(product, key_size=2048)  # the layout is the point, not the key size
    fw = EmulatedFirmware(
        tmp_path / "c",
        config=ChipConfig(product=product.value),
        root=emulated_root,
        snp_root=root,
    )
    plan = launch_plan(_read(DEBIAN_4M), vcpus=1, vcpu_sig=GENOA_SIG)
    handle = _launch(fw, plan)
    fw.snp_launch_finish(handle)
    raw = fw.snp_guest_report(handle, bytes(64))
    report, vek = verify_attestation(
        raw, _vcek(fw), product, at=datetime.now(UTC), extra_roots=[fw.snp_trusted_root()]
    )
    assert report.version == version and report.measurement == plan.digest()
    tcb = report.tcbs(product).reported
    assert (tcb.fmc is not None) is (product is Product.TURIN)
    assert vek.extensions.hwid == report.hwid(product) and len(vek.extensions.hwid or b"") == (
        8 if product is Product.TURIN else 64
    )
    with pytest.raises(ValueError, match="SNP root of genoa"):
        EmulatedFirmware(tmp_path / "d", config=ChipConfig(product=product.value), root=emulated_root,
                         snp_root=EmulatedSnpRoot.generate(Product.GENOA, key_size=2048))  # fmt: skip
