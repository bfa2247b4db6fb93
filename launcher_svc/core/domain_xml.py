"""The libvirt domain XML of an SEV/SEV-ES guest, built with ElementTree (never string formatting).

What makes it an attested SEV launch (PROTOCOL.md section 9):
* `<launchSecurity type='sev'>` with cbitpos and reducedPhysBits from the platform, the owner's policy,
  GODH (`dhCert`) and session blob (base64), and `kernelHashes='yes'` when a kernel is given, so QEMU
  measures the kernel, initrd and command line into the launch digest;
* a read-only, stateless OVMF (`<loader readonly='yes' stateless='yes'>`, no `<nvram>`): only the
  measured image runs. The loader type is the image's (`launcher_svc.core.loader`): `pflash` for a
  split OVMF code image, `rom` (QEMU's `-bios`) for a combined one and for every SEV-SNP guest;
* `<memoryBacking><locked/>`: encrypted pages cannot be swapped or moved;
* virtio devices with `iommu='on'`, so they use bounce buffers in shared memory;
* our own `<metadata>` element naming the launch, which lets the reconciler tell our domains apart;
* the vCPU model pinned (`<cpu mode='custom' match='exact' check='full'>`, `fallback='forbid'`) when the
  spec names one (always for SEV-ES, where the launcher supplies its default): an SEV-ES launch measures
  each vCPU's VMSA, whose reset RDX is the model's family/model/stepping, so QEMU must not pick a CPU
  model of its own (the host's, or whatever the machine type's default is).

An SEV-SNP guest (PROTOCOL.md section 11; libvirt 10.5+) gets the same hardening and
`<launchSecurity type='sev-snp'>` instead: cbitpos, reducedPhysBits, the 64-bit policy in lower-case
hex, and the owner's authorisation as libvirt passes it to QEMU's `sev-snp-guest` object: `idBlock`,
`idAuth` and `hostData` (base64), `authorKey='yes'` when the ID auth carries an author key, and
`kernelHashes='yes'` with a kernel. The init data whose SHA-256 is HOST_DATA reaches the guest through
fw_cfg (`<sysinfo type='fwcfg'>`, entry `opt/org.sevlaunch/init-data`): not measured, and it needs not
be, since the report's HOST_DATA binds it.
"""

from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from launcher_svc.core.loader import LoaderType
from launcher_svc.core.spec import GuestSpec, validate_vcpu_type
from sevlaunch.sev.technology import Technology

METADATA_NS = "urn:sevlaunch:launch:v1"
METADATA_PREFIX = "sevlaunch"
ET.register_namespace(METADATA_PREFIX, METADATA_NS)


@dataclass(frozen=True)
class SevLaunchParams:
    cbitpos: int
    reduced_phys_bits: int
    policy: int
    dh_cert: bytes
    session: bytes

    def __post_init__(self) -> None:
        if not 0 < self.cbitpos < 64 or not 0 <= self.reduced_phys_bits < 64:
            raise ValueError("cbitpos/reducedPhysBits out of range")
        if not 0 <= self.policy <= 0xFFFF_FFFF:
            raise ValueError("policy out of range")


ID_BLOCK_SIZE = 96
ID_AUTH_SIZE = 0x1000
HOST_DATA_SIZE = 32
MAX_INIT_DATA = 32 * 1024
INIT_DATA_FW_CFG = "opt/org.sevlaunch/init-data"


@dataclass(frozen=True)
class SnpLaunchParams:
    """What an SEV-SNP domain's `<launchSecurity>` carries. The ID block, ID auth and HOST_DATA are the
    owner's (none of them secret); without an ID block the firmware checks no digest at all, so the
    launcher's SNP flow always passes one."""

    cbitpos: int
    reduced_phys_bits: int
    policy: int
    id_block: bytes = field(default=b"", repr=False)
    id_auth: bytes = field(default=b"", repr=False)
    host_data: bytes = field(default=b"", repr=False)
    author_key: bool = False
    init_data: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.cbitpos < 64 or not 0 <= self.reduced_phys_bits < 64:
            raise ValueError("cbitpos/reducedPhysBits out of range")
        if not 0 <= self.policy < 1 << 64:
            raise ValueError("an SNP policy is a u64")
        if bool(self.id_block) != bool(self.id_auth):
            raise ValueError("an ID block goes with its ID auth")
        if self.id_block and len(self.id_block) != ID_BLOCK_SIZE:
            raise ValueError(f"an ID block is {ID_BLOCK_SIZE} bytes")
        if self.id_auth and len(self.id_auth) != ID_AUTH_SIZE:
            raise ValueError(f"an ID auth is {ID_AUTH_SIZE} bytes")
        if self.host_data and len(self.host_data) != HOST_DATA_SIZE:
            raise ValueError(f"HOST_DATA is {HOST_DATA_SIZE} bytes")
        if self.author_key and not self.id_block:
            raise ValueError("an author key needs an ID block")
        if len(self.init_data) > MAX_INIT_DATA or not self.init_data.isascii():
            raise ValueError("init data is at most 32 KiB of ASCII")
        if any(b < 0x20 or b == 0x7F for b in self.init_data):
            # fw_cfg strings through XML: control characters would not survive the round trip.
            raise ValueError("init data holds control characters")


_MODEL_VERSION = re.compile(r"-v[0-9]+$")


def libvirt_cpu_model(vcpu_type: str) -> str:
    """libvirt's name for a vCPU type of `sevlaunch.sev.vmsa`. libvirt's CPU map knows QEMU's models
    without their version suffix (`EPYC`, not `EPYC-v4`); every version of a model has the same
    family/model/stepping, which is all of the CPU model that the VMSA measures (VCPU_TYPES maps
    them to one signature; the unit tests check it for every name)."""
    validate_vcpu_type(vcpu_type)
    return _MODEL_VERSION.sub("", vcpu_type)


def domain_name_for(launch_id: str, guest_name: str) -> str:
    """The libvirt domain name: unique per launch, recognisable by an operator."""
    return f"sl-{launch_id[:12]}-{guest_name}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text
    return el


def build_domain_xml(
    spec: GuestSpec,
    *,
    launch_id: str,
    domain_name: str,
    sev: SevLaunchParams | SnpLaunchParams,
    loader: LoaderType,
) -> str:
    if isinstance(sev, SnpLaunchParams) != (spec.mode is Technology.SEV_SNP):
        raise ValueError(f"{type(sev).__name__} for a {spec.mode.value} guest")
    if spec.mode is Technology.SEV_SNP and loader is not LoaderType.ROM:
        raise ValueError("QEMU loads SEV-SNP firmware as a ROM only")
    dom = ET.Element("domain", {"type": "kvm"})
    _sub(dom, "name", domain_name)
    meta = _sub(dom, "metadata")
    ET.SubElement(meta, f"{{{METADATA_NS}}}launch", {"id": launch_id, "guest": spec.name})
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    backing = _sub(dom, "memoryBacking")
    _sub(backing, "locked")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
    # Stateless, read-only firmware: no NVRAM store (no pflash unit 1), so nothing unmeasured can
    # change the boot; the measurement covers exactly the image the loader names.
    _sub(os_el, "loader", spec.firmware_path, readonly="yes", type=loader.value, stateless="yes")
    if spec.kernel_path is not None:
        _sub(os_el, "kernel", spec.kernel_path)
        if spec.initrd_path is not None:
            _sub(os_el, "initrd", spec.initrd_path)
        if spec.cmdline is not None:
            _sub(os_el, "cmdline", spec.cmdline)

    features = _sub(dom, "features")
    _sub(features, "acpi")
    if spec.vcpu_type is not None:
        # Exactly this model, checked after start, no fallback to a nearby one: the VMSAs depend on it.
        cpu = _sub(dom, "cpu", mode="custom", match="exact", check="full")
        _sub(cpu, "model", libvirt_cpu_model(spec.vcpu_type), fallback="forbid")
    # A reboot would run the guest again without a fresh measurement: SEV guests are destroyed instead.
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    for disk in spec.disks:
        d = _sub(devices, "disk", type="file", device="disk")
        _sub(d, "driver", name="qemu", type=disk.format.value, iommu="on")
        _sub(d, "source", file=disk.path)
        _sub(d, "target", dev=disk.target, bus="virtio")
        if disk.readonly:
            _sub(d, "readonly")
    for net in spec.networks:
        i = _sub(devices, "interface", type="network")
        _sub(i, "source", network=net)
        _sub(i, "model", type="virtio")
        _sub(i, "driver", iommu="on")
    # A balloon would let the host reclaim pages it cannot read anyway; locked memory forbids it.
    _sub(devices, "memballoon", model="none")

    if isinstance(sev, SnpLaunchParams):
        _snp_launch_security(dom, spec, sev)
        return ET.tostring(dom, encoding="unicode")
    ls_attrib = {"type": "sev"}
    if spec.kernel_path is not None:
        ls_attrib["kernelHashes"] = "yes"
    ls = _sub(dom, "launchSecurity", **ls_attrib)
    _sub(ls, "cbitpos", str(sev.cbitpos))
    _sub(ls, "reducedPhysBits", str(sev.reduced_phys_bits))
    _sub(ls, "policy", f"0x{sev.policy:04x}")
    _sub(ls, "dhCert", base64.b64encode(sev.dh_cert).decode())
    _sub(ls, "session", base64.b64encode(sev.session).decode())
    return ET.tostring(dom, encoding="unicode")


def _snp_launch_security(dom: ET.Element, spec: GuestSpec, snp: SnpLaunchParams) -> None:
    if snp.init_data:
        # After <features> in libvirt's order would do too: the schema interleaves the domain's children.
        sysinfo = ET.Element("sysinfo", {"type": "fwcfg"})
        entry = ET.SubElement(sysinfo, "entry", {"name": INIT_DATA_FW_CFG})
        entry.text = snp.init_data.decode("ascii")
        features = dom.find("features")
        children = list(dom)
        dom.insert(children.index(features) if features is not None else len(children), sysinfo)
    attrib = {"type": "sev-snp"}
    if spec.kernel_path is not None:
        attrib["kernelHashes"] = "yes"
    if snp.id_block:
        attrib["authorKey"] = "yes" if snp.author_key else "no"
    ls = _sub(dom, "launchSecurity", **attrib)
    _sub(ls, "cbitpos", str(snp.cbitpos))
    _sub(ls, "reducedPhysBits", str(snp.reduced_phys_bits))
    # libvirt's schema takes lower-case hex only (`hexuint`); 16 digits show it is the 64-bit policy.
    _sub(ls, "policy", f"0x{snp.policy:016x}")
    if snp.id_block:
        _sub(ls, "idBlock", base64.b64encode(snp.id_block).decode())
        _sub(ls, "idAuth", base64.b64encode(snp.id_auth).decode())
    if snp.host_data:
        _sub(ls, "hostData", base64.b64encode(snp.host_data).decode())


@dataclass(frozen=True)
class ParsedLaunch:
    """What QEMU takes from a domain's XML for an SEV launch; the emulated backend plays QEMU with it."""

    domain_name: str
    launch_id: str | None
    vcpus: int
    loader: str | None
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    sev: bool
    kernel_hashes: bool
    policy: int
    dh_cert: bytes
    session: bytes
    cpu_model: str | None = None  # the pinned `<cpu><model>`, if any
    loader_type: str | None = None  # `<loader type=...>`: "pflash" or "rom"
    # SEV-SNP (`sev` is False for these: no dhCert/session, no LAUNCH_MEASURE)
    snp: bool = False
    id_block: bytes = b""
    id_auth: bytes = b""
    host_data: bytes = b""
    author_key: bool = False
    init_data: bytes = b""


def _text(root: ET.Element, path: str) -> str | None:
    el = root.find(path)
    return None if el is None or el.text is None else el.text.strip()


def _b64(value: str | None) -> bytes:
    if not value:
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("launchSecurity holds invalid base64") from None


def parse_domain_xml(xml: str) -> ParsedLaunch:
    """Parses libvirt's (or our) domain XML. Raises ValueError on anything unexpected."""
    root = ET.fromstring(xml)  # noqa: S314 - XML from the local libvirt connection or our own builder
    name = _text(root, "name")
    if not name:
        raise ValueError("domain has no name")
    meta = root.find(f"metadata/{{{METADATA_NS}}}launch")
    ls = root.find("launchSecurity")
    sev = ls is not None and ls.get("type") == "sev"
    snp = ls is not None and ls.get("type") == "sev-snp"
    policy_text = _text(root, "launchSecurity/policy") if sev or snp else None
    loader_el = root.find("os/loader")
    init_data = b""
    for entry in root.findall("sysinfo[@type='fwcfg']/entry"):
        if entry.get("name") == INIT_DATA_FW_CFG and entry.text:
            init_data = entry.text.encode("ascii", "replace")
    return ParsedLaunch(
        domain_name=name,
        launch_id=meta.get("id") if meta is not None else None,
        vcpus=int(_text(root, "vcpu") or "1"),
        loader=_text(root, "os/loader"),
        kernel=_text(root, "os/kernel"),
        initrd=_text(root, "os/initrd"),
        cmdline=_text(root, "os/cmdline"),
        sev=sev,
        kernel_hashes=(sev or snp) and ls is not None and ls.get("kernelHashes") == "yes",
        policy=int(policy_text, 16) if policy_text else 0,
        dh_cert=_b64(_text(root, "launchSecurity/dhCert")) if sev else b"",
        session=_b64(_text(root, "launchSecurity/session")) if sev else b"",
        cpu_model=_text(root, "cpu/model"),
        loader_type=loader_el.get("type") if loader_el is not None else None,
        snp=snp,
        id_block=_b64(_text(root, "launchSecurity/idBlock")) if snp else b"",
        id_auth=_b64(_text(root, "launchSecurity/idAuth")) if snp else b"",
        host_data=_b64(_text(root, "launchSecurity/hostData")) if snp else b"",
        author_key=snp and ls is not None and ls.get("authorKey") == "yes",
        init_data=init_data,
    )
