"""The emulated AMD root (ARK and ASK) and the PEM handling of the chip's private keys."""

from __future__ import annotations

import uuid
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevlaunch.firmware.emulator.layout import (
    ARK_CERT,
    ARK_KEY,
    ASK_ARK_CERT,
    ASK_CERT,
    ASK_KEY,
    DECODE_ERRORS,
    ROOT_RSA_BITS,
    EmulatorStateError,
)
from sevlaunch.firmware.state import atomic_write
from sevlaunch.sev.amd_cert import AMDCertificate, AMDKeyUsage, parse_ask_ark


class EmulatedRoot:
    """An emulated AMD root: ARK (self-signed) and ASK (signed by the ARK), RSA-4096, AMD's format.

    RSA-4096 key generation takes seconds, so tests and demos make one and give it to several chips.
    """

    def __init__(
        self,
        *,
        ark_key: rsa.RSAPrivateKey,
        ask_key: rsa.RSAPrivateKey,
        ark: AMDCertificate,
        ask: AMDCertificate,
    ) -> None:
        self._ark_key = ark_key
        self._ask_key = ask_key
        self.ark = ark
        self.ask = ask

    def __repr__(self) -> str:
        return f"EmulatedRoot(ark_key_id={self.ark.key_id.hex()}, ask_key_id={self.ask.key_id.hex()})"

    @property
    def ask_key(self) -> rsa.RSAPrivateKey:
        return self._ask_key

    @classmethod
    def generate(cls) -> EmulatedRoot:
        ark_key = rsa.generate_private_key(public_exponent=65537, key_size=ROOT_RSA_BITS)
        ask_key = rsa.generate_private_key(public_exponent=65537, key_size=ROOT_RSA_BITS)
        ark_id, ask_id = uuid.uuid4().bytes, uuid.uuid4().bytes
        ark = AMDCertificate.create(
            key_id=ark_id,
            certifying_id=ark_id,
            key_usage=AMDKeyUsage.ARK,
            public_key=ark_key.public_key(),
            signer_private_key=ark_key,
        )
        ask = AMDCertificate.create(
            key_id=ask_id,
            certifying_id=ark_id,
            key_usage=AMDKeyUsage.ASK,
            public_key=ask_key.public_key(),
            signer_private_key=ark_key,
        )
        return cls(ark_key=ark_key, ask_key=ask_key, ark=ark, ask=ask)

    def ask_ark(self) -> bytes:
        """ASK‖ARK, the layout of AMD's `ask_ark_<gen>.cert`."""
        return self.ask.to_bytes() + self.ark.to_bytes()

    def save(self, directory: Path) -> None:
        atomic_write(directory / ARK_KEY, pem(self._ark_key))
        atomic_write(directory / ASK_KEY, pem(self._ask_key))
        atomic_write(directory / ARK_CERT, self.ark.to_bytes(), mode=0o644)
        atomic_write(directory / ASK_CERT, self.ask.to_bytes(), mode=0o644)
        atomic_write(directory / ASK_ARK_CERT, self.ask_ark(), mode=0o644)

    @classmethod
    def load(cls, directory: str | Path) -> EmulatedRoot:
        """Loads the root of an existing chip directory (or of a directory `save` wrote)."""
        directory = Path(directory)
        ask, ark = parse_ask_ark((directory / ASK_ARK_CERT).read_bytes())
        return cls(
            ark_key=load_rsa((directory / ARK_KEY).read_bytes()),
            ask_key=load_rsa((directory / ASK_KEY).read_bytes()),
            ark=ark,
            ask=ask,
        )


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the chip's keys sit in 0600 files as the real ones sit in PSP flash."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_rsa(data: bytes) -> rsa.RSAPrivateKey:
    # The emulator generated this key and keeps it in a 0600 file of its own state directory, so the
    # expensive RSA consistency check (~0.7 s for 4096 bits) guards against nothing here.
    try:
        key = serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
    except (*DECODE_ERRORS, UnsupportedAlgorithm):
        raise EmulatorStateError("an RSA private key of the chip does not parse") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise EmulatorStateError("expected an RSA private key")
    return key


def load_ec(text: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
    except (*DECODE_ERRORS, UnsupportedAlgorithm):
        raise EmulatorStateError("an EC private key of the chip does not parse") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EmulatorStateError("expected an EC private key")
    return key
