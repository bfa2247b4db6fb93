"""sevlaunch.audit, the one hash-chain implementation the owner writes with and the CLI verifies with."""

from __future__ import annotations

import pytest

from sevlaunch.audit import (
    GENESIS,
    AuditChainBroken,
    ChainEntry,
    audit_mac_key,
    canonical_record,
    parse_canonical,
    record_hash,
    record_mac,
    verify_chain,
)

KEY = audit_mac_key(b"k" * 32)


def _chain(n: int) -> list[ChainEntry]:
    entries, prev = [], GENESIS
    for seq in range(1, n + 1):
        text = canonical_record(seq, 1000.5 + seq, {"actor": "launcher", "outcome": "allowed"}, prev)
        digest = record_hash(text)
        entries.append(ChainEntry(seq, text, prev, digest, record_mac(KEY, digest)))
        prev = digest
    return entries


def test_canonical_text_round_trips_and_is_fixed() -> None:
    text = canonical_record(1, 2.5, {"b": "x", "a": "y"}, GENESIS)
    assert text == '{"event":{"a":"y","b":"x"},"prev":"' + GENESIS + '","seq":1,"time":"2.5"}'
    assert parse_canonical(text) == (1, 2.5, {"a": "y", "b": "x"}, GENESIS)


@pytest.mark.parametrize(
    "text",
    [
        '{"event":{},"prev":"0","seq":1,"time":"2.5"} ',  # trailing space: not the hashed form
        '{"prev":"0","event":{},"seq":1,"time":"2.5"}',  # unsorted keys
        '{"event":{},"prev":"0","seq":1,"time":"2.5","x":1}',
        '{"event":{"a":1},"prev":"0","seq":1,"time":"2.5"}',
        '{"event":{},"prev":"0","seq":"1","time":"2.5"}',
        "[]",
        "not json",
    ],
)
def test_non_canonical_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a canonical"):
        parse_canonical(text)


def test_chain_verifies_with_head_and_mac() -> None:
    entries = _chain(3)
    assert verify_chain(entries, head=(3, entries[-1].hash), mac_key=KEY) == 3
    assert verify_chain([], head=None) == 0


def test_each_kind_of_break_is_named() -> None:
    entries = _chain(3)
    head = (3, entries[-1].hash)
    second = entries[1]
    unlinked = ChainEntry(2, second.canonical, GENESIS, second.hash, second.mac)
    edited = ChainEntry(2, second.canonical, second.prev_hash, "f" * 64, second.mac)
    forged = ChainEntry(2, second.canonical, second.prev_hash, second.hash, "0" * 64)
    cases = [
        ([entries[0], entries[2]], head, "audit record 2 is missing"),
        ([entries[0], unlinked], head, "audit record 2: does not link"),
        ([entries[0], edited], head, "audit record 2: content does not match its hash"),
        ([entries[0], forged], head, "audit record 2: MAC does not verify"),
        (entries[:2], head, "truncated"),
        (entries, None, "head is missing"),
    ]
    for chain, h, words in cases:
        with pytest.raises(AuditChainBroken, match=words):
            verify_chain(chain, head=h, mac_key=KEY)
