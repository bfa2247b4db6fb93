"""SEV platform certificates: every real vector byte for byte, link signatures, slot rules, signing, fuzz."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from sevlaunch.sev.amd_cert import AMDCertificate, AMDKeyUsage
from sevlaunch.sev.cert import CERT_SIZE, Algorithm, Curve, ECKey, SEVCertificate, Usage
from sevlaunch.sev.errors import MalformedInput, Reason, SevError, VerificationFailed

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
SEV_CERT_FILES = sorted(
    str(p.relative_to(VECTORS)) for p in VECTORS.rglob("*.cert") if p.stat().st_size == CERT_SIZE
)
NAOS = sorted(p.name for p in (VECTORS / "chains").glob("naos-sev-tool-*"))
FULL_CHAINS = ["virtee-naples", "virtee-rome", "virtee-milan"]


def vec(path: str) -> bytes:
    return (VECTORS / path).read_bytes()


def sev(path: str) -> SEVCertificate:
    return SEVCertificate.from_bytes(vec(path))


def test_vector_inventory() -> None:
    # 6 naos exports x 5 files, 4 chains x 4 (+ Naples unsigned CEK), 2 KDS CEKs, 1 sample OCA.
    assert len(NAOS) == 6
    assert len(SEV_CERT_FILES) == 6 * 5 + 4 * 4 + 1 + 2 + 1


@pytest.mark.parametrize("path", SEV_CERT_FILES)
def test_every_vector_parses_and_round_trips(path: str) -> None:
    raw = vec(path)
    cert = SEVCertificate.from_bytes(raw)
    assert cert.to_bytes() == raw
    assert cert.body() == raw[:0x414]
    rebuilt = SEVCertificate(**{f: getattr(cert, f) for f in cert.__dataclass_fields__})
    assert rebuilt.to_bytes() == raw and rebuilt == cert
    assert isinstance(cert.key, ECKey) and cert.key.curve is Curve.P384
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def _slot(cert: SEVCertificate, n: int) -> list[str] | None:
    s = cert.signatures[n]
    if s.is_empty:
        return None
    u, a = Usage(s.usage), Algorithm(s.algorithm)
    return [f"{u.name}({u.value:#x})", f"{a.name}({a.value:#x})" if a.value > 9 else f"{a.name}({a.value})"]


def _kat_cases() -> list[tuple[str, str, dict[str, object]]]:
    kat = json.loads(vec("kat.json"))
    out = []
    for case in kat["cases"]:
        if case["category"] != "cert_parsing":
            continue
        for name, path in case["inputs"]["files"].items():
            if vec(path).__len__() == CERT_SIZE:
                out.append((case["id"], path, case["expected"][name]))
    return out


@pytest.mark.parametrize(("case_id", "path", "want"), _kat_cases())
def test_kat_cert_parsing(case_id: str, path: str, want: dict[str, object]) -> None:
    cert = sev(path)
    assert f"{cert.api_major}.{cert.api_minor}" == want["api"]
    assert f"{cert.usage.name}({cert.usage.value:#x})" == want["usage"]
    assert f"{cert.algorithm.name}({cert.algorithm.value})" == want["algo"]
    if "curve" in want:
        assert isinstance(cert.key, ECKey)
        assert f"{cert.key.curve.name}({cert.key.curve.value})" == want["curve"]
    assert _slot(cert, 0) == want["sig1"]
    assert _slot(cert, 1) == want["sig2"]


@pytest.mark.parametrize("chain", [*FULL_CHAINS, "virtee-naples-2019-02", *NAOS])
def test_platform_links_verify(chain: str) -> None:
    pdh, pek, oca, cek = (sev(f"chains/{chain}/{n}.cert") for n in ("pdh", "pek", "oca", "cek"))
    oca.verify_signed_by(oca)
    pek.verify_signed_by(oca)
    pek.verify_signed_by(cek)
    pdh.verify_signed_by(pek)


@pytest.mark.parametrize("chain", FULL_CHAINS)
def test_ask_signed_ceks(chain: str) -> None:
    sev(f"chains/{chain}/cek.cert").verify_signed_by(
        AMDCertificate.from_bytes(vec(f"chains/{chain}/ask.cert"))
    )


def test_cross_generation_ask_does_not_verify_cek() -> None:
    gens = {"virtee-naples": "naples", "virtee-rome": "rome", "virtee-milan": "milan"}
    for chain, own in gens.items():
        cek = sev(f"chains/{chain}/cek.cert")
        for gen in ("naples", "rome", "milan", "genoa", "turin"):
            ask = AMDCertificate.from_bytes(vec(f"amd/{gen}/ask.cert"))
            if gen == own:
                cek.verify_signed_by(ask)
            else:
                with pytest.raises(VerificationFailed) as exc:
                    cek.verify_signed_by(ask)
                assert exc.value.reason is Reason.BAD_SIGNATURE


UNSIGNED_CEKS = [
    "chains/virtee-naples/cek.unsigned.cert",
    "chains/virtee-naples-2019-02/cek.cert",
    *(f"chains/{n}/cek.cert" for n in NAOS),
]


@pytest.mark.parametrize("path", UNSIGNED_CEKS)
def test_unsigned_ceks_fail_ask_link(path: str) -> None:
    cek = sev(path)
    assert cek.sig1.is_empty and cek.sig2.is_empty
    for gen in ("naples", "rome", "milan"):
        with pytest.raises(VerificationFailed) as exc:
            cek.verify_signed_by(AMDCertificate.from_bytes(vec(f"amd/{gen}/ask.cert")))
        assert exc.value.reason is Reason.MISSING_SIGNATURE


def test_unsigned_and_signed_naples_cek_share_the_key() -> None:
    signed, unsigned = sev("chains/virtee-naples/cek.cert"), sev("chains/virtee-naples/cek.unsigned.cert")
    assert signed.public_key_bytes() == unsigned.public_key_bytes()
    assert signed.fingerprint() == unsigned.fingerprint()
    assert (
        signed.fingerprint() == hashlib.sha256(vec("chains/virtee-naples/cek.cert")[0x10:0x414]).hexdigest()
    )
    sev("chains/virtee-naples/pek.cert").verify_signed_by(unsigned)


def test_rome_kds_cek_and_malformed_slot() -> None:
    rome_ask = AMDCertificate.from_bytes(vec("amd/rome/ask.cert"))
    fixed = sev("misc/rome-cek-kds-2019-02/cek.cert")
    fixed.verify_signed_by(rome_ask)
    with pytest.raises(VerificationFailed):
        fixed.verify_signed_by(AMDCertificate.from_bytes(vec("amd/naples/ask.cert")))
    malformed_raw = vec("misc/rome-cek-kds-2019-02/cek_malformed_sig2_usage.cert")
    assert (
        bytes.fromhex(vec("misc/rome-cek-kds-2019-02/cek_kds_original.hex").decode().strip()) == malformed_raw
    )
    malformed = SEVCertificate.from_bytes(malformed_raw)
    assert malformed.to_bytes() == malformed_raw
    assert malformed.sig2.usage == 0x10 and malformed.sig2.algorithm == 0 and malformed.sig2.is_malformed
    # Slot 1 alone is a valid ASK signature, but the half-empty slot 2 fails the whole certificate.
    with pytest.raises(MalformedInput) as exc:
        malformed.verify_signed_by(rome_ask)
    assert exc.value.reason is Reason.MALFORMED_SIGNATURE_SLOT


def test_reversed_directions_fail() -> None:
    for chain in ("virtee-naples", "virtee-rome"):
        pdh, pek, oca, cek = (sev(f"chains/{chain}/{n}.cert") for n in ("pdh", "pek", "oca", "cek"))
        with pytest.raises(VerificationFailed) as exc:
            cek.verify_signed_by(pek)
        assert exc.value.reason is Reason.MISSING_SIGNATURE
        with pytest.raises(VerificationFailed):
            oca.verify_signed_by(pek)
        # A PDH is an ECDH key: it signs nothing, not even itself.
        for subject in (pek, pdh):
            with pytest.raises(VerificationFailed) as exc:
                subject.verify_signed_by(pdh)
            assert exc.value.reason is Reason.WRONG_USAGE
        # The OCA is not the CEK's signer, even though its algorithm matches a slot of the PEK.
        with pytest.raises(VerificationFailed):
            pdh.verify_signed_by(oca)


def _body_offsets() -> list[int]:
    # version, api, reserved, usage, algo, curve id, Qx (low, high significant, zero high part), Qy, padding.
    return [0x0, 0x3, 0x4, 0x5, 0x6, 0x8, 0xB, 0xC, 0xF, 0x10, 0x13, 0x14, 0x30, 0x43, 0x50, 0x5C, 0x70,
            0x8B, 0x90, 0xA3, 0xA4, 0x200, 0x413]  # fmt: skip


@pytest.mark.parametrize("offset", _body_offsets())
def test_one_byte_change_in_body_fails(offset: int) -> None:
    oca = sev("chains/virtee-rome/oca.cert")
    rome_ask = AMDCertificate.from_bytes(vec("amd/rome/ask.cert"))
    for path, signer in (("chains/virtee-rome/pek.cert", oca), ("chains/virtee-rome/cek.cert", rome_ask)):
        tampered = bytearray(vec(path))
        tampered[offset] ^= 0x01
        with pytest.raises(SevError):
            SEVCertificate.from_bytes(bytes(tampered)).verify_signed_by(signer)


@pytest.mark.parametrize("offset", [0x41C, 0x41C + 47, 0x41C + 72, 0x41C + 143, 0x41C + 200, 0x61B])
def test_signature_change_fails(offset: int) -> None:
    tampered = bytearray(vec("chains/virtee-milan/pdh.cert"))
    tampered[offset] ^= 0x01
    with pytest.raises(VerificationFailed):
        SEVCertificate.from_bytes(bytes(tampered)).verify_signed_by(sev("chains/virtee-milan/pek.cert"))


def test_sign_with_sample_oca_key() -> None:
    oca = sev("misc/sev-tool-oca/oca.cert")
    oca.verify_signed_by(oca)
    oca_key = serialization.load_pem_private_key(vec("misc/sev-tool-oca/oca_key.pem"), None)
    assert isinstance(oca_key, ec.EllipticCurvePrivateKey)
    assert ECKey.from_public_key(oca_key.public_key()) == oca.key
    pek_key = ec.generate_private_key(ec.SECP384R1())
    cek_key = ec.generate_private_key(ec.SECP384R1())
    cek = SEVCertificate.for_ec_key(
        usage=Usage.CEK,
        algorithm=Algorithm.ECDSA_SHA256,
        public_key=cek_key.public_key(),
        api_major=1,
        api_minor=55,
    )
    pek = SEVCertificate.for_ec_key(
        usage=Usage.PEK,
        algorithm=Algorithm.ECDSA_SHA256,
        public_key=pek_key.public_key(),
        api_major=1,
        api_minor=55,
    )
    with pytest.raises(VerificationFailed) as exc:
        pek.verify_signed_by(oca)
    assert exc.value.reason is Reason.MISSING_SIGNATURE
    pek = pek.sign_with(Usage.CEK, Algorithm.ECDSA_SHA256, cek_key).sign_with(
        Usage.OCA, Algorithm.ECDSA_SHA256, oca_key
    )
    assert Usage(pek.sig1.usage) is Usage.CEK and Usage(pek.sig2.usage) is Usage.OCA
    reparsed = SEVCertificate.from_bytes(pek.to_bytes())
    assert reparsed == pek
    reparsed.verify_signed_by(oca)
    reparsed.verify_signed_by(cek)
    with pytest.raises(RuntimeError):
        pek.sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, oca_key)
    with pytest.raises(TypeError):
        cek.sign_with(Usage.ASK, Algorithm.RSA_SHA384, oca_key)
    # An ECDSA_SHA384 slot hashes with SHA-384; the same key under ECDSA_SHA256 does not verify it.
    p384 = cek.sign_with(Usage.OCA, Algorithm.ECDSA_SHA384, oca_key)
    with pytest.raises(VerificationFailed):
        p384.verify_signed_by(oca)


def test_sign_with_rsa_ask() -> None:
    ask_key = rsa.generate_private_key(65537, 2048)
    ask = AMDCertificate.create(
        key_id=b"k" * 16,
        certifying_id=b"r" * 16,
        key_usage=AMDKeyUsage.ASK,
        public_key=ask_key.public_key(),
        signer_private_key=ask_key,
    )
    cek = SEVCertificate.for_ec_key(
        usage=Usage.CEK,
        algorithm=Algorithm.ECDSA_SHA256,
        public_key=ec.generate_private_key(ec.SECP384R1()).public_key(),
        api_major=0,
        api_minor=24,
    )
    for algo in (Algorithm.RSA_SHA256, Algorithm.RSA_SHA384):
        signed = SEVCertificate.from_bytes(cek.sign_with(Usage.ASK, algo, ask_key).to_bytes())
        signed.verify_signed_by(ask)
        with pytest.raises(VerificationFailed):
            signed.verify_signed_by(AMDCertificate.from_bytes(vec("amd/naples/ask.cert")))


def test_construction_checks() -> None:
    good = sev("chains/virtee-rome/pek.cert")
    with pytest.raises(MalformedInput):
        SEVCertificate(
            api_major=0, api_minor=0, usage=Usage.NONE, algorithm=Algorithm.ECDSA_SHA256, key=good.key
        )
    with pytest.raises(MalformedInput):
        SEVCertificate(
            api_major=0, api_minor=0, usage=Usage.PEK, algorithm=Algorithm.RSA_SHA256, key=good.key
        )
    with pytest.raises(MalformedInput):
        ECKey(Curve.P384, b"\x00" * 48, b"\x00" * 72)


def test_invalid_point_is_malformed() -> None:
    raw = bytearray(vec("chains/virtee-rome/pek.cert"))
    raw[0x14] ^= 0x01  # Qx no longer matches Qy: not on the curve
    with pytest.raises(MalformedInput):
        SEVCertificate.from_bytes(bytes(raw)).public_key()


BASE = vec("chains/virtee-rome/pek.cert")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2200))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        cert = SEVCertificate.from_bytes(data)
    except MalformedInput:
        return
    assert cert.to_bytes() == data


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(0, CERT_SIZE - 1), extra=st.binary(min_size=1, max_size=32))
def test_fuzz_truncated_and_extended(cut: int, extra: bytes) -> None:
    with pytest.raises(MalformedInput):
        SEVCertificate.from_bytes(BASE[:cut])
    with pytest.raises(MalformedInput):
        SEVCertificate.from_bytes(BASE + extra)


OCA = sev("chains/virtee-rome/oca.cert")


@settings(max_examples=150, deadline=None)
@given(bit=st.integers(0, CERT_SIZE * 8 - 1))
def test_fuzz_bit_flips(bit: int) -> None:
    raw = bytearray(BASE)
    raw[bit // 8] ^= 1 << (bit % 8)
    try:
        cert = SEVCertificate.from_bytes(bytes(raw))
    except MalformedInput:
        return
    assert cert.to_bytes() == bytes(raw)
    if bit // 8 >= 0x61C:
        return  # slot 2 (the CEK's signature) is not the one the OCA check reads
    with pytest.raises(SevError):
        cert.verify_signed_by(OCA)


@settings(max_examples=30, deadline=None)
@given(
    usage=st.sampled_from([Usage.OCA, Usage.PEK, Usage.PDH, Usage.CEK]),
    algo=st.sampled_from([Algorithm.ECDSA_SHA256, Algorithm.ECDH_SHA256, Algorithm.ECDSA_SHA384]),
    major=st.integers(0, 255),
    minor=st.integers(0, 255),
    p256=st.booleans(),
)
def test_writer_parser_round_trip(usage: Usage, algo: Algorithm, major: int, minor: int, p256: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1() if p256 else ec.SECP384R1())
    cert = SEVCertificate.for_ec_key(
        usage=usage, algorithm=algo, public_key=key.public_key(), api_major=major, api_minor=minor
    )
    assert SEVCertificate.from_bytes(cert.to_bytes()) == cert
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
