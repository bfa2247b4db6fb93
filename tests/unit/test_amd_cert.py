"""AMD CA certificates (ARK/ASK): real roots byte for byte, Naples quirks, tampering, creation, fuzz."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevlaunch.sev import roots
from sevlaunch.sev.amd_cert import AMDCertificate, AMDKeyUsage, parse_ark, parse_ask_ark
from sevlaunch.sev.errors import MalformedInput, Reason, SevError, VerificationFailed

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
GENERATIONS = ("naples", "rome", "milan", "genoa", "turin")
# PROTOCOL.md section 1: the pinned ARK key ids.
ARK_IDS = {
    "naples": "1bb987c3-5949-4606-b174-945601c9ea5b",
    "rome": "e6002122-fb58-4193-99d1-5fee7b131351",
    "milan": "94c38e41-77d0-4792-92a7-ae671d083fb6",
    "genoa": "9f9d4a8f-e761-4565-99f6-946c4c010f3a",
    "turin": "d05c3a8b-de48-4904-b495-52422ceb3942",
}


def vec(path: str) -> bytes:
    return (VECTORS / path).read_bytes()


def load(path: str) -> AMDCertificate:
    return AMDCertificate.from_bytes(vec(path))


@pytest.mark.parametrize("gen", GENERATIONS)
def test_real_roots_round_trip_and_verify(gen: str) -> None:
    ark_raw, ask_raw = vec(f"amd/{gen}/ark.cert"), vec(f"amd/{gen}/ask.cert")
    ark, ask = AMDCertificate.from_bytes(ark_raw), AMDCertificate.from_bytes(ask_raw)
    assert ark.to_bytes() == ark_raw and ask.to_bytes() == ask_raw
    # Re-encoding from the fields (not the cached input) gives the same bytes.
    assert AMDCertificate(**{f: getattr(ark, f) for f in ark.__dataclass_fields__}).to_bytes() == ark_raw
    assert ark.key_usage is AMDKeyUsage.ARK and ask.key_usage is AMDKeyUsage.ASK
    assert str(uuid.UUID(bytes=ark.key_id)) == ARK_IDS[gen]
    assert ark.certifying_id == ark.key_id and ask.certifying_id == ark.key_id
    assert ark.modulus_bits == (2048 if gen == "naples" else 4096)
    assert len(ark_raw) == (832 if gen == "naples" else 1600)
    ark.verify_self_signed()
    ask.verify_signed_by(ark)
    # The package data is the same bytes.
    assert roots.ark_bytes(gen) == ark_raw and roots.ask_bytes(gen) == ask_raw


@pytest.mark.parametrize("gen", ["milan", "genoa", "turin"])
def test_x509_keys_equal_sev_format_keys(gen: str) -> None:
    for name in ("ark", "ask"):
        pem = x509.load_pem_x509_certificate(vec(f"amd/{gen}/{name}.pem"))
        key = pem.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        assert key.public_numbers() == load(f"amd/{gen}/{name}.cert").public_key().public_numbers()


@pytest.mark.parametrize("signer_gen", GENERATIONS)
@pytest.mark.parametrize("subject_gen", GENERATIONS)
def test_ask_verifies_only_under_its_own_ark(signer_gen: str, subject_gen: str) -> None:
    ark = load(f"amd/{signer_gen}/ark.cert")
    ask = load(f"amd/{subject_gen}/ask.cert")
    if signer_gen == subject_gen:
        ask.verify_signed_by(ark)
    else:
        with pytest.raises(VerificationFailed) as exc:
            ask.verify_signed_by(ark)
        assert exc.value.reason is Reason.WRONG_SIGNER


def test_reversed_direction_fails() -> None:
    for gen in ("naples", "rome"):
        ark, ask = load(f"amd/{gen}/ark.cert"), load(f"amd/{gen}/ask.cert")
        with pytest.raises(VerificationFailed) as exc:
            ark.verify_signed_by(ask)
        assert exc.value.reason is Reason.WRONG_USAGE
        with pytest.raises(VerificationFailed):
            ask.verify_self_signed()


def test_naples_ask_ark_file() -> None:
    ask, ark = parse_ask_ark(vec("amd/naples/ask_ark.cert"))
    assert ask == load("amd/naples/ask.cert") and ark == load("amd/naples/ark.cert")


def test_published_truncated_naples_ark_is_recognised_as_the_pinned_key() -> None:
    truncated = vec("amd/naples/ark.cert.truncated_public")
    assert len(truncated) == 576
    with pytest.raises(MalformedInput) as exc:
        AMDCertificate.from_bytes(truncated)
    assert exc.value.reason is Reason.TRUNCATED
    # With AMD's separately supplied signature it is the pinned ARK ...
    assert truncated + vec("amd/naples/ark.cert.sig") == vec("amd/naples/ark.cert")
    # ... and parse_ark maps exactly these bytes to it.
    ark = parse_ark(truncated)
    assert ark.to_bytes() == vec("amd/naples/ark.cert")
    ark.verify_self_signed()
    # AMD's ask_ark_naples.cert layout: ASK || truncated ARK.
    ask, ark2 = parse_ask_ark(vec("amd/naples/ask.cert") + truncated)
    assert ark2 == ark
    ask.verify_signed_by(ark2)


@pytest.mark.parametrize("offset", [0, 4, 0x14, 0x24, 0x38, 0x40, 0x140, 0x23F])
def test_other_truncated_arks_are_malformed(offset: int) -> None:
    tampered = bytearray(vec("amd/naples/ark.cert.truncated_public"))
    tampered[offset] ^= 0x01
    with pytest.raises(MalformedInput):
        parse_ark(bytes(tampered))


def test_zero_signature_naples_ark_parses_but_fails() -> None:
    ark = load("amd/naples/ark.cert.zero_sig_2019-02")
    assert ark.to_bytes() == vec("amd/naples/ark.cert.zero_sig_2019-02")
    assert ark.signed_bytes() == load("amd/naples/ark.cert").signed_bytes()
    with pytest.raises(VerificationFailed) as exc:
        ark.verify_self_signed()
    assert exc.value.reason is Reason.MISSING_SIGNATURE
    _ask, ark2 = parse_ask_ark(vec("amd/naples/ask_ark.cert.zero_sig_2019-02"))
    assert ark2 == ark
    with pytest.raises(VerificationFailed):
        ark2.verify_self_signed()


def test_kat_fields() -> None:
    kat = json.loads(vec("kat.json"))
    case = next(c for c in kat["cases"] if c["id"] == "cert-fields-naples")
    for name in ("ark", "ask"):
        cert = load(case["inputs"]["files"][name])
        want = case["expected"][name]
        assert f"{cert.key_usage.name}({cert.key_usage.value:#x})" == want["usage"]
        assert cert.modulus_bits == want["key_bits"]
        assert int.from_bytes(cert.key_id, "little") == want["key_id_u128"]
        assert int.from_bytes(cert.certifying_id, "little") == want["certifying_id_u128"]
    assert load("amd/naples/ark.cert").hash_algorithm.name == case["expected"]["ark"]["sig_hash"].lower()


def _sample_offsets(size: int) -> list[int]:
    # Every header field, then the start, middle and end of the exponent and the modulus.
    n = (size - 0x40) // 3
    header = [0, 3, 4, 0x13, 0x14, 0x23, 0x24, 0x27, 0x28, 0x37, 0x38, 0x3B, 0x3C, 0x3F]
    return [*header, 64, 64 + n // 2, 64 + n - 1, 64 + n, 64 + n + n // 2, 64 + 2 * n - 1]


@pytest.mark.parametrize("gen", ["naples", "rome"])
def test_one_byte_change_in_signed_region_fails(gen: str) -> None:
    raw = vec(f"amd/{gen}/ask.cert")
    ark = load(f"amd/{gen}/ark.cert")
    for offset in _sample_offsets(len(raw)):
        tampered = bytearray(raw)
        tampered[offset] ^= 0x80
        with pytest.raises(SevError):
            AMDCertificate.from_bytes(bytes(tampered)).verify_signed_by(ark)


def test_signature_change_fails() -> None:
    raw = vec("amd/rome/ark.cert")
    for offset in (0x40 + 2 * 512, 0x40 + 2 * 512 + 300, len(raw) - 1):
        tampered = bytearray(raw)
        tampered[offset] ^= 0x01
        with pytest.raises(VerificationFailed) as exc:
            AMDCertificate.from_bytes(bytes(tampered)).verify_self_signed()
        assert exc.value.reason is Reason.BAD_SIGNATURE


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    return rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)


def test_create_round_trips_and_verifies(rsa_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> None:
    ark_key, ask_key = rsa_keys
    ark = AMDCertificate.create(
        key_id=b"\x01" * 16,
        certifying_id=b"\x01" * 16,
        key_usage=AMDKeyUsage.ARK,
        public_key=ark_key.public_key(),
        signer_private_key=ark_key,
    )
    ask = AMDCertificate.create(
        key_id=b"\x02" * 16,
        certifying_id=b"\x01" * 16,
        key_usage=AMDKeyUsage.ASK,
        public_key=ask_key.public_key(),
        signer_private_key=ark_key,
    )
    ark.verify_self_signed()
    ask.verify_signed_by(ark)
    assert AMDCertificate.from_bytes(ask.to_bytes()) == ask
    assert ask.public_key().public_numbers() == ask_key.public_key().public_numbers()
    # Signed by the wrong key (but claiming the ARK): fails.
    forged = AMDCertificate.create(
        key_id=b"\x02" * 16,
        certifying_id=b"\x01" * 16,
        key_usage=AMDKeyUsage.ASK,
        public_key=ask_key.public_key(),
        signer_private_key=ask_key,
    )
    with pytest.raises(VerificationFailed) as exc:
        forged.verify_signed_by(ark)
    assert exc.value.reason is Reason.BAD_SIGNATURE
    # A real AMD ARK does not vouch for it either.
    with pytest.raises(VerificationFailed):
        ask.verify_signed_by(load("amd/naples/ark.cert"))


def test_repr_is_short() -> None:
    assert "reserved" not in repr(load("amd/rome/ask.cert"))


BASE = [vec("amd/naples/ark.cert"), vec("amd/rome/ask.cert")]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2000))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        cert = AMDCertificate.from_bytes(data)
    except MalformedInput:
        return
    assert AMDCertificate.from_bytes(cert.to_bytes()) == cert


@settings(max_examples=150, deadline=None)
@given(which=st.sampled_from([0, 1]), cut=st.integers(0, 1599), extra=st.binary(min_size=1, max_size=64))
def test_fuzz_truncated_and_extended(which: int, cut: int, extra: bytes) -> None:
    raw = BASE[which]
    with pytest.raises(MalformedInput):
        AMDCertificate.from_bytes(raw[: cut % len(raw)])
    with pytest.raises(MalformedInput):
        AMDCertificate.from_bytes(raw + extra)
    with pytest.raises(MalformedInput):
        parse_ask_ark(raw[: cut % len(raw)])


@settings(max_examples=150, deadline=None)
@given(which=st.sampled_from([0, 1]), bit=st.integers(0, 1600 * 8 - 1))
def test_fuzz_bit_flips(which: int, bit: int) -> None:
    raw = bytearray(BASE[which])
    bit %= len(raw) * 8
    raw[bit // 8] ^= 1 << (bit % 8)
    ark = load("amd/naples/ark.cert") if which == 0 else load("amd/rome/ark.cert")
    try:
        cert = AMDCertificate.from_bytes(bytes(raw))
    except MalformedInput:
        return
    assert cert.to_bytes() == bytes(raw)
    with pytest.raises(SevError):
        cert.verify_signed_by(ark)
