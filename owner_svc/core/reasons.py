"""The owner's refusal reasons: the `ErrorInfo.reason` of every typed error its core raises.

One enum, so a reason is a name the type checker knows, and `tests/unit/test_owner_reasons.py` holds it
against what `protos/sevlaunch/rpc/v1/owner.proto` and README.md document, both ways. Chain and manifest
verification failures carry the protocol's reasons (`sevlaunch.sev.errors.Reason`), not these.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # NOT_FOUND
    UNKNOWN_WORKLOAD = "unknown_workload"
    UNKNOWN_SESSION = "unknown_session"
    UNKNOWN_MANIFEST = "unknown_manifest"
    # PERMISSION_DENIED: refused on the merits.
    GENERATION_NOT_ALLOWED = "generation_not_allowed"
    FIRMWARE_TOO_OLD = "firmware_too_old"
    POLICY_NOT_ALLOWED = "policy_not_allowed"
    POLICY_MISMATCH = "policy_mismatch"
    MEASUREMENT_MISMATCH = "measurement_mismatch"
    WRONG_CALLER = "wrong_caller"
    # FAILED_PRECONDITION
    NO_REFERENCE_VALUES = "no_reference_values"
    NO_SECRET = "no_secret"
    SESSION_EXPIRED = "session_expired"
    SESSION_ALREADY_USED = "session_already_used"
    SESSION_REFUSED = "session_refused"
    SESSION_REVOKED = "session_revoked"
    SECRET_TOO_LARGE = "secret_too_large"  # also INVALID_ARGUMENT, for a secret or workload put
    SESSION_NOT_OPEN = "session_not_open"
    WORKLOAD_IN_USE = "workload_in_use"
    # INVALID_ARGUMENT: malformed requests, refused before anything is written.
    BAD_WORKLOAD_ID = "bad_workload_id"
    BAD_SESSION_ID = "bad_session_id"
    BAD_GUID = "bad_guid"
    BAD_POLICY = "bad_policy"
    BAD_FIRMWARE_VERSION = "bad_firmware_version"
    BAD_FIRMWARE_MINIMUM = "bad_firmware_minimum"
    BAD_SELECTOR = "bad_selector"
    BAD_WORKLOAD = "bad_workload"
    BAD_SECRET = "bad_secret"
    BAD_ENVELOPE = "bad_envelope"
    BAD_LIMIT = "bad_limit"
    BAD_MANIFEST_ID = "bad_manifest_id"
    # The store (UNAVAILABLE, ABORTED, INTERNAL).
    STORE_UNAVAILABLE = "store_unavailable"
    STORE_CONFLICT = "store_conflict"
    STORE_CORRUPT = "store_corrupt"
