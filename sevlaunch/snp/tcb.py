"""SEV-SNP products and TCB versions (SNP ABI, publication 56860, TCB_VERSION; PROTOCOL.md section 11).

A TCB_VERSION is a little-endian u64 of security patch levels (SPLs), one byte each, whose layout depends on
the product:

    Milan, Genoa: byte 0 bootloader, 1 TEE, 2-5 reserved, 6 SNP, 7 microcode
    Turin:        byte 0 FMC, 1 bootloader, 2 TEE, 3 SNP, 4-6 reserved, 7 microcode

TCB versions are only partially ordered: one meets a minimum when every component is at least the
minimum's. A v2 report does not say its product, so decoding its TCBs needs the product from the caller;
v3+ reports carry the CPUID family/model that `product_from_cpuid` maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sevlaunch.sev.errors import MalformedInput, Unsupported
from sevlaunch.snp.errors import SnpReason

SPL_MAX = 0xFF


class Product(StrEnum):
    MILAN = "milan"
    GENOA = "genoa"
    TURIN = "turin"

    @property
    def kds_name(self) -> str:
        """The product as AMD's KDS and certificate names spell it: Milan, Genoa, Turin."""
        return self.value.capitalize()

    @property
    def has_fmc(self) -> bool:
        return self is Product.TURIN

    @classmethod
    def parse(cls, value: str) -> Product:
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise Unsupported(
                SnpReason.UNKNOWN_PRODUCT, f"product {value!r} is none of milan, genoa, turin"
            ) from None


# (family, first model, last model) -> product. Family 19h: Milan models 00h-0Fh, Genoa 10h-1Fh and the
# Genoa-generation parts at A0h-AFh (Bergamo, Siena); family 1Ah: Turin models 00h-1Fh.
_CPUID_PRODUCTS: tuple[tuple[int, int, int, Product], ...] = (
    (0x19, 0x00, 0x0F, Product.MILAN),
    (0x19, 0x10, 0x1F, Product.GENOA),
    (0x19, 0xA0, 0xAF, Product.GENOA),
    (0x1A, 0x00, 0x1F, Product.TURIN),
)


def product_from_cpuid(family: int, model: int) -> Product | None:
    """The product of a CPUID family/model (a v3+ report's CPUID_FAM_ID/CPUID_MOD_ID), None if unknown."""
    for fam, first, last, product in _CPUID_PRODUCTS:
        if family == fam and first <= model <= last:
            return product
    return None


# Byte index of each component in the u64, per layout; the other bytes are reserved.
_MILAN_LAYOUT = {"bootloader": 0, "tee": 1, "snp": 6, "microcode": 7}
_TURIN_LAYOUT = {"fmc": 0, "bootloader": 1, "tee": 2, "snp": 3, "microcode": 7}


def _layout(product: Product) -> dict[str, int]:
    return _TURIN_LAYOUT if product.has_fmc else _MILAN_LAYOUT


@dataclass(frozen=True, order=False)
class TcbVersion:
    """One TCB_VERSION of one product. `fmc` exists on Turin only (None elsewhere)."""

    product: Product
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    def __post_init__(self) -> None:
        if self.product.has_fmc and self.fmc is None:
            object.__setattr__(self, "fmc", 0)
        if not self.product.has_fmc and self.fmc is not None:
            raise MalformedInput(SnpReason.BAD_REPORT, f"tcb: {self.product.kds_name} has no FMC component")
        for name, value in self.components().items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= SPL_MAX:
                raise MalformedInput(SnpReason.BAD_REPORT, f"tcb.{name}: {value!r} is not a byte")

    @classmethod
    def from_raw(cls, raw: int, product: Product, *, field: str = "tcb") -> TcbVersion:
        """Decodes a u64; reserved bytes must be zero (a non-zero one usually means the wrong product)."""
        if not 0 <= raw < 1 << 64:
            raise MalformedInput(SnpReason.BAD_REPORT, f"{field}: {raw} is not a u64")
        data = raw.to_bytes(8, "little")
        layout = _layout(product)
        reserved = [i for i in range(8) if i not in layout.values() and data[i]]
        if reserved:
            raise MalformedInput(
                SnpReason.BAD_REPORT,
                f"{field}: reserved byte(s) {reserved} of a {product.kds_name} TCB_VERSION are not zero "
                f"({raw:#018x}; wrong product?)",
            )
        return cls(product, **{name: data[index] for name, index in layout.items()})

    @property
    def raw(self) -> int:
        data = bytearray(8)
        for name, index in _layout(self.product).items():
            data[index] = self.components()[name]
        return int.from_bytes(data, "little")

    def components(self) -> dict[str, int]:
        """The SPLs by name (fmc first on Turin, as KDS lists them)."""
        parts = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        return {"fmc": self.fmc, **parts} if self.fmc is not None else parts

    def meets(self, minimum: TcbVersion) -> bool:
        """Every component >= the minimum's (the same product's)."""
        return not self.shortfall(minimum)

    def shortfall(self, minimum: TcbVersion) -> list[str]:
        """The components below the minimum, as 'name value<min' strings (empty: the minimum is met)."""
        if minimum.product is not self.product:
            raise Unsupported(
                SnpReason.PRODUCT_MISMATCH,
                f"tcb: a {self.product.kds_name} TCB compared with a {minimum.product.kds_name} minimum",
            )
        mine, theirs = self.components(), minimum.components()
        return [f"{name} {mine[name]}<{theirs[name]}" for name in theirs if mine[name] < theirs[name]]

    def __le__(self, other: object) -> bool:
        if not isinstance(other, TcbVersion):
            return NotImplemented
        return other.meets(self)

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, TcbVersion):
            return NotImplemented
        return self.meets(other)

    def __str__(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.components().items())

    def as_json(self) -> dict[str, int]:
        return {**self.components(), "raw": self.raw}

    @classmethod
    def from_json(cls, data: object, product: Product, *, field: str) -> TcbVersion:
        """{"bootloader": n, "tee": n, "snp": n, "microcode": n[, "fmc": n]} (fmc on Turin only)."""
        if not isinstance(data, dict):
            raise MalformedInput(SnpReason.BAD_APPRAISAL_POLICY, f"{field}: expected an object of SPLs")
        names = set(_layout(product))
        unknown = set(data) - names - {"raw"}
        missing = names - set(data) - ({"fmc"} if product.has_fmc else set())
        if unknown or missing:
            raise MalformedInput(
                SnpReason.BAD_APPRAISAL_POLICY,
                f"{field}: unknown {sorted(unknown)} / missing {sorted(missing)} "
                f"components for {product.value}",
            )
        values = {name: data[name] for name in names if name in data}
        for name, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= SPL_MAX:
                raise MalformedInput(
                    SnpReason.BAD_APPRAISAL_POLICY, f"{field}.{name}: {value!r} is not 0..255"
                )
        tcb = cls(product, **values)
        if "raw" in data and data["raw"] != tcb.raw:
            raise MalformedInput(
                SnpReason.BAD_APPRAISAL_POLICY, f"{field}.raw: disagrees with its components"
            )
        return tcb
