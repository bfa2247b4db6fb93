"""The SEV-SNP part of a reference value manifest (`sevlaunch.refvalues`): what a publisher vouches for
besides the launch digests themselves.

    "snp": {"family_id": "<32 hex>", "image_id": "<32 hex>", "guest_svn": 3,
            "min_tcb": {"genoa": {"bootloader": 9, "tee": 0, "snp": 23, "microcode": 72}, ...}}

* `family_id`, `image_id`: the ID block's, which the report repeats; the owner signs them into the ID
  block, and a report must carry exactly these.
* `guest_svn`: this build's security version, put in the ID block; a report below it does not match.
* `min_tcb`: per product, the least TCB (component by component, the product's layout: Turin has an FMC
  component) the publisher supports this firmware on. A report's reported, committed and launch TCBs must
  each meet it. An empty `min_tcb` sets no floor; a non-empty one does not vouch for unlisted products.

Strict like the rest of the manifest: unknown keys, wrong sizes, unknown products or components refuse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.snp.tcb import Product, TcbVersion

ID_SIZE = 16
_KEYS = {"family_id", "image_id", "guest_svn", "min_tcb"}
# Order of the short `--min-tcb` form's components: KDS order (fmc first on Turin).
_SHORT_FORM = {
    False: ("bootloader", "tee", "snp", "microcode"),
    True: ("fmc", "bootloader", "tee", "snp", "microcode"),
}


def _bad(detail: str) -> MalformedInput:
    return MalformedInput(Reason.BAD_MANIFEST, detail)


@dataclass(frozen=True)
class SnpReference:
    family_id: bytes = bytes(ID_SIZE)
    image_id: bytes = bytes(ID_SIZE)
    guest_svn: int = 0
    min_tcb: tuple[TcbVersion, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("family_id", "image_id"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != ID_SIZE:
                raise _bad(f"snp.{name} must be {ID_SIZE} bytes")
        if isinstance(self.guest_svn, bool) or not isinstance(self.guest_svn, int):
            raise _bad("snp.guest_svn must be an integer")
        if not 0 <= self.guest_svn < 1 << 32:
            raise _bad("snp.guest_svn must be a u32")
        object.__setattr__(self, "min_tcb", tuple(sorted(self.min_tcb, key=lambda t: t.product.value)))
        products = [t.product for t in self.min_tcb]
        if len(set(products)) != len(products):
            raise _bad("snp.min_tcb names a product twice")

    def min_tcb_for(self, product: Product) -> TcbVersion | None:
        return next((t for t in self.min_tcb if t.product is product), None)

    @property
    def min_tcb_by_product(self) -> Mapping[Product, TcbVersion]:
        return {t.product: t for t in self.min_tcb}

    def to_obj(self) -> dict[str, Any]:
        return {
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "guest_svn": self.guest_svn,
            "min_tcb": {t.product.value: t.components() for t in self.min_tcb},
        }

    @classmethod
    def from_obj(cls, obj: object) -> SnpReference:
        if not isinstance(obj, dict):
            raise _bad("snp is not a JSON object")
        if unknown := obj.keys() - _KEYS:
            raise _bad(f"snp has unknown fields {', '.join(sorted(map(str, unknown)))}")
        if missing := _KEYS - obj.keys():
            raise _bad(f"snp lacks {', '.join(sorted(missing))}")
        ids = {}
        for name in ("family_id", "image_id"):
            value = obj[name]
            if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{32}", value):
                raise _bad(f"snp.{name} must be 32 lower-case hex digits")
            ids[name] = bytes.fromhex(value)
        svn = obj["guest_svn"]
        if not isinstance(svn, int) or isinstance(svn, bool):
            raise _bad("snp.guest_svn must be an integer")
        tcbs = obj["min_tcb"]
        if not isinstance(tcbs, dict):
            raise _bad("snp.min_tcb is not an object of products")
        parsed: list[TcbVersion] = []
        for name, value in tcbs.items():
            if name not in {p.value for p in Product}:
                raise _bad(f"snp.min_tcb: {name!r} is none of milan, genoa, turin")
            product = Product(name)
            if not isinstance(value, dict) or set(value) != set(_SHORT_FORM[product.has_fmc]):
                raise _bad(f"snp.min_tcb.{name}: exactly {', '.join(_SHORT_FORM[product.has_fmc])}")
            try:
                parsed.append(TcbVersion.from_json(value, product, field=f"snp.min_tcb.{name}"))
            except MalformedInput as exc:
                raise _bad(exc.detail) from None
        return cls(ids["family_id"], ids["image_id"], svn, tuple(parsed))


def parse_min_tcb(text: str) -> TcbVersion:
    """`PRODUCT=BL:TEE:SNP:UCODE` (Milan, Genoa) or `turin=FMC:BL:TEE:SNP:UCODE`, decimal SPLs."""
    name, sep, values = text.partition("=")
    try:
        product = Product(name.strip().lower())
    except ValueError:
        raise MalformedInput(
            Reason.BAD_FIELD, f"min TCB {text!r}: product is none of milan, genoa, turin"
        ) from None
    names = _SHORT_FORM[product.has_fmc]
    parts = values.split(":") if sep else []
    if len(parts) != len(names) or not all(p.isdigit() and int(p) <= 0xFF for p in parts):
        raise MalformedInput(
            Reason.BAD_FIELD, f"min TCB {text!r}: expected {product.value}={':'.join(names)} (0..255 each)"
        )
    return TcbVersion(product, **{n: int(p) for n, p in zip(names, parts, strict=True)})
