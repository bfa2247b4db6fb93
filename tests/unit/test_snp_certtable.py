"""The SEV-SNP certificate table (GHCB spec 56421): writer, strict parser, round trips, real certificates."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.snp.certtable import (
    ARK_GUID,
    ASK_GUID,
    ENTRY_SIZE,
    PAGE_SIZE,
    VCEK_GUID,
    VLEK_GUID,
    CertTable,
    CertTableEntry,
)

REPORTS = Path(__file__).resolve().parents[1] / "vectors" / "snp" / "reports"


def _real_chain() -> tuple[bytes, bytes, bytes]:
    """VCEK, ASK and ARK (DER) of a real Milan chip, from tests/vectors/snp."""
    folder = REPORTS / "virtee-sev-milan"
    ask, ark = x509.load_pem_x509_certificates((folder / "chain.pem").read_bytes())
    return (folder / "vcek.der").read_bytes(), ask.public_bytes(Encoding.DER), ark.public_bytes(Encoding.DER)


def test_real_chain_round_trips_and_is_laid_out_as_the_spec_says() -> None:
    vcek, ask, ark = _real_chain()
    table = CertTable.of([(VCEK_GUID, vcek), (ASK_GUID, ask), (ARK_GUID, ark)])
    raw = table.to_bytes()
    assert len(raw) == 4 * ENTRY_SIZE + len(vcek) + len(ask) + len(ark) == table.encoded_size()
    # Entry 0: the VCEK GUID in RFC 4122 byte order, its offset just after the terminator, its length.
    assert raw[:16] == bytes.fromhex("63da758de6644564adc5f4b93be8accd")
    assert struct.unpack_from("<II", raw, 16) == (4 * ENTRY_SIZE, len(vcek))
    assert struct.unpack_from("<II", raw, ENTRY_SIZE + 16) == (4 * ENTRY_SIZE + len(vcek), len(ask))
    assert raw[3 * ENTRY_SIZE : 4 * ENTRY_SIZE] == bytes(ENTRY_SIZE)
    parsed = CertTable.from_bytes(raw)
    assert parsed == table and parsed.vcek == vcek and parsed.ask == ask and parsed.ark == ark
    assert parsed.vlek is None
    # What the parser hands back is the certificate the host put in, byte for byte.
    assert x509.load_der_x509_certificate(parsed.ark).subject == x509.load_der_x509_certificate(ark).subject


def test_page_padding_is_accepted_and_kept_out_of_the_certificates() -> None:
    vcek, ask, ark = _real_chain()
    table = CertTable.of([(VLEK_GUID, vcek), (ASK_GUID, ask), (ARK_GUID, ark)])
    padded = table.to_bytes(pad_to_page=True)
    assert len(padded) % PAGE_SIZE == 0 and len(padded) > table.encoded_size()
    assert CertTable.from_bytes(padded) == table
    assert CertTable.from_bytes(padded + bytes(PAGE_SIZE)) == table


def test_empty_table_is_just_the_terminator() -> None:
    assert CertTable().to_bytes() == bytes(ENTRY_SIZE)
    assert CertTable.from_bytes(bytes(PAGE_SIZE)) == CertTable()


def test_unknown_guids_are_kept_in_order() -> None:
    other = uuid.UUID("12345678-1234-5678-9abc-def012345678")
    table = CertTable.of([(other, b"crl"), (ARK_GUID, b"ark")])
    parsed = CertTable.from_bytes(table.to_bytes())
    assert [e.guid for e in parsed.entries] == [other, ARK_GUID] and parsed.get(other) == b"crl"


def _entry(guid: uuid.UUID, offset: int, length: int) -> bytes:
    return guid.bytes + struct.pack("<II", offset, length)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", Reason.TRUNCATED),
        (_entry(VCEK_GUID, 48, 4) + b"abcd", Reason.TRUNCATED),  # no terminator
        (_entry(VCEK_GUID, 48, 8) + bytes(24) + b"abcd", Reason.TRUNCATED),  # runs past the end
        (_entry(VCEK_GUID, 24, 4) + bytes(24) + b"abcd", Reason.BAD_FIELD),  # points into the table
        (_entry(VCEK_GUID, 72, 4) + _entry(ASK_GUID, 74, 4) + bytes(24) + b"abcdef", Reason.BAD_FIELD),
        (_entry(VCEK_GUID, 72, 2) + _entry(VCEK_GUID, 74, 2) + bytes(24) + b"abcd", Reason.BAD_FIELD),
        (bytes(16) + struct.pack("<II", 48, 4) + bytes(24) + b"abcd", Reason.BAD_FIELD),  # nil GUID
        (_entry(VCEK_GUID, 48, 0) + bytes(24), Reason.BAD_LENGTH),  # an empty certificate
        (_entry(VCEK_GUID, 48, 4) + bytes(24) + b"abcd" + b"\x01", Reason.BAD_FIELD),  # trailing data
    ],
    ids=[
        "empty",
        "no-terminator",
        "past-end",
        "into-table",
        "overlap",
        "duplicate",
        "nil",
        "zero",
        "trailing",
    ],
)
def test_malformed_tables_are_refused(raw: bytes, reason: Reason) -> None:
    with pytest.raises(MalformedInput) as exc:
        CertTable.from_bytes(raw)
    assert exc.value.reason == reason


def test_writer_refuses_what_the_parser_would() -> None:
    with pytest.raises(MalformedInput):
        CertTable.of([(VCEK_GUID, b"a"), (VCEK_GUID, b"b")])
    with pytest.raises(MalformedInput):
        CertTableEntry(uuid.UUID(int=0), b"a")
    with pytest.raises(MalformedInput):
        CertTableEntry(ASK_GUID, b"")


_guids = st.one_of(
    st.sampled_from([VCEK_GUID, VLEK_GUID, ASK_GUID, ARK_GUID]),
    st.uuids().filter(lambda u: u.int != 0),
)
_tables = st.lists(
    st.tuples(_guids, st.binary(min_size=1, max_size=300)), max_size=6, unique_by=lambda e: e[0]
).map(CertTable.of)


@given(_tables, st.booleans())
def test_write_then_parse_is_identity(table: CertTable, pad: bool) -> None:
    raw = table.to_bytes(pad_to_page=pad)
    assert CertTable.from_bytes(raw) == table
    assert CertTable.from_bytes(raw).to_bytes(pad_to_page=pad) == raw


@given(st.binary(max_size=600))
def test_arbitrary_bytes_parse_or_fail_typed(raw: bytes) -> None:
    try:
        table = CertTable.from_bytes(raw)
    except MalformedInput:
        return
    # Whatever parses holds only certificates found inside the input.
    for entry in table.entries:
        assert entry.data in raw


@given(_tables, st.data())
def test_corrupting_a_table_never_escapes_the_typed_error(table: CertTable, data: st.DataObject) -> None:
    raw = bytearray(table.to_bytes())
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    try:
        parsed = CertTable.from_bytes(bytes(raw))
    except MalformedInput:
        return
    assert CertTable.from_bytes(parsed.to_bytes()) == parsed
