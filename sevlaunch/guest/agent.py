"""The guest agent's flow: attest to the owner named in the init data and receive the launch's secret.

    init data -> GetChallenge -> ephemeral key pair -> report (REPORT_DATA = SHA-512(challenge || key))
              -> Attest(report, certificates, key) -> HPKE-sealed secret -> opened with the private key

The flow talks to the owner through `OwnerClient` and to the firmware through a `GuestReportSource`, so it
runs the same against the real owner over TLS (`sevlaunch.guest.owner_client`), configfs-tsm,
/dev/sev-guest, or fakes in tests. Before it sends anything the agent checks its own report: HOST_DATA
must be the init data's digest (else this guest was launched with other init data, and the owner would
refuse it anyway; saying so here names the real problem) and REPORT_DATA must be what it asked for.
The ephemeral private key never leaves this process and is dropped when the flow returns.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from sevlaunch.guest.source import GuestReportSource
from sevlaunch.sev.errors import MalformedInput, SevError, VerificationFailed
from sevlaunch.snp.challenge import check_challenge, report_data
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.report import AttestationReport
from sevlaunch.snp.secret_wrap import GuestKeyPair, WrappedSecret


class AgentReason(StrEnum):
    HOST_DATA_MISMATCH = "host_data_mismatch"
    REPORT_DATA_MISMATCH = "report_data_mismatch"
    OWNER_REFUSED = "owner_refused"
    OWNER_UNAVAILABLE = "owner_unavailable"
    BAD_OWNER_ANSWER = "bad_owner_answer"


class OwnerRefused(SevError):
    """The owner answered with an error. `owner_reason` is its ErrorInfo reason (e.g. `forged_chain`)."""

    def __init__(self, owner_reason: str, detail: str) -> None:
        self.owner_reason = owner_reason
        super().__init__(AgentReason.OWNER_REFUSED, f"{owner_reason}: {detail}" if owner_reason else detail)


class OwnerUnavailable(SevError):
    """The owner could not be reached, or its certificate does not chain to the init data's CA."""

    def __init__(self, detail: str) -> None:
        super().__init__(AgentReason.OWNER_UNAVAILABLE, detail)


class OwnerClient(Protocol):
    def get_challenge(self, authorization_id: str) -> bytes: ...

    def attest(
        self,
        *,
        authorization_id: str,
        challenge: bytes,
        report: bytes,
        cert_table: bytes | None,
        guest_public_key: bytes,
    ) -> WrappedSecret: ...


@dataclass(frozen=True)
class ReleasedSecret:
    """The secret the owner released. `repr` never shows it."""

    secret: bytes
    measurement: bytes

    def __repr__(self) -> str:
        return f"ReleasedSecret({len(self.secret)} bytes, measurement={self.measurement.hex()[:16]}...)"


def attest_and_receive(
    init_data: InitData, owner: OwnerClient, source: GuestReportSource, *, vmpl: int = 0
) -> ReleasedSecret:
    """Runs the flow once. Raises a typed SevError at the first failure; nothing is returned half-done."""
    aid = init_data.authorization_id
    challenge = owner.get_challenge(aid)
    try:
        check_challenge(challenge)
    except MalformedInput:
        raise MalformedInput(AgentReason.BAD_OWNER_ANSWER, "the owner's challenge is not 32 bytes") from None
    keys = GuestKeyPair.generate()
    wanted = report_data(challenge, keys.public_bytes)
    got = source.get_report(wanted, vmpl)
    report = AttestationReport.from_bytes(got.report)
    if not hmac.compare_digest(report.host_data, init_data.host_data):
        raise VerificationFailed(
            AgentReason.HOST_DATA_MISMATCH,
            "the report's HOST_DATA is not this init data's digest: "
            "the guest was launched with other init data",
        )
    if not hmac.compare_digest(report.report_data, wanted):
        raise VerificationFailed(
            AgentReason.REPORT_DATA_MISMATCH, "the firmware's report binds other REPORT_DATA"
        )
    wrapped = owner.attest(
        authorization_id=aid,
        challenge=challenge,
        report=got.report,
        cert_table=got.cert_table,
        guest_public_key=keys.public_bytes,
    )
    secret = keys.open(wrapped, authorization_id=aid, challenge=challenge)
    return ReleasedSecret(secret, report.measurement)
