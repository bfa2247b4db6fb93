"""The platform service's own refusal reasons: the `reason` of the `google.rpc.ErrorInfo` a caller sees.

Besides these a caller can meet the protocol library's reasons (`sevlaunch.sev.errors.Reason`, e.g. a
certificate that does not parse) and `firmware_error` with the firmware's status. README.md and
`protos/sevlaunch/rpc/v1/platform.proto` document this list; a test keeps the three in step.
"""

from __future__ import annotations

from enum import StrEnum


class PlatformReason(StrEnum):
    # GetCertificateChain: where the ASK-signed CEK comes from.
    NO_CEK_SOURCE = "no_cek_source"  # no CEK file, cached CEK or KDS is configured
    CEK_NOT_FOUND = "cek_not_found"  # the KDS does not know this chip id
    KDS_UNAVAILABLE = "kds_unavailable"  # nothing from the KDS within the deadline, none cached
    KDS_BAD_RESPONSE = "kds_bad_response"  # the KDS answered with something that is not a CEK / this VCEK
    # SEV-SNP: GetSnpStatus, GetVekChain, the certificate table, SNP admin.
    SNP_UNSUPPORTED = "snp_unsupported"  # the backend has no SEV-SNP (or no certificate table store)
    NO_VEK_SOURCE = "no_vek_source"  # no provisioned VCEK for the reported TCB, none cached, no KDS
    VCEK_NOT_FOUND = "vcek_not_found"  # the KDS knows no VCEK for this chip and TCB
    NO_VLEK = "no_vlek"  # a VLEK was asked for; none is loaded or none provisioned
    NO_CERT_TABLE = "no_cert_table"  # GetSnpCertTable: nothing installed
    BAD_CERT_TABLE = "bad_cert_table"  # InstallSnpCertTable: not a table with a VCEK or VLEK
    CERT_TABLE_MISMATCH = "cert_table_mismatch"  # its VEK is not this chip's at the reported TCB
    BAD_TCB = "bad_tcb"  # SetSnpConfig: not a TCB of this product
    # Admin requests, refused before the firmware sees them.
    BAD_LENGTH = "bad_length"  # ImportPEKCertificate: a certificate is not 0x824 bytes
    WRONG_USAGE = "wrong_usage"  # ImportPEKCertificate: not a PEK and an OCA
    CONFIRMATION_REQUIRED = "confirmation_required"  # FactoryReset without confirm=true
