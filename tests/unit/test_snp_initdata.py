"""Init data: canonical encoding, strict parsing, HOST_DATA."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sevlaunch.sev.errors import MalformedInput
from sevlaunch.snp.initdata import (
    MAX_INIT_DATA_BYTES,
    Endpoint,
    InitData,
    InitDataReason,
    host_data,
)


def _cert(*, ca: bool | None = True) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "owner guest CA")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


CA = _cert()


def _doc(**overrides: object) -> dict[str, object]:
    obj: dict[str, object] = {
        "version": 1,
        "endpoint": "https://owner.example:8443",
        "ca_pem": CA,
        "authorization_id": "auth-0001",
        "nonce": "ab" * 32,
    }
    obj.update(overrides)
    return obj


def _canon(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def test_round_trip_and_host_data() -> None:
    data = InitData.new(endpoint="https://owner.example:8443", ca_pem=CA, authorization_id="auth-1")
    raw = data.to_bytes()
    again = InitData.parse(raw)
    assert again == data
    assert again.to_bytes() == raw
    assert data.host_data == hashlib.sha256(raw).digest() == host_data(raw)
    assert len(data.host_data) == 32
    # One trailing newline is layout: same document, same HOST_DATA.
    assert InitData.parse(raw + b"\n").host_data == data.host_data
    # Two fresh init data for the same launch differ (the nonce), so do their HOST_DATA.
    other = InitData.new(endpoint="https://owner.example:8443", ca_pem=CA, authorization_id="auth-1")
    assert other.host_data != data.host_data


def test_exact_bytes_of_a_known_document() -> None:
    raw = _canon(_doc())
    parsed = InitData.parse(raw)
    assert parsed.to_bytes() == raw
    assert raw.startswith(b'{"authorization_id":"auth-0001","ca_pem":"-----BEGIN CERTIFICATE-----\\n')
    assert raw.endswith(b'"endpoint":"https://owner.example:8443","nonce":"' + b"ab" * 32 + b'","version":1}')
    assert parsed.nonce == bytes.fromhex("ab" * 32)
    assert parsed.endpoint.grpc_target == "owner.example:8443"
    assert parsed.ca_certificate.subject.rfc4514_string() == "CN=owner guest CA"


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(_doc()).encode(),  # spaces
        json.dumps(_doc(), sort_keys=True, indent=1).encode(),
        _canon(_doc()) + b"\n\n",
        b" " + _canon(_doc()),
        _canon(_doc()).replace(b'"version":1', b'"version":1.0'),
    ],
)
def test_non_canonical_spellings_are_refused(raw: bytes) -> None:
    with pytest.raises(MalformedInput) as err:
        InitData.parse(raw)
    assert err.value.reason is InitDataReason.BAD_INIT_DATA


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (_doc(extra=1), "unknown field"),
        ({k: v for k, v in _doc().items() if k != "nonce"}, "missing field"),
        (_doc(version=2), "version"),
        (_doc(version=True), "version"),
        (_doc(endpoint="http://owner.example:8443"), "https"),
        (_doc(endpoint="https://owner.example"), "port"),
        (_doc(endpoint="https://owner.example:0"), "port"),
        (_doc(endpoint="https://owner.example:65536"), "port"),
        (_doc(endpoint="https://owner.example:8443/path"), "no path"),
        (_doc(endpoint="https://user@owner.example:8443"), "no path"),
        (_doc(endpoint="https://owner.example:8443?q"), "no path"),
        (_doc(endpoint="https://Owner.example:8443"), "canonical"),
        (_doc(endpoint="https://-bad.example:8443"), "host"),
        (_doc(endpoint="https://" + "a" * 600 + ":1"), "endpoint"),
        (_doc(ca_pem="not a pem"), "ca_pem"),
        (_doc(ca_pem=CA + CA), "exactly one"),
        (_doc(ca_pem="junk\n" + CA), "exactly one PEM"),
        (_doc(ca_pem=_cert(ca=False)), "not a CA"),
        (_doc(ca_pem=_cert(ca=None)), "basicConstraints"),
        (_doc(ca_pem="x" * 20000), "ca_pem"),
        (_doc(authorization_id=""), "authorization_id"),
        (_doc(authorization_id="a/b"), "authorization_id"),
        (_doc(authorization_id="a" * 129), "authorization_id"),
        (_doc(authorization_id=7), "not a string"),
        (_doc(nonce="AB" * 32), "nonce"),
        (_doc(nonce="ab" * 31), "nonce"),
    ],
)
def test_bad_fields_are_refused(doc: dict[str, object], words: str) -> None:
    with pytest.raises(MalformedInput) as err:
        InitData.parse(_canon(doc))
    assert err.value.reason is InitDataReason.BAD_INIT_DATA
    assert words in err.value.detail


@pytest.mark.parametrize("raw", [b"", b"[]", b"\xff", b"[" * 100000, b"{" + b" " * (MAX_INIT_DATA_BYTES + 2)])
def test_garbage_is_a_typed_error(raw: bytes) -> None:
    with pytest.raises(MalformedInput):
        InitData.parse(raw)


def test_endpoint_forms() -> None:
    assert Endpoint.parse("https://127.0.0.1:50070").server_name == "127.0.0.1"
    v6 = Endpoint.parse("https://[::1]:50070")
    assert (v6.grpc_target, v6.server_name) == ("[::1]:50070", "::1")
    with pytest.raises(MalformedInput):
        Endpoint.parse("https://999.1.1.1:1")  # all-digit last label: a bad address, no name
    for bad in (
        "https://[0:0::1]:1",
        "https://[::1]:1/",
        "https://[zz::1]:1",
        "https://[127.0.0.1]:1",
        "https://1.2.3:1",
        "https://01.2.3.4:1",
    ):
        with pytest.raises(MalformedInput):
            Endpoint.parse(bad)


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, 10_000), replacement=st.binary(min_size=1, max_size=3))
@example(offset=86, replacement=b"/")  # a CA whose X.509 version decodes to 63: InvalidVersion, once untyped
def test_mutated_init_data_parses_to_itself_or_is_refused(offset: int, replacement: bytes) -> None:
    raw = _canon(_doc())
    at = offset % len(raw)
    mutated = raw[:at] + replacement + raw[at + 1 :]
    try:
        parsed = InitData.parse(mutated)
    except MalformedInput:
        return
    # Whatever parses is canonical: its HOST_DATA is the digest of exactly the bytes read.
    assert parsed.to_bytes() in (mutated, mutated[:-1])
    assert parsed.host_data == hashlib.sha256(parsed.to_bytes()).digest()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(MalformedInput):
        InitData.parse(raw)
