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
    UNKNOWN_AUTHORIZATION = "unknown_authorization"
    UNKNOWN_CHALLENGE = "unknown_challenge"
    # PERMISSION_DENIED: refused on the merits.
    GENERATION_NOT_ALLOWED = "generation_not_allowed"
    FIRMWARE_TOO_OLD = "firmware_too_old"
    POLICY_NOT_ALLOWED = "policy_not_allowed"
    POLICY_MISMATCH = "policy_mismatch"
    MEASUREMENT_MISMATCH = "measurement_mismatch"
    WRONG_CALLER = "wrong_caller"
    # PERMISSION_DENIED, SEV-SNP: the platform at authorisation, the report at attestation (one each).
    CONFIG_NOT_ALLOWED = "config_not_allowed"
    FORGED_CHAIN = "forged_chain"
    WRONG_PRODUCT = "wrong_product"
    VLEK_NOT_ALLOWED = "vlek_not_allowed"
    VCEK_TCB_MISMATCH = "vcek_tcb_mismatch"
    HWID_MISMATCH = "hwid_mismatch"
    VMPL_NOT_ALLOWED = "vmpl_not_allowed"
    TCB_ORDER = "tcb_order"
    PROVISIONAL_FIRMWARE = "provisional_firmware"
    REPORTED_TCB_TOO_LOW = "reported_tcb_too_low"
    COMMITTED_TCB_TOO_LOW = "committed_tcb_too_low"
    LAUNCH_TCB_TOO_LOW = "launch_tcb_too_low"
    VCPUS_MISMATCH = "vcpus_mismatch"
    FAMILY_ID_MISMATCH = "family_id_mismatch"
    IMAGE_ID_MISMATCH = "image_id_mismatch"
    GUEST_SVN_TOO_LOW = "guest_svn_too_low"
    PRODUCT_NOT_COVERED = "product_not_covered"
    ID_KEY_MISMATCH = "id_key_mismatch"
    AUTHOR_KEY_MISMATCH = "author_key_mismatch"
    HOST_DATA_MISMATCH = "host_data_mismatch"
    REPORT_DATA_MISMATCH = "report_data_mismatch"
    MALFORMED_REPORT = "malformed_report"
    MALFORMED_CERTIFICATES = "malformed_certificates"
    # FAILED_PRECONDITION
    NO_REFERENCE_VALUES = "no_reference_values"
    NO_SECRET = "no_secret"
    SESSION_EXPIRED = "session_expired"
    SESSION_ALREADY_USED = "session_already_used"
    SESSION_REFUSED = "session_refused"
    SESSION_REVOKED = "session_revoked"
    SECRET_TOO_LARGE = "secret_too_large"  # also INVALID_ARGUMENT, for a secret or workload put
    SESSION_NOT_OPEN = "session_not_open"
    SNP_NOT_CONFIGURED = "snp_not_configured"
    NO_SNP_RULES = "no_snp_rules"
    NO_DIGEST_FOR_CONFIG = "no_digest_for_config"
    AUTHORIZATION_EXPIRED = "authorization_expired"
    AUTHORIZATION_REVOKED = "authorization_revoked"
    AUTHORIZATION_REFUSED = "authorization_refused"
    ALREADY_RELEASED = "already_released"
    CHALLENGE_USED = "challenge_used"
    CHALLENGE_EXPIRED = "challenge_expired"
    TOO_MANY_CHALLENGES = "too_many_challenges"
    # RESOURCE_EXHAUSTED: the guest port's rate limits.
    RATE_LIMITED = "rate_limited"
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
    BAD_AUTHORIZATION_ID = "bad_authorization_id"
    BAD_LAUNCH_CONFIG = "bad_launch_config"
    BAD_PLATFORM = "bad_platform"
    BAD_SNP_KEY = "bad_snp_key"
    BAD_REPORT = "bad_report"
    BAD_CERTIFICATES = "bad_certificates"
    BAD_GUEST_KEY = "bad_guest_key"
    BAD_CHALLENGE = "bad_challenge"
    # The store (UNAVAILABLE, ABORTED, INTERNAL).
    STORE_UNAVAILABLE = "store_unavailable"
    STORE_CONFLICT = "store_conflict"
    STORE_CORRUPT = "store_corrupt"
