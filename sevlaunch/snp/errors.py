"""Reasons of the SEV-SNP core's typed errors.

The error classes are `sevlaunch.sev.errors`' (`MalformedInput`, `VerificationFailed`, `Unsupported`), so
the gRPC layer maps SNP errors exactly as SEV ones; SNP adds its own reasons here. Appraisal refusals name
the field they refused in the error's detail.
"""

from __future__ import annotations

from enum import StrEnum


class SnpReason(StrEnum):
    # --- reports, certificates and appraisal
    BAD_REPORT = "bad_report"

    # --- launch digest and ID block
    BAD_ID_BLOCK = "bad_id_block"
    BAD_ID_AUTH = "bad_id_auth"
    BAD_SEV_METADATA = "bad_sev_metadata"
    UNKNOWN_SECTION_TYPE = "unknown_section_type"
    NO_KERNEL_HASHES_SECTION = "no_kernel_hashes_section"
    NO_SEV_ES_RESET_BLOCK = "no_sev_es_reset_block"
    NO_SVSM_INFO = "no_svsm_info"
    BAD_FIRMWARE_IMAGE = "bad_firmware_image"
    BAD_PAGE_INFO = "bad_page_info"
    BAD_LAUNCH_UPDATE = "bad_launch_update"
    BAD_GUEST_FEATURES = "bad_guest_features"
    BAD_VCPU_COUNT = "bad_vcpu_count"
    MISSING_VCPU_TYPE = "missing_vcpu_type"
    UNKNOWN_VMM_TYPE = "unknown_vmm_type"
    UNSUPPORTED_VMM_TYPE = "unsupported_vmm_type"
    BAD_OVMF_HASH = "bad_ovmf_hash"
    BAD_PUBLIC_KEY = "bad_public_key"
    BAD_SIGNATURE_BLOB = "bad_signature_blob"
    UNSUPPORTED_CURVE = "unsupported_curve"
    UNSUPPORTED_KEY_ALGO = "unsupported_key_algo"
    BAD_SIGNING_KEY = "bad_signing_key"
    ID_BLOCK_SIGNATURE = "id_block_signature"
    ID_KEY_SIGNATURE = "id_key_signature"
    ID_BLOCK_MISMATCH = "id_block_mismatch"
