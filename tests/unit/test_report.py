"""The PEK-signed attestation report (PROTOCOL.md section 10)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from sevlaunch.sev.cert import Algorithm, SEVCertificate, Usage
from sevlaunch.sev.errors import MalformedInput, Reason, VerificationFailed
from sevlaunch.sev.report import REPORT_SIZE, AttestationReport
from sevlaunch.sev.types import LaunchDigest, MNonce

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
PEK_KEY = ec.generate_private_key(ec.SECP384R1())
PEK = SEVCertificate.for_ec_key(
    usage=Usage.PEK,
    algorithm=Algorithm.ECDSA_SHA256,
    public_key=PEK_KEY.public_key(),
    api_major=0,
    api_minor=24,
)
REPORT = AttestationReport(
    mnonce=MNonce(bytes(range(16))), launch_digest=LaunchDigest(hashlib.sha256(b"ovmf").digest()), policy=0x3
)


def test_layout_and_signature() -> None:
    signed = REPORT.sign(PEK_KEY)
    raw = signed.to_bytes()
    assert len(raw) == REPORT_SIZE == 0xD0
    assert raw[:16] == REPORT.mnonce and raw[0x10:0x30] == REPORT.launch_digest
    assert raw[0x30:0x34] == (3).to_bytes(4, "little")
    assert raw[0x34:0x38] == (0x1002).to_bytes(4, "little") and raw[0x38:0x3C] == (2).to_bytes(4, "little")
    # Independently: ECDSA P-384 over SHA-256 of bytes 0x00..0x33, r and s little-endian.
    r = int.from_bytes(raw[0x40:0x88], "little")
    s = int.from_bytes(raw[0x88:0xD0], "little")
    PEK_KEY.public_key().verify(encode_dss_signature(r, s), raw[:0x34], ec.ECDSA(hashes.SHA256()))
    parsed = AttestationReport.from_bytes(raw)
    assert parsed == signed
    parsed.verify(PEK)


def test_unsigned_and_tampered_reports_fail() -> None:
    with pytest.raises(VerificationFailed) as exc:
        REPORT.verify(PEK)
    assert exc.value.reason is Reason.WRONG_SIGNER
    raw = REPORT.sign(PEK_KEY).to_bytes()
    for offset in (0, 15, 0x10, 0x2F, 0x30, 0x33, 0x40, 0x87, 0x88, 0xCF):
        tampered = bytearray(raw)
        tampered[offset] ^= 0x01
        with pytest.raises(VerificationFailed):
            AttestationReport.from_bytes(bytes(tampered)).verify(PEK)


def test_wrong_signer_fails() -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(VerificationFailed) as exc:
        REPORT.sign(other).verify(PEK)
    assert exc.value.reason is Reason.BAD_SIGNATURE
    pdh = SEVCertificate.from_bytes((VECTORS / "chains/virtee-rome/pdh.cert").read_bytes())
    with pytest.raises(VerificationFailed) as exc:
        REPORT.sign(PEK_KEY).verify(pdh)
    assert exc.value.reason is Reason.WRONG_USAGE


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=0x200))
def test_fuzz_parse(data: bytes) -> None:
    if len(data) != REPORT_SIZE:
        with pytest.raises(MalformedInput):
            AttestationReport.from_bytes(data)
    else:
        assert AttestationReport.from_bytes(data).to_bytes() == data


@settings(max_examples=50, deadline=None)
@given(
    mnonce=st.binary(min_size=16, max_size=16),
    digest=st.binary(min_size=32, max_size=32),
    policy=st.integers(0, 2**32 - 1),
)
def test_round_trip(mnonce: bytes, digest: bytes, policy: int) -> None:
    report = AttestationReport(mnonce=MNonce(mnonce), launch_digest=LaunchDigest(digest), policy=policy)
    assert AttestationReport.from_bytes(report.to_bytes()) == report
    with pytest.raises(MalformedInput):
        AttestationReport(mnonce=MNonce(mnonce[:15]), launch_digest=LaunchDigest(digest), policy=policy)
