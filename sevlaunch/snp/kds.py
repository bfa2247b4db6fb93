"""AMD Key Distribution Service addresses (VCEK/KDS specification, publication 57230; PROTOCOL.md
section 11). Pure string building: fetching, caching and KDS's rate limit (429 + Retry-After) belong to
the caller.

    {base}/vcek/v1/{Milan|Genoa|Turin}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..[&fmcSPL=..]
    {base}/vcek/v1/{product}/cert_chain      ASK + ARK (PEM)
    {base}/vcek/v1/{product}/crl             the ARK's CRL (DER)
    {base}/vlek/v1/{product}/cert_chain      ASVK + ARK (PEM)
    {base}/vlek/v1/{product}/crl

`hwid` is the chip id in lower-case hex: all 64 bytes on Milan and Genoa, the first 8 on Turin. SPLs are
decimal, from the report's REPORTED_TCB (the TCB the VCEK is issued for).
"""

from __future__ import annotations

from sevlaunch.sev.errors import MalformedInput
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.report import CHIP_ID_SIZE, TURIN_HWID_SIZE, AttestationReport
from sevlaunch.snp.tcb import Product, TcbVersion

DEFAULT_KDS_URL = "https://kdsintf.amd.com"


def _base(base_url: str) -> str:
    return base_url.rstrip("/")


def hwid_hex(chip_id: bytes, product: Product) -> str:
    """The chip id as KDS addresses it. Turin's KDS hwID is 8 bytes; a 64-byte CHIP_ID is cut to them."""
    size = TURIN_HWID_SIZE if product is Product.TURIN else CHIP_ID_SIZE
    if len(chip_id) not in (size, CHIP_ID_SIZE):
        raise MalformedInput(
            SnpReason.BAD_REPORT, f"chip_id: {len(chip_id)} bytes, {product.kds_name} needs {size}"
        )
    if not any(chip_id):
        raise MalformedInput(SnpReason.BAD_REPORT, "chip_id: all zero (masked): KDS has no VCEK for it")
    return chip_id[:size].hex()


def vcek_url(chip_id: bytes, tcb: TcbVersion, *, base_url: str = DEFAULT_KDS_URL) -> str:
    """The VCEK of a chip at a TCB (the report's REPORTED_TCB); the product is the TCB's."""
    product = tcb.product
    query = f"blSPL={tcb.bootloader}&teeSPL={tcb.tee}&snpSPL={tcb.snp}&ucodeSPL={tcb.microcode}"
    if product.has_fmc:
        query += f"&fmcSPL={tcb.fmc}"
    return f"{_base(base_url)}/vcek/v1/{product.kds_name}/{hwid_hex(chip_id, product)}?{query}"


def report_vcek_url(
    report: AttestationReport, product: Product | None = None, *, base_url: str = DEFAULT_KDS_URL
) -> str:
    """The VCEK that should have signed `report` (product from its CPUID on v3+, else `product`)."""
    resolved = report.product(product)
    return vcek_url(report.chip_id, report.tcbs(resolved).reported, base_url=base_url)


def vcek_cert_chain_url(product: Product, *, base_url: str = DEFAULT_KDS_URL) -> str:
    return f"{_base(base_url)}/vcek/v1/{product.kds_name}/cert_chain"


def vcek_crl_url(product: Product, *, base_url: str = DEFAULT_KDS_URL) -> str:
    return f"{_base(base_url)}/vcek/v1/{product.kds_name}/crl"


def vlek_cert_chain_url(product: Product, *, base_url: str = DEFAULT_KDS_URL) -> str:
    return f"{_base(base_url)}/vlek/v1/{product.kds_name}/cert_chain"


def vlek_crl_url(product: Product, *, base_url: str = DEFAULT_KDS_URL) -> str:
    return f"{_base(base_url)}/vlek/v1/{product.kds_name}/crl"
