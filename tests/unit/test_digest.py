"""Launch digests: kat.json's known answers, and sev-snp-measure as an oracle on Debian's real OVMF."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from sevsnpmeasure import guest
from sevsnpmeasure.vcpu_types import CPU_SIGS, cpu_sig

from sevlaunch.sev.digest import LaunchUpdate, digest_updates, launch_digest, launch_updates
from sevlaunch.sev.errors import MalformedInput, Reason, Unsupported
from sevlaunch.sev.kernel_hashes import build_hashes_table
from sevlaunch.sev.measurement import LaunchMeasurement, compute_measure
from sevlaunch.sev.ovmf import SEV_ES_RESET_BLOCK_GUID, SEV_HASH_TABLE_GUID, FooterEntry, FooterTable
from sevlaunch.sev.technology import Technology
from sevlaunch.sev.types import MNonce
from sevlaunch.sev.vmsa import VMSA, VMSALayout, vcpu_signature

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
AMDSEV = VECTORS / "measurement" / "ovmf_AmdSev_suffix.bin"
CODE_4M = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
CODE_2M = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_FD = Path("/usr/share/ovmf/OVMF.fd")
KAT: list[dict[str, Any]] = json.loads((VECTORS / "kat.json").read_text())["cases"]
KAT_BY_ID = {case["id"]: case for case in KAT}


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not installed (Debian package ovmf)")
    return path


def _kat_blob(inputs: dict[str, Any], name: str) -> bytes | None:
    """kat.json gives kernel/initrd as `<name>_hex` (bytes) or `<name>: null` (absent)."""
    if f"{name}_hex" in inputs:
        return bytes.fromhex(inputs[f"{name}_hex"])
    return None


def _cases(*categories: str) -> list[Any]:
    return [pytest.param(c, id=c["id"]) for c in KAT if c["category"] in categories]


@pytest.mark.parametrize("case", _cases("launch_digest", "launch_digest_seves"))
def test_kat_launch_digest(case: dict[str, Any]) -> None:
    inputs = case["inputs"]
    seves = case["category"] == "launch_digest_seves"
    digest = launch_digest(
        (VECTORS / inputs["ovmf_file"]).read_bytes(),
        mode="sev-es" if seves else "sev",
        vcpus=inputs.get("vcpus", 1),
        vcpu_sig=vcpu_signature(inputs["vcpu_type"]) if seves else None,
        kernel=_kat_blob(inputs, "kernel"),
        initrd=_kat_blob(inputs, "initrd"),
        cmdline=inputs.get("cmdline"),
    )
    assert digest.hex() == case["expected"]["launch_digest_hex"]


@pytest.mark.parametrize("case", _cases("launch_digest_negative"))
def test_kat_launch_digest_negative(case: dict[str, Any]) -> None:
    inputs = case["inputs"]
    with pytest.raises(Unsupported) as exc:
        launch_digest(
            (VECTORS / inputs["ovmf_file"]).read_bytes(),
            mode="sev",
            kernel=_kat_blob(inputs, "kernel"),
            initrd=_kat_blob(inputs, "initrd"),
            cmdline=inputs.get("cmdline"),
        )
    assert exc.value.reason is Reason.NO_HASHES_TABLE


def _sevctl_measure(case: dict[str, Any], digest: bytes, mnonce: MNonce) -> str:
    inputs = case["inputs"]
    measure = compute_measure(
        (VECTORS / inputs["tik_file"]).read_bytes(),
        api_major=inputs["api_major"],
        api_minor=inputs["api_minor"],
        build_id=inputs["build_id"],
        policy=inputs["policy"],
        launch_digest=digest,
        mnonce=mnonce,
    )
    return LaunchMeasurement(measure, mnonce).to_b64()


def test_sevctl_build_firmware() -> None:
    case = KAT_BY_ID["sevctl-measurement-build-firmware"]
    inputs = case["inputs"]
    digest = launch_digest((VECTORS / inputs["firmware_file"]).read_bytes(), mode=Technology.SEV)
    assert digest.hex() == case["derived"]["launch_digest_hex"]
    mnonce = LaunchMeasurement.from_b64(case["expected"]["launch_measure_blob_b64"]).mnonce
    assert mnonce == base64.b64decode(inputs["nonce_b64"])
    assert _sevctl_measure(case, digest, mnonce) == case["expected"]["launch_measure_blob_b64"]


def test_sevctl_build_kernel_hashes() -> None:
    case = KAT_BY_ID["sevctl-measurement-build-kernel-hashes"]
    inputs = case["inputs"]
    digest = launch_digest(
        (VECTORS / inputs["firmware_file"]).read_bytes(),
        mode="sev",
        kernel=(VECTORS / inputs["kernel_file"]).read_bytes(),
        initrd=(VECTORS / inputs["initrd_file"]).read_bytes(),
        cmdline=inputs["cmdline"],
    )
    assert digest.hex() == case["derived"]["launch_digest_hex"]
    mnonce = LaunchMeasurement.from_b64(case["expected"]["launch_measure_blob_b64"]).mnonce
    assert _sevctl_measure(case, digest, mnonce) == case["expected"]["launch_measure_blob_b64"]


def test_sevctl_build_sev_es_vmsa() -> None:
    """sevctl's SEV-ES case: its VMSAs are the legacy layout for family 25 model 1 stepping 1."""
    case = KAT_BY_ID["sevctl-measurement-build-sev-es-vmsa"]
    inputs = case["inputs"]
    updates = launch_updates(
        (VECTORS / inputs["firmware_file"]).read_bytes(),
        mode="sev-es",
        vcpus=inputs["num_cpus"],
        vcpu_sig=vcpu_signature(family=25, model=1, stepping=1),
        layout=VMSALayout.legacy,
    )
    vmsas = [u.data for u in updates if u.kind == "vmsa"]
    vmsa0 = (VECTORS / inputs["vmsa_cpu0_file"]).read_bytes()
    vmsa1 = (VECTORS / inputs["vmsa_cpu1_file"]).read_bytes()
    assert vmsas == [vmsa0] + [vmsa1] * (inputs["num_cpus"] - 1)
    digest = digest_updates(updates)
    assert digest.hex() == case["derived"]["launch_digest_hex"]
    blob = inputs["launch_measure_blob_b64"]
    mnonce = LaunchMeasurement.from_b64(blob).mnonce
    assert _sevctl_measure(case, digest, mnonce) == case["expected"]["launch_measure_blob_b64"]


@pytest.mark.parametrize("path", [CODE_4M, OVMF_FD], ids=lambda p: p.name)
def test_sev_matches_sev_snp_measure_on_debian_images(path: Path) -> None:
    image = _need(path).read_bytes()
    assert launch_digest(image, mode="sev") == guest.sev_calc_launch_digest(str(path), "", "", "")
    assert launch_digest(image, mode="sev") == hashlib.sha256(image).digest()


# A spread of images, vCPU counts and vCPU types; each oracle call re-reads and hashes the image.
SEVES_CASES = [
    (CODE_4M, 1, "EPYC"),
    (CODE_4M, 2, "EPYC-Milan"),
    (CODE_4M, 4, "EPYC-Genoa"),
    (OVMF_FD, 1, "EPYC-Rome"),
    (OVMF_FD, 4, "EPYC-v4"),
    (CODE_2M, 2, "EPYC-Milan-v2"),
]


@pytest.mark.parametrize(
    ("path", "vcpus", "vcpu_type"), SEVES_CASES, ids=lambda v: getattr(v, "name", str(v))
)
def test_seves_matches_sev_snp_measure_on_debian_images(path: Path, vcpus: int, vcpu_type: str) -> None:
    image = _need(path).read_bytes()
    ours = launch_digest(image, mode="sev-es", vcpus=vcpus, vcpu_sig=vcpu_signature(vcpu_type))
    oracle = guest.seves_calc_launch_digest(vcpus, CPU_SIGS[vcpu_type], str(path), "", "", "")
    assert ours == oracle


def test_seves_family_model_stepping_matches_sev_snp_measure() -> None:
    path = _need(CODE_4M)
    sig = vcpu_signature(family=25, model=17, stepping=1)
    ours = launch_digest(path.read_bytes(), mode="sev-es", vcpus=3, vcpu_sig=sig)
    assert ours == guest.seves_calc_launch_digest(3, cpu_sig(25, 17, 1), str(path), "", "", "")


def test_layouts_give_different_digests() -> None:
    image = _need(CODE_4M).read_bytes()
    sig = vcpu_signature("EPYC-Milan")
    init2 = launch_digest(image, mode="sev-es", vcpu_sig=sig, layout=VMSALayout.init2)
    legacy = launch_digest(image, mode="sev-es", vcpu_sig=sig, layout=VMSALayout.legacy)
    assert init2 != legacy


@pytest.mark.parametrize(
    ("mode", "vcpus", "kernel", "initrd", "cmdline"),
    [
        ("sev", 1, b"\x7fELF fake kernel" * 100, b"initrd " * 50, "console=ttyS0 root=/dev/vda1"),
        ("sev", 1, b"k", None, None),
        ("sev-es", 1, b"bzImage" * 333, b"cpio", "quiet"),
        ("sev-es", 3, b"bzImage", None, "ro"),
    ],
)
def test_kernel_hashes_match_sev_snp_measure(
    tmp_path: Path, mode: str, vcpus: int, kernel: bytes, initrd: bytes | None, cmdline: str | None
) -> None:
    (tmp_path / "vmlinuz").write_bytes(kernel)
    initrd_path = ""
    if initrd is not None:
        (tmp_path / "initrd").write_bytes(initrd)
        initrd_path = str(tmp_path / "initrd")
    image = AMDSEV.read_bytes()
    sig = vcpu_signature("EPYC-Rome")
    ours = launch_digest(
        image,
        mode=Technology(mode),
        vcpus=vcpus,
        vcpu_sig=sig,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
    )
    kernel_path = str(tmp_path / "vmlinuz")
    if mode == "sev":
        oracle = guest.sev_calc_launch_digest(str(AMDSEV), kernel_path, initrd_path, cmdline or "")
    else:
        oracle = guest.seves_calc_launch_digest(
            vcpus, sig, str(AMDSEV), kernel_path, initrd_path, cmdline or ""
        )
    assert ours == oracle


@pytest.mark.parametrize("mode", ["sev", "sev-es"])
def test_kernel_with_debian_image_is_refused_like_sev_snp_measure(tmp_path: Path, mode: str) -> None:
    path = _need(CODE_4M)
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    with pytest.raises(Unsupported) as exc:
        launch_digest(path.read_bytes(), mode=Technology(mode), vcpu_sig=1, kernel=b"kernel")
    assert exc.value.reason is Reason.NO_HASHES_TABLE
    with pytest.raises(RuntimeError, match="doesn't support kernel"):
        if mode == "sev":
            guest.sev_calc_launch_digest(str(path), str(tmp_path / "vmlinuz"), "", "")
        else:
            guest.seves_calc_launch_digest(1, 1, str(path), str(tmp_path / "vmlinuz"), "", "")


def _image(*entries: FooterEntry) -> bytes:
    # QEMU wants pflash images in whole 4 KiB sectors.
    table = FooterTable(entries=entries).to_bytes()
    return bytes(8192 - len(table) - 32) + table + bytes(32)


def test_misaligned_firmware_is_refused() -> None:
    """The firmware encrypts 16-byte blocks; QEMU refuses pflash images that are not whole sectors."""
    with pytest.raises(MalformedInput) as exc:
        launch_digest(AMDSEV.read_bytes()[8:], mode="sev")
    assert exc.value.reason is Reason.BAD_LENGTH


def test_seves_without_reset_block_is_refused(tmp_path: Path) -> None:
    image = _image(FooterEntry(SEV_HASH_TABLE_GUID, struct.pack("<II", 0x1000, 0x400)))
    with pytest.raises(Unsupported) as exc:
        launch_digest(image, mode="sev-es", vcpu_sig=1)
    assert exc.value.reason is Reason.NO_SEV_ES_RESET_BLOCK
    # Plain SEV does not need the reset block.
    assert launch_digest(image, mode="sev") == hashlib.sha256(image).digest()
    (tmp_path / "ovmf").write_bytes(image)
    with pytest.raises(RuntimeError, match="SEV_ES_RESET_BLOCK"):
        guest.seves_calc_launch_digest(1, 1, str(tmp_path / "ovmf"), "", "", "")


def test_seves_image_without_footer_is_refused() -> None:
    with pytest.raises(Unsupported) as exc:
        launch_digest(bytes(8192), mode="sev-es", vcpu_sig=1)
    assert exc.value.reason is Reason.NO_SEV_ES_RESET_BLOCK


def test_hashes_area_too_small() -> None:
    image = _image(FooterEntry(SEV_HASH_TABLE_GUID, struct.pack("<II", 0x1000, 0xA0)))
    with pytest.raises(Unsupported) as exc:
        launch_updates(image, mode="sev", kernel=b"k")
    assert exc.value.reason is Reason.NO_HASHES_TABLE


def test_update_order_and_addresses() -> None:
    image = AMDSEV.read_bytes()
    sig = vcpu_signature("EPYC-Milan")
    updates = launch_updates(image, mode="sev-es", vcpus=3, vcpu_sig=sig, kernel=b"k", cmdline="c")
    assert [u.kind for u in updates] == ["data", "data", "vmsa", "vmsa", "vmsa"]
    assert updates[0] == LaunchUpdate("data", (1 << 32) - len(image), image)
    assert updates[0].data is image  # the firmware is not copied
    assert updates[1] == LaunchUpdate("data", 0x810C00, build_hashes_table(b"k", None, "c"))
    bsp, ap1, ap2 = (VMSA.from_bytes(u.data) for u in updates[2:])
    assert bsp.cs.base + bsp.rip == 0xFFFFFFF0
    assert ap1 == ap2
    assert ap1.cs.base + ap1.rip == 0x80B004
    assert {v.rdx for v in (bsp, ap1)} == {sig}
    assert launch_digest(image, mode="sev-es", vcpus=3, vcpu_sig=sig, kernel=b"k", cmdline="c") == (
        hashlib.sha256(b"".join(u.data for u in updates)).digest()
    )


def test_sev_ignores_vcpus() -> None:
    image = AMDSEV.read_bytes()
    assert launch_updates(image, mode="sev", vcpus=8, vcpu_sig=5) == [
        LaunchUpdate("data", (1 << 32) - 4096, image)
    ]


def test_argument_errors() -> None:
    image = AMDSEV.read_bytes()
    with pytest.raises(MalformedInput):
        launch_digest(image, mode="snp")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        launch_digest(image, mode="sev-es")
    with pytest.raises(TypeError):
        launch_digest(image, mode="sev", initrd=b"i")
    with pytest.raises(MalformedInput):
        launch_digest(image, mode="sev-es", vcpus=0, vcpu_sig=1)


def test_launch_update_validation() -> None:
    with pytest.raises(MalformedInput):
        LaunchUpdate("data", 0, bytes(17))
    with pytest.raises(ValueError):
        LaunchUpdate("data", None, bytes(16))
    with pytest.raises(MalformedInput):
        LaunchUpdate("vmsa", None, bytes(4095))
    with pytest.raises(ValueError):
        LaunchUpdate("vmsa", 0, bytes(4096))
    with pytest.raises(ValueError):
        LaunchUpdate("bogus", 0, bytes(16))  # type: ignore[arg-type]


def test_digest_is_one_sha256_pass_over_the_updates() -> None:
    """The digest of a 4 MB image is SHA-256 over exactly the update bytes (its speed: bench/bench_sev.py)."""
    image = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    table = FooterTable(entries=(FooterEntry(SEV_ES_RESET_BLOCK_GUID, struct.pack("<I", 0x80B004)),))
    image = image[: -len(table.to_bytes()) - 32] + table.to_bytes() + bytes(32)
    updates = launch_updates(image, mode="sev-es", vcpus=2, vcpu_sig=1)
    joined = b"".join(u.data for u in updates)
    assert launch_digest(image, mode="sev-es", vcpus=2, vcpu_sig=1) == hashlib.sha256(joined).digest()
