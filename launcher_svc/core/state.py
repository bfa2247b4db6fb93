"""The launch state machine and the port of its persistence (`LaunchStore`; the SQLite store is
`launcher_svc.adapters.sqlite_store`), so a restarted launcher knows every launch in flight.

The order of a launch lives here and nowhere else (STYLE.md rule 7): `advanced` (which every store's
`advance` applies) refuses any transition not in `TRANSITIONS`, and `may_resume` is the one gate in front
of resuming a guest: only a launch whose secret was injected (or whose owner explicitly waived it) may run.

SEV-SNP launches (`LaunchFlow.SNP`) take their own order: ACCEPTED, CHAIN_FETCHED (the platform's SNP
status and VCEK chain), AUTHORIZED (the owner's ID block, ID auth, policy and init data), DEFINED, STARTED
(SNP_LAUNCH_FINISH passed: the guest runs, since an SNP guest attests itself after boot), RUNNING (the
owner reports that the guest attested and got its secret). Until RUNNING the launch is in flight like
any other: a failure, a deadline or the owner's refusal of the attestation destroys the guest.

Nothing secret is stored: the spec, the owner's endpoint, the session id and the measurement are not
secrets; the GODH, session blob and wrapped secret are never written.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.spec import GuestSpec
from sevlaunch.errors import FailedPrecondition


class Phase(StrEnum):
    ACCEPTED = "ACCEPTED"
    CHAIN_FETCHED = "CHAIN_FETCHED"
    SESSION_OPENED = "SESSION_OPENED"
    DEFINED = "DEFINED"
    STARTED_PAUSED = "STARTED_PAUSED"
    MEASURED = "MEASURED"
    SECRET_RELEASED = "SECRET_RELEASED"  # noqa: S105 - a phase name
    SECRET_INJECTED = "SECRET_INJECTED"  # noqa: S105 - a phase name
    AUTHORIZED = "AUTHORIZED"  # SEV-SNP: the owner authorised the launch
    STARTED = "STARTED"  # SEV-SNP: SNP_LAUNCH_FINISH passed, the guest boots and attests
    RUNNING = "RUNNING"
    FAILED = "FAILED"  # ended before RUNNING, the domain destroyed
    DESTROYED = "DESTROYED"  # destroyed on request


class LaunchFlow(StrEnum):
    ORCHESTRATED = "orchestrated"
    TWO_PHASE = "two-phase"
    SNP = "snp"  # an orchestrated SEV-SNP launch


TERMINAL = frozenset({Phase.FAILED, Phase.DESTROYED})
# Phases in which a domain may exist that has not been given its secret: what fail-closed cleans.
PRE_RUNNING = frozenset(Phase) - TERMINAL - {Phase.RUNNING}

_ORCHESTRATED_ORDER = (
    Phase.ACCEPTED,
    Phase.CHAIN_FETCHED,
    Phase.SESSION_OPENED,
    Phase.DEFINED,
    Phase.STARTED_PAUSED,
    Phase.MEASURED,
    Phase.SECRET_RELEASED,
    Phase.SECRET_INJECTED,
    Phase.RUNNING,
)
_TWO_PHASE_ORDER = (
    Phase.ACCEPTED,
    Phase.DEFINED,
    Phase.STARTED_PAUSED,
    Phase.MEASURED,
    Phase.SECRET_INJECTED,
    Phase.RUNNING,
)
_SNP_ORDER = (
    Phase.ACCEPTED,
    Phase.CHAIN_FETCHED,
    Phase.AUTHORIZED,
    Phase.DEFINED,
    Phase.STARTED,
    Phase.RUNNING,
)
_ORDERS = {
    LaunchFlow.ORCHESTRATED: _ORCHESTRATED_ORDER,
    LaunchFlow.TWO_PHASE: _TWO_PHASE_ORDER,
    LaunchFlow.SNP: _SNP_ORDER,
}


def _chain(order: tuple[Phase, ...]) -> set[tuple[Phase, Phase]]:
    return set(itertools.pairwise(order))


TRANSITIONS: dict[LaunchFlow, frozenset[tuple[Phase, Phase]]] = {
    # SECRET_RELEASED -> RUNNING is the waived-secret path; `may_resume` additionally checks the waiver.
    LaunchFlow.ORCHESTRATED: frozenset(
        _chain(_ORCHESTRATED_ORDER) | {(Phase.SECRET_RELEASED, Phase.RUNNING)}
    ),
    LaunchFlow.TWO_PHASE: frozenset(_chain(_TWO_PHASE_ORDER)),
    LaunchFlow.SNP: frozenset(_chain(_SNP_ORDER)),
}


def next_phase(mode: LaunchFlow, current: Phase) -> Phase:
    order = _ORDERS[mode]
    idx = order.index(current)
    return order[idx + 1]


@dataclass(frozen=True)
class LaunchRecord:
    launch_id: str
    mode: LaunchFlow
    state: Phase
    spec: GuestSpec
    domain_name: str
    requested_by: str
    incarnation: str  # the launcher process that drives this launch; another one's launch is orphaned
    created_at: float
    updated_at: float
    deadline: float | None = None  # wall clock by which the current phase must be left
    failed_phase: Phase | None = None
    reason: str = ""  # a `LaunchReason`, or a peer's or the firmware's reason passed through
    detail: str = ""
    domain_uuid: str = ""
    owner_endpoint: str = ""
    workload_id: str = ""
    session_id: str = ""
    measurement: bytes = b""
    secret_waived: bool = False
    authorization_id: str = ""  # SEV-SNP: the owner's authorisation of this launch
    attested: bool = False  # SEV-SNP: the owner reported the guest attested and its secret released

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def may_resume(record: LaunchRecord) -> bool:
    """The only condition under which a guest may run: its secret is in, or the owner waived it; for
    SEV-SNP, the owner reported that the guest attested and received its secret."""
    if record.mode is LaunchFlow.SNP:
        return record.state is Phase.STARTED and record.attested
    if record.state is Phase.SECRET_INJECTED:
        return True
    return (
        record.mode is LaunchFlow.ORCHESTRATED
        and record.state is Phase.SECRET_RELEASED
        and record.secret_waived
        and record.spec.launch_without_secret
    )


@dataclass(frozen=True)
class PhaseChange:
    """One step of a launch: the phase it reaches, its new deadline, and what the step learnt."""

    to: Phase
    deadline: float | None = None  # the deadline of the phase after `to`, if it has one
    domain_uuid: str | None = None
    session_id: str | None = None
    measurement: bytes | None = None
    secret_waived: bool | None = None
    authorization_id: str | None = None
    attested: bool | None = None

    def applied(self, record: LaunchRecord, now: float) -> LaunchRecord:
        return replace(
            record,
            state=self.to,
            updated_at=now,
            deadline=self.deadline,
            domain_uuid=record.domain_uuid if self.domain_uuid is None else self.domain_uuid,
            session_id=record.session_id if self.session_id is None else self.session_id,
            measurement=record.measurement if self.measurement is None else self.measurement,
            secret_waived=record.secret_waived if self.secret_waived is None else self.secret_waived,
            authorization_id=(
                record.authorization_id if self.authorization_id is None else self.authorization_id
            ),
            attested=record.attested if self.attested is None else self.attested,
        )


def advanced(current: LaunchRecord, seen: LaunchRecord, change: PhaseChange, now: float) -> LaunchRecord:
    """`current` (the stored record) moved by `change`, if `seen` (the driver's copy) is still current
    and the move is one step of its flow's order; anything else is refused."""
    if current.state is not seen.state:
        # Someone else (an abort, the watchdog) moved it meanwhile: this driver must stop.
        raise FailedPrecondition(
            LaunchReason.LAUNCH_STATE_CHANGED, f"launch is {current.state.value}, not {seen.state.value}"
        )
    if (seen.state, change.to) not in TRANSITIONS[seen.mode]:
        raise RuntimeError(f"illegal launch transition {seen.state.value} -> {change.to.value}")
    new = change.applied(current, now)
    if change.to is Phase.RUNNING and not may_resume(replace(new, state=current.state)):
        raise RuntimeError("refusing to mark RUNNING a launch without an injected secret")
    return new


def finished(
    current: LaunchRecord, to: Phase, *, failed_phase: Phase | None, reason: str, detail: str, now: float
) -> LaunchRecord:
    """`current` moved to FAILED or DESTROYED (from any state), recording why."""
    if to not in TERMINAL:
        raise RuntimeError("finish() only moves to a terminal state")
    return replace(
        current,
        state=to,
        updated_at=now,
        deadline=None,
        failed_phase=failed_phase,
        reason=reason,
        detail=detail,
    )


class LaunchStore(Protocol):
    """Durable launch records. Every write is durable before it returns, so a launcher killed at any
    point restarts knowing which domains it may have left behind."""

    def insert(self, record: LaunchRecord) -> None: ...

    def get(self, launch_id: str) -> LaunchRecord:
        """The record; `NotFound(launch_not_found)` if there is none."""
        ...

    def by_domain(self, domain_name: str) -> LaunchRecord | None: ...

    def records(self, *, include_terminal: bool = True) -> list[LaunchRecord]: ...

    def in_flight(self) -> list[LaunchRecord]: ...

    def advance(self, record: LaunchRecord, change: PhaseChange) -> LaunchRecord:
        """Applies `advanced` to the stored record and stores the result."""
        ...

    def set_deadline(self, record: LaunchRecord, deadline: float | None) -> LaunchRecord: ...

    def finish(
        self, record: LaunchRecord, to: Phase, *, failed_phase: Phase | None, reason: str, detail: str
    ) -> LaunchRecord: ...

    def close(self) -> None: ...
