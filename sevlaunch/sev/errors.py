"""Typed errors of the SEV protocol core, classed by whose fault they are (STYLE.md, rule 5).

* `MalformedInput`: bytes from outside that do not parse (truncated, wrong length, bad field).
* `VerificationFailed`: well-formed data that fails a trust check (signature, root, MAC, measurement).
* `Unsupported`: a well-formed request the protocol or the given firmware cannot serve
  (kernel hashes with an OVMF that has no hashes table, a secret larger than the secret area, ...).
Programmer misuse raises the usual `TypeError`/`RuntimeError`, never one of these.

Every error carries a `Reason` that tests and the gRPC layer assert on, and a detail string that must
never contain key or secret material.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # Malformed input
    TRUNCATED = "truncated"
    BAD_LENGTH = "bad_length"
    BAD_VERSION = "bad_version"
    BAD_FIELD = "bad_field"
    BAD_ENCODING = "bad_encoding"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    MALFORMED_SIGNATURE_SLOT = "malformed_signature_slot"
    # Verification
    BAD_SIGNATURE = "bad_signature"
    MISSING_SIGNATURE = "missing_signature"
    WRONG_USAGE = "wrong_usage"
    WRONG_SIGNER = "wrong_signer"
    UNTRUSTED_ROOT = "untrusted_root"
    UNKNOWN_GENERATION = "unknown_generation"
    GENERATION_MISMATCH = "generation_mismatch"
    BAD_WRAP_MAC = "bad_wrap_mac"
    BAD_POLICY_MAC = "bad_policy_mac"
    BAD_SECRET_MAC = "bad_secret_mac"
    MEASUREMENT_MISMATCH = "measurement_mismatch"
    EMPTY_ALLOW_LIST = "empty_allow_list"
    BAD_MANIFEST = "bad_manifest"
    EXPIRED = "expired"
    REVOKED = "revoked"
    # Unsupported
    NO_HASHES_TABLE = "no_hashes_table"
    NO_SECRET_AREA = "no_secret_area"
    NO_SEV_ES_RESET_BLOCK = "no_sev_es_reset_block"
    NO_FOOTER_TABLE = "no_footer_table"
    SECRET_TOO_LARGE = "secret_too_large"
    UNKNOWN_VCPU_TYPE = "unknown_vcpu_type"
    POLICY_NOT_ALLOWED = "policy_not_allowed"
    API_TOO_OLD = "api_too_old"
    # The running kernel lacks an interface (e.g. /dev/sev's SNP commands before Linux 6.11), or a device
    # node was opened read-only for a command that needs it writable.
    KERNEL_UNSUPPORTED = "kernel_unsupported"
    DEVICE_NOT_WRITABLE = "device_not_writable"
    # A guest's report request that the hypervisor refused (GHCB VMM error) or that another writer of the
    # same configfs-tsm entry spoiled.
    HYPERVISOR_REFUSED = "hypervisor_refused"
    CONCURRENT_WRITER = "concurrent_writer"
    # The firmware refused a command; the exact status code is on FirmwareError.status
    FIRMWARE_STATUS = "firmware_status"


class SevError(Exception):
    """Base of every typed error of sevlaunch. `str()` is safe to log: it holds no secret."""

    def __init__(self, reason: StrEnum, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


class MalformedInput(SevError, ValueError):
    """Bytes or values from outside that do not parse as the format they claim to be."""


class VerificationFailed(SevError):
    """Well-formed data that fails a trust check. `link` names the failing chain link, e.g. 'ASK->CEK'."""

    def __init__(self, reason: StrEnum, detail: str = "", *, link: str | None = None) -> None:
        self.link = link
        super().__init__(reason, f"{link}: {detail}" if link else detail)


class Unsupported(SevError):
    """A well-formed request that this protocol, firmware image or platform cannot serve."""
