"""The launcher core's tracing port: one span per launch phase, if the shell traces at all.

The step machine opens `phase(name, launch_id)` around each phase's work, so the calls a phase makes
to the platform and the owner are children of its span (the shell's adapter is OpenTelemetry,
`launcher_svc.adapters.tracing`); the core itself knows no tracing library.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol


class PhaseTracer(Protocol):
    def phase(self, phase: str, launch_id: str) -> AbstractContextManager[object]:
        """A context around the work of reaching `phase`; an exception leaving it failed the phase."""
        ...


class NoTracing:
    def phase(self, phase: str, launch_id: str) -> AbstractContextManager[object]:
        return nullcontext()
