"""The SEV-SNP domain XML against libvirt's current schema (tests/vectors/libvirt: libvirt 11.3's RelaxNG,
which takes `<launchSecurity type='sev-snp'>`; bookworm's 9.0 schema does not) with xmllint, against
libvirt's own SNP example, and against the schema's negative examples, which our writer never produces."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher_svc.core.domain_xml import (
    HOST_DATA_SIZE,
    ID_AUTH_SIZE,
    ID_BLOCK_SIZE,
    INIT_DATA_FW_CFG,
    SevLaunchParams,
    SnpLaunchParams,
    build_domain_xml,
    parse_domain_xml,
)
from launcher_svc.core.loader import LoaderType
from launcher_svc.core.spec import DiskFormat, DiskSpec, GuestSpec
from sevlaunch.sev.technology import Technology

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "libvirt"
SCHEMA = VECTORS / "schemas" / "domain.rng"
EXAMPLE = VECTORS / "examples" / "launch-security-sev-snp.xml"
NEGATIVES = sorted((VECTORS / "negative").glob("*.xml"))
HEXUINT = re.compile(r"(0x)?[0-9a-f]+")  # basictypes.rng `hexuint`

ID_BLOCK = bytes(range(96))
ID_AUTH = bytes(range(256)) * 16
HOST_DATA = b"\x42" * 32
INIT_DATA = b'{"authorization_id":"a-1","ca_pem":"-----BEGIN CERTIFICATE-----\\nMII=\\n","nonce":"00"}'


def _spec(**kw: object) -> GuestSpec:
    base: dict[str, object] = dict(
        name="snp",
        memory_mib=2048,
        vcpus=2,
        firmware_path="/usr/share/OVMF/OVMF_CODE.fd",
        mode=Technology.SEV_SNP,
        policy=0x30000,
        vcpu_type="EPYC-v4",
        guest_features=1,
    )
    base.update(kw)
    return GuestSpec(**base)  # type: ignore[arg-type]


def _params(**kw: object) -> SnpLaunchParams:
    base: dict[str, object] = dict(
        cbitpos=51,
        reduced_phys_bits=1,
        policy=0x30000,
        id_block=ID_BLOCK,
        id_auth=ID_AUTH,
        host_data=HOST_DATA,
        author_key=True,
        init_data=INIT_DATA,
    )
    base.update(kw)
    return SnpLaunchParams(**base)  # type: ignore[arg-type]


CASES: dict[str, tuple[GuestSpec, SnpLaunchParams]] = {
    "authorised": (_spec(), _params()),
    "no-author-key": (_spec(), _params(author_key=False)),
    "no-id-block": (_spec(), _params(id_block=b"", id_auth=b"", author_key=False)),
    "no-init-data": (_spec(), _params(init_data=b"", host_data=b"")),
    "genoa-all-flags": (
        _spec(vcpus=8, vcpu_type="EPYC-Genoa"),
        _params(policy=0x3FF_FFFF & ~0xFFFF | 0x0201),
    ),
    "kernel-disks-networks": (
        _spec(
            kernel_path="/var/lib/libvirt/images/vmlinuz",
            initrd_path="/var/lib/libvirt/images/initrd.img",
            cmdline="console=ttyS0 root=/dev/vda1 quiet='<&>\"'",
            disks=(DiskSpec("/var/lib/libvirt/images/root.qcow2", "vda", DiskFormat.QCOW2),),
            networks=("default",),
        ),
        _params(),
    ),
}


def _xml(case: str) -> str:
    spec, params = CASES[case]
    return build_domain_xml(
        spec,
        launch_id="0123456789abcdef0123456789abcdef",
        domain_name=f"sl-0123456789ab-{case}",
        sev=params,
        loader=LoaderType.ROM,
    )


def _xmllint(path: Path) -> subprocess.CompletedProcess[str]:
    xmllint = shutil.which("xmllint")
    # ./run installs libxml2-utils; without xmllint the schema is not checked, which is a failure.
    assert xmllint is not None, "needs xmllint (Debian libxml2-utils, installed by ./run)"
    assert SCHEMA.is_file(), f"{SCHEMA} is missing"
    return subprocess.run(
        [xmllint, "--noout", "--relaxng", str(SCHEMA), str(path)], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_snp_domain_validates_against_libvirts_current_schema(case: str, tmp_path: Path) -> None:
    path = tmp_path / f"{case}.xml"
    path.write_text(_xml(case))
    result = _xmllint(path)
    assert result.returncode == 0, result.stderr
    assert "validates" in result.stderr


def test_libvirts_own_example_validates_and_the_negatives_fail(tmp_path: Path) -> None:
    assert _xmllint(EXAMPLE).returncode == 0
    assert len(NEGATIVES) == 2
    for negative in NEGATIVES:
        result = _xmllint(negative)
        assert result.returncode == 3, f"{negative.name} should fail the schema: {result.stderr}"
        assert "fails to validate" in result.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_snp_settings_have_the_shape_of_libvirts_example(case: str) -> None:
    ours = ET.fromstring(_xml(case)).find("launchSecurity")
    theirs = ET.parse(EXAMPLE).getroot().find("launchSecurity")
    assert ours is not None and theirs is not None
    assert ours.get("type") == theirs.get("type") == "sev-snp"
    # Only attributes and children libvirt's example uses (kernelHashes is its direct-boot variant's).
    assert set(ours.attrib) <= set(theirs.attrib) | {"kernelHashes"}
    assert {c.tag for c in ours} <= {c.tag for c in theirs}
    policy = ours.findtext("policy") or ""
    assert HEXUINT.fullmatch(policy) and policy.startswith("0x") and len(policy) == 18  # 64 bits
    assert HEXUINT.fullmatch(theirs.findtext("policy") or "")
    for tag in ("idBlock", "idAuth", "hostData"):
        if ours.find(tag) is not None:
            base64.b64decode(ours.findtext(tag) or "", validate=True)


def test_our_sizes_are_the_sizes_of_libvirts_example() -> None:
    parsed = parse_domain_xml(EXAMPLE.read_text())
    assert parsed.snp and not parsed.sev and parsed.author_key
    assert parsed.policy == 0x30000
    assert (len(parsed.id_block), len(parsed.id_auth), len(parsed.host_data)) == (
        ID_BLOCK_SIZE,
        ID_AUTH_SIZE,
        HOST_DATA_SIZE,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_snp_domain_keeps_the_sev_hardening_and_round_trips(case: str) -> None:
    spec, params = CASES[case]
    xml = _xml(case)
    root = ET.fromstring(xml)
    loader = root.find("os/loader")
    assert loader is not None and (loader.get("type"), loader.get("stateless"), loader.get("readonly")) == (
        "rom",
        "yes",
        "yes",
    )
    assert root.find("os/nvram") is None and root.find("memoryBacking/locked") is not None
    cpu = root.find("cpu")
    assert cpu is not None and (cpu.get("mode"), cpu.get("match"), cpu.get("check")) == (
        "custom",
        "exact",
        "full",
    )
    for dev in root.findall("devices/disk") + root.findall("devices/interface"):
        driver = dev.find("driver")
        assert driver is not None and driver.get("iommu") == "on"
    ls = root.find("launchSecurity")
    assert ls is not None
    assert ls.get("kernelHashes") == ("yes" if spec.kernel_path else None)
    assert ls.get("authorKey") == (None if not params.id_block else "yes" if params.author_key else "no")
    for sev_only in ("dhCert", "session", "handle"):
        assert ls.find(sev_only) is None
    parsed = parse_domain_xml(xml)
    assert (parsed.snp, parsed.sev, parsed.policy) == (True, False, params.policy)
    assert (parsed.id_block, parsed.id_auth, parsed.host_data) == (
        params.id_block,
        params.id_auth,
        params.host_data,
    )
    assert (parsed.author_key, parsed.init_data) == (params.author_key, params.init_data)
    assert parsed.cmdline == spec.cmdline and parsed.kernel_hashes == spec.has_kernel
    if params.init_data:
        entry = root.find("sysinfo[@type='fwcfg']/entry")
        assert entry is not None and entry.get("name") == INIT_DATA_FW_CFG


@settings(max_examples=200, deadline=None)
@given(policy=st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_the_writer_never_writes_a_policy_the_schema_refuses(policy: int) -> None:
    spec, _ = CASES["authorised"]
    xml = build_domain_xml(
        spec,
        launch_id="0" * 32,
        domain_name="sl-0-snp",
        sev=SnpLaunchParams(51, 1, policy),
        loader=LoaderType.ROM,
    )
    text = ET.fromstring(xml).findtext("launchSecurity/policy") or ""
    assert HEXUINT.fullmatch(text) and int(text, 16) == policy


@pytest.mark.parametrize(
    "kw",
    [
        {"policy": 1 << 64},
        {"policy": -1},
        {"id_block": ID_BLOCK[:95]},
        {"id_auth": ID_AUTH + b"\x00"},
        {"id_block": b"", "author_key": False},  # an ID auth without its block
        {"id_block": b"", "id_auth": b"", "author_key": True},
        {"host_data": HOST_DATA[:31]},
        {"init_data": b"\x01"},
        {"init_data": "é".encode()},
        {"init_data": b"x" * (32 * 1024 + 1)},
        {"cbitpos": 0},
    ],
)
def test_snp_parameters_the_firmware_would_refuse_are_never_written(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _params(**kw)


def test_the_technology_and_the_parameters_must_agree() -> None:
    with pytest.raises(ValueError):
        build_domain_xml(
            _spec(),
            launch_id="0" * 32,
            domain_name="d",
            sev=SevLaunchParams(51, 1, 3, b"", b""),
            loader=LoaderType.ROM,
        )
    with pytest.raises(ValueError):
        build_domain_xml(
            _spec(mode=Technology.SEV, policy=3),
            launch_id="0" * 32,
            domain_name="d",
            sev=_params(),
            loader=LoaderType.ROM,
        )


def test_an_snp_domain_loads_its_firmware_as_a_rom_only() -> None:
    """QEMU puts SNP firmware in guest_memfd-backed private memory, which read-only pflash memslots
    cannot be: the writer refuses a pflash loader for an SNP guest rather than write a domain QEMU
    would not start."""
    spec, params = CASES["authorised"]
    with pytest.raises(ValueError, match="ROM"):
        build_domain_xml(spec, launch_id="0" * 32, domain_name="d", sev=params, loader=LoaderType.PFLASH)
    assert parse_domain_xml(_xml("authorised")).loader_type == "rom"
