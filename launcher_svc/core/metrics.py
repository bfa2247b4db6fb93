"""What the core reports for metrics, as a small protocol; the Prometheus adapter lives in
`launcher_svc.adapters.prometheus`. Labels are phases, flows, outcomes and destroy paths only: never
launch ids, names or anything secret."""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

from launcher_svc.core.state import LaunchFlow, Phase


class Outcome(StrEnum):
    RUNNING = "running"
    FAILED = "failed"


class DestroyPath(StrEnum):
    FAIL_CLOSED = "fail_closed"
    RECONCILER = "reconciler"
    REQUEST = "request"


class LaunchMetrics(Protocol):
    def phase_done(self, phase: Phase, seconds: float) -> None: ...

    def launch_finished(self, flow: LaunchFlow, outcome: Outcome, failed_phase: Phase | None) -> None: ...

    def domain_destroyed(self, path: DestroyPath) -> None: ...

    def in_flight(self, count: int) -> None: ...


class NoMetrics:
    """The default: reports nothing."""

    def phase_done(self, phase: Phase, seconds: float) -> None:
        pass

    def launch_finished(self, flow: LaunchFlow, outcome: Outcome, failed_phase: Phase | None) -> None:
        pass

    def domain_destroyed(self, path: DestroyPath) -> None:
        pass

    def in_flight(self, count: int) -> None:
        pass
