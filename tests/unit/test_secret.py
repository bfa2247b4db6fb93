"""LAUNCH_SECRET packaging and the OVMF secret table (PROTOCOL.md §6)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevlaunch.sev.errors import MalformedInput, Reason, Unsupported, VerificationFailed
from sevlaunch.sev.secret import (
    DISK_PASSPHRASE_GUID,
    SECRET_TABLE_GUID,
    SecretEntry,
    SecretHeader,
    SecretTable,
    open_secret,
    package_secret,
)
from sevlaunch.sev.session import TransportKeys

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
SEVCTL = VECTORS / "secret/sevctl"


def _case(case_id: str) -> dict[str, Any]:
    cases = json.loads((VECTORS / "kat.json").read_text())["cases"]
    return next(c for c in cases if c["id"] == case_id)


def _keys(case: dict[str, Any]) -> TransportKeys:
    tek = (VECTORS / case["inputs"]["tek_file"]).read_bytes()
    tik = (VECTORS / case["inputs"]["tik_file"]).read_bytes()
    assert (tek.hex(), tik.hex()) == (case["inputs"]["tek_hex"], case["inputs"]["tik_hex"])
    return TransportKeys(tek, tik)


def _measure(case: dict[str, Any]) -> bytes:
    return base64.b64decode(case["inputs"]["launch_measure_blob_b64"])[:32]


@pytest.mark.parametrize("case_id", ["sevctl-secret-build-one-secret", "sevctl-secret-build-two-secrets"])
def test_kat_sevctl_secret_build(case_id: str) -> None:
    # kat.json sevctl-secret-build-* (virtee/sevctl tests/secretbuild.rs), with the real sevctl files.
    case = _case(case_id)
    keys = _keys(case)
    table = SecretTable.of(
        [
            SecretEntry(uuid.UUID(s["guid"]), (VECTORS / s["file"]).read_bytes())
            for s in case["inputs"]["secrets"]
        ]
    )
    if "derived" in case:
        assert table.to_bytes().hex() == case["derived"]["table_hex"]
    header, payload = package_secret(
        keys, _measure(case), table.to_bytes(), iv=base64.b64decode(case["inputs"]["iv_b64"])
    )
    assert base64.b64encode(header.to_bytes()).decode() == case["expected"]["header_b64"]
    assert base64.b64encode(payload).decode() == case["expected"]["payload_b64"]
    # Same bytes with the version rule made explicit (any API >= 0.17 binds the measure).
    assert (
        package_secret(keys, _measure(case), table.to_bytes(), iv=header.iv, api_major=0, api_minor=17)[0]
        == header
    )
    opened = open_secret(keys, _measure(case), SecretHeader.from_bytes(header.to_bytes()), payload)
    assert SecretTable.from_bytes(opened) == table


def test_kat_sevctl_max_size_padding() -> None:
    # kat.json sevctl-secret-build-max-size-padding.
    case = _case("sevctl-secret-build-max-size-padding")
    keys, guid = _keys(case), uuid.UUID(case["inputs"]["guid"])
    lengths = []
    for name in case["inputs"]["secret_files"]:
        table = SecretTable.of([SecretEntry(guid, (VECTORS / name).read_bytes())])
        _, payload = package_secret(keys, _measure(case), table.to_bytes())
        assert len(payload) % case["expected"]["payload_len_multiple_of"] == 0
        assert len(payload) <= case["expected"]["payload_len_max"]
        lengths.append(len(payload))
    assert lengths == [case["derived"]["payload_len_each"]] * 2
    with pytest.raises(Unsupported) as exc:
        table.require_fits()
    assert exc.value.reason is Reason.SECRET_TOO_LARGE
    table.require_fits(16384)


def test_kat_simple_kbs_table_layout() -> None:
    # kat.json simple-kbs-secret-table-layout (confidential-containers/simple-kbs src/request.rs).
    case = _case("simple-kbs-secret-table-layout")
    raw = SecretTable.of(
        [SecretEntry(uuid.UUID(case["inputs"]["guid"]), case["inputs"]["data_ascii"].encode())]
    ).to_bytes()
    e = case["expected"]
    assert len(raw) == e["total_len"]
    assert struct.unpack_from("<I", raw, 16)[0] == e["table_length_field"]
    assert struct.unpack_from("<I", raw, 36)[0] == e["secret_length_field"]
    assert raw[-e["padding_len"] :] == bytes(e["padding_len"])
    assert raw.hex() == case["derived"]["table_hex"]


def _reference_package(tek: bytes, tik: bytes, measure: bytes, iv: bytes, plain: bytes, bind: bool) -> bytes:
    # PROTOCOL.md §6 with a raw cryptography Cipher and stdlib hmac, independent of sevlaunch.
    enc = Cipher(algorithms.AES(tek), modes.CTR(iv)).encryptor()
    ct = enc.update(plain) + enc.finalize()
    msg = b"\x01" + struct.pack("<I", 0) + iv + struct.pack("<II", len(ct), len(ct)) + ct
    mac = hmac.new(tik, msg + (measure if bind else b""), hashlib.sha256).digest()
    return struct.pack("<I", 0) + iv + mac + ct


@pytest.mark.parametrize(
    ("version", "binds_measure"),
    [(None, True), ((0, 16), False), ((0, 17), True), ((0, 24), True), ((1, 0), True), ((0, 0), False)],
)
def test_api_version_rule(version: tuple[int, int] | None, binds_measure: bool) -> None:
    # kat.json launch-secret-mac-api-version-rule: before API 0.17 the MAC leaves the measure out.
    # Reference bytes computed here by _reference_package.
    keys, measure, iv = TransportKeys(b"E" * 16, b"I" * 16), hashlib.sha256(b"m").digest(), b"v" * 16
    plain = SecretTable.of([SecretEntry.disk_passphrase(b"hunter2")]).to_bytes()
    kwargs = {} if version is None else {"api_major": version[0], "api_minor": version[1]}
    header, payload = package_secret(keys, measure, plain, iv=iv, **kwargs)
    assert header.to_bytes() + payload == _reference_package(
        b"E" * 16, b"I" * 16, measure, iv, plain, binds_measure
    )
    assert open_secret(keys, measure, header, payload, **kwargs) == plain
    other = hashlib.sha256(b"other launch").digest()
    if binds_measure:
        with pytest.raises(VerificationFailed) as exc:
            open_secret(keys, other, header, payload, **kwargs)
        assert exc.value.reason is Reason.BAD_SECRET_MAC
    else:
        assert open_secret(keys, other, header, payload, **kwargs) == plain


def test_version_must_be_given_whole() -> None:
    with pytest.raises(TypeError):
        package_secret(TransportKeys(bytes(16), bytes(16)), bytes(32), b"x" * 16, api_major=1)


def test_round_trip_and_tampering() -> None:
    keys = TransportKeys.generate()
    measure = hashlib.sha256(b"launch").digest()
    table = SecretTable.of(
        [SecretEntry.disk_passphrase(b"pw"), SecretEntry(uuid.uuid4(), b"\x00\x01api-key")]
    )
    header, payload = package_secret(keys, measure, table.to_bytes())
    assert SecretTable.from_bytes(open_secret(keys, measure, header, payload)) == table
    for bad_keys, bad_measure, bad_header, bad_payload in (
        (TransportKeys.generate(), measure, header, payload),
        (keys, hashlib.sha256(b"another launch").digest(), header, payload),
        (keys, measure, SecretHeader(0, bytes(16), header.mac), payload),
        (keys, measure, header, payload[:-1] + bytes([payload[-1] ^ 1])),
        (keys, measure, header, payload + b"\0"),
    ):
        with pytest.raises(VerificationFailed) as exc:
            open_secret(bad_keys, bad_measure, bad_header, bad_payload)
        assert exc.value.reason is Reason.BAD_SECRET_MAC
    with pytest.raises(Unsupported):
        open_secret(keys, measure, SecretHeader(1, header.iv, header.mac), payload)


def test_bad_inputs() -> None:
    keys = TransportKeys.generate()
    with pytest.raises(MalformedInput):
        package_secret(keys, bytes(48), b"x" * 16)  # a whole measurement blob, not the measure
    with pytest.raises(MalformedInput):
        package_secret(keys, bytes(32), b"")
    with pytest.raises(MalformedInput):
        package_secret(keys, bytes(32), b"x", iv=bytes(8))


def test_entries_hide_data() -> None:
    entry = SecretEntry.disk_passphrase(b"correct horse battery")
    assert entry.data == b"correct horse battery\x00"
    assert SecretEntry.disk_passphrase(b"x\x00").data == b"x\x00"
    for text in (repr(entry), str(entry), repr(SecretTable.of([entry]))):
        assert "horse" not in text and "22 bytes" in text


def test_table_rules() -> None:
    with pytest.raises(MalformedInput):
        SecretTable.of([SecretEntry(DISK_PASSPHRASE_GUID, b"a"), SecretEntry(DISK_PASSPHRASE_GUID, b"b")])
    empty = SecretTable(())
    assert empty.to_bytes() == SECRET_TABLE_GUID.bytes_le + struct.pack("<I", 20) + bytes(12)
    assert SecretTable.from_bytes(empty.to_bytes()) == empty
    table = SecretTable.of([SecretEntry(DISK_PASSPHRASE_GUID, b"abc")])
    assert table.get(DISK_PASSPHRASE_GUID) == b"abc" and table.get(uuid.uuid4()) is None
    unpadded = table.to_bytes()[: table.unpadded_length]
    assert SecretTable.from_bytes(unpadded) == table  # both padded and unpadded forms parse


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:19], Reason.TRUNCATED),
        (lambda b: bytes(16) + b[16:], Reason.BAD_FIELD),  # wrong table GUID
        (lambda b: b[:16] + struct.pack("<I", 19) + b[20:], Reason.TRUNCATED),
        (lambda b: b[:16] + struct.pack("<I", 1000) + b[20:], Reason.TRUNCATED),
        (lambda b: b + bytes(16), Reason.BAD_LENGTH),  # more than one block of padding
        (lambda b: b[:-1] + b"\x01", Reason.BAD_LENGTH),  # non-zero padding
        (lambda b: b[:36] + struct.pack("<I", 19) + b[40:], Reason.BAD_LENGTH),  # entry shorter than header
        (lambda b: b[:36] + struct.pack("<I", 500) + b[40:], Reason.BAD_LENGTH),  # entry past the table
        (lambda b: b[:16] + struct.pack("<I", 30) + b[20:30], Reason.TRUNCATED),  # entry header cut
    ],
)
def test_table_parse_errors(mutate: Any, reason: Reason) -> None:
    good = SecretTable.of([SecretEntry(DISK_PASSPHRASE_GUID, b"abc")]).to_bytes()
    with pytest.raises(MalformedInput) as exc:
        SecretTable.from_bytes(mutate(good))
    assert exc.value.reason is reason


def test_header_layout() -> None:
    header = SecretHeader(0, bytes(range(16)), bytes(range(32, 64)))
    raw = header.to_bytes()
    assert len(raw) == 52 and raw[:4] == bytes(4) and raw[4:20] == bytes(range(16))
    assert SecretHeader.from_bytes(raw) == header
    with pytest.raises(MalformedInput):
        SecretHeader(0, bytes(15), bytes(32))


@settings(deadline=None, max_examples=150)
@given(st.binary(max_size=120))
def test_table_parser_raises_only_malformed_input(data: bytes) -> None:
    try:
        SecretTable.from_bytes(data)
    except MalformedInput:
        pass


@settings(deadline=None, max_examples=150)
@given(st.lists(st.tuples(st.uuids(), st.binary(max_size=40)), max_size=4, unique_by=lambda t: t[0]))
def test_table_round_trip_and_truncation(entries: list[tuple[uuid.UUID, bytes]]) -> None:
    table = SecretTable.of([SecretEntry(g, d) for g, d in entries])
    raw = table.to_bytes()
    assert len(raw) % 16 == 0 and SecretTable.from_bytes(raw) == table
    for cut in range(0, table.unpadded_length, 7):
        with pytest.raises(MalformedInput):
            SecretTable.from_bytes(raw[:cut])
    with pytest.raises(MalformedInput):
        SecretTable.from_bytes(raw + b"\x01")


@settings(deadline=None, max_examples=100)
@given(st.binary(max_size=80))
def test_header_parser_raises_only_malformed_input(data: bytes) -> None:
    try:
        header = SecretHeader.from_bytes(data)
    except MalformedInput as exc:
        assert exc.reason in (Reason.TRUNCATED, Reason.BAD_LENGTH)
        return
    assert header.to_bytes() == data
