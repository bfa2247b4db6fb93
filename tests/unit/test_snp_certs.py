"""SEV-SNP certificates: AMD's serial number 0, VCEK/VLEK extensions in both hwID encodings, chains under
an emulated AMD root (trusted only when passed), CRLs, and parsers that refuse bad bytes with typed errors."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.utils import CryptographyDeprecationWarning
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevlaunch.sev.errors import MalformedInput, SevError, VerificationFailed
from sevlaunch.snp.certs import (
    ARK_SPKI_SHA256,
    OID_HWID,
    PSS_SHA384,
    CertKind,
    amd_root,
    load_certificate,
    load_certificates,
    load_crl,
    root_from_pem,
    serial_number,
    spki_sha256,
    vek_extensions,
    verify_vek_chain,
)
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.issue import EmulatedSnpRoot, der_integer, der_octet_string, make_ask, make_vcek
from sevlaunch.snp.tcb import Product, TcbVersion

SNP = Path(__file__).resolve().parents[1] / "vectors" / "snp"
NOW = datetime(2026, 6, 1, tzinfo=UTC)
START = NOW - timedelta(days=30)
CHIP = bytes(range(64))
MILAN_TCB = TcbVersion(Product.MILAN, bootloader=3, tee=0, snp=8, microcode=115)
TURIN_TCB = TcbVersion(Product.TURIN, bootloader=1, tee=2, snp=3, microcode=4, fmc=5)


@pytest.fixture(scope="module")
def milan() -> EmulatedSnpRoot:
    # 2048-bit keys keep the test fast; AMD's (and the emulator's default) are 4096.
    return EmulatedSnpRoot.generate(Product.MILAN, key_size=2048, not_before=START)


@pytest.fixture(scope="module")
def turin() -> EmulatedSnpRoot:
    return EmulatedSnpRoot.generate(Product.TURIN, key_size=2048, not_before=START)


def p384() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


# -- serial number 0 ---------------------------------------------------------------------------------


def test_amd_serial_zero_is_handled_deliberately() -> None:
    der = (SNP / "reports/virtee-sev-milan/vcek.der").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning, ours included, would fail the load
        cert = load_certificate(der)
        assert serial_number(cert) == 0
        # ...while cryptography itself still warns, so the filter is what makes the difference:
        with pytest.raises(CryptographyDeprecationWarning, match="serial number"):
            x509.load_der_x509_certificate(der)


def test_other_cryptography_warnings_are_not_hidden() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_certificate((SNP / "reports/go-sev-guest-milan/vcek.der").read_bytes())
        warnings.warn("unrelated", CryptographyDeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["unrelated"]


# -- pinned roots --------------------------------------------------------------------------------------


@pytest.mark.parametrize("product", list(Product))
def test_packaged_roots_match_the_pins_and_vectors(product: Product) -> None:
    root = amd_root(product)
    assert root.amd and root.pin == ARK_SPKI_SHA256[product]
    names = {c.subject.rfc4514_string().split(",")[0] for c in root.intermediates}
    assert names == {f"CN=SEV-VLEK-{product.kds_name}", f"CN=SEV-{product.kds_name}"}
    for name in ("ark", "ask", "asvk"):
        vector = (SNP / "roots" / product.value / f"{name}.pem").read_bytes()
        packaged = {c.public_bytes(serialization.Encoding.PEM) for c in (root.ark, *root.intermediates)}
        assert vector in packaged


# -- extensions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["bare", "octet_string"])
def test_hwid_both_encodings(milan: EmulatedSnpRoot, encoding: str) -> None:
    cert = milan.issue_vcek(p384().public_key(), CHIP, MILAN_TCB, hwid_encoding=encoding, not_before=START)
    raw = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_HWID)).value
    assert isinstance(raw, x509.UnrecognizedExtension)
    assert raw.value == (CHIP if encoding == "bare" else der_octet_string(CHIP))
    ext = vek_extensions(cert)
    assert ext.hwid == CHIP and ext.tcb(Product.MILAN) == MILAN_TCB and ext.product_name == "Milan"


def test_turin_vcek_has_fmc_and_8_byte_hwid(turin: EmulatedSnpRoot) -> None:
    cert = turin.issue_vcek(p384().public_key(), CHIP, TURIN_TCB, not_before=START)
    ext = vek_extensions(cert)
    assert ext.hwid == CHIP[:8] and ext.fmc == 5 and ext.tcb(Product.TURIN) == TURIN_TCB
    verified = verify_vek_chain(cert, Product.TURIN, at=NOW, extra_roots=[turin.trusted_root()])
    assert verified.kind is CertKind.VCEK and verified.tcb == TURIN_TCB


def test_der_integer_encoding() -> None:
    assert der_integer(0) == bytes.fromhex("020100")
    assert der_integer(115) == bytes.fromhex("020173")
    assert der_integer(217) == bytes.fromhex("020200d9")  # the VLEK vector's microcode SPL


# -- chains under an emulated root ---------------------------------------------------------------------


def test_emulated_root_is_trusted_only_when_passed(milan: EmulatedSnpRoot) -> None:
    vcek = milan.issue_vcek(p384().public_key(), CHIP, MILAN_TCB, not_before=START)
    chain = load_certificates(milan.chain_pem())
    with pytest.raises(VerificationFailed) as caught:
        verify_vek_chain(vcek, Product.MILAN, at=NOW, chain=chain)
    assert caught.value.reason is SnpReason.UNTRUSTED_ARK
    with pytest.raises(VerificationFailed):  # without a chain: checked against AMD's ASK, whose key differs
        verify_vek_chain(vcek, Product.MILAN, at=NOW)
    root = root_from_pem(
        milan.chain_pem() + milan.asvk.public_bytes(serialization.Encoding.PEM), Product.MILAN, name="emu"
    )
    assert not root.amd and root.pin == spki_sha256(milan.ark)
    for given_chain in (chain, ()):
        verified = verify_vek_chain(vcek, Product.MILAN, at=NOW, chain=given_chain, extra_roots=[root])
        assert verified.kind is CertKind.VCEK and verified.root == "emu" and verified.extensions.hwid == CHIP
    with pytest.raises(VerificationFailed):  # an extra root of another product does not count
        verify_vek_chain(vcek, Product.GENOA, at=NOW, chain=chain, extra_roots=[root])


def test_extra_root_with_amds_exact_names_is_told_apart_by_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # An emulator that copies AMD's subject names exactly: with no chain given, AMD's ASK and the copy both
    # carry the VCEK's issuer name; the key decides, and the copy counts only when passed explicitly.
    from sevlaunch.snp import issue

    amd_subject = amd_root(Product.MILAN).ark.subject

    def amd_name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(x509.NameOID.COMMON_NAME, cn) if a.oid == x509.NameOID.COMMON_NAME else a
                for a in amd_subject
            ]
        )

    monkeypatch.setattr(issue, "_name", amd_name)
    copy = EmulatedSnpRoot.generate(Product.MILAN, key_size=2048, not_before=START)
    vcek = copy.issue_vcek(p384().public_key(), CHIP, MILAN_TCB, not_before=START)
    assert vcek.issuer in {c.subject for c in amd_root(Product.MILAN).intermediates}  # a perfect copy
    with pytest.raises(VerificationFailed) as caught:
        verify_vek_chain(vcek, Product.MILAN, at=NOW)
    assert caught.value.reason is SnpReason.BAD_CERT_SIGNATURE
    verified = verify_vek_chain(vcek, Product.MILAN, at=NOW, extra_roots=[copy.trusted_root()])
    assert verified.root.startswith("emulated")


def test_vlek_chain(milan: EmulatedSnpRoot) -> None:
    vlek = milan.issue_vlek(p384().public_key(), MILAN_TCB, "cloud.example", not_before=START)
    verified = verify_vek_chain(vlek, Product.MILAN, at=NOW, extra_roots=[milan.trusted_root()])
    assert verified.kind is CertKind.VLEK and verified.extensions.csp_id == "cloud.example"
    assert verified.extensions.hwid is None
    asvk_chain = load_certificates(milan.chain_pem(vlek=True))
    verify_vek_chain(vlek, Product.MILAN, at=NOW, chain=asvk_chain, extra_roots=[milan.trusted_root()])
    ask_chain = load_certificates(milan.chain_pem())
    with pytest.raises(VerificationFailed) as caught:  # a VLEK must come from the ASVK
        verify_vek_chain(vlek, Product.MILAN, at=NOW, chain=ask_chain, extra_roots=[milan.trusted_root()])
    assert caught.value.reason is SnpReason.WRONG_ISSUER


def test_vcek_signed_by_the_asvk_is_refused(milan: EmulatedSnpRoot) -> None:
    # Same issuer name trick: an "ASK" that is really a second ASVK-named key cannot issue VCEKs.
    vcek = make_vcek(milan.asvk_key, milan.asvk, p384().public_key(), CHIP, MILAN_TCB, not_before=START)
    with pytest.raises(VerificationFailed) as caught:
        verify_vek_chain(vcek, Product.MILAN, at=NOW, extra_roots=[milan.trusted_root()])
    assert caught.value.reason is SnpReason.WRONG_ISSUER and "ASK" in caught.value.detail


def test_validity_window(milan: EmulatedSnpRoot) -> None:
    vcek = milan.issue_vcek(
        p384().public_key(),
        CHIP,
        MILAN_TCB,
        not_before=START + timedelta(days=1),
        lifetime=timedelta(days=60),
    )
    roots = [milan.trusted_root()]
    verify_vek_chain(vcek, Product.MILAN, at=NOW, extra_roots=roots)
    for at in (START + timedelta(days=1, seconds=-1), START + timedelta(days=62)):
        with pytest.raises(VerificationFailed) as caught:
            verify_vek_chain(vcek, Product.MILAN, at=at, extra_roots=roots)
        assert caught.value.reason is SnpReason.CERT_NOT_VALID and "vcek_validity" in str(caught.value)
    naive = datetime(2026, 6, 1)  # naive times are UTC
    assert verify_vek_chain(vcek, Product.MILAN, at=naive, extra_roots=roots).at == NOW


def test_intermediate_with_the_wrong_signature(milan: EmulatedSnpRoot) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fake_ask = make_ask(stranger, milan.ark, milan.ask_key.public_key(), Product.MILAN, not_before=START)
    vcek = milan.issue_vcek(p384().public_key(), CHIP, MILAN_TCB, not_before=START)
    chain = [fake_ask, milan.ark]
    with pytest.raises(VerificationFailed) as caught:
        verify_vek_chain(vcek, Product.MILAN, at=NOW, chain=chain, extra_roots=[milan.trusted_root()])
    assert caught.value.reason is SnpReason.BAD_CERT_SIGNATURE and "ark->intermediate" in str(caught.value)


def test_vek_must_be_p384(milan: EmulatedSnpRoot) -> None:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "SEV-VCEK")]))
        .issuer_name(milan.ask.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(7)
        .not_valid_before(START)
        .not_valid_after(NOW + timedelta(days=1))
    )
    cert = builder.sign(milan.ask_key, hashes.SHA384(), rsa_padding=PSS_SHA384)
    with pytest.raises(MalformedInput, match="P-384"):
        verify_vek_chain(cert, Product.MILAN, at=NOW, extra_roots=[milan.trusted_root()])


def test_rsa_pkcs1_signature_refused(milan: EmulatedSnpRoot) -> None:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "SEV-VCEK")]))
        .issuer_name(milan.ask.subject)
        .public_key(p384().public_key())
        .serial_number(8)
        .not_valid_before(START)
        .not_valid_after(NOW + timedelta(days=1))
    )
    cert = builder.sign(milan.ask_key, hashes.SHA384())  # PKCS#1 v1.5, not PSS
    with pytest.raises(VerificationFailed, match="RSASSA-PSS"):
        verify_vek_chain(cert, Product.MILAN, at=NOW, extra_roots=[milan.trusted_root()])


# -- CRLs ----------------------------------------------------------------------------------------------


def test_crl_revokes_vcek_and_ask(milan: EmulatedSnpRoot) -> None:
    vcek = milan.issue_vcek(p384().public_key(), CHIP, MILAN_TCB, not_before=START)
    roots = [milan.trusted_root()]
    clean = load_crl(milan.crl([12345], last_update=START).public_bytes(serialization.Encoding.DER))
    verify_vek_chain(vcek, Product.MILAN, at=NOW, extra_roots=roots, crls=[clean])
    for revoked in (serial_number(vcek), serial_number(milan.ask)):
        crl = milan.crl([revoked], last_update=START)
        with pytest.raises(VerificationFailed) as caught:
            verify_vek_chain(vcek, Product.MILAN, at=NOW, extra_roots=roots, crls=[crl])
        assert caught.value.reason is SnpReason.CERT_REVOKED and str(revoked) in caught.value.detail
    vlek = milan.issue_vlek(p384().public_key(), MILAN_TCB, "csp", not_before=START)
    crl = load_crl(
        milan.crl([serial_number(milan.asvk)], last_update=START).public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(VerificationFailed, match="SEV-VLEK-Milan"):
        verify_vek_chain(vlek, Product.MILAN, at=NOW, extra_roots=roots, crls=[crl])


def test_crl_must_be_the_arks_and_current(milan: EmulatedSnpRoot) -> None:
    vcek = milan.issue_vcek(p384().public_key(), CHIP, MILAN_TCB, not_before=START)
    roots = [milan.trusted_root()]
    other = EmulatedSnpRoot.generate(Product.MILAN, key_size=2048, not_before=START)
    forged = other.crl([], last_update=START)  # same names, another key
    with pytest.raises(VerificationFailed) as caught:
        verify_vek_chain(vcek, Product.MILAN, at=NOW, extra_roots=roots, crls=[forged])
    assert caught.value.reason is SnpReason.BAD_CRL and "does not verify" in caught.value.detail
    stale = milan.crl([], last_update=START, next_update=timedelta(days=1))
    with pytest.raises(VerificationFailed, match="not current"):
        verify_vek_chain(vcek, Product.MILAN, at=NOW, extra_roots=roots, crls=[stale])


def test_amd_vcek_checked_against_an_emulated_crl_is_refused() -> None:
    # A CRL is only believed when the chain's own ARK signed it.
    other = EmulatedSnpRoot.generate(Product.MILAN, key_size=2048, not_before=START)
    vcek = load_certificate((SNP / "reports/virtee-sev-milan/vcek.der").read_bytes())
    with pytest.raises(VerificationFailed) as caught:
        verify_vek_chain(vcek, Product.MILAN, at=NOW, crls=[other.crl([])])
    assert caught.value.reason is SnpReason.BAD_CRL


# -- parsers: typed errors only ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_bad_certificates(data: bytes) -> None:
    with pytest.raises(MalformedInput) as caught:
        load_certificate(data)
    assert caught.value.reason is SnpReason.BAD_CERTIFICATE
    with pytest.raises(MalformedInput):
        load_crl(data)


def test_two_pems_where_one_is_expected() -> None:
    with pytest.raises(MalformedInput, match="2 certificates"):
        load_certificate((SNP / "reports/virtee-sev-milan/chain.pem").read_bytes())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_load(data: bytes) -> None:
    for loader in (load_certificate, load_certificates, load_crl):
        try:
            loader(data)
        except MalformedInput:
            pass


# A flip inside a name attribute can give it a length X.509 does not allow (a 2-letter country of 11):
# cryptography warns as the name is read, and the certificate is judged as usual.
@pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")
@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1500), st.integers(1, 255))
def test_mutated_real_vcek(offset: int, mask: int) -> None:
    original = load_certificate((SNP / "reports/trustee-milan-vcek/vcek.der").read_bytes())
    der = bytearray(original.public_bytes(serialization.Encoding.DER))
    der[offset % len(der)] ^= mask
    try:
        cert = load_certificate(bytes(der))
        vek_extensions(cert)
        verify_vek_chain(cert, Product.MILAN, at=NOW)
    except SevError:
        return
    # Still accepted: then the flip cannot have touched what is signed, nor the signature.
    assert cert.tbs_certificate_bytes == original.tbs_certificate_bytes
    assert cert.signature == original.signature


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(["1.3.6.1.4.1.3704.1.3.1", "1.3.6.1.4.1.3704.1.4", "1.3.6.1.4.1.3704.1.2"]),
    st.binary(max_size=80),
)
def test_random_extension_values(milan: EmulatedSnpRoot, oid: str, value: bytes) -> None:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "SEV-VCEK")]))
        .issuer_name(milan.ask.subject)
        .public_key(PUBLIC)
        .serial_number(9)
        .not_valid_before(START)
        .not_valid_after(NOW)
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    )
    cert = builder.sign(SIGNER, hashes.SHA256())
    try:
        ext = vek_extensions(cert)
    except MalformedInput as exc:
        assert oid in exc.detail
        return
    if oid.endswith(".4"):
        assert ext.hwid is not None and len(ext.hwid) in (8, 64)


PUBLIC = ec.derive_private_key(7, ec.SECP384R1()).public_key()
SIGNER = ec.derive_private_key(11, ec.SECP384R1())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 10_000), mask=st.integers(1, 255))
def test_mutated_crl(milan: EmulatedSnpRoot, offset: int, mask: int) -> None:
    vcek = milan.issue_vcek(PUBLIC, CHIP, MILAN_TCB, not_before=START)
    original = milan.crl([5, 6], last_update=START).public_bytes(serialization.Encoding.DER)
    der = bytearray(original)
    der[offset % len(der)] ^= mask
    try:
        crl = load_crl(bytes(der))
        verify_vek_chain(vcek, Product.MILAN, at=NOW, extra_roots=[milan.trusted_root()], crls=[crl])
    except SevError:
        return
    # Accepted: then what the ARK signed is untouched, and no new serial slipped in unsigned.
    assert crl.tbs_certlist_bytes == load_crl(original).tbs_certlist_bytes
