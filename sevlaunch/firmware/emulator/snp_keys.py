"""The emulated chip's SEV-SNP keys: its emulated AMD SNP root (ARK, ASK, ASVK as X.509, one per product)
kept in the state directory, and the VCEK derived from the chip secret and a TCB.

A real VCEK is derived inside the PSP from chip-unique fused secrets and the TCB it is reported for, so a
new reported TCB means a new key and AMD's KDS can issue its certificate without ever holding the chip.
The emulator does the same with HKDF-SHA384 over its 48-byte chip secret: the same secret and TCB give the
same P-384 key in every process, and the emulated KDS can issue the matching certificate on demand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sevlaunch.firmware.emulator.layout import DECODE_ERRORS, EmulatorStateError
from sevlaunch.firmware.emulator.root import load_rsa, pem
from sevlaunch.firmware.state import atomic_write
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.tcb import Product

SNP_ARK_KEY: Final = "snp_ark.key"
SNP_ASK_KEY: Final = "snp_ask.key"
SNP_ASVK_KEY: Final = "snp_asvk.key"
#: ARK, ASK and ASVK (PEM): the emulated SNP root, to be trusted explicitly (`certs.root_from_pem`).
SNP_ROOT_PEM: Final = "snp_root.pem"
#: The VCEK and VLEK certificates already issued, by TCB (issuing one is an RSA-4096 signature).
SNP_VEK_DIR: Final = "snp_veks"

# The order of the P-384 group: a derived scalar is reduced into 1..n-1.
_P384_ORDER: Final = (
    0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
)
_VCEK_INFO: Final = b"sevlaunch emulated SNP VCEK"
_VLEK_INFO: Final = b"sevlaunch emulated SNP VLEK"


def _p384_key(secret: bytes, info: bytes) -> ec.EllipticCurvePrivateKey:
    # 64 bytes of key material reduced modulo n: the bias is below 2^-128.
    okm = HKDF(algorithm=hashes.SHA384(), length=64, salt=None, info=info).derive(secret)
    scalar = int.from_bytes(okm, "big") % (_P384_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP384R1())


def derive_vcek(chip_secret: bytes, product: Product, tcb_raw: int) -> ec.EllipticCurvePrivateKey:
    """The chip's VCEK at one TCB (raw u64 in the product's layout)."""
    return _p384_key(chip_secret, _VCEK_INFO + product.value.encode() + tcb_raw.to_bytes(8, "little"))


def derive_vlek(seed: bytes) -> ec.EllipticCurvePrivateKey:
    """The VLEK a loaded hashstick's seed stands for."""
    return _p384_key(seed, _VLEK_INFO)


def save_snp_root(directory: Path, root: EmulatedSnpRoot) -> None:
    atomic_write(directory / SNP_ARK_KEY, pem(root.ark_key))
    atomic_write(directory / SNP_ASK_KEY, pem(root.ask_key))
    atomic_write(directory / SNP_ASVK_KEY, pem(root.asvk_key))
    certs = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (root.ark, root.ask, root.asvk))
    atomic_write(directory / SNP_ROOT_PEM, certs, mode=0o644)


def has_snp_root(directory: Path) -> bool:
    return (directory / SNP_ROOT_PEM).exists()


def load_snp_root(directory: Path, product: Product) -> EmulatedSnpRoot:
    """The chip's SNP root; a damaged file is an `EmulatorStateError`."""
    try:
        certs = x509.load_pem_x509_certificates((directory / SNP_ROOT_PEM).read_bytes())
        keys = [
            load_rsa((directory / name).read_bytes()) for name in (SNP_ARK_KEY, SNP_ASK_KEY, SNP_ASVK_KEY)
        ]
    except OSError as exc:
        raise EmulatorStateError(f"cannot read the SNP root: {exc.strerror or type(exc).__name__}") from None
    except DECODE_ERRORS:
        raise EmulatorStateError(f"{SNP_ROOT_PEM} does not parse") from None
    if len(certs) != 3:
        raise EmulatorStateError(f"{SNP_ROOT_PEM} holds {len(certs)} certificates, not ARK, ASK and ASVK")
    ark, ask, asvk = certs
    for cert, key in zip(certs, keys, strict=True):
        if cert.public_key() != key.public_key():
            raise EmulatorStateError(f"{SNP_ROOT_PEM} does not match the SNP root's keys")
    return EmulatedSnpRoot(product, keys[0], keys[1], keys[2], ark, ask, asvk)


def vek_cert_path(directory: Path, kind: str, tcb_raw: int) -> Path:
    return directory / SNP_VEK_DIR / f"{kind}-{tcb_raw:016x}.der"
