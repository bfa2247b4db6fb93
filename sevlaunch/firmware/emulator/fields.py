"""Typed reading of `state.json`: well-formed JSON with a wrong type or an out-of-range value is a damaged
state, an `EmulatorStateError` at load, never a raw exception in some later command. Shared by the SEV
codec (`codec`) and the SEV-SNP one (`snp_state`)."""

from __future__ import annotations

import base64
from typing import Any

from sevlaunch.firmware.emulator.layout import STATE_FILE, U64_MAX, EmulatorStateError


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


# -- typed reading of state.json: well-formed JSON with wrong types or ranges is a damaged state too ----


def _bad(what: str) -> EmulatorStateError:
    return EmulatorStateError(f"{STATE_FILE}: {what}")


def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} is not an object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(f"{what} is not a list")
    return value


def _int(value: object, what: str, lo: int = 0, hi: int = U64_MAX) -> int:
    # bool is an int in Python, not in the state's schema.
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(f"{what} is not an integer in {lo}..{hi}")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"{what} is not a boolean")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{what} is not a string")
    return value


def _hex(value: object, what: str, size: int) -> bytes:
    try:
        data = bytes.fromhex(_str(value, what))
    except ValueError:
        raise _bad(f"{what} is not hex") from None
    if len(data) != size:
        raise _bad(f"{what} is {len(data)} bytes, not {size}")
    return data


def _opt_hex(value: object, what: str, size: int) -> bytes | None:
    return None if value is None else _hex(value, what, size)


def _b64_field(value: object, what: str) -> bytes:
    try:
        return _unb64(_str(value, what))
    except ValueError:
        raise _bad(f"{what} is not base64") from None
