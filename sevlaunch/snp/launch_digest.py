"""The SEV-SNP launch digest of a firmware image and guest configuration, as sev-snp-measure's `--mode snp`
and `--mode snp:svsm` compute it (PROTOCOL.md section 11).

A VMM launches an SNP guest with these SNP_LAUNCH_UPDATE commands, in this order (QEMU
`target/i386/sev.c`; EC2's and GCE's VMMs as sev-snp-measure models them):

1. the firmware image as NORMAL pages, mapped to end at 4 GiB (`ovmf_hash` is the digest after this step
   alone, which sev-snp-measure's `--snp-ovmf-hash` lets a caller supply instead of the image);
2. for each section of the firmware's SEV metadata, in order: SNP_SEC_MEM as ZERO pages (UNMEASURED on
   GCE), SNP_SECRETS as one SECRETS page, CPUID as one CPUID page (EC2 issues the CPUID pages after every
   other section), SVSM_CAA as ZERO pages, SNP_KERNEL_HASHES as one NORMAL page holding QEMU's kernel
   hashes table at the offset the footer declares, or as ZERO pages without a kernel;
3. one VMSA page per vCPU, the BSP first.

With COCONUT-SVSM (`svsm_launch_plan`), the OVMF image is followed by the SVSM image, mapped to end
below the OVMF and its variable store, and the sections are the SVSM's.
"""

from __future__ import annotations

from sevlaunch.sev.errors import MalformedInput, Unsupported
from sevlaunch.sev.kernel_hashes import build_hashes_table
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.gctx import (
    DIGEST_SIZE,
    PAGE_SIZE,
    VMSA_GPA,
    LaunchPlan,
    LaunchUpdate,
    PageType,
    SnpLaunchDigest,
    digest_updates,
)
from sevlaunch.snp.metadata import MetadataSection, SectionType, SnpFirmware
from sevlaunch.snp.vmsa import DEFAULT_GUEST_FEATURES, MAX_VCPUS, VmmType, snp_vmsa_pages, svsm_vmsa

NO_KERNEL_HASHES_MESSAGE = "Kernel specified but OVMF metadata doesn't include SNP_KERNEL_HASHES section"


def _image_update(image: bytes, firmware: SnpFirmware) -> LaunchUpdate:
    return LaunchUpdate(PageType.NORMAL, firmware.gpa, image, len(image))


def ovmf_hash(ovmf: bytes) -> SnpLaunchDigest:
    """The launch digest after the firmware's pages alone: sev-snp-measure's `--mode snp:ovmf-hash`."""
    return digest_updates([_image_update(ovmf, SnpFirmware.from_bytes(ovmf))])


def _kernel_hashes_page(firmware: SnpFirmware, section: MetadataSection, table: bytes) -> bytes:
    # QEMU writes the table at the footer's SEV hash table address and launches the section's page: the
    # table must sit inside that one page, or the pages the guest checks would not be the measured ones.
    where = firmware.hashes_table_gpa
    if section.size != PAGE_SIZE:
        raise Unsupported(
            SnpReason.NO_KERNEL_HASHES_SECTION,
            f"SNP_KERNEL_HASHES section of {section.size:#x} bytes, expected one page",
        )
    if where is None or not section.gpa <= where <= section.end - len(table):
        raise Unsupported(
            SnpReason.NO_KERNEL_HASHES_SECTION,
            "the firmware's SEV hash table address does not lie in its SNP_KERNEL_HASHES page",
        )
    offset = where - section.gpa
    return bytes(offset) + table + bytes(PAGE_SIZE - offset - len(table))


def _section_updates(
    firmware: SnpFirmware, *, hashes_table: bytes | None, vmm_type: VmmType
) -> list[LaunchUpdate]:
    updates: list[LaunchUpdate] = []
    for section in firmware.sections:
        kind = section.section_type
        if kind is SectionType.SNP_SEC_MEM:
            page_type = PageType.UNMEASURED if vmm_type is VmmType.GCE else PageType.ZERO
            updates.append(LaunchUpdate(page_type, section.gpa, None, section.size))
        elif kind is SectionType.SNP_SECRETS:
            updates.append(LaunchUpdate(PageType.SECRETS, section.gpa))
        elif kind is SectionType.CPUID:
            if vmm_type is not VmmType.EC2:
                updates.append(LaunchUpdate(PageType.CPUID, section.gpa))
        elif kind is SectionType.SVSM_CAA:
            updates.append(LaunchUpdate(PageType.ZERO, section.gpa, None, section.size))
        elif kind is SectionType.SNP_KERNEL_HASHES:
            if hashes_table is None:
                updates.append(LaunchUpdate(PageType.ZERO, section.gpa, None, section.size))
            else:
                page = _kernel_hashes_page(firmware, section, hashes_table)
                updates.append(LaunchUpdate(PageType.NORMAL, section.gpa, page, PAGE_SIZE))
        else:  # pragma: no cover - SectionType has no other members
            raise Unsupported(SnpReason.UNKNOWN_SECTION_TYPE, f"section type {kind!r}")
    if vmm_type is VmmType.EC2:
        updates.extend(
            LaunchUpdate(PageType.CPUID, s.gpa)
            for s in firmware.sections
            if s.section_type is SectionType.CPUID
        )
    return updates


def _vmsa_updates(pages: list[bytes]) -> list[LaunchUpdate]:
    return [LaunchUpdate(PageType.VMSA, VMSA_GPA, page) for page in pages]


def launch_plan(
    ovmf: bytes,
    *,
    vcpus: int = 1,
    vcpu_sig: int | None = None,
    guest_features: int = DEFAULT_GUEST_FEATURES,
    vmm_type: VmmType | str = VmmType.QEMU,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
    cmdline: str | bytes | None = None,
    ovmf_hash: bytes | None = None,
) -> LaunchPlan:
    """The SNP_LAUNCH_UPDATE commands of an SNP guest booting `ovmf`, in order.

    `vcpu_sig` is CPUID(1).EAX of the vCPU type (`sevlaunch.sev.vmsa.vcpu_signature`), needed under
    QEMU only. A kernel (with optional initrd and command line; an empty command line is the same as
    none) is measured through the kernel hashes page, which the firmware must declare. With
    `ovmf_hash` (48 bytes, see `ovmf_hash()`), the chain starts from it and the image's pages are left
    out; the image is still read for its metadata.
    """
    vmm = VmmType.parse(vmm_type)
    if kernel is None and (initrd is not None or cmdline is not None):
        raise TypeError("an initrd or a command line needs a kernel")
    firmware = SnpFirmware.from_bytes(ovmf)
    table = None
    if kernel is not None:
        if not firmware.metadata or not firmware.metadata.has(SectionType.SNP_KERNEL_HASHES):
            raise Unsupported(SnpReason.NO_KERNEL_HASHES_SECTION, NO_KERNEL_HASHES_MESSAGE)
        table = build_hashes_table(kernel, initrd, cmdline)
    if firmware.sev_es_reset_eip is None:
        raise Unsupported(
            SnpReason.NO_SEV_ES_RESET_BLOCK, "the firmware has no SEV-ES reset block: it cannot run SEV-SNP"
        )
    if ovmf_hash is not None:
        if len(ovmf_hash) != DIGEST_SIZE:
            raise MalformedInput(SnpReason.BAD_OVMF_HASH, f"an OVMF hash is 48 bytes, got {len(ovmf_hash)}")
        updates: list[LaunchUpdate] = []
    else:
        updates = [_image_update(ovmf, firmware)]
    updates += _section_updates(firmware, hashes_table=table, vmm_type=vmm)
    pages = snp_vmsa_pages(
        vcpus=vcpus,
        ap_eip=firmware.sev_es_reset_eip,
        vcpu_sig=vcpu_sig,
        guest_features=guest_features,
        vmm_type=vmm,
    )
    updates += _vmsa_updates(pages)
    if ovmf_hash is not None:
        return LaunchPlan(tuple(updates), seed=bytes(ovmf_hash))
    return LaunchPlan(tuple(updates))


def launch_digest(
    ovmf: bytes,
    *,
    vcpus: int = 1,
    vcpu_sig: int | None = None,
    guest_features: int = DEFAULT_GUEST_FEATURES,
    vmm_type: VmmType | str = VmmType.QEMU,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
    cmdline: str | bytes | None = None,
    ovmf_hash: bytes | None = None,
) -> SnpLaunchDigest:
    """The 48-byte SNP launch digest (the report's MEASUREMENT) of `launch_plan`'s guest."""
    return launch_plan(
        ovmf,
        vcpus=vcpus,
        vcpu_sig=vcpu_sig,
        guest_features=guest_features,
        vmm_type=vmm_type,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        ovmf_hash=ovmf_hash,
    ).digest()


def svsm_launch_plan(ovmf: bytes, svsm: bytes, *, vars_size: int, vcpus: int, vcpu_sig: int) -> LaunchPlan:
    """The SNP_LAUNCH_UPDATE commands of a COCONUT-SVSM guest under QEMU: `ovmf` ends at 4 GiB, its
    variable store of `vars_size` bytes sits below it and the SVSM image below that."""
    if isinstance(vars_size, bool) or not 0 <= vars_size < (1 << 32):
        raise MalformedInput(SnpReason.BAD_FIRMWARE_IMAGE, f"OVMF variable store size {vars_size!r}")
    firmware = SnpFirmware.from_bytes(ovmf)
    image = SnpFirmware.from_bytes(svsm, end_at=firmware.gpa - vars_size)
    if image.svsm_info is None:
        raise Unsupported(SnpReason.NO_SVSM_INFO, "the SVSM image's footer has no SVSM info entry")
    if isinstance(vcpus, bool) or not 1 <= vcpus <= MAX_VCPUS:
        raise MalformedInput(SnpReason.BAD_VCPU_COUNT, f"vCPU count {vcpus!r} outside 1..{MAX_VCPUS}")
    entry = svsm_vmsa(eip=image.gpa + image.svsm_info, vcpu_sig=vcpu_sig).to_bytes()
    updates = [_image_update(ovmf, firmware), _image_update(svsm, image)]
    updates += _section_updates(image, hashes_table=None, vmm_type=VmmType.QEMU)
    # Every vCPU starts in the SVSM at its entry point: the pages are identical.
    updates += _vmsa_updates([entry] * vcpus)
    return LaunchPlan(tuple(updates))


def svsm_launch_digest(
    ovmf: bytes, svsm: bytes, *, vars_size: int, vcpus: int, vcpu_sig: int
) -> SnpLaunchDigest:
    """sev-snp-measure's `--mode snp:svsm` digest."""
    return svsm_launch_plan(ovmf, svsm, vars_size=vars_size, vcpus=vcpus, vcpu_sig=vcpu_sig).digest()
