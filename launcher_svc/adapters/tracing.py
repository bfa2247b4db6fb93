"""The launcher core's `PhaseTracer` on the shell's OpenTelemetry tracing (`sevlaunch.rpc.tracing`):
a span `launch phase NAME` per phase, a no-op while tracing is off."""

from __future__ import annotations

from contextlib import AbstractContextManager

from sevlaunch.rpc import tracing


class ShellPhaseTracer:
    def phase(self, phase: str, launch_id: str) -> AbstractContextManager[object]:
        return tracing.span(
            f"launch phase {phase}", {"sevlaunch.phase": phase, "sevlaunch.launch_id": launch_id}
        )
