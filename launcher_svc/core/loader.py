"""How QEMU is to load a guest's firmware image: the domain XML's `<loader type=...>`, chosen by the image.

* A split OVMF code image (Debian's OVMF_CODE*.fd: the code volume first, variables in a separate
  OVMF_VARS file) goes on pflash unit 0, read-only (`<loader type='pflash' readonly='yes'
  stateless='yes'>`, no `<nvram>`). Under SEV, QEMU encrypts and measures unit 0 in place
  (LAUNCH_UPDATE_DATA of the whole image), so the launch digest is the image's. Stateless leaves unit 1
  empty: OVMF then keeps its variables in memory, and nothing the host could have written survives into
  the boot. pflash also takes images whose size is any multiple of a 4 KiB sector, such as
  OVMF_CODE_4M.fd (3.5 MiB - 16 KiB), which `-bios` refuses.
* A combined image (variable store inside, at offset 0: OVMF.fd, the AmdSev build) is one ROM,
  `<loader type='rom'>`, i.e. QEMU's `-bios`; it is measured whole all the same.
* An SEV-SNP guest always gets `rom`: QEMU places SNP firmware in guest_memfd-backed private memory,
  which read-only pflash memslots cannot be, so QEMU's SNP support (9.1 and later) loads it by `-bios`.

`-bios` maps only images that are whole 64 KiB blocks ("could not load PC BIOS" otherwise), which
`check_loadable` refuses before anything is defined.
"""

from __future__ import annotations

from enum import StrEnum

from sevlaunch.sev.flash import holds_variable_store
from sevlaunch.sev.technology import Technology

#: QEMU's `-bios` (x86_bios_rom_init) maps an image only in whole 64 KiB blocks.
ROM_ALIGNMENT = 64 << 10
#: pflash is made of 4 KiB sectors (QEMU's pc_system_flash_map, FLASH_SECTOR_SIZE).
PFLASH_SECTOR = 4 << 10


class LoaderType(StrEnum):
    PFLASH = "pflash"
    ROM = "rom"


def choose_loader(image: bytes, mode: Technology) -> LoaderType:
    if mode is Technology.SEV_SNP or holds_variable_store(image):
        return LoaderType.ROM
    return LoaderType.PFLASH


def loadable_problem(size: int, loader: LoaderType) -> str | None:
    """Why QEMU would refuse to load an image of `size` bytes this way, or None if it would not."""
    if size == 0:
        return "the firmware image is empty"
    if loader is LoaderType.ROM and size % ROM_ALIGNMENT:
        return f"a ROM firmware image must be whole 64 KiB blocks; this one is {size} bytes"
    if loader is LoaderType.PFLASH and size % PFLASH_SECTOR:
        return f"a pflash firmware image must be whole 4 KiB sectors; this one is {size} bytes"
    return None
