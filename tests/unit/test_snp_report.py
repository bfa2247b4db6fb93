"""The ATTESTATION_REPORT parser and writer: byte-exact round trips on every real report, a writer that
signs, every signed byte covered by the signature, and no input that raises anything but a typed error."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from sevlaunch.sev.errors import MalformedInput, SevError, Unsupported, VerificationFailed
from sevlaunch.snp.certs import load_certificate
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.report import REPORT_SIZE, SIGNED_SIZE, AttestationReport, SigningKey
from sevlaunch.snp.tcb import Product, TcbVersion

SNP = Path(__file__).resolve().parents[1] / "vectors" / "snp"
REAL = sorted(p.parent.name for p in (SNP / "reports").glob("*/report.bin"))
P384 = ec.SECP384R1()
# A flipped bit makes the report malformed, or breaks the signature, or names an algorithm we do not have.
REFUSALS = (SnpReason.BAD_REPORT, SnpReason.BAD_REPORT_SIGNATURE, SnpReason.UNSUPPORTED_SIGNATURE_ALGO)


def raw(name: str) -> bytes:
    return (SNP / "reports" / name / "report.bin").read_bytes()


def vek_key(name: str) -> ec.EllipticCurvePublicKey:
    path = next((SNP / "reports" / name).glob("v*.der"))
    key = load_certificate(path.read_bytes()).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def init_fields(report: AttestationReport) -> dict[str, object]:
    return {f.name: getattr(report, f.name) for f in dataclasses.fields(report) if f.init}


def test_six_real_reports_present() -> None:
    assert len(REAL) == 6


@pytest.mark.parametrize("name", REAL)
def test_round_trip_is_byte_exact(name: str) -> None:
    data = raw(name)
    report = AttestationReport.from_bytes(data)
    assert report.to_bytes() == data
    rebuilt = AttestationReport(**init_fields(report))  # written from the fields, not the cached bytes
    assert rebuilt == report
    assert rebuilt.to_bytes() == data
    assert rebuilt.signed_bytes() == data[:SIGNED_SIZE] and len(rebuilt.signed_bytes()) == 0x2A0
    assert rebuilt.signature_bytes() == data[SIGNED_SIZE:]
    rebuilt.verify_signature(vek_key(name))


@pytest.mark.parametrize("name", REAL)
def test_every_signed_byte_is_covered(name: str) -> None:
    """One random bit flipped at every offset 0x000-0x29F: refused, as malformed or as badly signed."""
    data = raw(name)
    key = vek_key(name)
    rng = random.Random(f"{name}-flip")
    for offset in range(SIGNED_SIZE):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << rng.randrange(8)
        with pytest.raises(SevError) as caught:
            AttestationReport.from_bytes(bytes(flipped)).verify_signature(key)
        assert caught.value.reason in REFUSALS, offset


def test_signature_bytes_are_covered_too() -> None:
    data = raw("virtee-sev-milan")
    key = vek_key("virtee-sev-milan")
    for offset in (SIGNED_SIZE, SIGNED_SIZE + 47, SIGNED_SIZE + 72, SIGNED_SIZE + 72 + 47):
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        with pytest.raises(VerificationFailed):
            AttestationReport.from_bytes(bytes(flipped)).verify_signature(key)
    padding = bytearray(data)
    padding[SIGNED_SIZE + 144] = 1  # the signature's zero padding
    with pytest.raises(MalformedInput, match="reserved bytes at 0x330"):
        AttestationReport.from_bytes(bytes(padding))


def test_writer_signs_and_verifies_every_version() -> None:
    key = ec.generate_private_key(P384)
    other = ec.generate_private_key(P384)
    for version in (2, 3, 4, 5):
        cpuid = (0x1A, 0x02, 0x00) if version >= 3 else (None, None, None)
        vectors = (0x5, 0x7) if version >= 4 else (None, None)
        tcb = TcbVersion(Product.TURIN, bootloader=1, tee=2, snp=3, microcode=4, fmc=5)
        unsigned = AttestationReport(
            version=version,
            guest_svn=7,
            policy=0x30000,
            report_data=bytes(range(64)),
            measurement=b"\x11" * 48,
            chip_id=b"\xab" * 8 + bytes(56),
            reported_tcb=tcb.raw,
            current_tcb=tcb.raw,
            committed_tcb=tcb.raw,
            launch_tcb=tcb.raw,
            cpuid_fam_id=cpuid[0],
            cpuid_mod_id=cpuid[1],
            cpuid_step=cpuid[2],
            launch_mit_vector=vectors[0],
            current_mit_vector=vectors[1],
        )
        signed = unsigned.signed(key)
        data = signed.to_bytes()
        assert len(data) == REPORT_SIZE and data[:SIGNED_SIZE] == unsigned.to_bytes()[:SIGNED_SIZE]
        assert signed.sign(key)[144:] == bytes(0x200 - 144)
        parsed = AttestationReport.from_bytes(data)
        assert parsed == signed
        parsed.verify_signature(key.public_key())
        with pytest.raises(VerificationFailed):
            parsed.verify_signature(other.public_key())
        if version >= 3:
            assert parsed.product() is Product.TURIN and parsed.tcbs(Product.TURIN).reported == tcb
        if version >= 4:
            assert (data[0x1F8], data[0x200]) == (5, 7)


def test_field_offsets_match_the_abi() -> None:
    report = AttestationReport(
        version=5,
        guest_svn=0x01020304,
        policy=0x30000 | 0x0102,
        family_id=b"\x10" * 16,
        image_id=b"\x20" * 16,
        vmpl=2,
        current_tcb=0x0A,
        platform_info=0x25,
        author_key_en=True,
        mask_chip_key=True,
        signing_key=SigningKey.VLEK,
        host_data=b"\x30" * 32,
        id_key_digest=b"\x40" * 48,
        author_key_digest=b"\x50" * 48,
        report_id=b"\x60" * 32,
        reported_tcb=0x0B,
        cpuid_fam_id=0x19,
        cpuid_mod_id=0x11,
        cpuid_step=0x01,
        chip_id=b"\x70" * 64,
        committed_tcb=0x0C,
        current_build=1,
        current_minor=2,
        current_major=3,
        committed_build=4,
        committed_minor=5,
        committed_major=6,
        launch_tcb=0x0D,
        launch_mit_vector=0x0E,
        current_mit_vector=0x0F,
    )
    data = report.to_bytes()
    assert data[0x00:0x08] == bytes.fromhex("0500000004030201")
    assert data[0x08:0x10] == (0x30102).to_bytes(8, "little")
    assert data[0x10] == 0x10 and data[0x20] == 0x20 and data[0x30] == 2 and data[0x34] == 1
    assert data[0x38] == 0x0A and data[0x40] == 0x25 and data[0x48] == 0b111
    assert data[0xC0] == 0x30 and data[0xE0] == 0x40 and data[0x110] == 0x50 and data[0x140] == 0x60
    assert data[0x160:0x180] == b"\xff" * 32 and data[0x180] == 0x0B and data[0x188:0x18B] == b"\x19\x11\x01"
    assert data[0x1A0:0x1E0] == b"\x70" * 64 and data[0x1E0] == 0x0C
    assert data[0x1E8:0x1F0] == bytes([1, 2, 3, 0, 4, 5, 6, 0])
    assert (data[0x1F0], data[0x1F8], data[0x200]) == (0x0D, 0x0E, 0x0F)
    assert AttestationReport.from_bytes(data) == report


def test_version_dependent_bytes() -> None:
    base = bytearray(raw("virtee-sev-milan"))  # v2
    cpuid = bytearray(base)
    cpuid[0x188] = 0x19
    with pytest.raises(MalformedInput, match="0x188"):
        AttestationReport.from_bytes(bytes(cpuid))
    vector = bytearray(base)
    vector[0x1F8] = 1
    with pytest.raises(MalformedInput, match="0x1f8"):
        AttestationReport.from_bytes(bytes(vector))
    vector[0:4] = (4).to_bytes(4, "little")  # v4 reads the same bytes as LAUNCH_MIT_VECTOR
    assert AttestationReport.from_bytes(bytes(vector)).launch_mit_vector == 1
    for version in (0, 1, 6, 0xFFFFFFFF):
        bad = bytearray(base)
        bad[0:4] = version.to_bytes(4, "little")
        with pytest.raises(MalformedInput, match="version"):
            AttestationReport.from_bytes(bytes(bad))


@pytest.mark.parametrize(
    ("flags", "fragment"), [(0x20, "reserved bits"), (2 << 2, "signing_key"), (6 << 2, "signing_key")]
)
def test_flags_reserved_values_refused(flags: int, fragment: str) -> None:
    data = bytearray(raw("virtee-sev-milan"))
    data[0x48:0x4C] = flags.to_bytes(4, "little")
    with pytest.raises(MalformedInput, match=fragment):
        AttestationReport.from_bytes(bytes(data))


def test_unsigned_and_unknown_algorithm_refused() -> None:
    key = ec.generate_private_key(P384)
    unsigned = AttestationReport(signing_key=SigningKey.NONE).signed(key)
    with pytest.raises(VerificationFailed, match="not signed"):
        unsigned.verify_signature(key.public_key())
    other_algo = dataclasses.replace(AttestationReport(), signature_algo=2).signed(key)
    with pytest.raises(Unsupported, match="signature_algo"):
        other_algo.verify_signature(key.public_key())
    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(VerificationFailed, match="P-384"):
        AttestationReport().signed(key).verify_signature(p256.public_key())
    with pytest.raises(Unsupported):
        AttestationReport().sign(p256)


def test_constructor_refuses_bad_fields() -> None:
    with pytest.raises(MalformedInput, match="measurement"):
        AttestationReport(measurement=b"short")
    with pytest.raises(MalformedInput, match="vmpl"):
        AttestationReport(vmpl=1 << 32)
    with pytest.raises(MalformedInput, match="cpuid"):
        AttestationReport(version=2, cpuid_fam_id=0x19, cpuid_mod_id=1, cpuid_step=1)
    assert AttestationReport(version=3).cpuid_fam_id == 0  # left out: "not reported", as firmware writes
    assert AttestationReport(version=4).current_mit_vector == 0
    with pytest.raises(MalformedInput, match="cpuid"):
        AttestationReport(version=3, cpuid_fam_id=0x100)
    with pytest.raises(MalformedInput, match="mit_vector"):
        AttestationReport(version=3, cpuid_fam_id=0, cpuid_mod_id=0, cpuid_step=0, launch_mit_vector=1)


def test_product_from_cpuid_and_hint() -> None:
    v2 = AttestationReport.from_bytes(raw("virtee-sev-milan"))
    with pytest.raises(Unsupported, match="product"):
        v2.product()
    assert v2.product(Product.GENOA) is Product.GENOA  # a v2 report cannot contradict the caller
    genoa = AttestationReport.from_bytes(raw("trustee-genoa-e2e"))
    assert genoa.product() is Product.GENOA and genoa.product(Product.GENOA) is Product.GENOA
    with pytest.raises(VerificationFailed) as caught:
        genoa.product(Product.MILAN)
    assert caught.value.reason is SnpReason.PRODUCT_MISMATCH
    assert AttestationReport.from_bytes(raw("trustee-milan-vlek")).product() is Product.MILAN
    unknown = dataclasses.replace(genoa, cpuid_fam_id=0x17, cpuid_mod_id=0x31)
    with pytest.raises(Unsupported, match="no known product"):
        unknown.product()


def test_tcbs_of_the_wrong_layout_refused() -> None:
    genoa = AttestationReport.from_bytes(raw("trustee-genoa-e2e"))  # SNP SPL in byte 6
    with pytest.raises(MalformedInput, match="reserved byte"):
        genoa.tcbs(Product.TURIN)


def test_repr_and_json_have_every_field() -> None:
    report = AttestationReport.from_bytes(raw("trustee-milan-vlek"))
    data = report.as_json(Product.MILAN)
    assert data["signing_key"] == "vlek" and data["cpuid_mod_id"] == 1
    assert data["reported_tcb_decoded"] == {
        "bootloader": 4,
        "tee": 0,
        "snp": 24,
        "microcode": 217,
        "raw": report.reported_tcb,
    }
    assert {f.name for f in dataclasses.fields(report) if f.init} <= set(data)


# -- hypothesis: no input raises anything but a typed error ------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2 * REPORT_SIZE))
def test_random_bytes_any_length(data: bytes) -> None:
    try:
        AttestationReport.from_bytes(data)
    except MalformedInput:
        return
    assert len(data) == REPORT_SIZE


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(REAL), st.integers(0, 2 * REPORT_SIZE))
def test_truncated_and_oversized_real_reports(name: str, length: int) -> None:
    data = raw(name)
    candidate = (data + bytes(REPORT_SIZE))[:length]
    if length == REPORT_SIZE:
        assert AttestationReport.from_bytes(candidate).to_bytes() == data
        return
    with pytest.raises(MalformedInput, match="report_size"):
        AttestationReport.from_bytes(candidate)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(REAL),
    st.lists(st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(1, 255)), max_size=8),
)
def test_mutated_real_reports_parse_exactly_or_refuse(name: str, edits: list[tuple[int, int]]) -> None:
    data = bytearray(raw(name))
    for offset, mask in edits:
        data[offset] ^= mask
    try:
        report = AttestationReport.from_bytes(bytes(data))
    except MalformedInput:
        return
    assert report.to_bytes() == bytes(data)
    assert AttestationReport(**init_fields(report)).to_bytes() == bytes(data)
    for product in Product:
        try:
            report.tcbs(report.product(product))
            report.guest_policy()
        except SevError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=REPORT_SIZE, max_size=REPORT_SIZE))
def test_random_full_size_reports(data: bytes) -> None:
    key = ec.derive_private_key(12345, P384).public_key()
    try:
        AttestationReport.from_bytes(data).verify_signature(key)
    except SevError:
        return
    pytest.fail("random bytes verified")
