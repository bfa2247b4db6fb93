"""The SEV-SNP peers of the launcher, faked: a platform with an SNP status and a VCEK chain (opaque to the
launcher), and an owner that authorises launches with a real ID block signed by a real P-384 ID key
(and optionally an author key) for a launch digest the test chooses, then answers the attestation
status with the verdicts the test lines up."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from launcher_svc.core.ports import (
    AttestationState,
    AttestationVerdict,
    OwnerSession,
    PlatformChain,
    ReleasedSecret,
    SnpAuthorization,
    SnpLaunchConfig,
    SnpPlatformEvidence,
    SnpPlatformStatus,
)
from sevlaunch.errors import ServiceError
from sevlaunch.snp.idblock import IdBlock, sign_id_block

SNP_POLICY = 0x30000  # SMT allowed, bit 17 (must be one), ABI 0.0
EVIDENCE = SnpPlatformEvidence(
    status=SnpPlatformStatus(
        product="Genoa",
        api_major=1,
        api_minor=55,
        build_id=21,
        current_tcb=0x1B00_0000_0000_0004,
        reported_tcb=0x1B00_0000_0000_0004,
        committed_tcb=0x1B00_0000_0000_0004,
        mask_chip_id=False,
        guest_count=0,
        hwid="ab" * 64,
    ),
    vek_type="vcek",
    vek_der=b"vcek-der",
    ask_der=b"ask-der",
    ark_der=b"ark-der",
    vek_tcb=0x1B00_0000_0000_0004,
)


class FakeSnpPlatform:
    def __init__(self, evidence: SnpPlatformEvidence = EVIDENCE, error: ServiceError | None = None) -> None:
        self.evidence = evidence
        self.error = error

    async def certificate_chain(self) -> PlatformChain:
        return PlatformChain(b"pdh", b"pek", b"oca", b"cek", b"ask", b"ark")

    async def snp_evidence(self) -> SnpPlatformEvidence:
        if self.error is not None:
            raise self.error
        return self.evidence


def init_data(authorization_id: str) -> bytes:
    return json.dumps(
        {"authorization_id": authorization_id, "endpoint": "https://owner:50054", "nonce": "ab" * 32},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def authorization(
    digest: bytes,
    *,
    policy: int = SNP_POLICY,
    author: bool = True,
    authorization_id: str = "auth-1",
    id_key: ec.EllipticCurvePrivateKey | None = None,
) -> SnpAuthorization:
    """A real authorisation of a launch with `digest`: ID block, ID auth, HOST_DATA of its init data."""
    id_key = id_key or ec.generate_private_key(ec.SECP384R1())
    author_key = ec.generate_private_key(ec.SECP384R1()) if author else None
    block = IdBlock(launch_digest=digest, policy=policy, family_id=b"F" * 16, image_id=b"I" * 16)
    auth = sign_id_block(block, id_key, author_key)
    data = init_data(authorization_id)
    return SnpAuthorization(
        authorization_id=authorization_id,
        id_block=block.to_bytes(),
        id_auth=auth.to_bytes(),
        author_key=author,
        policy=policy,
        host_data=hashlib.sha256(data).digest(),
        init_data=data,
    )


@dataclass
class FakeSnpOwner:
    """Authorises with `auth` (or raises `authorize_error`), then answers `snp_attestation` with
    `verdicts` in turn (the last one repeats)."""

    auth: SnpAuthorization
    verdicts: list[AttestationVerdict | ServiceError] = field(
        default_factory=lambda: [AttestationVerdict(AttestationState.RELEASED)]
    )
    authorize_error: ServiceError | None = None
    configs: list[SnpLaunchConfig] = field(default_factory=list)
    evidence: list[SnpPlatformEvidence] = field(default_factory=list)
    polls: int = 0
    revoked: list[str] = field(default_factory=list)
    revoke_error: Exception | None = None

    async def open_session(self, endpoint: str, **kwargs: Any) -> OwnerSession:
        raise AssertionError("an SNP launch opens no SEV session")

    async def release_secret(self, endpoint: str, **kwargs: Any) -> ReleasedSecret:
        raise AssertionError("an SNP launch releases no secret through the launcher")

    async def authorize_snp_launch(
        self, endpoint: str, *, workload_id: str, platform: SnpPlatformEvidence, config: SnpLaunchConfig
    ) -> SnpAuthorization:
        self.configs.append(config)
        self.evidence.append(platform)
        if self.authorize_error is not None:
            raise self.authorize_error
        return self.auth

    async def snp_attestation(self, endpoint: str, *, authorization_id: str) -> AttestationVerdict:
        assert authorization_id == self.auth.authorization_id
        verdict = self.verdicts[min(self.polls, len(self.verdicts) - 1)]
        self.polls += 1
        if isinstance(verdict, ServiceError):
            raise verdict
        return verdict

    async def revoke_snp_authorization(self, endpoint: str, *, authorization_id: str) -> None:
        self.revoked.append(authorization_id)
        if self.revoke_error is not None:
            raise self.revoke_error

    async def close(self) -> None:
        pass
