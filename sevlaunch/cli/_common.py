"""Small helpers shared by the CLI commands."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from sevlaunch.cli import CommandError


def read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


def write_private(path: Path, data: bytes) -> None:
    """Writes key or secret material: created 0600, never world-readable even for an instant."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def parse_hex(value: str, *, what: str, length: int | None = None) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise CommandError(f"{what} is not hex") from None
    if length is not None and len(raw) != length:
        raise CommandError(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


def parse_b64(value: str, *, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError(f"{what} is not base64") from None


def parse_int(value: str) -> int:
    """argparse type: decimal or 0x-prefixed hex."""
    return int(value, 0)
