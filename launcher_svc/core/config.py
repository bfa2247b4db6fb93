"""The launch core's settings and the events it streams."""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher_svc.core.spec import PathPolicy
from launcher_svc.core.state import Phase


@dataclass(frozen=True)
class LaunchEvent:
    launch_id: str
    phase: Phase
    duration: float
    domain_name: str
    at: float
    failed_phase: Phase | None = None
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True)
class LauncherConfig:
    paths: PathPolicy = field(default_factory=PathPolicy)
    phase_timeout: float = 30.0
    # Per-phase overrides, e.g. {Phase.SECRET_RELEASED: 60}; for a two-phase launch the wait for
    # CompleteLaunch is the SECRET_INJECTED phase.
    phase_timeouts: dict[Phase, float] = field(default_factory=dict)
    max_concurrent: int = 8
    secret_gpa: int | None = None  # for OVMF images without a declared secret area (Debian's)
    reconcile_interval: float = 10.0
    reconcile_foreign: bool = False  # also destroy paused SEV domains the launcher did not create
    cleanup_grace: float = 10.0  # how long fail-closed waits for a hypervisor call still in a worker
    # The vCPU model pinned for SEV-ES guests whose spec names none (`--vcpu-type`): an SEV-ES launch
    # always runs on a pinned model, since its VMSAs (and so its measurement) depend on it.
    vcpu_type: str = "EPYC-v4"
    # SEV-SNP: how often the launcher asks the owner whether a started guest has attested. The wait is
    # the RUNNING phase's deadline (`phase_timeouts[Phase.RUNNING]`), which must cover the guest's boot.
    attestation_poll: float = 1.0

    def timeout(self, phase: Phase) -> float:
        return self.phase_timeouts.get(phase, self.phase_timeout)

    @property
    def shutdown_budget(self) -> float:
        """What `Launcher.stop` may take in all: one abort's worst case (a cleanup grace waiting for a
        hypervisor call in flight, another for the destroy), since all launches are aborted at once.
        A SIGTERM takes the server's `--grace` (calls in flight) plus this; Kubernetes'
        terminationGracePeriodSeconds must exceed the sum (k8s/base/host-daemonset.yaml: 60 > 10 + 20)."""
        return 2 * self.cleanup_grace
