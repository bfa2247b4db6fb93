"""The emulated chip's SEV-SNP state and its part of `state.json`.

`SnpPlatform` is what SNP_PLATFORM_STATUS reports and SNP_COMMIT / SNP_SET_CONFIG / a firmware update
change (SNP ABI, publication 56860, chapter 8 "Platform Management"): the current, committed and reported
TCB (raw u64s in the product's layout), the firmware versions, the chip-id and chip-key masking, the loaded
VLEK, the host's certificate table for extended guest requests, and the SNP guests. It also holds the chip
secret the VCEK is derived from (the real one is fused into the part), so it never appears in a repr.

Each product fixes what its firmware reports: the ATTESTATION_REPORT version, the CPUID family/model the
report carries from version 3, the TCB layout (Turin adds an FMC SPL) and a plausible initial TCB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

from sevlaunch.firmware.emulator.fields import (
    _b64,
    _b64_field,
    _bad,
    _bool,
    _hex,
    _int,
    _list,
    _obj,
    _str,
)
from sevlaunch.firmware.emulator.layout import U32_MAX
from sevlaunch.snp.tcb import Product, TcbVersion

CHIP_SECRET_SIZE: Final = 48
REPORT_ID_SIZE: Final = 32
HOST_DATA_SIZE: Final = 32
SNP_DIGEST_SIZE: Final = 48
ID_SIZE: Final = 16
VLEK_SEED_SIZE: Final = 48


@dataclass(frozen=True)
class ProductModel:
    """What an emulated product's SNP firmware reports."""

    report_version: int
    cpuid: tuple[int, int, int]  # family, model, stepping (a v3+ report's CPUID_FAM_ID/MOD_ID/STEP)
    api: tuple[int, int, int]  # SNP firmware API major, minor, build
    initial_tcb: dict[str, int]
    aes_256_xts: bool  # MEM_AES_256_XTS guest policy bit supported


PRODUCTS: Final[dict[Product, ProductModel]] = {
    Product.MILAN: ProductModel(
        report_version=2,
        cpuid=(0x19, 0x01, 0x01),
        api=(1, 55, 21),
        initial_tcb={"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
        aes_256_xts=False,
    ),
    Product.GENOA: ProductModel(
        report_version=3,
        cpuid=(0x19, 0x11, 0x01),
        api=(1, 55, 37),
        initial_tcb={"bootloader": 7, "tee": 0, "snp": 14, "microcode": 72},
        aes_256_xts=False,
    ),
    Product.TURIN: ProductModel(
        report_version=5,
        cpuid=(0x1A, 0x02, 0x01),
        api=(1, 58, 5),
        initial_tcb={"fmc": 1, "bootloader": 1, "tee": 1, "snp": 3, "microcode": 68},
        aes_256_xts=True,
    ),
}


def initial_tcb(product: Product) -> TcbVersion:
    return TcbVersion(product, **PRODUCTS[product].initial_tcb)


class SnpGuestState(IntEnum):
    """An SNP guest context's state (56860 section 4.3 "Guest State"): LAUNCH from SNP_LAUNCH_START until
    SNP_LAUNCH_FINISH, then RUNNING."""

    LAUNCH = 1
    RUNNING = 2


@dataclass
class SnpGuest:
    handle: int
    asid: int
    policy: int
    gstate: SnpGuestState
    launch_tcb: int
    report_id: bytes
    digest: bytes = bytes(SNP_DIGEST_SIZE)  # the launch digest so far (MEASUREMENT once finished)
    pages: int = 0
    vmsa_count: int = 0
    secrets_gpas: list[int] = field(default_factory=list)
    cpuid_gpas: list[int] = field(default_factory=list)
    host_data: bytes = bytes(HOST_DATA_SIZE)
    family_id: bytes = bytes(ID_SIZE)
    image_id: bytes = bytes(ID_SIZE)
    guest_svn: int = 0
    id_key_digest: bytes = bytes(SNP_DIGEST_SIZE)
    author_key_digest: bytes = bytes(SNP_DIGEST_SIZE)
    author_key_en: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "asid": self.asid,
            "policy": self.policy,
            "gstate": int(self.gstate),
            "launch_tcb": self.launch_tcb,
            "report_id": self.report_id.hex(),
            "digest": self.digest.hex(),
            "pages": self.pages,
            "vmsa_count": self.vmsa_count,
            "secrets_gpas": self.secrets_gpas,
            "cpuid_gpas": self.cpuid_gpas,
            "host_data": self.host_data.hex(),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "guest_svn": self.guest_svn,
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "author_key_en": self.author_key_en,
        }

    @classmethod
    def from_json(cls, data: object) -> SnpGuest:
        doc = _obj(data, "an SNP guest")
        handle = _int(doc["handle"], "an SNP guest handle", 1, U32_MAX)
        what = f"SNP guest {handle}"
        try:
            gstate = SnpGuestState(_int(doc["gstate"], f"{what} gstate", 0, 0xFF))
        except ValueError:
            raise _bad(f"{what} gstate is not a guest state") from None
        return cls(
            handle=handle,
            asid=_int(doc["asid"], f"{what} ASID", 1, U32_MAX),
            policy=_int(doc["policy"], f"{what} policy"),
            gstate=gstate,
            launch_tcb=_int(doc["launch_tcb"], f"{what} launch TCB"),
            report_id=_hex(doc["report_id"], f"{what} report id", REPORT_ID_SIZE),
            digest=_hex(doc["digest"], f"{what} digest", SNP_DIGEST_SIZE),
            pages=_int(doc["pages"], f"{what} page count"),
            vmsa_count=_int(doc["vmsa_count"], f"{what} VMSA count"),
            secrets_gpas=[_int(g, f"{what} secrets GPA") for g in _list(doc["secrets_gpas"], what)],
            cpuid_gpas=[_int(g, f"{what} CPUID GPA") for g in _list(doc["cpuid_gpas"], what)],
            host_data=_hex(doc["host_data"], f"{what} host data", HOST_DATA_SIZE),
            family_id=_hex(doc["family_id"], f"{what} family id", ID_SIZE),
            image_id=_hex(doc["image_id"], f"{what} image id", ID_SIZE),
            guest_svn=_int(doc["guest_svn"], f"{what} guest SVN", 0, U32_MAX),
            id_key_digest=_hex(doc["id_key_digest"], f"{what} ID key digest", SNP_DIGEST_SIZE),
            author_key_digest=_hex(doc["author_key_digest"], f"{what} author key digest", SNP_DIGEST_SIZE),
            author_key_en=_bool(doc["author_key_en"], f"{what} author_key_en"),
        )


@dataclass
class LoadedVlek:
    """A VLEK loaded with SNP_VLEK_LOAD: the seed its key derives from, the TCB and cloud provider it was
    issued for."""

    seed: bytes = field(repr=False)
    tcb: int
    csp_id: str

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed.hex(), "tcb": self.tcb, "csp_id": self.csp_id}

    @classmethod
    def from_json(cls, data: object) -> LoadedVlek | None:
        if data is None:
            return None
        doc = _obj(data, "the loaded VLEK")
        return cls(
            seed=_hex(doc["seed"], "the VLEK seed", VLEK_SEED_SIZE),
            tcb=_int(doc["tcb"], "the VLEK TCB"),
            csp_id=_str(doc["csp_id"], "the VLEK CSP id"),
        )


Version = tuple[int, int, int]


def _version(value: object, what: str) -> Version:
    parts = _list(value, what)
    if len(parts) != 3:
        raise _bad(f"{what} is not [major, minor, build]")
    return (_int(parts[0], what, 0, 0xFF), _int(parts[1], what, 0, 0xFF), _int(parts[2], what, 0, 0xFF))


@dataclass
class SnpPlatform:
    chip_secret: bytes = field(repr=False)
    current_tcb: int
    committed_tcb: int
    reported_tcb: int
    current_version: Version
    committed_version: Version
    initialized: bool = False
    mask_chip_id: bool = False
    mask_chip_key: bool = False
    vlek: LoadedVlek | None = None
    cert_table: bytes | None = field(default=None, repr=False)
    guests: dict[int, SnpGuest] = field(default_factory=dict)

    @classmethod
    def new(cls, product: Product, chip_secret: bytes) -> SnpPlatform:
        tcb = initial_tcb(product).raw
        version = PRODUCTS[product].api
        return cls(
            chip_secret=chip_secret,
            current_tcb=tcb,
            committed_tcb=tcb,
            reported_tcb=tcb,
            current_version=version,
            committed_version=version,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "chip_secret": self.chip_secret.hex(),
            "current_tcb": self.current_tcb,
            "committed_tcb": self.committed_tcb,
            "reported_tcb": self.reported_tcb,
            "current_version": list(self.current_version),
            "committed_version": list(self.committed_version),
            "initialized": self.initialized,
            "mask_chip_id": self.mask_chip_id,
            "mask_chip_key": self.mask_chip_key,
            "vlek": self.vlek.to_json() if self.vlek else None,
            "cert_table": _b64(self.cert_table) if self.cert_table is not None else None,
            "guests": [g.to_json() for g in self.guests.values()],
        }

    @classmethod
    def from_json(cls, data: object, product: Product) -> SnpPlatform | None:
        """The SNP state, checked for types, ranges and the product's TCB layout; None for a chip made
        before the emulator spoke SNP (its SNP state is created on first use)."""
        if data is None:
            return None
        doc = _obj(data, "snp")
        tcbs = {}
        for name in ("current_tcb", "committed_tcb", "reported_tcb"):
            raw = _int(doc[name], f"snp {name}")
            try:
                TcbVersion.from_raw(raw, product, field=name)
            except ValueError as exc:
                raise _bad(f"snp {name} is not a {product.value} TCB ({exc})") from None
            tcbs[name] = raw
        guests: dict[int, SnpGuest] = {}
        for entry in _list(doc["guests"], "snp guests"):
            guest = SnpGuest.from_json(entry)
            if guest.handle in guests:
                raise _bad(f"SNP guest {guest.handle} appears twice")
            guests[guest.handle] = guest
        table = doc["cert_table"]
        return cls(
            chip_secret=_hex(doc["chip_secret"], "snp chip secret", CHIP_SECRET_SIZE),
            current_tcb=tcbs["current_tcb"],
            committed_tcb=tcbs["committed_tcb"],
            reported_tcb=tcbs["reported_tcb"],
            current_version=_version(doc["current_version"], "snp current_version"),
            committed_version=_version(doc["committed_version"], "snp committed_version"),
            initialized=_bool(doc["initialized"], "snp initialized"),
            mask_chip_id=_bool(doc["mask_chip_id"], "snp mask_chip_id"),
            mask_chip_key=_bool(doc["mask_chip_key"], "snp mask_chip_key"),
            vlek=LoadedVlek.from_json(doc["vlek"]),
            cert_table=None if table is None else _b64_field(table, "snp cert_table"),
            guests=guests,
        )


__all__ = [
    "PRODUCTS",
    "LoadedVlek",
    "ProductModel",
    "SnpGuest",
    "SnpGuestState",
    "SnpPlatform",
    "initial_tcb",
]
