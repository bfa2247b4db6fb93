"""The emulated chip's fixed facts: sizes, the files of its state directory, and the error a damaged
directory raises.

Sizes the SEV protocol defines come from `sevlaunch.sev` (one definition per byte count); the names
here stay importable from `sevlaunch.firmware.emulator` as before.
"""

from __future__ import annotations

from typing import Final

from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.sev.measurement import LAUNCH_DIGEST_SIZE, MNONCE_SIZE
from sevlaunch.sev.secret import SECRET_HEADER_SIZE
from sevlaunch.sev.vmsa import VMSA_SIZE

STATE_FORMAT: Final = 1
CHIP_ID_SIZE: Final = 64
ATTESTATION_MIN_API: Final = (0, 23)  # 55766: ATTESTATION is defined from API 0.23
ROOT_RSA_BITS: Final = 4096  # Rome and later: RSA-4096 ARK/ASK, RSA-PSS with SHA-384

STATE_FILE: Final = "state.json"
ARK_KEY: Final = "ark.key"
ASK_KEY: Final = "ask.key"
ARK_CERT: Final = "ark.cert"
ASK_CERT: Final = "ask.cert"
ASK_ARK_CERT: Final = "ask_ark.cert"
CEK_KEY: Final = "cek.key"
CEK_CERT: Final = "cek.cert"  # the ASK-signed CEK, as a KDS serves it
GUESTS_DIR: Final = "guests"
#: The `command` of an `EmulatorStateError`: the failing step is reading the chip's state, whatever
#: command needed it.
STATE_COMMAND: Final = "EMULATOR_STATE"

U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1


class EmulatorStateError(FirmwareError, ValueError):
    """The state directory cannot be read: a truncated, garbage or foreign `state.json`, a missing or
    unreadable key file. The emulator's damaged SPI flash, so HWERROR_PLATFORM, the PSP's answer (a
    typed error the server shell maps, not a traceback from json or the PEM parser). Also a ValueError,
    like `MalformedInput`: a server opening such a directory at start reports "cannot start"."""

    def __init__(self, detail: str) -> None:
        super().__init__(StatusCode.HWERROR_PLATFORM, STATE_COMMAND, detail)

    def __reduce__(self) -> tuple[object, ...]:
        return (EmulatorStateError, (self._detail_only,))


#: Every exception that decoding a damaged state can raise: json (ValueError, RecursionError for absurd
#: nesting), bytes.fromhex/base64 (ValueError), missing keys, wrong JSON types, unknown enum values.
DECODE_ERRORS: Final = (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError)

__all__ = [
    "ARK_CERT",
    "ARK_KEY",
    "ASK_ARK_CERT",
    "ASK_CERT",
    "ASK_KEY",
    "ATTESTATION_MIN_API",
    "CEK_CERT",
    "CEK_KEY",
    "CHIP_ID_SIZE",
    "DECODE_ERRORS",
    "GUESTS_DIR",
    "LAUNCH_DIGEST_SIZE",
    "MNONCE_SIZE",
    "ROOT_RSA_BITS",
    "SECRET_HEADER_SIZE",
    "STATE_COMMAND",
    "STATE_FILE",
    "STATE_FORMAT",
    "U32_MAX",
    "U64_MAX",
    "VMSA_SIZE",
    "EmulatorStateError",
]
