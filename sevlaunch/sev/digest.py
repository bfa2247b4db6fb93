"""The launch digest: what the SEV firmware hashes while QEMU launches a guest (PROTOCOL.md §5).

QEMU (`target/i386/sev.c`, `hw/i386/pc_sysfw.c`, `hw/i386/x86.c`) issues, in this order:

1. LAUNCH_UPDATE_DATA of pflash unit 0, the whole OVMF code image, mapped to end at 4 GiB;
2. with `kernel-hashes=on` and a kernel: LAUNCH_UPDATE_DATA of the padded 176-byte hashes table at the
   address the OVMF footer declares (`sev_add_kernel_loader_hashes`);
3. SEV-ES only: LAUNCH_UPDATE_VMSA of every vCPU in KVM's order, the BSP (vCPU 0) first.

The firmware's launch digest is SHA-256 over those plaintexts in order; `launch_digest` hashes them
incrementally without joining them, so a 4 MiB image costs one pass of SHA-256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from sevlaunch.sev import footer
from sevlaunch.sev.errors import MalformedInput, Reason, Unsupported
from sevlaunch.sev.technology import PRE_LAUNCH, Technology
from sevlaunch.sev.types import LaunchDigest

# The VMSA model and the kernel hashes table are imported where used: a plain SEV digest (the common
# `sevlaunch measurement digest --mode sev`) needs neither, and a command's start-up is mostly imports.
from sevlaunch.sev.vcpu import VMSALayout

if TYPE_CHECKING:
    from sevlaunch.sev.launch_update import LaunchUpdate


def __getattr__(name: str) -> Any:
    # `LaunchUpdate` is a dataclass, and `dataclasses` costs a command ~6 ms to import: it lives in
    # `launch_update` and is loaded the first time it is asked for, which a plain SEV digest never does.
    if name == "LaunchUpdate":
        from sevlaunch.sev.launch_update import LaunchUpdate

        return LaunchUpdate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_data_update(gpa: int | None, data: bytes) -> None:
    """A LAUNCH_UPDATE_DATA's checks: a 64-bit guest physical address, whole 16-byte blocks."""
    if gpa is None or not 0 <= gpa < (1 << 64):
        raise ValueError("a data update needs a 64-bit guest physical address")
    # The firmware encrypts in 16-byte blocks; QEMU only ever hands it such lengths.
    if len(data) % 16:
        raise MalformedInput(
            Reason.BAD_LENGTH, f"LAUNCH_UPDATE_DATA length {len(data)} is not a multiple of 16"
        )


def _mode(mode: Technology | str) -> Technology:
    try:
        tech = Technology(mode)
    except ValueError:
        tech = None
    if tech not in PRE_LAUNCH:
        raise MalformedInput(Reason.BAD_FIELD, f"unknown launch mode {mode!r} (sev or sev-es)")
    assert tech is not None
    return tech


def launch_updates(
    ovmf: bytes,
    *,
    mode: Technology | Literal["sev", "sev-es"],
    vcpus: int = 1,
    vcpu_sig: int | None = None,
    layout: VMSALayout = VMSALayout.init2,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
    cmdline: str | bytes | None = None,
) -> list[LaunchUpdate]:
    """The LAUNCH_UPDATE_* commands QEMU issues for this firmware and configuration, in order.

    `vcpu_sig` (CPUID 1 EAX, see `vmsa.vcpu_signature`) is needed for SEV-ES only. An initrd or a
    command line without a kernel is a usage error: QEMU adds the hashes table only for a kernel.
    """
    from sevlaunch.sev.launch_update import LaunchUpdate
    from sevlaunch.sev.ovmf import OVMF

    launch_mode = _mode(mode)
    if kernel is None and (initrd is not None or cmdline is not None):
        raise TypeError("an initrd or a command line needs a kernel")
    parsed = OVMF.from_bytes(ovmf)
    updates = [LaunchUpdate("data", parsed.gpa, ovmf)]

    if kernel is not None:
        from sevlaunch.sev.kernel_hashes import PADDED_TABLE_LENGTH, build_hashes_table

        if parsed.hashes_table is None:
            raise Unsupported(
                Reason.NO_HASHES_TABLE,
                "kernel given but the OVMF declares no kernel hashes table (needs an AmdSev build)",
            )
        base, size = parsed.hashes_table
        if size < PADDED_TABLE_LENGTH:
            raise Unsupported(
                Reason.NO_HASHES_TABLE, f"OVMF hashes table area of {size} bytes cannot hold the table"
            )
        updates.append(LaunchUpdate("data", base, build_hashes_table(kernel, initrd, cmdline)))

    if launch_mode is Technology.SEV_ES:
        if vcpu_sig is None:
            raise TypeError("SEV-ES needs the vCPU signature (vcpu_sig)")
        if vcpus < 1:
            raise MalformedInput(Reason.BAD_FIELD, f"vCPU count must be at least 1, got {vcpus}")
        if parsed.sev_es_reset_eip is None:
            raise Unsupported(
                Reason.NO_SEV_ES_RESET_BLOCK,
                "the OVMF has no SEV-ES reset block, so it cannot boot SEV-ES APs",
            )
        from sevlaunch.sev.vmsa import build_vmsa

        bsp = build_vmsa(eip=None, vcpu_sig=vcpu_sig, layout=layout, bsp=True)
        updates.append(LaunchUpdate("vmsa", None, bsp))
        if vcpus > 1:
            ap = build_vmsa(eip=parsed.sev_es_reset_eip, vcpu_sig=vcpu_sig, layout=layout, bsp=False)
            # Every AP page is identical; the same bytes object is shared, not copied.
            updates.extend(LaunchUpdate("vmsa", None, ap) for _ in range(vcpus - 1))
    return updates


def digest_updates(updates: Sequence[LaunchUpdate]) -> LaunchDigest:
    """SHA-256 over the plaintexts of `updates`, in order, as the firmware computes it."""
    hasher = hashlib.sha256()
    for update in updates:
        hasher.update(update.data)
    return LaunchDigest(hasher.digest())


def launch_digest(
    ovmf: bytes,
    *,
    mode: Technology | Literal["sev", "sev-es"],
    vcpus: int = 1,
    vcpu_sig: int | None = None,
    layout: VMSALayout = VMSALayout.init2,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
    cmdline: str | bytes | None = None,
) -> LaunchDigest:
    """The 32-byte launch digest the firmware will hold after QEMU launched this configuration."""
    if kernel is None and initrd is None and cmdline is None and _mode(mode) is Technology.SEV:
        # A plain SEV launch is one update, the image: the same checks as `launch_updates` (the footer
        # as OVMF.from_bytes reads it, the update's length), then one SHA-256, without the models.
        footer.check_image(ovmf)
        check_data_update(footer.FOUR_GIB - len(ovmf), ovmf)
        return LaunchDigest(hashlib.sha256(ovmf).digest())
    return digest_updates(
        launch_updates(
            ovmf,
            mode=mode,
            vcpus=vcpus,
            vcpu_sig=vcpu_sig,
            layout=layout,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
        )
    )
