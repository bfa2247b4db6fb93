"""The SEV-SNP launch digest chain: how the firmware measures each page of SNP_LAUNCH_UPDATE.

AMD SEV-SNP ABI spec (publication 56860), section 8.17 SNP_LAUNCH_UPDATE and its table "Layout of the
PAGE_INFO Structure": for every page it launches, the firmware builds a 0x70-byte PAGE_INFO and sets the
guest context's launch digest to SHA-384 of it::

    0x00  DIGEST_CUR[48]   the launch digest so far (zeros at SNP_LAUNCH_START)
    0x30  CONTENTS[48]     SHA-384 of the page for NORMAL and VMSA pages, zeros for the other types
    0x60  u16 LENGTH       0x70
    0x62  u8  PAGE_TYPE    see PageType
    0x63  u8  IMI_PAGE     bit 0: the page is part of a migration image (never for a launch)
    0x64  u8  VMPL3_PERMS, 0x65 VMPL2_PERMS, 0x66 VMPL1_PERMS, 0x67 reserved
    0x68  u64 GPA          the page's guest physical address (0xFFFFFFFFF000 for a VMSA)

`LaunchUpdate` is one SNP_LAUNCH_UPDATE over a range of pages and `LaunchPlan` the ordered list a VMM
issues, so that an emulated firmware can replay the same pages and reach the same digest.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NewType

from sevlaunch.sev.errors import MalformedInput
from sevlaunch.snp.errors import SnpReason

SnpLaunchDigest = NewType("SnpLaunchDigest", bytes)  # 48 bytes, SHA-384

DIGEST_SIZE = 48
PAGE_SIZE = 4096
PAGE_INFO_SIZE = 0x70
ZERO_DIGEST = SnpLaunchDigest(bytes(DIGEST_SIZE))
# KVM hands every VMSA to the firmware with GPA -1, page-aligned and cut to the 52-bit physical address
# space (Linux `snp_launch_update_vmsa`), so all vCPUs' VMSAs are measured at this one address.
VMSA_GPA = 0xFFFFFFFFF000

_PAGE_INFO = struct.Struct("<48s48sHBBBBBxQ")
# The fixed middle of a launch PAGE_INFO (length, type, IMI 0, no VMPL permissions) per page type; the
# digest loop packs only the hashes and the GPA around it.
_TAIL = struct.Struct("<HBBBBBxQ")


class PageType(IntEnum):
    """SNP_LAUNCH_UPDATE PAGE_TYPE (ABI spec table "Page Types")."""

    NORMAL = 1
    VMSA = 2
    ZERO = 3
    UNMEASURED = 4
    SECRETS = 5
    CPUID = 6

    @property
    def has_contents(self) -> bool:
        """Only NORMAL and VMSA pages are measured by content; the others contribute zeros."""
        return self in (PageType.NORMAL, PageType.VMSA)


def _u8(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise MalformedInput(SnpReason.BAD_PAGE_INFO, f"PAGE_INFO {name} {value} is not a byte")


@dataclass(frozen=True, kw_only=True)
class PageInfo:
    """One PAGE_INFO structure; `next_digest()` is the launch digest after the page it describes."""

    digest_cur: bytes
    contents: bytes
    page_type: PageType
    gpa: int
    imi_page: bool = False
    vmpl3_perms: int = 0
    vmpl2_perms: int = 0
    vmpl1_perms: int = 0

    def __post_init__(self) -> None:
        if len(self.digest_cur) != DIGEST_SIZE or len(self.contents) != DIGEST_SIZE:
            raise MalformedInput(SnpReason.BAD_PAGE_INFO, "PAGE_INFO digests are 48 bytes each")
        if not 0 <= self.gpa < (1 << 64) or self.gpa % PAGE_SIZE:
            raise MalformedInput(
                SnpReason.BAD_PAGE_INFO, f"PAGE_INFO GPA {self.gpa:#x} is not a page address"
            )
        for name in ("vmpl3_perms", "vmpl2_perms", "vmpl1_perms"):
            _u8(name, getattr(self, name))

    def to_bytes(self) -> bytes:
        return _PAGE_INFO.pack(
            self.digest_cur,
            self.contents,
            PAGE_INFO_SIZE,
            self.page_type,
            int(self.imi_page),
            self.vmpl3_perms,
            self.vmpl2_perms,
            self.vmpl1_perms,
            self.gpa,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PageInfo:
        if len(data) != PAGE_INFO_SIZE:
            raise MalformedInput(
                SnpReason.BAD_PAGE_INFO, f"PAGE_INFO is {PAGE_INFO_SIZE} bytes, got {len(data)}"
            )
        digest_cur, contents, length, kind, imi, vmpl3, vmpl2, vmpl1, gpa = _PAGE_INFO.unpack(data)
        if length != PAGE_INFO_SIZE:
            raise MalformedInput(SnpReason.BAD_PAGE_INFO, f"PAGE_INFO length field {length:#x}")
        if imi > 1 or data[0x67]:
            raise MalformedInput(SnpReason.BAD_PAGE_INFO, "PAGE_INFO reserved bits are set")
        try:
            page_type = PageType(kind)
        except ValueError:
            raise MalformedInput(SnpReason.BAD_PAGE_INFO, f"PAGE_INFO page type {kind}") from None
        return cls(
            digest_cur=digest_cur,
            contents=contents,
            page_type=page_type,
            gpa=gpa,
            imi_page=bool(imi),
            vmpl3_perms=vmpl3,
            vmpl2_perms=vmpl2,
            vmpl1_perms=vmpl1,
        )

    def next_digest(self) -> SnpLaunchDigest:
        return SnpLaunchDigest(hashlib.sha384(self.to_bytes()).digest())


@dataclass(frozen=True)
class LaunchUpdate:
    """One SNP_LAUNCH_UPDATE of `length` bytes of pages starting at guest physical address `gpa`.

    NORMAL and VMSA updates carry their plaintext in `data`; the other types carry none (`data` None):
    the firmware fills or checks those pages itself and measures zeros. `length` defaults to
    `len(data)`, or one page without data. A VMSA update is one page at `VMSA_GPA`.
    """

    page_type: PageType
    gpa: int
    data: bytes | None = field(default=None, repr=False)
    length: int = 0

    def __post_init__(self) -> None:
        try:
            page_type = PageType(self.page_type)
        except ValueError:
            raise MalformedInput(SnpReason.BAD_LAUNCH_UPDATE, f"page type {self.page_type!r}") from None
        object.__setattr__(self, "page_type", page_type)
        if not self.length:
            object.__setattr__(self, "length", PAGE_SIZE if self.data is None else len(self.data))
        if page_type.has_contents:
            if self.data is None or len(self.data) != self.length:
                raise MalformedInput(
                    SnpReason.BAD_LAUNCH_UPDATE, f"a {page_type.name} update needs its {self.length} bytes"
                )
        elif self.data is not None:
            raise MalformedInput(SnpReason.BAD_LAUNCH_UPDATE, f"a {page_type.name} update carries no data")
        if self.length <= 0 or self.length % PAGE_SIZE:
            raise MalformedInput(
                SnpReason.BAD_LAUNCH_UPDATE, f"update length {self.length:#x} is not whole pages"
            )
        if self.gpa % PAGE_SIZE or not 0 <= self.gpa <= (1 << 64) - self.length:
            raise MalformedInput(
                SnpReason.BAD_LAUNCH_UPDATE, f"update GPA {self.gpa:#x} is not a page address"
            )
        if page_type is PageType.VMSA and (self.gpa != VMSA_GPA or self.length != PAGE_SIZE):
            raise MalformedInput(SnpReason.BAD_LAUNCH_UPDATE, "a VMSA update is one page at 0xFFFFFFFFF000")

    @property
    def page_count(self) -> int:
        return self.length // PAGE_SIZE

    def pages(self) -> Iterator[tuple[int, bytes | None]]:
        """(GPA, page plaintext or None) for every page, as the firmware takes them one by one."""
        view = None if self.data is None else memoryview(self.data)
        for index in range(self.page_count):
            at = index * PAGE_SIZE
            yield self.gpa + at, None if view is None else bytes(view[at : at + PAGE_SIZE])


def page_contents(page_type: PageType, page: bytes | memoryview | None) -> bytes:
    """PAGE_INFO.CONTENTS for a page: SHA-384 of its plaintext for NORMAL and VMSA, zeros otherwise."""
    if not PageType(page_type).has_contents:
        return bytes(DIGEST_SIZE)
    if page is None or len(page) != PAGE_SIZE:
        raise MalformedInput(SnpReason.BAD_LAUNCH_UPDATE, f"a {page_type.name} page is 4096 bytes")
    return hashlib.sha384(page).digest()


def extend(
    digest_cur: bytes, page_type: PageType, gpa: int, page: bytes | memoryview | None
) -> SnpLaunchDigest:
    """The launch digest after the firmware measured one page (the single-page step an emulator takes)."""
    info = PageInfo(
        digest_cur=digest_cur, contents=page_contents(page_type, page), page_type=page_type, gpa=gpa
    )
    return info.next_digest()


def _check_seed(seed: bytes) -> None:
    if len(seed) != DIGEST_SIZE:
        raise MalformedInput(SnpReason.BAD_OVMF_HASH, f"a launch digest seed is 48 bytes, got {len(seed)}")


def digest_updates(updates: Iterable[LaunchUpdate], *, seed: bytes = ZERO_DIGEST) -> SnpLaunchDigest:
    """The launch digest after `updates`, in order, starting from `seed` (zeros at SNP_LAUNCH_START).

    Same result as `extend` page by page; this loop only skips rebuilding a PageInfo per page, since a
    4 MiB firmware image is ~900 pages.
    """
    _check_seed(seed)
    sha384, pack, join = hashlib.sha384, _TAIL.pack, b"".join
    zeros = bytes(DIGEST_SIZE)
    digest = bytes(seed)
    for update in updates:
        page_type = PageType(update.page_type)
        view = None if update.data is None else memoryview(update.data)
        for index in range(update.page_count):
            at = index * PAGE_SIZE
            contents = zeros if view is None else sha384(view[at : at + PAGE_SIZE]).digest()
            tail = pack(PAGE_INFO_SIZE, page_type, 0, 0, 0, 0, update.gpa + at)
            digest = sha384(join((digest, contents, tail))).digest()
    return SnpLaunchDigest(digest)


@dataclass(frozen=True)
class LaunchPlan:
    """The SNP_LAUNCH_UPDATE commands a VMM issues for a guest, in order, and the digest they give.

    `seed` is the digest the chain starts from: zeros, except with a precomputed OVMF hash
    (sev-snp-measure's `--snp-ovmf-hash`), where the firmware's pages are left out of `updates`.
    """

    updates: tuple[LaunchUpdate, ...]
    seed: bytes = ZERO_DIGEST

    def __post_init__(self) -> None:
        _check_seed(self.seed)

    def digest(self) -> SnpLaunchDigest:
        return digest_updates(self.updates, seed=self.seed)

    def page_infos(self) -> Iterator[PageInfo]:
        """Every PAGE_INFO the firmware builds, in order (each one's `next_digest` is the next one's
        `digest_cur`)."""
        digest = bytes(self.seed)
        for update in self.updates:
            for gpa, page in update.pages():
                info = PageInfo(
                    digest_cur=digest,
                    contents=page_contents(update.page_type, page),
                    page_type=update.page_type,
                    gpa=gpa,
                )
                yield info
                digest = info.next_digest()

    def matches(self, digest: bytes) -> bool:
        """Constant-time comparison with a digest from elsewhere (a report, an ID block)."""
        return hmac.compare_digest(self.digest(), digest)
