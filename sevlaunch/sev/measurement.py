"""The launch measurement (PROTOCOL.md §5; AMD SEV API spec §6.5, "LAUNCH_MEASURE").

The firmware proves what it loaded with an HMAC under the TIK: only the owner (who made the TIK) can
check it, and a host that changed the firmware image, the policy or the firmware version cannot forge it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from sevlaunch.sev.errors import MalformedInput, Reason, VerificationFailed
from sevlaunch.sev.kdf import hmac_sha256
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.types import LaunchDigest, Measure, MNonce

MEASURE_SIZE = 32
MNONCE_SIZE = 16
LAUNCH_MEASUREMENT_SIZE = MEASURE_SIZE + MNONCE_SIZE
LAUNCH_DIGEST_SIZE = 32
# The "measurement context" byte that opens the HMAC message (AMD-ASPFW names it the channel context).
MEAS_CTX = 0x04
# Firmware before API 0.17 MACs only policy ‖ digest ‖ mnonce (PROTOCOL.md §5).
API_WITH_MEASUREMENT_HEADER = (0, 17)


@dataclass(frozen=True)
class LaunchMeasurement:
    """The 48-byte output of LAUNCH_MEASURE: measure[32] ‖ mnonce[16] (base64 in QMP and libvirt)."""

    measure: Measure
    mnonce: MNonce

    def __post_init__(self) -> None:
        if not isinstance(self.measure, bytes) or not isinstance(self.mnonce, bytes):
            raise TypeError("measure and mnonce are bytes")
        if len(self.measure) != MEASURE_SIZE or len(self.mnonce) != MNONCE_SIZE:
            raise MalformedInput(
                Reason.BAD_LENGTH,
                f"measure is {MEASURE_SIZE} and mnonce {MNONCE_SIZE} bytes, "
                f"got {len(self.measure)} and {len(self.mnonce)}",
            )

    @classmethod
    def from_bytes(cls, data: bytes) -> LaunchMeasurement:
        if len(data) != LAUNCH_MEASUREMENT_SIZE:
            raise MalformedInput(
                Reason.TRUNCATED if len(data) < LAUNCH_MEASUREMENT_SIZE else Reason.BAD_LENGTH,
                f"a launch measurement is {LAUNCH_MEASUREMENT_SIZE} bytes, got {len(data)}",
            )
        data = bytes(data)
        return cls(Measure(data[:MEASURE_SIZE]), MNonce(data[MEASURE_SIZE:]))

    @classmethod
    def from_b64(cls, text: str | bytes) -> LaunchMeasurement:
        """Parses the base64 form that QMP `query-sev-launch-measure` and libvirt report."""
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedInput(Reason.BAD_ENCODING, "launch measurement is not base64") from None
        return cls.from_bytes(raw)

    def to_bytes(self) -> bytes:
        return self.measure + self.mnonce

    def to_b64(self) -> str:
        return base64.b64encode(self.to_bytes()).decode("ascii")


def _u8(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise MalformedInput(Reason.BAD_FIELD, f"{name} must be an integer 0..255, got {value!r}")
    return value


def _policy_u32(policy: GuestPolicy | int) -> int:
    # The reported policy is remote data: any u32 is measured as is, so no reserved-bit check here.
    value = policy.value if isinstance(policy, GuestPolicy) else policy
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF_FFFF:
        raise MalformedInput(Reason.BAD_FIELD, f"policy must be a u32, got {value!r}")
    return value


def compute_measure(
    tik: bytes,
    *,
    api_major: int,
    api_minor: int,
    build_id: int,
    policy: GuestPolicy | int,
    launch_digest: LaunchDigest | bytes,
    mnonce: MNonce | bytes,
) -> Measure:
    """measure = HMAC-SHA256(TIK, 0x04 ‖ api_major ‖ api_minor ‖ build ‖ u32le(policy) ‖ LD ‖ mnonce).

    For firmware API < 0.17 the leading four bytes (context, major, minor, build) are not part of the
    message (PROTOCOL.md §5): the version is taken from what the platform reports.
    """
    if len(tik) != 16:
        raise MalformedInput(Reason.BAD_LENGTH, f"TIK must be 16 bytes, got {len(tik)}")
    if len(launch_digest) != LAUNCH_DIGEST_SIZE:
        raise MalformedInput(Reason.BAD_LENGTH, f"launch digest must be 32 bytes, got {len(launch_digest)}")
    if len(mnonce) != MNONCE_SIZE:
        raise MalformedInput(Reason.BAD_LENGTH, f"mnonce must be 16 bytes, got {len(mnonce)}")
    version = (_u8("api_major", api_major), _u8("api_minor", api_minor))
    header = b""
    if version >= API_WITH_MEASUREMENT_HEADER:
        header = bytes((MEAS_CTX, api_major, api_minor, _u8("build_id", build_id)))
    else:
        _u8("build_id", build_id)
    body = struct.pack("<I", _policy_u32(policy)) + bytes(launch_digest) + bytes(mnonce)
    return Measure(hmac_sha256(tik, header, body))


def verify_measurement(
    tik: bytes,
    measurement: LaunchMeasurement,
    *,
    api_major: int,
    api_minor: int,
    build_id: int,
    policy: GuestPolicy | int,
    launch_digests: Sequence[LaunchDigest | bytes],
) -> LaunchDigest:
    """Returns the accepted launch digest that explains `measurement`, or raises.

    Every candidate is computed and compared (no early exit), so timing tells nothing about which
    candidate, if any, matched. An empty candidate list fails closed: it never means "accept anything".
    """
    if isinstance(launch_digests, bytes | bytearray | str):
        raise TypeError("launch_digests is a sequence of digests, not one digest")
    if len(launch_digests) == 0:
        raise VerificationFailed(Reason.EMPTY_ALLOW_LIST, "no accepted launch digests to verify against")
    matched: LaunchDigest | None = None
    for digest in launch_digests:
        expected = compute_measure(
            tik,
            api_major=api_major,
            api_minor=api_minor,
            build_id=build_id,
            policy=policy,
            launch_digest=digest,
            mnonce=measurement.mnonce,
        )
        if hmac.compare_digest(expected, measurement.measure) and matched is None:
            matched = LaunchDigest(bytes(digest))
    if matched is None:
        raise VerificationFailed(
            Reason.MEASUREMENT_MISMATCH,
            f"launch measurement matches none of {len(launch_digests)} accepted launch digest(s)",
        )
    return matched
