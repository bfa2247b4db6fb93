"""SEV-ES VM save areas (VMSA) as QEMU/KVM hand them to LAUNCH_UPDATE_VMSA (PROTOCOL.md §5).

The page layout is the SEV-ES save area of the AMD64 APM vol. 2, table B-4 (Linux
`arch/x86/include/asm/svm.h`, `struct sev_es_save_area`); only the fields a reset vCPU sets are
modelled. The register values are the x86 reset state as KVM's `kvm_vcpu_reset()`/`svm_vcpu_reset()`
leave it after QEMU's `x86_cpu_reset()`, which is what the firmware encrypts:

* CS selector 0xf000 and the reset vector: the BSP starts at 0xfffffff0; an AP starts at the address
  of OVMF's SEV-ES reset block (CS base = bits 31..16, IP = bits 15..0, QEMU `sev_es_set_reset_vector`).
* RDX holds the CPUID(1).EAX signature of the guest vCPU, as after a real reset.
* EFER.SVME (KVM sets it), CR4.MCE, CR0.ET, DR6/DR7 and RFLAGS at their reset values, the PAT MSR at
  its power-on value, XCR0 = x87.
* MXCSR and the x87 FCW: KVM with `KVM_SEV_INIT2` (Linux 6.10+) syncs the FPU reset state into the
  VMSA (0x1f80 and 0x037f), older KVM (`KVM_SEV_ES_INIT`) leaves both 0. That is `VMSALayout`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.sev.vcpu import (
    BSP_RESET_EIP,
    VCPU_TYPES,
    VMSA_SIZE,
    VMSALayout,
    cpu_signature,
    vcpu_signature,
)

__all__ = [
    "BSP_RESET_EIP",
    "VCPU_TYPES",
    "VMSA",
    "VMSA_SIZE",
    "Segment",
    "VMSALayout",
    "build_vmsa",
    "cpu_signature",
    "vcpu_signature",
]


@dataclass(frozen=True)
class Segment:
    """`struct vmcb_seg`: selector u16, attrib u16, limit u32, base u64 (16 bytes)."""

    selector: int = 0
    attrib: int = 0
    limit: int = 0
    base: int = 0

    _STRUCT = struct.Struct("<HHIQ")

    def to_bytes(self) -> bytes:
        try:
            return self._STRUCT.pack(self.selector, self.attrib, self.limit, self.base)
        except struct.error:
            raise MalformedInput(Reason.BAD_FIELD, f"segment field out of range: {self}") from None

    @classmethod
    def from_bytes(cls, data: bytes) -> Segment:
        if len(data) != cls._STRUCT.size:
            raise MalformedInput(Reason.BAD_LENGTH, f"segment must be 16 bytes, got {len(data)}")
        return cls(*cls._STRUCT.unpack(data))


# Offsets in the save area (APM vol. 2 table B-4). Segments first, 16 bytes each.
_SEGMENT_OFFSETS = {
    "es": 0x000, "cs": 0x010, "ss": 0x020, "ds": 0x030, "fs": 0x040,
    "gs": 0x050, "gdtr": 0x060, "ldtr": 0x070, "idtr": 0x080, "tr": 0x090,
}  # fmt: skip
# Scalar registers: (offset, struct format).
_SCALAR_FIELDS = {
    "efer": (0x0D0, "<Q"),
    "cr4": (0x148, "<Q"),
    "cr3": (0x150, "<Q"),
    "cr0": (0x158, "<Q"),
    "dr7": (0x160, "<Q"),
    "dr6": (0x168, "<Q"),
    "rflags": (0x170, "<Q"),
    "rip": (0x178, "<Q"),
    "rsp": (0x1D8, "<Q"),
    "rax": (0x1F8, "<Q"),
    "g_pat": (0x268, "<Q"),
    "rdx": (0x310, "<Q"),
    "sev_features": (0x3B0, "<Q"),
    "xcr0": (0x3E8, "<Q"),
    "mxcsr": (0x408, "<I"),
    "x87_fcw": (0x410, "<H"),
}

PAT_RESET = 0x0007040600070406  # APM vol. 2 §7.8.1: PAT MSR power-on value
_DATA_SEGMENT_ATTRIB = 0x93  # present, writable, accessed
_CODE_SEGMENT_ATTRIB = 0x9B  # present, readable code, accessed
_LDT_ATTRIB = 0x82
_TSS_ATTRIB = 0x8B  # busy 32-bit TSS


@dataclass(frozen=True, kw_only=True)
class VMSA:
    """An SEV-ES save area page. `from_bytes` refuses a page that holds state outside these fields."""

    es: Segment = Segment()
    cs: Segment = Segment()
    ss: Segment = Segment()
    ds: Segment = Segment()
    fs: Segment = Segment()
    gs: Segment = Segment()
    gdtr: Segment = Segment()
    ldtr: Segment = Segment()
    idtr: Segment = Segment()
    tr: Segment = Segment()
    efer: int = 0
    cr4: int = 0
    cr3: int = 0
    cr0: int = 0
    dr7: int = 0
    dr6: int = 0
    rflags: int = 0
    rip: int = 0
    rsp: int = 0
    rax: int = 0
    g_pat: int = 0
    rdx: int = 0
    sev_features: int = 0
    xcr0: int = 0
    mxcsr: int = 0
    x87_fcw: int = 0

    def to_bytes(self) -> bytes:
        page = bytearray(VMSA_SIZE)
        for name, offset in _SEGMENT_OFFSETS.items():
            segment: Segment = getattr(self, name)
            page[offset : offset + 16] = segment.to_bytes()
        for name, (offset, fmt) in _SCALAR_FIELDS.items():
            try:
                struct.pack_into(fmt, page, offset, getattr(self, name))
            except struct.error:
                raise MalformedInput(Reason.BAD_FIELD, f"VMSA field {name} out of range") from None
        return bytes(page)

    @classmethod
    def from_bytes(cls, data: bytes) -> VMSA:
        if len(data) != VMSA_SIZE:
            raise MalformedInput(Reason.BAD_LENGTH, f"VMSA must be {VMSA_SIZE} bytes, got {len(data)}")
        values: dict[str, object] = {}
        covered = bytearray(data)
        for name, offset in _SEGMENT_OFFSETS.items():
            values[name] = Segment.from_bytes(data[offset : offset + 16])
            covered[offset : offset + 16] = bytes(16)
        for name, (offset, fmt) in _SCALAR_FIELDS.items():
            (values[name],) = struct.unpack_from(fmt, data, offset)
            size = struct.calcsize(fmt)
            covered[offset : offset + size] = bytes(size)
        stray = next((i for i, b in enumerate(covered) if b), None)
        if stray is not None:
            raise MalformedInput(
                Reason.BAD_FIELD, f"VMSA holds state at offset {stray:#x} that is not modelled"
            )
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def reset_state(cls, *, eip: int, vcpu_sig: int, layout: VMSALayout, sev_features: int = 0) -> VMSA:
        """The reset vCPU that QEMU/KVM launch, starting at `eip` (CS base from its high half)."""
        if not 0 <= eip <= 0xFFFFFFFF:
            raise MalformedInput(Reason.BAD_FIELD, f"reset EIP {eip:#x} is not a 32-bit address")
        if not 0 <= vcpu_sig <= 0xFFFFFFFF:
            raise MalformedInput(Reason.BAD_FIELD, f"vCPU signature {vcpu_sig:#x} is not 32 bits")
        layout = VMSALayout(layout)
        data = Segment(0, _DATA_SEGMENT_ATTRIB, 0xFFFF, 0)
        return cls(
            es=data,
            cs=Segment(0xF000, _CODE_SEGMENT_ATTRIB, 0xFFFF, eip & 0xFFFF0000),
            ss=data,
            ds=data,
            fs=data,
            gs=data,
            gdtr=Segment(0, 0, 0xFFFF, 0),
            ldtr=Segment(0, _LDT_ATTRIB, 0xFFFF, 0),
            idtr=Segment(0, 0, 0xFFFF, 0),
            tr=Segment(0, _TSS_ATTRIB, 0xFFFF, 0),
            efer=0x1000,  # EFER.SVME: KVM requires it set in an SVM guest
            cr4=0x40,  # CR4.MCE: KVM sets it at reset
            cr0=0x10,  # CR0.ET
            dr7=0x400,
            dr6=0xFFFF0FF0,
            rflags=0x2,
            rip=eip & 0xFFFF,
            g_pat=PAT_RESET,
            rdx=vcpu_sig,
            sev_features=sev_features,
            xcr0=0x1,
            mxcsr=0x1F80 if layout is VMSALayout.init2 else 0,
            x87_fcw=0x037F if layout is VMSALayout.init2 else 0,
        )


def build_vmsa(
    *,
    eip: int | None,
    vcpu_sig: int,
    layout: VMSALayout = VMSALayout.init2,
    bsp: bool,
    sev_features: int = 0,
) -> bytes:
    """The 4096-byte VMSA of one vCPU, QEMU as VMM.

    The BSP always starts at the reset vector 0xfffffff0 (`eip` is ignored and may be None); an AP
    starts at `eip`, the OVMF's SEV-ES reset block address (`OVMF.sev_es_reset_eip`).
    """
    if bsp:
        start = BSP_RESET_EIP
    elif eip is None:
        raise TypeError("an AP VMSA needs the SEV-ES reset EIP")
    else:
        start = eip
    return VMSA.reset_state(eip=start, vcpu_sig=vcpu_sig, layout=layout, sev_features=sev_features).to_bytes()
