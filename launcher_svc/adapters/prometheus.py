"""The launcher's Prometheus metrics (the core's `LaunchMetrics`), in the server's registry. Labels are
phases, outcomes, modes, destroy paths and firmware command/status names only: never launch ids, names
or anything secret."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from launcher_svc.core.metrics import DestroyPath, Outcome
from launcher_svc.core.state import LaunchFlow, Phase

PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class LauncherMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.launches = Counter(
            "sevlaunch_launcher_launches",
            "Launches ended, by mode, outcome (running, failed) and failing phase",
            ["mode", "outcome", "failed_phase"],
            registry=registry,
        )
        self.phase_seconds = Histogram(
            "sevlaunch_launcher_phase_duration_seconds",
            "Time to reach each launch phase",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self.destroyed = Counter(
            "sevlaunch_launcher_domains_destroyed",
            "Domains destroyed, by path (fail_closed, reconciler, request)",
            ["path"],
            registry=registry,
        )
        # The launch commands the emulated backend issues in QEMU's place (named like platform_svc's
        # sevlaunch_firmware_*). With the libvirt backend QEMU talks to the firmware and these stay empty.
        self.firmware_commands = Counter(
            "sevlaunch_launcher_firmware_commands",
            "Firmware launch commands issued by the emulated hypervisor, by command and firmware status",
            ["command", "status"],
            registry=registry,
        )
        self.firmware_latency = Histogram(
            "sevlaunch_launcher_firmware_command_duration_seconds",
            "Firmware launch command time, by command",
            ["command"],
            registry=registry,
        )
        self.in_flight_gauge = Gauge(
            "sevlaunch_launcher_launches_in_flight", "Launches admitted and not yet ended", registry=registry
        )

    def phase_done(self, phase: Phase, seconds: float) -> None:
        self.phase_seconds.labels(phase.value).observe(seconds)

    def launch_finished(self, flow: LaunchFlow, outcome: Outcome, failed_phase: Phase | None) -> None:
        self.launches.labels(flow.value, outcome.value, failed_phase.value if failed_phase else "").inc()

    def domain_destroyed(self, path: DestroyPath) -> None:
        self.destroyed.labels(path.value).inc()

    def in_flight(self, count: int) -> None:
        self.in_flight_gauge.set(count)

    def firmware_command(self, command: str, status: str, seconds: float) -> None:
        """`EmulatedHypervisor`'s firmware observer: command and status names only."""
        self.firmware_commands.labels(command, status).inc()
        self.firmware_latency.labels(command).observe(seconds)
