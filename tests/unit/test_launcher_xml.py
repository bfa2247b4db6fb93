"""The domain XML of SEV, SEV-ES and kernel-boot guests, checked by libvirt's own parser (defineXML on
the test driver) and by libvirt's RelaxNG schema (virt-xml-validate, or xmllint with the schema)."""

from __future__ import annotations

import base64
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from launcher_svc.adapters.libvirt_backend import ensure_event_loop
from launcher_svc.core.domain_xml import (
    METADATA_NS,
    SevLaunchParams,
    build_domain_xml,
    libvirt_cpu_model,
    parse_domain_xml,
)
from launcher_svc.core.loader import LoaderType
from launcher_svc.core.spec import DiskFormat, DiskSpec, GuestSpec
from sevlaunch.errors import InvalidArgument
from sevlaunch.sev.technology import Technology
from sevlaunch.sev.vmsa import VCPU_TYPES, vcpu_signature

GODH = bytes(range(256)) * 8 + b"\x00" * 36  # 0x824 bytes
SESSION = b"\x5a" * 128
SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
VECTOR_SCHEMA = Path(__file__).parent.parent / "vectors" / "libvirt" / "schemas" / "domain.rng"


def _spec(**kw: object) -> GuestSpec:
    base: dict[str, object] = dict(
        name="g1",
        memory_mib=512,
        vcpus=1,
        firmware_path="/usr/share/OVMF/OVMF_CODE_4M.fd",
        mode=Technology.SEV,
        policy=0x3,
    )
    base.update(kw)
    return GuestSpec(**base)  # type: ignore[arg-type]


CASES = {
    "sev": _spec(),
    "sev-es": _spec(vcpus=4, mode=Technology.SEV_ES, policy=0x7, vcpu_type="EPYC-v4"),
    "sev-es-genoa": _spec(vcpus=2, mode=Technology.SEV_ES, policy=0x7, vcpu_type="EPYC-Genoa-v1"),
    "sev-milan": _spec(vcpu_type="EPYC-Milan"),
    "kernel": _spec(
        kernel_path="/var/lib/libvirt/images/vmlinuz",
        initrd_path="/var/lib/libvirt/images/initrd.img",
        cmdline="console=ttyS0 root=/dev/vda1 quiet='<&>\"'",
        disks=(
            DiskSpec("/var/lib/libvirt/images/root.qcow2", "vda", DiskFormat.QCOW2),
            DiskSpec("/var/lib/libvirt/images/seed.img", "vdb", readonly=True),
        ),
        networks=("default",),
    ),
}


def _xml(spec: GuestSpec, policy: int | None = None, loader: LoaderType = LoaderType.PFLASH) -> str:
    # PFLASH: what preflight chooses for the specs' firmware, Debian's split OVMF_CODE_4M.fd.
    return build_domain_xml(
        spec,
        launch_id="0123456789abcdef0123456789abcdef",
        domain_name=f"sl-0123456789ab-{spec.name}",
        sev=SevLaunchParams(
            cbitpos=51, reduced_phys_bits=1, policy=policy or spec.policy, dh_cert=GODH, session=SESSION
        ),
        loader=loader,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_libvirt_parser_accepts_and_keeps_the_sev_settings(case: str) -> None:
    ensure_event_loop()
    spec = CASES[case]
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(_xml(spec))
        try:
            back = ET.fromstring(dom.XMLDesc(0))
        finally:
            dom.undefine()
    finally:
        conn.close()
    ls = back.find("launchSecurity")
    assert ls is not None and ls.get("type") == "sev"
    assert ls.get("kernelHashes") == ("yes" if spec.kernel_path else None)
    assert ls.findtext("cbitpos") == "51" and ls.findtext("reducedPhysBits") == "1"
    assert int(ls.findtext("policy") or "", 16) == spec.policy
    assert base64.b64decode(ls.findtext("dhCert") or "") == GODH
    assert base64.b64decode(ls.findtext("session") or "") == SESSION
    assert back.find("memoryBacking/locked") is not None
    loader = back.find("os/loader")
    assert loader is not None and loader.get("stateless") == "yes" and loader.get("readonly") == "yes"
    assert loader.get("type") == "pflash" and loader.text == spec.firmware_path
    assert back.find("os/nvram") is None
    assert back.findtext("vcpu") == str(spec.vcpus)
    for dev in back.findall("devices/disk") + back.findall("devices/interface"):
        driver = dev.find("driver")
        assert driver is not None and driver.get("iommu") == "on"
    assert back.find(f"metadata/{{{METADATA_NS}}}launch") is not None
    if spec.cmdline:
        assert back.findtext("os/cmdline") == spec.cmdline  # escaped by ElementTree, not by hand
    parsed = parse_domain_xml(_xml(spec))
    assert (parsed.dh_cert, parsed.session, parsed.policy, parsed.vcpus) == (
        GODH,
        SESSION,
        spec.policy,
        spec.vcpus,
    )
    assert parsed.launch_id == "0123456789abcdef0123456789abcdef"
    assert (parsed.loader, parsed.loader_type) == (spec.firmware_path, "pflash")
    cpu = back.find("cpu")
    if spec.vcpu_type is None:
        assert cpu is None and parsed.cpu_model is None
    else:
        # libvirt kept the pin as given: exactly this model, checked, no fallback.
        assert cpu is not None
        assert (cpu.get("mode"), cpu.get("match"), cpu.get("check")) == ("custom", "exact", "full")
        model = cpu.find("model")
        assert model is not None and model.get("fallback") == "forbid"
        assert model.text == libvirt_cpu_model(spec.vcpu_type) == parsed.cpu_model
        assert vcpu_signature(model.text) == vcpu_signature(spec.vcpu_type)


@pytest.mark.parametrize("name", sorted(VCPU_TYPES))
def test_every_vcpu_type_pins_a_libvirt_model_with_its_signature(name: str) -> None:
    model = libvirt_cpu_model(name)
    assert "-v" not in model  # libvirt's CPU map has no versioned names
    assert vcpu_signature(model) == vcpu_signature(name)


@pytest.mark.parametrize("name", ["Skylake-Server", "EPYC-v9", "", "EPYC'/><evil"])
def test_unknown_vcpu_types_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        libvirt_cpu_model(name)
    assert err.value.reason == "bad_vcpu_type"
    with pytest.raises(InvalidArgument):
        _xml(_spec(vcpu_type=name))


def _validator() -> list[str] | None:
    if shutil.which("virt-xml-validate"):
        return ["virt-xml-validate"]
    if shutil.which("xmllint") and SCHEMA.is_file():
        return ["xmllint", "--noout", "--relaxng", str(SCHEMA)]
    return None


@pytest.mark.parametrize("case", sorted(CASES))
def test_libvirt_schema_validates(case: str, tmp_path: Path) -> None:
    path = tmp_path / f"{case}.xml"
    path.write_text(_xml(CASES[case]))
    cmd = _validator()
    # ./run installs libxml2-utils; a missing validator is a set-up defect, not a reason to skip.
    assert cmd is not None, "needs xmllint (Debian libxml2-utils, installed by ./run) or virt-xml-validate"
    args = [*cmd, str(path)] + (["domain"] if cmd[0] == "virt-xml-validate" else [])
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("loader", list(LoaderType))
def test_both_loaders_pass_libvirts_parser_and_both_schemas(loader: LoaderType, tmp_path: Path) -> None:
    """`pflash` (a split code image) and `rom` (a combined image), each read-only and stateless with no
    `<nvram>`: kept as written by libvirt's parser, valid against this host's schema and against the
    SEV-SNP-era schema of tests/vectors/libvirt."""
    xml = _xml(CASES["sev"], loader=loader)
    ensure_event_loop()
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(xml)
        try:
            back = ET.fromstring(dom.XMLDesc(0))
        finally:
            dom.undefine()
    finally:
        conn.close()
    kept = back.find("os/loader")
    assert kept is not None
    assert (kept.get("type"), kept.get("readonly"), kept.get("stateless")) == (loader.value, "yes", "yes")
    assert back.find("os/nvram") is None
    assert parse_domain_xml(xml).loader_type == loader.value
    path = tmp_path / f"{loader.value}.xml"
    path.write_text(xml)
    cmd = _validator()
    assert cmd is not None, "needs xmllint (Debian libxml2-utils, installed by ./run) or virt-xml-validate"
    args = [*cmd, str(path)] + (["domain"] if cmd[0] == "virt-xml-validate" else [])
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    xmllint = shutil.which("xmllint")
    assert xmllint is not None
    result = subprocess.run(
        [xmllint, "--noout", "--relaxng", str(VECTOR_SCHEMA), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_libvirt_rejects_a_broken_policy() -> None:
    ensure_event_loop()
    xml = _xml(CASES["sev"]).replace("<policy>0x0003</policy>", "<policy>not-a-number</policy>")
    conn = libvirt.open("test:///default")
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.defineXML(xml)
    finally:
        conn.close()
