"""The vCPU facts a launch digest needs before any save area is built: the VMSA size, the KVM init
layout, and the CPUID(1).EAX signature of QEMU's AMD models.

Apart from `vmsa` so that a SEV launch digest (no VMSAs) and the command line's option tables load
neither the save-area model nor `dataclasses`; `sevlaunch.sev.vmsa` re-exports every name.
"""

from __future__ import annotations

from enum import StrEnum

from sevlaunch.sev.errors import MalformedInput, Reason, Unsupported

VMSA_SIZE = 4096
BSP_RESET_EIP = 0xFFFFFFF0


class VMSALayout(StrEnum):
    """Which KVM VM init produced the save area: it decides MXCSR and the x87 FCW."""

    init2 = "init2"  # KVM_SEV_INIT2: MXCSR 0x1f80, FCW 0x037f (sev-snp-measure's QEMU model)
    legacy = "legacy"  # KVM_SEV_ES_INIT: both zero (sevctl's VMSAs)


def cpu_signature(family: int, model: int, stepping: int) -> int:
    """CPUID Fn0000_0001_EAX from family/model/stepping (AMD pub. 25481; QEMU `cpu_x86_version`):
    families above 0xf put 0xf in the base field and the rest in the extended one; the model's high
    nibble always goes to the extended model field."""
    if not 0 <= family <= 0xF + 0xFF:
        raise MalformedInput(Reason.BAD_FIELD, f"vCPU family {family} outside 0..{0xF + 0xFF}")
    if not 0 <= model <= 0xFF:
        raise MalformedInput(Reason.BAD_FIELD, f"vCPU model {model} outside 0..255")
    if not 0 <= stepping <= 0xF:
        raise MalformedInput(Reason.BAD_FIELD, f"vCPU stepping {stepping} outside 0..15")
    base_family, ext_family = (0xF, family - 0xF) if family > 0xF else (family, 0)
    return (ext_family << 20) | ((model >> 4) << 16) | (base_family << 8) | ((model & 0xF) << 4) | stepping


# QEMU's built-in AMD EPYC models (target/i386/cpu.c builtin_x86_defs and their versions), the same
# names sev-snp-measure accepts.
_EPYC = cpu_signature(23, 1, 2)
_ROME = cpu_signature(23, 49, 0)
_MILAN = cpu_signature(25, 1, 1)
_GENOA = cpu_signature(25, 17, 0)
_TURIN = cpu_signature(26, 0, 0)
VCPU_TYPES: dict[str, int] = {
    "EPYC": _EPYC,
    "EPYC-v1": _EPYC,
    "EPYC-v2": _EPYC,
    "EPYC-IBPB": _EPYC,
    "EPYC-v3": _EPYC,
    "EPYC-v4": _EPYC,
    "EPYC-Rome": _ROME,
    "EPYC-Rome-v1": _ROME,
    "EPYC-Rome-v2": _ROME,
    "EPYC-Rome-v3": _ROME,
    "EPYC-Milan": _MILAN,
    "EPYC-Milan-v1": _MILAN,
    "EPYC-Milan-v2": _MILAN,
    "EPYC-Genoa": _GENOA,
    "EPYC-Genoa-v1": _GENOA,
    "EPYC-Turin": _TURIN,
}


def vcpu_signature(
    name: str | None = None,
    *,
    family: int | None = None,
    model: int | None = None,
    stepping: int | None = None,
) -> int:
    """The vCPU signature of a named QEMU CPU model, or of an explicit family/model/stepping."""
    explicit = (family, model, stepping)
    if name is not None:
        if any(v is not None for v in explicit):
            raise TypeError("give a vCPU type name or family/model/stepping, not both")
        try:
            return VCPU_TYPES[name]
        except KeyError:
            raise Unsupported(
                Reason.UNKNOWN_VCPU_TYPE, f"unknown vCPU type {name!r} (known: {', '.join(VCPU_TYPES)})"
            ) from None
    if family is None or model is None or stepping is None:
        raise TypeError("give a vCPU type name or all of family, model and stepping")
    return cpu_signature(family, model, stepping)
