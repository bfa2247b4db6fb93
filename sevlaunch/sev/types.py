"""Bytes that mean different things get different types (STYLE.md, rule 9)."""

from __future__ import annotations

from typing import NewType

Nonce = NewType("Nonce", bytes)  # 16 bytes
MNonce = NewType("MNonce", bytes)  # 16 bytes, the firmware's measurement nonce
ChipId = NewType("ChipId", bytes)  # 64 bytes (GET_ID)
LaunchDigest = NewType("LaunchDigest", bytes)  # 32 bytes, SHA-256
Measure = NewType("Measure", bytes)  # 32 bytes, HMAC-SHA256
