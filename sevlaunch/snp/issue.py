"""Issuing SEV-SNP certificates the way AMD does, for an emulated AMD root (the emulated firmware's
ARK -> ASK -> VCEK and ARK -> ASVK -> VLEK) and for tests. Never trusted unless a verifier is handed the
resulting root explicitly (`certs.TrustedRoot` / `root_from_pem`).

The certificates have AMD's shape: RSASSA-PSS SHA-384 (salt 48) signatures, the role names
`ARK-<Product>`, `SEV-<Product>`, `SEV-VLEK-<Product>`, `SEV-VCEK`, `SEV-VLEK` (which `certs.role`
reads), and for a VCEK/VLEK AMD's extensions: struct version, productName, the TCB SPLs, and the hwID
(VCEK) or the CSP id (VLEK). They do not copy AMD's serial number 0 (`cryptography` refuses to write it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from sevlaunch.sev.errors import MalformedInput
from sevlaunch.snp.certs import (
    OID_BOOTLOADER_SPL,
    OID_CSP_ID,
    OID_FMC_SPL,
    OID_HWID,
    OID_PRODUCT_NAME,
    OID_SNP_SPL,
    OID_STRUCT_VERSION,
    OID_TEE_SPL,
    OID_UCODE_SPL,
    PSS_SHA384,
    TrustedRoot,
)
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.report import CHIP_ID_SIZE, TURIN_HWID_SIZE
from sevlaunch.snp.tcb import Product, TcbVersion

ORGANIZATION = "sevlaunch emulated AMD"
_SHA384 = hashes.SHA384()
ROOT_LIFETIME = timedelta(days=25 * 365)
VEK_LIFETIME = timedelta(days=7 * 365)


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # a leading zero keeps it non-negative
    return b"\x02" + _der_length(len(body)) + body


def der_octet_string(value: bytes) -> bytes:
    return b"\x04" + _der_length(len(value)) + value


def der_ia5string(value: str) -> bytes:
    raw = value.encode("ascii")
    return b"\x16" + _der_length(len(raw)) + raw


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


def _window(not_before: datetime | None, lifetime: timedelta) -> tuple[datetime, datetime]:
    start = (not_before or datetime.now(UTC)).astimezone(UTC)
    return start, start + lifetime


def _ca_extensions(builder: x509.CertificateBuilder, path_length: int | None) -> x509.CertificateBuilder:
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    return builder.add_extension(
        x509.BasicConstraints(ca=True, path_length=path_length), critical=True
    ).add_extension(usage, critical=True)


def make_ark(
    ark_key: rsa.RSAPrivateKey, product: Product, *, not_before: datetime | None = None
) -> x509.Certificate:
    start, end = _window(not_before, ROOT_LIFETIME)
    name = _name(f"ARK-{product.kds_name}")
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ark_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    return _ca_extensions(builder, 1).sign(ark_key, _SHA384, rsa_padding=PSS_SHA384)


def make_ask(
    ark_key: rsa.RSAPrivateKey,
    ark: x509.Certificate,
    ask_public_key: rsa.RSAPublicKey,
    product: Product,
    *,
    vlek: bool = False,
    not_before: datetime | None = None,
) -> x509.Certificate:
    """An ASK (signs VCEKs) or, with `vlek`, an ASVK (signs VLEKs), signed by the ARK."""
    start, end = _window(not_before, ROOT_LIFETIME)
    cn = f"SEV-VLEK-{product.kds_name}" if vlek else f"SEV-{product.kds_name}"
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ark.subject)
        .public_key(ask_public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    return _ca_extensions(builder, 0).sign(ark_key, _SHA384, rsa_padding=PSS_SHA384)


def _vek(
    issuer_key: rsa.RSAPrivateKey,
    issuer: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    cn: str,
    tcb: TcbVersion,
    extra: Iterable[tuple[str, bytes]],
    not_before: datetime | None,
    lifetime: timedelta,
) -> x509.Certificate:
    if not isinstance(public_key.curve, ec.SECP384R1):
        raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"{cn}: the key must be ECDSA P-384")
    start, end = _window(not_before, lifetime)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    product = tcb.product
    values = [
        (OID_STRUCT_VERSION, der_integer(1 if product.has_fmc else 0)),
        (OID_PRODUCT_NAME, der_ia5string(product.kds_name)),
        (OID_BOOTLOADER_SPL, der_integer(tcb.bootloader)),
        (OID_TEE_SPL, der_integer(tcb.tee)),
        (OID_SNP_SPL, der_integer(tcb.snp)),
        (OID_UCODE_SPL, der_integer(tcb.microcode)),
    ]
    if tcb.fmc is not None:
        values.append((OID_FMC_SPL, der_integer(tcb.fmc)))
    for oid, value in [*values, *extra]:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False
        )
    return builder.sign(issuer_key, _SHA384, rsa_padding=PSS_SHA384)


def make_vcek(
    ask_key: rsa.RSAPrivateKey,
    ask: x509.Certificate,
    vcek_public_key: ec.EllipticCurvePublicKey,
    chip_id: bytes,
    tcb: TcbVersion,
    *,
    hwid_encoding: str = "bare",
    not_before: datetime | None = None,
    lifetime: timedelta = VEK_LIFETIME,
) -> x509.Certificate:
    """A VCEK for a chip at `tcb` (its product's layout). hwID: the chip id (its first 8 bytes on Turin),
    `bare` as AMD's certificates carry it or wrapped in a DER OCTET STRING (`octet_string`)."""
    size = TURIN_HWID_SIZE if tcb.product is Product.TURIN else CHIP_ID_SIZE
    if len(chip_id) not in (size, CHIP_ID_SIZE):
        raise MalformedInput(
            SnpReason.BAD_CERTIFICATE, f"vcek: chip_id must be {size} or {CHIP_ID_SIZE} bytes"
        )
    hwid = chip_id[:size]
    if hwid_encoding not in ("bare", "octet_string"):
        raise ValueError(f"hwid_encoding {hwid_encoding!r}")
    value = hwid if hwid_encoding == "bare" else der_octet_string(hwid)
    return _vek(ask_key, ask, vcek_public_key, "SEV-VCEK", tcb, [(OID_HWID, value)], not_before, lifetime)


def make_vlek(
    asvk_key: rsa.RSAPrivateKey,
    asvk: x509.Certificate,
    vlek_public_key: ec.EllipticCurvePublicKey,
    tcb: TcbVersion,
    csp_id: str,
    *,
    not_before: datetime | None = None,
    lifetime: timedelta = VEK_LIFETIME,
) -> x509.Certificate:
    """A VLEK for a cloud provider `csp_id` at `tcb` (no hwID: a VLEK is not bound to one chip)."""
    extra = [(OID_CSP_ID, der_ia5string(csp_id))]
    return _vek(asvk_key, asvk, vlek_public_key, "SEV-VLEK", tcb, extra, not_before, lifetime)


def make_crl(
    ark_key: rsa.RSAPrivateKey,
    ark: x509.Certificate,
    revoked_serials: Iterable[int],
    *,
    last_update: datetime | None = None,
    next_update: timedelta = timedelta(days=30),
) -> x509.CertificateRevocationList:
    """An ARK-signed CRL (RSASSA-PSS SHA-384) listing `revoked_serials`."""
    start = (last_update or datetime.now(UTC)).astimezone(UTC)
    builder = x509.CertificateRevocationListBuilder().issuer_name(ark.subject).last_update(start)
    builder = builder.next_update(start + next_update)
    for serial in revoked_serials:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start).build()
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ark_key, _SHA384, rsa_padding=PSS_SHA384)


@dataclass(frozen=True)
class EmulatedSnpRoot:
    """An emulated AMD root of one product: ARK, ASK and ASVK with their keys (RSA, 4096 bits as AMD's).
    Holds private keys: never log it; `repr` shows the product only."""

    product: Product
    ark_key: rsa.RSAPrivateKey
    ask_key: rsa.RSAPrivateKey
    asvk_key: rsa.RSAPrivateKey
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate

    def __repr__(self) -> str:
        return f"EmulatedSnpRoot(product={self.product.value})"

    @classmethod
    def generate(
        cls, product: Product, *, key_size: int = 4096, not_before: datetime | None = None
    ) -> EmulatedSnpRoot:
        keys = [rsa.generate_private_key(public_exponent=65537, key_size=key_size) for _ in range(3)]
        ark = make_ark(keys[0], product, not_before=not_before)
        ask = make_ask(keys[0], ark, keys[1].public_key(), product, not_before=not_before)
        asvk = make_ask(keys[0], ark, keys[2].public_key(), product, vlek=True, not_before=not_before)
        return cls(product, keys[0], keys[1], keys[2], ark, ask, asvk)

    def trusted_root(self) -> TrustedRoot:
        """The public part, to hand a verifier as an explicit extra root."""
        return TrustedRoot.from_certificates(
            self.product, [self.ark, self.ask, self.asvk], name=f"emulated ARK-{self.product.kds_name}"
        )

    def chain_pem(self, *, vlek: bool = False) -> bytes:
        """ASK (or ASVK) then ARK, PEM: what KDS's cert_chain serves."""
        first = self.asvk if vlek else self.ask
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (first, self.ark))

    def issue_vcek(
        self,
        vcek_public_key: ec.EllipticCurvePublicKey,
        chip_id: bytes,
        tcb: TcbVersion,
        *,
        hwid_encoding: str = "bare",
        not_before: datetime | None = None,
        lifetime: timedelta = VEK_LIFETIME,
    ) -> x509.Certificate:
        return make_vcek(
            self.ask_key, self.ask, vcek_public_key, chip_id, tcb,
            hwid_encoding=hwid_encoding, not_before=not_before, lifetime=lifetime,
        )  # fmt: skip

    def issue_vlek(
        self,
        vlek_public_key: ec.EllipticCurvePublicKey,
        tcb: TcbVersion,
        csp_id: str,
        *,
        not_before: datetime | None = None,
        lifetime: timedelta = VEK_LIFETIME,
    ) -> x509.Certificate:
        return make_vlek(
            self.asvk_key, self.asvk, vlek_public_key, tcb, csp_id, not_before=not_before, lifetime=lifetime
        )

    def crl(
        self,
        revoked_serials: Iterable[int],
        *,
        last_update: datetime | None = None,
        next_update: timedelta = timedelta(days=30),
    ) -> x509.CertificateRevocationList:
        return make_crl(
            self.ark_key, self.ark, revoked_serials, last_update=last_update, next_update=next_update
        )
