"""SEV-SNP certificates: ARK, ASK, ASVK, VCEK, VLEK as X.509, and their chains (AMD's VCEK/KDS
specification, publication 57230; PROTOCOL.md section 11).

    ARK (self-signed, RSA-4096) -> ASK  -> VCEK (per chip and reported TCB, ECDSA P-384 key)
                                -> ASVK -> VLEK (per cloud provider, loaded into the firmware)

Every RSA signature is RSASSA-PSS with SHA-384, MGF1-SHA-384 and a 48-byte salt. Trust comes from one
place only: the SHA-256 of each product's ARK SubjectPublicKeyInfo, pinned below, or an extra root the
caller passes explicitly (an emulated AMD root); certificate names are never trusted, since anybody can
copy them. The chain must also be the right shape: a VCEK under its product's ASK, a VLEK under its ASVK.

AMD issues VCEKs and VLEKs with serial number 0, which RFC 5280 forbids and `cryptography` (>= 42) warns
about on loading ("a future release may refuse them"). We accept them deliberately: that one warning is
ignored, for loads made from this module only (see `_allow_serial_zero`), and tests pin the behaviour.
"""

from __future__ import annotations

import hashlib
import hmac
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from sevlaunch.sev.errors import MalformedInput, VerificationFailed
from sevlaunch.snp import roots as _roots
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.tcb import Product, TcbVersion

# SHA-256 of the DER SubjectPublicKeyInfo of each product's ARK (tests/vectors/snp/README.md, "roots/").
ARK_SPKI_SHA256: dict[Product, str] = {
    Product.MILAN: "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9",
    Product.GENOA: "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831",
    Product.TURIN: "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08",
}

OID_AMD = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = f"{OID_AMD}.1"
OID_PRODUCT_NAME = f"{OID_AMD}.2"
OID_BOOTLOADER_SPL = f"{OID_AMD}.3.1"
OID_TEE_SPL = f"{OID_AMD}.3.2"
OID_SNP_SPL = f"{OID_AMD}.3.3"
OID_UCODE_SPL = f"{OID_AMD}.3.8"
OID_FMC_SPL = f"{OID_AMD}.3.9"
OID_HWID = f"{OID_AMD}.4"
OID_CSP_ID = f"{OID_AMD}.5"
SPL_OIDS = {
    "bootloader": OID_BOOTLOADER_SPL,
    "tee": OID_TEE_SPL,
    "snp": OID_SNP_SPL,
    "microcode": OID_UCODE_SPL,
    "fmc": OID_FMC_SPL,
}

PSS_SALT_LENGTH = 48
_SHA384 = hashes.SHA384()
PSS_SHA384 = padding.PSS(mgf=padding.MGF1(_SHA384), salt_length=PSS_SALT_LENGTH)
HWID_SIZES = (8, 64)
_ISO = "%Y-%m-%dT%H:%M:%SZ"

# What `cryptography` raises on a malformed certificate or CRL, at load or at first use of a field.
_X509_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)

_SERIAL_WARNING = r"Parsed a serial number which wasn't positive"
_SERIAL_FILTER_MODULE = rf"{__name__.replace('.', '[.]')}\Z"


def _allow_serial_zero() -> None:
    """Ignores cryptography's serial-number-not-positive deprecation warning for calls from this module.

    A filter on (message, category, this module) rather than `catch_warnings()` around each load: the
    latter swaps the process-wide filter list and is not thread-safe. Re-checked on every load because a
    test framework may reset the filters between tests.
    """
    for action, message, category, module, _lineno in warnings.filters:
        if (
            action == "ignore"
            and category is CryptographyDeprecationWarning
            and message is not None
            and message.pattern == _SERIAL_WARNING
            and module is not None
            and module.pattern == _SERIAL_FILTER_MODULE
        ):
            return
    warnings.filterwarnings(
        "ignore",
        message=_SERIAL_WARNING,
        category=CryptographyDeprecationWarning,
        module=_SERIAL_FILTER_MODULE,
    )


class CertKind(StrEnum):
    ARK = "ark"
    ASK = "ask"
    ASVK = "asvk"
    VCEK = "vcek"
    VLEK = "vlek"


# --------------------------------------------------------------------------------------------- loading


def load_certificate(data: bytes, *, what: str = "certificate") -> x509.Certificate:
    """One X.509 certificate, PEM or DER (AMD serves VCEKs as DER, chains as PEM)."""
    _allow_serial_zero()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            certs = x509.load_pem_x509_certificates(data)
            if len(certs) != 1:
                raise MalformedInput(
                    SnpReason.BAD_CERTIFICATE, f"{what}: {len(certs)} certificates, expected 1"
                )
            cert = certs[0]
        else:
            cert = x509.load_der_x509_certificate(data)
        _parse_fully(cert)
    except _X509_ERRORS as exc:
        if isinstance(exc, MalformedInput):
            raise
        raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"{what}: not an X.509 certificate") from None
    return cert


def _parse_fully(cert: x509.Certificate) -> None:
    """`cryptography` decodes fields lazily: touch every one we use, so a malformed certificate fails
    here, as MalformedInput, and never later in the middle of a trust decision."""
    cert.serial_number  # noqa: B018 - under the serial-0 filter, not at first use elsewhere
    cert.subject.rfc4514_string()
    cert.issuer.rfc4514_string()
    cert.not_valid_before_utc  # noqa: B018
    cert.not_valid_after_utc  # noqa: B018
    cert.signature_algorithm_oid  # noqa: B018
    cert.signature_hash_algorithm  # noqa: B018
    cert.public_key()
    for _ext in cert.extensions:
        pass


def load_certificates(data: bytes, *, what: str = "chain") -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (an ASK+ARK `cert_chain`), or one DER certificate."""
    _allow_serial_zero()
    if not data.lstrip().startswith(b"-----BEGIN"):
        return [load_certificate(data, what=what)]
    try:
        certs = x509.load_pem_x509_certificates(data)
        for cert in certs:
            _parse_fully(cert)
    except _X509_ERRORS:
        raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"{what}: not PEM certificates") from None
    return certs


def load_crl(data: bytes, *, what: str = "crl") -> x509.CertificateRevocationList:
    """An AMD CRL, DER (as KDS serves it) or PEM."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
        crl.issuer.rfc4514_string()  # decoded lazily: touch what we use (see _parse_fully)
        crl.last_update_utc  # noqa: B018
        crl.next_update_utc  # noqa: B018
        crl.signature_algorithm_oid  # noqa: B018
        crl.signature_hash_algorithm  # noqa: B018
        for revoked in crl:
            revoked.serial_number  # noqa: B018
    except _X509_ERRORS:
        raise MalformedInput(SnpReason.BAD_CRL, f"{what}: not an X.509 CRL") from None
    return crl


def serial_number(cert: x509.Certificate) -> int:
    """The serial, read here because reading it outside this module warns again for AMD's zero serials."""
    _allow_serial_zero()
    return cert.serial_number


def spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def role(cert: x509.Certificate, product: Product) -> CertKind | None:
    """The role a certificate's name claims for `product` (the names AMD gives; trust comes elsewhere)."""
    cn = common_name(cert)
    return {
        f"ARK-{product.kds_name}": CertKind.ARK,
        f"SEV-{product.kds_name}": CertKind.ASK,
        f"SEV-VLEK-{product.kds_name}": CertKind.ASVK,
        "SEV-VCEK": CertKind.VCEK,
        "SEV-VLEK": CertKind.VLEK,
    }.get(cn)


# ------------------------------------------------------------------------------------ DER extensions


def _der_tlv(value: bytes, tag: int, what: str) -> bytes:
    """The content of a single DER TLV with `tag` filling all of `value` (short or long definite length)."""
    if len(value) < 2 or value[0] != tag:
        raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"{what}: expected DER tag {tag:#04x}")
    length, offset = value[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 2 or len(value) < 2 + count:
            raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"{what}: bad DER length")
        length, offset = int.from_bytes(value[2 : 2 + count], "big"), 2 + count
        if length < 0x80 or (count == 2 and length < 0x100):
            raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"{what}: non-minimal DER length")
    if offset + length != len(value):
        raise MalformedInput(
            SnpReason.BAD_CERTIFICATE, f"{what}: DER length {length} does not fill the value"
        )
    return value[offset:]


def _der_uint(value: bytes, what: str) -> int:
    content = _der_tlv(value, 0x02, what)
    if not content or content[0] & 0x80:
        raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"{what}: not a non-negative INTEGER")
    if len(content) > 1 and content[0] == 0 and not content[1] & 0x80:
        raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"{what}: non-minimal INTEGER")
    return int.from_bytes(content, "big")


def _hwid(value: bytes) -> bytes:
    """hwID: newer certificates wrap it in a DER OCTET STRING, older ones hold the bare bytes."""
    try:
        inner = _der_tlv(value, 0x04, "hwid")
    except MalformedInput:
        inner = b""
    if len(inner) in HWID_SIZES:
        return inner
    if len(value) in HWID_SIZES:
        return value
    raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"hwid ({OID_HWID}): {len(value)} bytes, not 8 or 64")


@dataclass(frozen=True)
class VekExtensions:
    """AMD's extensions of a VCEK or VLEK. SPLs missing from the certificate are None."""

    struct_version: int | None
    product_name: str | None
    bootloader: int | None
    tee: int | None
    snp: int | None
    microcode: int | None
    fmc: int | None
    hwid: bytes | None
    csp_id: str | None

    def tcb(self, product: Product) -> TcbVersion:
        """The SPLs as `product`'s TCB version; refuses a missing SPL, or an FMC SPL where none belongs."""
        missing = [n for n in ("bootloader", "tee", "snp", "microcode") if getattr(self, n) is None]
        if product.has_fmc and self.fmc is None:
            missing.append("fmc")
        if missing:
            raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"vek extensions: no {', '.join(missing)} SPL")
        if not product.has_fmc and self.fmc is not None:
            raise VerificationFailed(
                SnpReason.PRODUCT_MISMATCH, f"vek extensions: an FMC SPL in a {product.kds_name} certificate"
            )
        assert self.bootloader is not None and self.tee is not None
        assert self.snp is not None and self.microcode is not None
        try:
            return TcbVersion(product, self.bootloader, self.tee, self.snp, self.microcode, self.fmc)
        except MalformedInput as exc:
            raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"vek extensions: {exc.detail}") from None


def vek_extensions(cert: x509.Certificate) -> VekExtensions:
    values: dict[str, bytes] = {}
    for ext in cert.extensions:
        if isinstance(ext.value, x509.UnrecognizedExtension) and ext.oid.dotted_string.startswith(
            OID_AMD + "."
        ):
            values[ext.oid.dotted_string] = ext.value.value

    def uint(oid: str, name: str) -> int | None:
        return _der_uint(values[oid], f"{name} ({oid})") if oid in values else None

    def text(oid: str, name: str) -> str | None:
        if oid not in values:
            return None
        try:
            return _der_tlv(values[oid], 0x16, f"{name} ({oid})").decode("ascii")
        except UnicodeDecodeError:
            raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"{name} ({oid}): not IA5String") from None

    return VekExtensions(
        struct_version=uint(OID_STRUCT_VERSION, "struct version"),
        product_name=text(OID_PRODUCT_NAME, "productName"),
        bootloader=uint(OID_BOOTLOADER_SPL, "blSPL"),
        tee=uint(OID_TEE_SPL, "teeSPL"),
        snp=uint(OID_SNP_SPL, "snpSPL"),
        microcode=uint(OID_UCODE_SPL, "ucodeSPL"),
        fmc=uint(OID_FMC_SPL, "fmcSPL"),
        hwid=_hwid(values[OID_HWID]) if OID_HWID in values else None,
        csp_id=text(OID_CSP_ID, "csp_id"),
    )


# ------------------------------------------------------------------------------ signatures and roots


def verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate, *, link: str) -> None:
    """`issuer` signed `cert` with RSASSA-PSS SHA-384 (salt 48), and `cert` names it as its issuer."""
    if cert.issuer != issuer.subject:
        raise VerificationFailed(
            SnpReason.WRONG_ISSUER,
            f"issuer {cert.issuer.rfc4514_string()} is not {issuer.subject.rfc4514_string()}",
            link=link,
        )
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise VerificationFailed(SnpReason.BAD_CERT_SIGNATURE, "the issuer's key is not RSA", link=link)
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
        cert.signature_hash_algorithm, hashes.SHA384
    ):
        raise VerificationFailed(
            SnpReason.BAD_CERT_SIGNATURE, "signature is not RSASSA-PSS SHA-384", link=link
        )
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, PSS_SHA384, _SHA384)
    except InvalidSignature:
        raise VerificationFailed(
            SnpReason.BAD_CERT_SIGNATURE, "signature does not verify", link=link
        ) from None


def check_validity(cert: x509.Certificate, at: datetime, *, link: str) -> None:
    at = _utc(at)
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise VerificationFailed(
            SnpReason.CERT_NOT_VALID,
            f"valid {cert.not_valid_before_utc:{_ISO}} to {cert.not_valid_after_utc:{_ISO}}, "
            f"not at {at:{_ISO}}",
            link=link,
        )


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


@dataclass(frozen=True)
class TrustedRoot:
    """A product's ARK and the intermediates (ASK, ASVK) verified under it. `amd` is False for an extra root
    the caller passed (an emulated AMD), which `verify_vek_chain` trusts only when given explicitly."""

    product: Product
    ark: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    name: str
    amd: bool

    @property
    def pin(self) -> str:
        return spki_sha256(self.ark)

    @classmethod
    def from_certificates(
        cls, product: Product, certs: Sequence[x509.Certificate], *, name: str, amd: bool = False
    ) -> TrustedRoot:
        """Exactly one self-signed ARK and its intermediates; every signature is checked here, once."""
        arks = [c for c in certs if c.subject == c.issuer]
        if len(arks) != 1:
            raise MalformedInput(
                SnpReason.BAD_CERTIFICATE, f"root {name}: {len(arks)} self-signed ARKs, expected 1"
            )
        ark = arks[0]
        if role(ark, product) is not CertKind.ARK:
            raise VerificationFailed(
                SnpReason.WRONG_ISSUER, f"root {name}: {common_name(ark)!r} is not a {product.kds_name} ARK"
            )
        verify_signed_by(ark, ark, link="ark")
        intermediates = tuple(c for c in certs if c is not ark)
        for cert in intermediates:
            kind = role(cert, product)
            if kind not in (CertKind.ASK, CertKind.ASVK):
                raise VerificationFailed(
                    SnpReason.WRONG_ISSUER,
                    f"root {name}: {common_name(cert)!r} is no {product.kds_name} ASK/ASVK",
                )
            verify_signed_by(cert, ark, link=f"ark->{kind.value}")
        return cls(product, ark, intermediates, name, amd)


@cache
def amd_root(product: Product) -> TrustedRoot:
    """AMD's pinned root of `product` from package data, its pin and signatures checked once."""
    certs = [load_certificate(_roots.pem_bytes(product.value, kind), what=kind) for kind in _roots.KINDS]
    if not hmac.compare_digest(spki_sha256(certs[0]), ARK_SPKI_SHA256[product]):
        raise VerificationFailed(
            SnpReason.UNTRUSTED_ARK, f"ark_pin: packaged {product.value} ARK is not the pinned one"
        )
    return TrustedRoot.from_certificates(product, certs, name=f"AMD ARK-{product.kds_name}", amd=True)


def root_from_pem(data: bytes, product: Product, *, name: str) -> TrustedRoot:
    """An extra (non-AMD) root from a PEM bundle of ARK and ASK/ASVK, e.g. an emulated firmware's."""
    return TrustedRoot.from_certificates(product, load_certificates(data, what=name), name=name)


# ----------------------------------------------------------------------------------------- the chain


@dataclass(frozen=True)
class VerifiedVek:
    """A VCEK or VLEK whose chain verified at `at`: what the per-report checks need, parsed once."""

    kind: CertKind
    product: Product
    certificate: x509.Certificate
    public_key: ec.EllipticCurvePublicKey
    extensions: VekExtensions
    tcb: TcbVersion
    root: str
    at: datetime

    def check_validity(self, at: datetime) -> None:
        check_validity(self.certificate, at, link=f"{self.kind.value}_validity")


def _revocation(
    crls: Iterable[x509.CertificateRevocationList],
    root: TrustedRoot,
    at: datetime,
    certs: Sequence[x509.Certificate],
) -> None:
    for index, crl in enumerate(crls):
        link = f"crl[{index}]"
        if crl.issuer != root.ark.subject:
            raise VerificationFailed(
                SnpReason.BAD_CRL, f"issuer {crl.issuer.rfc4514_string()} is not the ARK", link=link
            )
        key = root.ark.public_key()
        assert isinstance(key, rsa.RSAPublicKey)  # TrustedRoot verified the ARK's RSA self-signature
        if crl.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
            crl.signature_hash_algorithm, hashes.SHA384
        ):
            raise VerificationFailed(SnpReason.BAD_CRL, "signature is not RSASSA-PSS SHA-384", link=link)
        try:
            key.verify(crl.signature, crl.tbs_certlist_bytes, PSS_SHA384, _SHA384)
        except InvalidSignature:
            raise VerificationFailed(
                SnpReason.BAD_CRL, "signature by the ARK does not verify", link=link
            ) from None
        if crl.last_update_utc > at or (crl.next_update_utc is not None and crl.next_update_utc < at):
            raise VerificationFailed(SnpReason.BAD_CRL, f"not current at {at:{_ISO}}", link=link)
        for cert in certs:
            if crl.get_revoked_certificate_by_serial_number(serial_number(cert)) is not None:
                name = common_name(cert)
                raise VerificationFailed(
                    SnpReason.CERT_REVOKED, f"{name} (serial {serial_number(cert)}) is revoked", link=link
                )


def _signed_by_any(cert: x509.Certificate, issuers: Iterable[x509.Certificate]) -> bool:
    for issuer in issuers:
        try:
            verify_signed_by(cert, issuer, link="probe")
        except VerificationFailed:
            continue
        return True
    return False


def verify_vek_chain(
    vek: x509.Certificate,
    product: Product,
    *,
    at: datetime,
    chain: Sequence[x509.Certificate] = (),
    extra_roots: Iterable[TrustedRoot] = (),
    crls: Iterable[x509.CertificateRevocationList] = (),
) -> VerifiedVek:
    """Verifies ARK -> ASK -> VCEK or ARK -> ASVK -> VLEK for `product` at time `at`.

    `chain` (optional, e.g. KDS's cert_chain: ASK or ASVK, then ARK) may supply the intermediates; its ARK
    must still be the product's pinned AMD ARK or one of `extra_roots` (compared by key, never by name).
    Without it the pinned root's own ASK/ASVK are used. `crls`, if given, must be signed by that ARK and
    must not list the intermediate or the VEK.
    """
    at = _utc(at)
    kind = role(vek, product)
    if kind not in (CertKind.VCEK, CertKind.VLEK):
        raise MalformedInput(
            SnpReason.BAD_CERTIFICATE, f"vek: {common_name(vek)!r} is neither SEV-VCEK nor SEV-VLEK"
        )
    roots = [amd_root(product), *(r for r in extra_roots if r.product is product)]
    if chain:
        given_arks = [c for c in chain if c.subject == c.issuer]
        if len(given_arks) != 1:
            raise MalformedInput(
                SnpReason.BAD_CERTIFICATE, f"chain: {len(given_arks)} self-signed ARKs, expected 1"
            )
        pin = spki_sha256(given_arks[0])
        root = next((r for r in roots if hmac.compare_digest(r.pin, pin)), None)
        if root is None:
            raise VerificationFailed(
                SnpReason.UNTRUSTED_ARK,
                f"ark_pin: the chain's ARK ({common_name(given_arks[0])!r}, key {pin[:16]}...) is not "
                f"the pinned {product.kds_name} ARK nor an explicitly trusted root",
            )
        intermediates: Sequence[x509.Certificate] = [c for c in chain if c is not given_arks[0]]
        for cert in intermediates:
            verify_signed_by(cert, root.ark, link="ark->intermediate")
        check_validity(given_arks[0], at, link="ark_validity")
    else:
        named = [r for r in roots if any(c.subject == vek.issuer for c in r.intermediates)]
        root = named[0] if named else roots[0]
        if len(named) > 1:  # an extra root that copies AMD's names: the issuer is the one whose key signed
            root = next((r for r in named if _signed_by_any(vek, r.intermediates)), root)
        intermediates = root.intermediates
    want = CertKind.ASK if kind is CertKind.VCEK else CertKind.ASVK
    issuer = next((c for c in intermediates if c.subject == vek.issuer), None)
    if issuer is None or role(issuer, product) is not want:
        raise VerificationFailed(
            SnpReason.WRONG_ISSUER,
            f"the {kind.value.upper()}'s issuer {vek.issuer.rfc4514_string()!r} "
            f"is not the {product.kds_name} {want.value.upper()}",
            link="vek_issuer",
        )
    verify_signed_by(vek, issuer, link=f"{kind.value}_signature")
    check_validity(root.ark, at, link="ark_validity")
    check_validity(issuer, at, link=f"{want.value}_validity")
    check_validity(vek, at, link=f"{kind.value}_validity")
    _revocation(crls, root, at, (issuer, vek))
    key = vek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"{kind.value}: the key is not ECDSA P-384")
    extensions = vek_extensions(vek)
    if kind is CertKind.VCEK and extensions.hwid is None:
        raise MalformedInput(SnpReason.BAD_CERTIFICATE, f"vcek: no hwID extension ({OID_HWID})")
    if extensions.product_name is not None and extensions.product_name.split("-")[0] != product.kds_name:
        raise VerificationFailed(
            SnpReason.PRODUCT_MISMATCH,
            f"productName: {kind.value} says {extensions.product_name!r}, {product.kds_name} was asked",
        )
    return VerifiedVek(kind, product, vek, key, extensions, extensions.tcb(product), root.name, at)
