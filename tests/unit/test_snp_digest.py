"""SEV-SNP launch digests: kat-snp.json's known answers, and sev-snp-measure 0.0.13 as an oracle on
Debian's real OVMF images and on the AmdSev fixture with a kernel, an initrd and a command line."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from sevsnpmeasure import guest as oracle
from sevsnpmeasure.vcpu_types import CPU_SIGS
from sevsnpmeasure.vmm_types import VMMType

from sevlaunch.sev.errors import MalformedInput, Unsupported
from sevlaunch.sev.vmsa import vcpu_signature
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.gctx import VMSA_GPA, PageType, extend
from sevlaunch.snp.launch_digest import (
    NO_KERNEL_HASHES_MESSAGE,
    launch_digest,
    launch_plan,
    ovmf_hash,
    svsm_launch_digest,
    svsm_launch_plan,
)
from sevlaunch.snp.metadata import SectionType, SnpFirmware

SNP = Path(__file__).resolve().parents[1] / "vectors" / "snp"
AMDSEV = SNP / "measurement" / "ovmf_AmdSev_suffix.bin"
OVMFX64 = SNP / "measurement" / "ovmf_OvmfX64_suffix.bin"
# Debian's ovmf package: the 2 MiB build carries the SNP metadata; the 4 MiB (SMM) build has none, so
# its SNP digest is the image's pages and the VMSAs only (sev-snp-measure agrees on both).
DEBIAN_2M = Path("/usr/share/OVMF/OVMF_CODE.fd")
DEBIAN_4M = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
KAT: list[dict[str, Any]] = json.loads((SNP / "kat-snp.json").read_text())


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: install Debian's ovmf package (./run does)")
    return path


def _cases(kind: str) -> list[Any]:
    return [pytest.param(c, id=c["id"]) for c in KAT if c["kind"] == kind]


def _read(name: str | None) -> bytes | None:
    return None if name is None else (SNP / name).read_bytes()


def _kat_digest(inputs: dict[str, Any]) -> bytes:
    sig = vcpu_signature(inputs["vcpu_type"]) if inputs["vcpu_type"] else None
    ovmf = (SNP / inputs["ovmf"]).read_bytes()
    if inputs["mode"] == "snp:svsm":
        assert sig is not None
        return svsm_launch_digest(
            ovmf,
            (SNP / inputs["svsm"]).read_bytes(),
            vars_size=inputs["vars_size"],
            vcpus=inputs["vcpus"],
            vcpu_sig=sig,
        )
    assert inputs["mode"] == "snp"
    seed = inputs.get("snp_ovmf_hash")
    return launch_digest(
        ovmf,
        vcpus=inputs["vcpus"],
        vcpu_sig=sig,
        guest_features=int(inputs["guest_features"], 0),
        vmm_type=inputs["vmm_type"],
        kernel=_read(inputs["kernel"]),
        initrd=_read(inputs["initrd"]),
        cmdline=inputs["cmdline"],
        ovmf_hash=None if seed is None else bytes.fromhex(seed),
    )


def test_kat_has_every_snp_digest_case() -> None:
    kinds = [c["kind"] for c in KAT]
    assert kinds.count("snp_launch_digest") == 16
    assert kinds.count("snp_ovmf_hash") == 1
    assert kinds.count("snp_launch_digest_error") == 1


@pytest.mark.parametrize("case", _cases("snp_launch_digest"))
def test_kat_launch_digest(case: dict[str, Any]) -> None:
    assert _kat_digest(case["inputs"]).hex() == case["expected"]


@pytest.mark.parametrize("case", _cases("snp_ovmf_hash"))
def test_kat_ovmf_hash(case: dict[str, Any]) -> None:
    assert ovmf_hash((SNP / case["inputs"]["ovmf"]).read_bytes()).hex() == case["expected"]


@pytest.mark.parametrize("case", _cases("snp_launch_digest_error"))
def test_kat_launch_digest_error(case: dict[str, Any]) -> None:
    with pytest.raises(Unsupported) as exc:
        _kat_digest(case["inputs"])
    assert exc.value.reason is SnpReason.NO_KERNEL_HASHES_SECTION
    assert case["expected"]["error"] in str(exc.value)
    assert NO_KERNEL_HASHES_MESSAGE == case["expected"]["error"]


@pytest.mark.parametrize("case", _cases("snp_launch_digest"))
def test_kat_plan_replayed_page_by_page(case: dict[str, Any]) -> None:
    """What the emulated firmware will do: SNP_LAUNCH_UPDATE one page at a time from the plan."""
    inputs = case["inputs"]
    sig = vcpu_signature(inputs["vcpu_type"]) if inputs["vcpu_type"] else None
    ovmf = (SNP / inputs["ovmf"]).read_bytes()
    if inputs["mode"] == "snp:svsm":
        assert sig is not None
        plan = svsm_launch_plan(
            ovmf,
            (SNP / inputs["svsm"]).read_bytes(),
            vars_size=inputs["vars_size"],
            vcpus=inputs["vcpus"],
            vcpu_sig=sig,
        )
    else:
        seed = inputs.get("snp_ovmf_hash")
        plan = launch_plan(
            ovmf,
            vcpus=inputs["vcpus"],
            vcpu_sig=sig,
            guest_features=int(inputs["guest_features"], 0),
            vmm_type=inputs["vmm_type"],
            kernel=_read(inputs["kernel"]),
            initrd=_read(inputs["initrd"]),
            cmdline=inputs["cmdline"],
            ovmf_hash=None if seed is None else bytes.fromhex(seed),
        )
    digest = plan.seed
    for update in plan.updates:
        for gpa, page in update.pages():
            digest = extend(digest, update.page_type, gpa, page)
    assert digest.hex() == case["expected"]
    infos = list(plan.page_infos())
    assert infos[-1].next_digest().hex() == case["expected"]
    assert all(a.next_digest() == b.digest_cur for a, b in itertools.pairwise(infos))
    vmsas = [u for u in plan.updates if u.page_type is PageType.VMSA]
    assert len(vmsas) == inputs["vcpus"] and all(u.gpa == VMSA_GPA for u in vmsas)


def test_plan_order_for_the_amdsev_fixture_with_a_kernel() -> None:
    ovmf = AMDSEV.read_bytes()
    plan = launch_plan(ovmf, vcpus=2, vcpu_sig=CPU_SIGS["EPYC-Milan"], kernel=b"k", initrd=b"i", cmdline="c")
    kinds = [(u.page_type, u.gpa, u.length) for u in plan.updates]
    assert kinds == [
        (PageType.NORMAL, 0xFFFFF000, 0x1000),
        (PageType.ZERO, 0x800000, 0x9000),
        (PageType.ZERO, 0x80A000, 0x3000),
        (PageType.SECRETS, 0x80D000, 0x1000),
        (PageType.CPUID, 0x80E000, 0x1000),
        (PageType.ZERO, 0x80F000, 0x1000),  # SVSM calling area
        (PageType.NORMAL, 0x810000, 0x1000),  # kernel hashes page
        (PageType.ZERO, 0x811000, 0xF000),
        (PageType.VMSA, VMSA_GPA, 0x1000),
        (PageType.VMSA, VMSA_GPA, 0x1000),
    ]
    hashes_page = plan.updates[6].data
    assert hashes_page is not None
    # The table sits at the footer's SEV hash table address (0x810c00) inside the page.
    assert hashes_page[:0xC00] == bytes(0xC00) and hashes_page[0xC00 + 176 :] == bytes(0x1000 - 0xC00 - 176)
    assert plan.updates[0].data is ovmf  # the image is not copied


def test_ec2_measures_cpuid_last_and_gce_leaves_sec_mem_unmeasured() -> None:
    ovmf = AMDSEV.read_bytes()
    ec2 = [u.page_type for u in launch_plan(ovmf, vmm_type="ec2").updates]
    assert ec2[-2:] == [PageType.CPUID, PageType.VMSA] and ec2.count(PageType.CPUID) == 1
    gce = [u.page_type for u in launch_plan(ovmf, vmm_type="GCE").updates]
    assert PageType.ZERO in gce  # the SVSM calling area and the empty kernel hashes page stay ZERO
    assert gce.count(PageType.UNMEASURED) == 3


# ------------------------------------------------------------------ sev-snp-measure as the oracle


def _oracle(
    ovmf: Path,
    *,
    vcpus: int,
    vcpu_type: str | None,
    features: int,
    vmm: str = "QEMU",
    kernel: Path | None = None,
    initrd: Path | None = None,
    cmdline: str | None = None,
) -> bytes:
    sig = CPU_SIGS[vcpu_type] if vcpu_type else 0
    digest: bytes = oracle.snp_calc_launch_digest(
        vcpus,
        sig,
        str(ovmf),
        str(kernel) if kernel else None,
        str(initrd) if initrd else None,
        cmdline,
        features,
        "",
        VMMType[vmm],
    )
    return digest


def _ours(
    ovmf: Path,
    *,
    vcpus: int,
    vcpu_type: str | None,
    features: int,
    vmm: str = "QEMU",
    kernel: Path | None = None,
    initrd: Path | None = None,
    cmdline: str | None = None,
) -> bytes:
    return launch_digest(
        ovmf.read_bytes(),
        vcpus=vcpus,
        vcpu_sig=vcpu_signature(vcpu_type) if vcpu_type else None,
        guest_features=features,
        vmm_type=vmm,
        kernel=kernel.read_bytes() if kernel else None,
        initrd=initrd.read_bytes() if initrd else None,
        cmdline=cmdline,
    )


_GRID = [
    (1, "EPYC", 0x1, "QEMU"),
    (2, "EPYC-v4", 0x21, "QEMU"),
    (4, "EPYC-Rome", 0x1, "QEMU"),
    (16, "EPYC-Milan", 0x21, "QEMU"),
    (4, "EPYC-Milan-v2", 0x5, "QEMU"),
    (2, "EPYC-Genoa", 0x21, "QEMU"),
    (16, "EPYC-Genoa-v1", 0x8021, "QEMU"),
    (4, "EPYC-Turin", 0x21, "QEMU"),
    (1, "EPYC-v4", 0x21, "ec2"),
    (4, "EPYC-Milan", 0x1, "ec2"),
    (16, "EPYC-Genoa", 0x21, "ec2"),
    (1, None, 0x1, "gce"),
    (2, None, 0x21, "gce"),
    (16, None, 0x1, "gce"),
]


@pytest.mark.parametrize(("vcpus", "vcpu_type", "features", "vmm"), _GRID)
def test_debian_ovmf_with_snp_metadata_equals_sev_snp_measure(
    vcpus: int, vcpu_type: str | None, features: int, vmm: str
) -> None:
    ovmf = _need(DEBIAN_2M)
    assert SnpFirmware.from_bytes(ovmf.read_bytes()).metadata is not None
    kwargs: dict[str, Any] = {"vcpus": vcpus, "vcpu_type": vcpu_type, "features": features, "vmm": vmm}
    assert _ours(ovmf, **kwargs) == _oracle(ovmf, **kwargs)


@pytest.mark.parametrize(("vcpus", "vcpu_type", "features", "vmm"), _GRID[::3])
def test_debian_ovmf_4m_equals_sev_snp_measure(
    vcpus: int, vcpu_type: str | None, features: int, vmm: str
) -> None:
    ovmf = _need(DEBIAN_4M)
    firmware = SnpFirmware.from_bytes(ovmf.read_bytes())
    assert firmware.metadata is None and firmware.sev_es_reset_eip
    kwargs: dict[str, Any] = {"vcpus": vcpus, "vcpu_type": vcpu_type, "features": features, "vmm": vmm}
    assert _ours(ovmf, **kwargs) == _oracle(ovmf, **kwargs)


@pytest.fixture(scope="module")
def boot_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("boot")
    kernel, initrd = folder / "vmlinuz", folder / "initrd.img"
    # Deterministic, non-trivial contents (several pages, not page-aligned).
    kernel.write_bytes(bytes(range(256)) * 4099)
    initrd.write_bytes(b"initrd\x00\xff" * 3001)
    return kernel, initrd


@pytest.mark.parametrize(
    ("vcpus", "vcpu_type", "features", "vmm", "cmdline"),
    [
        (1, "EPYC-v4", 0x21, "QEMU", "console=ttyS0 root=/dev/vda1 ro"),
        (2, "EPYC-Milan", 0x1, "QEMU", "quiet"),
        (4, "EPYC-Genoa", 0x21, "QEMU", None),
        (16, "EPYC", 0x21, "QEMU", "a" * 300),
        (4, "EPYC-v4", 0x21, "ec2", "console=ttyS0"),
        (2, None, 0x1, "gce", "console=ttyS0"),
    ],
)
def test_amdsev_fixture_with_kernel_equals_sev_snp_measure(
    boot_files: tuple[Path, Path],
    vcpus: int,
    vcpu_type: str | None,
    features: int,
    vmm: str,
    cmdline: str | None,
) -> None:
    kernel, initrd = boot_files
    kwargs: dict[str, Any] = {
        "vcpus": vcpus,
        "vcpu_type": vcpu_type,
        "features": features,
        "vmm": vmm,
        "kernel": kernel,
        "initrd": initrd,
        "cmdline": cmdline,
    }
    assert _ours(AMDSEV, **kwargs) == _oracle(AMDSEV, **kwargs)


def test_kernel_without_initrd_and_empty_cmdline_equal_sev_snp_measure(boot_files: tuple[Path, Path]) -> None:
    kernel, _ = boot_files
    base: dict[str, Any] = {"vcpus": 2, "vcpu_type": "EPYC-v4", "features": 0x21, "kernel": kernel}
    assert _ours(AMDSEV, **base) == _oracle(AMDSEV, **base)
    # An empty command line hashes a lone NUL, like none at all.
    assert _ours(AMDSEV, **base, cmdline="") == _ours(AMDSEV, **base)


def test_every_input_changes_the_digest(boot_files: tuple[Path, Path]) -> None:
    kernel, initrd = boot_files
    base: dict[str, Any] = {
        "vcpus": 2,
        "vcpu_type": "EPYC-v4",
        "features": 0x21,
        "kernel": kernel,
        "initrd": initrd,
    }
    reference = _ours(AMDSEV, **base)
    variants = [
        {**base, "vcpus": 3},
        {**base, "vcpu_type": "EPYC-Milan"},
        {**base, "features": 0x1},
        {**base, "vmm": "ec2"},
        {**base, "cmdline": "x"},
        {**base, "initrd": None},
        {**base, "kernel": initrd},
    ]
    digests = {_ours(AMDSEV, **v) for v in variants}
    assert reference not in digests and len(digests) == len(variants)


def test_ovmf_hash_seed_equals_full_image_and_skips_its_pages() -> None:
    ovmf = _need(DEBIAN_2M).read_bytes()
    seed = ovmf_hash(ovmf)
    plan = launch_plan(ovmf, vcpus=4, vcpu_sig=CPU_SIGS["EPYC-Genoa"], ovmf_hash=seed)
    assert plan.seed == seed and all(u.gpa != SnpFirmware.from_bytes(ovmf).gpa for u in plan.updates)
    assert plan.digest() == launch_digest(ovmf, vcpus=4, vcpu_sig=CPU_SIGS["EPYC-Genoa"])
    assert seed == oracle.calc_snp_ovmf_hash(str(DEBIAN_2M))


def test_refusals_are_typed() -> None:
    ovmf = AMDSEV.read_bytes()
    sig = CPU_SIGS["EPYC-v4"]
    with pytest.raises(MalformedInput) as bad_features:
        launch_digest(ovmf, vcpu_sig=sig, guest_features=0x20)
    assert bad_features.value.reason is SnpReason.BAD_GUEST_FEATURES
    with pytest.raises(MalformedInput) as bad_vcpus:
        launch_digest(ovmf, vcpus=0, vcpu_sig=sig)
    assert bad_vcpus.value.reason is SnpReason.BAD_VCPU_COUNT
    with pytest.raises(Unsupported) as no_sig:
        launch_digest(ovmf, vcpus=1)
    assert no_sig.value.reason is SnpReason.MISSING_VCPU_TYPE
    with pytest.raises(Unsupported) as vmm:
        launch_digest(ovmf, vcpu_sig=sig, vmm_type="xen")
    assert vmm.value.reason is SnpReason.UNKNOWN_VMM_TYPE
    with pytest.raises(MalformedInput) as seed:
        launch_digest(ovmf, vcpu_sig=sig, ovmf_hash=b"short")
    assert seed.value.reason is SnpReason.BAD_OVMF_HASH
    with pytest.raises(MalformedInput) as partial:
        launch_digest(ovmf[:-16], vcpu_sig=sig)
    assert partial.value.reason is SnpReason.BAD_FIRMWARE_IMAGE
    with pytest.raises(Unsupported) as svsm_info:
        svsm_launch_digest(ovmf, ovmf, vars_size=0, vcpus=1, vcpu_sig=sig)
    assert svsm_info.value.reason is SnpReason.NO_SVSM_INFO
    with pytest.raises(TypeError):
        launch_digest(ovmf, vcpu_sig=sig, initrd=b"i")


def test_kernel_hashes_table_outside_its_page_is_refused() -> None:
    """An image whose footer puts the hash table outside the SNP_KERNEL_HASHES page would have QEMU
    write the table to a page that is not measured: refused rather than measured wrongly."""
    ovmf = bytearray(AMDSEV.read_bytes())
    firmware = SnpFirmware.from_bytes(bytes(ovmf))
    assert firmware.hashes_table_gpa == 0x810C00
    at = bytes(ovmf).find((0x810C00).to_bytes(4, "little") + (0x400).to_bytes(4, "little"))
    ovmf[at : at + 4] = (0x811000).to_bytes(4, "little")
    moved = bytes(ovmf)
    assert SnpFirmware.from_bytes(moved).hashes_table_gpa == 0x811000
    assert any(
        s.section_type is SectionType.SNP_KERNEL_HASHES for s in SnpFirmware.from_bytes(moved).sections
    )
    with pytest.raises(Unsupported) as exc:
        launch_digest(moved, vcpu_sig=CPU_SIGS["EPYC-v4"], kernel=b"k")
    assert exc.value.reason is SnpReason.NO_KERNEL_HASHES_SECTION
    # Without a kernel the page is a zero page and the table address does not matter.
    launch_digest(moved, vcpu_sig=CPU_SIGS["EPYC-v4"])


def test_image_without_reset_block_is_refused() -> None:
    ovmf = bytearray(OVMFX64.read_bytes())
    at = bytes(ovmf).find(bytes.fromhex("de71f7007e1acb4f890e68c77e2fb44e"))  # SEV-ES reset block GUID
    assert at > 0
    ovmf[at] ^= 0xFF  # the entry is still walked, under an unknown GUID
    with pytest.raises(Unsupported) as exc:
        launch_digest(bytes(ovmf), vcpu_sig=CPU_SIGS["EPYC-v4"])
    assert exc.value.reason is SnpReason.NO_SEV_ES_RESET_BLOCK
