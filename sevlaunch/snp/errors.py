"""Reasons of the SEV-SNP core's typed errors.

The error classes are `sevlaunch.sev.errors`' (`MalformedInput`, `VerificationFailed`, `Unsupported`), so
the gRPC layer maps SNP errors exactly as SEV ones; SNP adds its own reasons here. Appraisal refusals name
the field they refused in the error's detail.
"""

from __future__ import annotations

from enum import StrEnum


class SnpReason(StrEnum):
    # --- reports, certificates and appraisal
    # Malformed input (MalformedInput)
    BAD_REPORT = "bad_report"  # size, version, reserved bytes, flags of an ATTESTATION_REPORT
    BAD_CERTIFICATE = "bad_certificate"  # not X.509, or a VCEK/VLEK extension that does not decode
    BAD_CRL = "bad_crl"
    BAD_GUEST_POLICY = "bad_guest_policy"  # must-be-one bit 17 clear, or a reserved bit set
    BAD_APPRAISAL_POLICY = "bad_appraisal_policy"  # the appraisal policy document itself
    # Trust checks (VerificationFailed)
    BAD_REPORT_SIGNATURE = "bad_report_signature"
    BAD_CERT_SIGNATURE = "bad_cert_signature"
    UNTRUSTED_ARK = "untrusted_ark"  # the ARK is neither a pinned AMD root nor a root the caller passed
    WRONG_ISSUER = "wrong_issuer"  # a VCEK under an ASVK, a VLEK under an ASK, another product's key
    CERT_NOT_VALID = "cert_not_valid"  # outside notBefore..notAfter at the time asked
    CERT_REVOKED = "cert_revoked"
    SIGNING_KEY_MISMATCH = "signing_key_mismatch"  # report says VCEK, certificate is a VLEK (or the reverse)
    PRODUCT_MISMATCH = "product_mismatch"
    TCB_MISMATCH = "tcb_mismatch"  # VCEK/VLEK TCB extensions differ from the report's REPORTED_TCB
    CHIP_ID_MISMATCH = "chip_id_mismatch"  # VCEK hwID differs from the report's CHIP_ID
    # Appraisal refusals (VerificationFailed; the detail names the field)
    VERSION_REFUSED = "version_refused"
    SIGNING_KEY_REFUSED = "signing_key_refused"
    VMPL_REFUSED = "vmpl_refused"
    GUEST_POLICY_REFUSED = "guest_policy_refused"
    PLATFORM_INFO_REFUSED = "platform_info_refused"
    TCB_TOO_LOW = "tcb_too_low"
    TCB_ORDER = "tcb_order"  # reported <= committed <= current does not hold
    PROVISIONAL_FIRMWARE = "provisional_firmware"
    CHIP_ID_REFUSED = "chip_id_refused"
    GUEST_SVN_TOO_LOW = "guest_svn_too_low"
    FIELD_MISMATCH = "field_mismatch"  # measurement, host_data, report_data, key digests, family/image id
    # Unsupported
    UNKNOWN_PRODUCT = "unknown_product"  # CPUID of no known product, or a v2 report without a product
    UNSUPPORTED_SIGNATURE_ALGO = "unsupported_signature_algo"

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
