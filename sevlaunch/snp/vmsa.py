"""SEV-SNP VM save areas: the VMSA page of every vCPU that SNP_LAUNCH_UPDATE measures (page type VMSA).

The page layout and the register model are `sevlaunch.sev.vmsa.VMSA`'s (the SEV-ES save area, APM
vol. 2 table B-4): an SNP guest starts from the same x86 reset state, with three differences that
decide the digest:

* `sev_features` (the "guest features") must have bit 0, SNPActive, set; the other bits are the
  SEV features the VMM enables (APM vol. 2 table 15-34; Linux `SVM_SEV_FEAT_*`), see `GuestFeature`.
* The VMM: QEMU/KVM's reset state (as for SEV-ES with KVM_SEV_INIT2), Amazon EC2's and Google Compute
  Engine's, which differ in a few segment attributes, RDX, the PAT and the FPU state (the values
  sev-snp-measure 0.0.13 models, `VmmType`).
* COCONUT-SVSM guests start the SVSM itself, in 32-bit protected mode at its entry point (`svsm_vmsa`).

The BSP starts at the reset vector 0xfffffff0 and every AP at the firmware's SEV-ES reset block address;
all vCPUs' VMSAs are measured at the same GPA (`gctx.VMSA_GPA`).
"""

from __future__ import annotations

from dataclasses import replace
from enum import IntFlag, StrEnum

from sevlaunch.sev.errors import MalformedInput, Unsupported
from sevlaunch.sev.vmsa import BSP_RESET_EIP, VMSA, Segment, VMSALayout
from sevlaunch.snp.errors import SnpReason

# The vCPU count QEMU accepts for an x86 machine (`max_cpus` of pc-q35); a bound for input checks.
MAX_VCPUS = 4096


class GuestFeature(IntFlag):
    """SEV_FEATURES bits of the VMSA (APM vol. 2 "SEV_FEATURES"; SEV_STATUS MSR bit n + 2)."""

    SNP_ACTIVE = 1 << 0
    VTOM = 1 << 1
    REFLECT_VC = 1 << 2
    RESTRICTED_INJECTION = 1 << 3
    ALTERNATE_INJECTION = 1 << 4
    DEBUG_SWAP = 1 << 5
    PREVENT_HOST_IBS = 1 << 6
    BTB_ISOLATION = 1 << 7
    VMPL_SSS = 1 << 8
    SECURE_TSC = 1 << 9
    VMGEXIT_PARAMETER = 1 << 10
    IBS_VIRTUALIZATION = 1 << 12
    VMSA_REG_PROT = 1 << 14
    SMT_PROTECTION = 1 << 15


# sev-snp-measure's default (`--guest-features 0x1`); 0x21 adds DebugSwap.
DEFAULT_GUEST_FEATURES = GuestFeature.SNP_ACTIVE


class VmmType(StrEnum):
    """The hypervisor that creates the VMSAs; spelled as sev-snp-measure's `--vmm-type` spells them."""

    QEMU = "QEMU"
    EC2 = "ec2"
    GCE = "gce"

    @classmethod
    def parse(cls, name: str | VmmType) -> VmmType:
        """Case-insensitive: `qemu`, `QEMU`, `ec2`, `EC2`, `gce`, ..."""
        for member in cls:
            if member.value.lower() == str(name).lower():
                return member
        raise Unsupported(
            SnpReason.UNKNOWN_VMM_TYPE,
            f"unknown VMM type {name!r} (known: {', '.join(m.value for m in cls)})",
        )


# EC2 and GCE hand the guest RDX = 0x600 whatever the vCPU (family 6 model 0, a generic value), where
# QEMU/KVM put the vCPU's CPUID(1).EAX.
_CLOUD_RDX = 0x600
# GCE's hypervisor writes its own PAT value.
_GCE_PAT = 0x00070106
_EC2_DATA_ATTRIB = 0x92  # not accessed
_EC2_TSS_ATTRIB = 0x83  # available 16-bit TSS
_EC2_BSP_CODE_ATTRIB = 0x9A


def check_guest_features(guest_features: int) -> int:
    if isinstance(guest_features, bool) or not 0 <= guest_features < (1 << 64):
        raise MalformedInput(SnpReason.BAD_GUEST_FEATURES, f"guest features {guest_features!r} are not a u64")
    # VMRUN of an SNP guest fails unless its VMSA says SNPActive; a digest without it can never occur.
    if not guest_features & GuestFeature.SNP_ACTIVE:
        raise MalformedInput(
            SnpReason.BAD_GUEST_FEATURES, f"guest features {guest_features:#x} lack bit 0 (SNPActive)"
        )
    return int(guest_features)


def snp_vmsa(*, eip: int, bsp: bool, vcpu_sig: int | None, guest_features: int, vmm_type: VmmType) -> VMSA:
    """The save area of one vCPU starting at `eip`. `vcpu_sig` (CPUID 1 EAX) is needed for QEMU only."""
    features = check_guest_features(guest_features)
    vmm = VmmType.parse(vmm_type)
    if vmm is VmmType.QEMU:
        if vcpu_sig is None:
            raise Unsupported(SnpReason.MISSING_VCPU_TYPE, "a QEMU guest needs its vCPU type or signature")
        return VMSA.reset_state(eip=eip, vcpu_sig=vcpu_sig, layout=VMSALayout.init2, sev_features=features)
    # EC2 and GCE leave the FPU state zero, like KVM before KVM_SEV_INIT2.
    base = VMSA.reset_state(eip=eip, vcpu_sig=_CLOUD_RDX, layout=VMSALayout.legacy, sev_features=features)
    if vmm is VmmType.GCE:
        return replace(base, g_pat=_GCE_PAT)
    return replace(
        base,
        cs=replace(base.cs, attrib=_EC2_BSP_CODE_ATTRIB) if bsp else base.cs,
        ss=replace(base.ss, attrib=_EC2_DATA_ATTRIB),
        tr=replace(base.tr, attrib=_EC2_TSS_ATTRIB),
    )


def snp_vmsa_pages(
    *, vcpus: int, ap_eip: int | None, vcpu_sig: int | None, guest_features: int, vmm_type: VmmType
) -> list[bytes]:
    """The VMSA page of every vCPU in launch order, the BSP (vCPU 0) first. The APs share one bytes
    object: their pages are identical."""
    if isinstance(vcpus, bool) or not 1 <= vcpus <= MAX_VCPUS:
        raise MalformedInput(SnpReason.BAD_VCPU_COUNT, f"vCPU count {vcpus!r} outside 1..{MAX_VCPUS}")
    pages = [
        snp_vmsa(
            eip=BSP_RESET_EIP, bsp=True, vcpu_sig=vcpu_sig, guest_features=guest_features, vmm_type=vmm_type
        ).to_bytes()
    ]
    if vcpus > 1:
        if not ap_eip:
            raise Unsupported(
                SnpReason.NO_SEV_ES_RESET_BLOCK,
                "the firmware declares no AP reset address, so APs cannot start",
            )
        ap = snp_vmsa(
            eip=ap_eip, bsp=False, vcpu_sig=vcpu_sig, guest_features=guest_features, vmm_type=vmm_type
        )
        pages.extend([ap.to_bytes()] * (vcpus - 1))
    return pages


# COCONUT-SVSM's entry state: flat 32-bit protected mode (CR0.PE), code selector 8 and data selector 16 of
# the SVSM's GDT, 4 GiB limits, granularity and default-size bits in the attributes.
_SVSM_CODE = Segment(8, 0xC9B, 0xFFFFFFFF, 0)
_SVSM_DATA = Segment(16, 0xC93, 0xFFFFFFFF, 0)
_SVSM_GS = Segment(0, 0x093, 0xFFFF, 0)
# The SVSM runs at VMPL0 with SNPActive only: the guest's features are the SVSM's to choose later.
SVSM_SEV_FEATURES = int(GuestFeature.SNP_ACTIVE)


def svsm_vmsa(*, eip: int, vcpu_sig: int) -> VMSA:
    """The save area of every vCPU of a COCONUT-SVSM launch under QEMU (they all start at the SVSM
    entry point). Like sev-snp-measure 0.0.13, whose SVSM digests the known answers pin, MXCSR holds
    its reset value and the x87 control word stays zero."""
    if not 0 <= eip <= 0xFFFFFFFF:
        raise MalformedInput(SnpReason.NO_SVSM_INFO, f"SVSM entry point {eip:#x} is not a 32-bit address")
    base = VMSA.reset_state(
        eip=BSP_RESET_EIP, vcpu_sig=vcpu_sig, layout=VMSALayout.init2, sev_features=SVSM_SEV_FEATURES
    )
    return replace(
        base,
        es=_SVSM_DATA,
        cs=_SVSM_CODE,
        ss=_SVSM_DATA,
        ds=_SVSM_DATA,
        fs=_SVSM_DATA,
        gs=_SVSM_GS,
        cr0=0x11,  # CR0.PE | CR0.ET
        rip=eip,
        x87_fcw=0,
    )
