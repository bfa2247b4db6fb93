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
