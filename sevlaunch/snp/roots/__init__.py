"""AMD's SEV-SNP roots per product, as package data: ARK (self-signed root), ASK (signs VCEKs) and ASVK
(signs VLEKs), PEM.

Sources (tests/vectors/snp/README.md, "roots/"): the ARK and ASK from virtee/sev
`src/certs/snp/builtin/<product>/`, the ASVK from google/go-sev-guest
`verify/trust/ask_ark_<product>_vlek.pem`; byte-identical across virtee/sev, go-sev-guest and trustee.
The trust anchor is not these files but the SHA-256 of each ARK's SubjectPublicKeyInfo pinned in
`sevlaunch.snp.certs`.

This module only hands out bytes: parsing and trust decisions live in `sevlaunch.snp.certs`.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

PRODUCTS = ("milan", "genoa", "turin")
KINDS = ("ark", "ask", "asvk")


@cache
def pem_bytes(product: str, kind: str) -> bytes:
    if product not in PRODUCTS or kind not in KINDS:
        raise KeyError(f"{product}/{kind}")
    return resources.files(__name__).joinpath(product, f"{kind}.pem").read_bytes()
