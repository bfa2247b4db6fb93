"""Guest policy bits (PROTOCOL.md §8)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.sev.policy import GuestPolicy, PolicyFlags


def test_flag_values_match_the_spec() -> None:
    assert [int(f) for f in PolicyFlags] == [0x1, 0x2, 0x4, 0x8, 0x10, 0x20]
    assert [f.name for f in PolicyFlags] == ["NODBG", "NOKS", "ES", "NOSEND", "DOMAIN", "SEV"]


def test_common_policies() -> None:
    sev = GuestPolicy(0x0003)
    assert sev.flags == PolicyFlags.NODBG | PolicyFlags.NOKS
    assert not sev.allows_debug and not sev.allows_key_sharing and not sev.requires_es and sev.allows_send
    es = GuestPolicy(0x0007)
    assert es.requires_es
    assert GuestPolicy(0).allows_debug


def test_api_minimum_fields() -> None:
    policy = GuestPolicy(0x1100_0001 | 0x0002_0000)
    assert policy.api_major_min == 0x02
    assert policy.api_minor_min == 0x11
    assert policy.flags == PolicyFlags.NODBG
    assert policy.firmware_allowed(2, 17) and policy.firmware_allowed(3, 0)
    assert not policy.firmware_allowed(2, 16) and not policy.firmware_allowed(1, 200)
    assert GuestPolicy.from_flags(PolicyFlags.NODBG, api_major_min=2, api_minor_min=0x11) == policy


def test_describe() -> None:
    assert GuestPolicy(0x0007).describe() == "0x00000007: NODBG|NOKS|ES, min API 0.0"
    assert GuestPolicy(0x1101_0000).describe() == "0x11010000: no flags, min API 1.17"


def test_bytes_round_trip() -> None:
    assert GuestPolicy(0x1101_0003).to_bytes() == bytes.fromhex("03000111")
    assert GuestPolicy.from_bytes(bytes.fromhex("03000111")) == GuestPolicy(0x1101_0003)
    with pytest.raises(MalformedInput) as exc:
        GuestPolicy.from_bytes(b"\x03\x00\x00")
    assert exc.value.reason is Reason.BAD_LENGTH


@pytest.mark.parametrize("value", [-1, 1 << 32, 0x40, 0x8000])
def test_out_of_range_or_reserved_rejected(value: int) -> None:
    with pytest.raises(MalformedInput) as exc:
        GuestPolicy(value)
    assert exc.value.reason is Reason.BAD_FIELD


def test_from_flags_rejects_bad_api() -> None:
    with pytest.raises(MalformedInput):
        GuestPolicy.from_flags(PolicyFlags.NODBG, api_major_min=256)


@settings(deadline=None, max_examples=100)
@given(st.binary(min_size=0, max_size=8))
def test_from_bytes_raises_only_malformed_input(data: bytes) -> None:
    try:
        policy = GuestPolicy.from_bytes(data)
    except MalformedInput:
        return
    assert policy.to_bytes() == data
