"""Assembling the platform's full certificate chain from what the firmware exports (pure).

PDH_CERT_EXPORT gives the PDH and PEK‖OCA‖CEK with the CEK as the chip holds it, not signed by the
ASK. The ASK-signed CEK comes from the KDS (or a file); it must be the same key as the exported one,
or the chain would name a different chip: that is checked here, before anything is cached or served.
"""

from __future__ import annotations

from dataclasses import dataclass

from sevlaunch.sev.cert import CERT_SIZE, SEVCertificate, Usage
from sevlaunch.sev.errors import MalformedInput, Reason, VerificationFailed


@dataclass(frozen=True, kw_only=True)
class PlatformChain:
    pdh: bytes
    pek: bytes
    oca: bytes
    cek: bytes  # ASK-signed
    ask: bytes
    ark: bytes
    generation: str
    chip_id: str
    api_major: int
    api_minor: int
    build: int
    cek_source: str

    def to_full_bytes(self) -> bytes:
        """PDH‖PEK‖OCA‖CEK‖ASK‖ARK, sevctl's `export --full` layout."""
        return self.pdh + self.pek + self.oca + self.cek + self.ask + self.ark


def split_exported_chain(blob: bytes) -> tuple[bytes, bytes, bytes]:
    """PEK‖OCA‖CEK from PDH_CERT_EXPORT → (PEK, OCA, CEK)."""
    if len(blob) != 3 * CERT_SIZE:
        raise MalformedInput(
            Reason.BAD_LENGTH, f"exported chain is {len(blob)} bytes, expected {3 * CERT_SIZE}"
        )
    return blob[:CERT_SIZE], blob[CERT_SIZE : 2 * CERT_SIZE], blob[2 * CERT_SIZE :]


def check_signed_cek(exported_cek: bytes, signed_cek: bytes) -> SEVCertificate:
    """The ASK-signed CEK, refused unless it is a CEK with the exported CEK's public key."""
    exported = SEVCertificate.from_bytes(exported_cek)
    signed = SEVCertificate.from_bytes(signed_cek)
    if signed.usage is not Usage.CEK:
        raise VerificationFailed(Reason.WRONG_USAGE, f"CEK source holds a {signed.usage.name} certificate")
    if signed.public_key_bytes() != exported.public_key_bytes():
        raise VerificationFailed(
            Reason.WRONG_SIGNER, "the ASK-signed CEK is not this chip's CEK", link="ASK->CEK"
        )
    return signed
