"""The launcher's OwnerClient, SEV-SNP side: what it sends AuthorizeSnpLaunch (the platform's evidence and
the launch configuration as owner.proto names them) and how GetSnpAttestation's states become the
launcher's verdicts (the launch core polls these)."""

from __future__ import annotations

import hashlib

import pytest

from launcher_svc.adapters.grpc_clients import attestation_verdict, snp_authorize_request
from launcher_svc.core.ports import (
    AttestationState,
    SnpLaunchConfig,
    SnpPlatformEvidence,
    SnpPlatformStatus,
)
from sevlaunch.errors import FailedPrecondition
from sevlaunch.rpc.v1 import owner_pb2
from sevlaunch.sev.kernel_hashes import KernelHashes


def evidence(committed: int | None = 0x48000000000E0007) -> SnpPlatformEvidence:
    status = SnpPlatformStatus(
        product="Genoa",
        api_major=1,
        api_minor=55,
        build_id=37,
        current_tcb=0x48000000000F0007,
        reported_tcb=0x48000000000E0007,
        committed_tcb=committed,
        mask_chip_id=False,
        guest_count=0,
        hwid="ab" * 64,
    )
    return SnpPlatformEvidence(
        status=status, vek_type="vcek", vek_der=b"VCEK", ask_der=b"ASK", ark_der=b"ARK", vek_tcb=0x1
    )


def config(kernel_hashes: KernelHashes | None = None) -> SnpLaunchConfig:
    return SnpLaunchConfig(
        firmware_sha256="0" * 64,
        vcpus=2,
        vcpu_type="EPYC-v4",
        guest_features=0x1,
        vmm_type="QEMU",
        policy=0x30000,
        kernel_hashes=kernel_hashes,
    )


def test_the_request_carries_the_platform_as_sent_and_the_launch_config() -> None:
    req = snp_authorize_request("web-1", evidence(), config())
    assert req.workload_id == "web-1"
    p = req.platform
    assert (p.vek_cert, list(p.chain)) == (b"VCEK", [b"ASK", b"ARK"])
    # The TCBs are GetSnpStatus's raw u64s: committed as committed, current as the launch TCB.
    assert (p.committed_tcb, p.current_tcb) == (0x48000000000E0007, 0x48000000000F0007)
    c = req.config
    assert (c.vcpus, c.vcpu_type, c.guest_features, c.vmm_type, c.policy) == (
        2,
        "EPYC-v4",
        1,
        "QEMU",
        0x30000,
    )
    assert c.firmware_sha256 == "0" * 64
    assert not c.HasField("kernel_hashes")


def test_an_unknown_committed_tcb_is_left_out_not_sent_as_zero() -> None:
    req = snp_authorize_request("web-1", evidence(committed=None), config())
    assert not req.platform.HasField("committed_tcb") and req.platform.HasField("current_tcb")


def test_kernel_hashes_go_as_lower_hex_sha256() -> None:
    kh = KernelHashes.compute(b"kernel", b"initrd", "console=ttyS0")
    req = snp_authorize_request("web-1", evidence(), config(kh))
    k = req.config.kernel_hashes
    assert k.kernel == hashlib.sha256(b"kernel").hexdigest()
    assert k.initrd == hashlib.sha256(b"initrd").hexdigest()
    assert k.cmdline == hashlib.sha256(b"console=ttyS0\0").hexdigest()


@pytest.mark.parametrize(
    ("state", "reason", "expected", "expected_reason"),
    [
        (owner_pb2.SNP_AUTHORIZATION_STATE_AUTHORIZED, "", AttestationState.PENDING, ""),
        (owner_pb2.SNP_AUTHORIZATION_STATE_RELEASED, "", AttestationState.RELEASED, ""),
        (
            owner_pb2.SNP_AUTHORIZATION_STATE_REFUSED,
            "reported_tcb_too_low",
            AttestationState.REFUSED,
            "reported_tcb_too_low",
        ),
        (owner_pb2.SNP_AUTHORIZATION_STATE_REFUSED, "", AttestationState.REFUSED, "attestation_refused"),
        (owner_pb2.SNP_AUTHORIZATION_STATE_EXPIRED, "", AttestationState.REFUSED, "authorization_expired"),
        (owner_pb2.SNP_AUTHORIZATION_STATE_REVOKED, "revoked", AttestationState.REFUSED, "revoked"),
        (owner_pb2.SNP_AUTHORIZATION_STATE_REVOKED, "", AttestationState.REFUSED, "authorization_revoked"),
    ],
)
def test_owner_states_become_verdicts(
    state: int, reason: str, expected: AttestationState, expected_reason: str
) -> None:
    verdict = attestation_verdict(owner_pb2.SnpAuthorizationInfo(state=state, reason=reason))  # type: ignore[arg-type]
    assert verdict.state is expected
    assert verdict.reason == expected_reason


def test_an_unknown_state_fails_closed() -> None:
    with pytest.raises(FailedPrecondition) as err:
        attestation_verdict(owner_pb2.SnpAuthorizationInfo(state=0))
    assert err.value.reason == "owner_error"
