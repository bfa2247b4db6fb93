"""The `sevlaunch demo` environment: the three services on localhost with emulated hardware.

`DemoEnvironment` (set-up, services, launches, audit) is used by `sevlaunch demo` and by the end-to-end
tests; `services` starts and stops service processes (also inside network namespaces).
"""

from __future__ import annotations

from sevlaunch.demo.env import (
    DEFAULT_FIRMWARE,
    AuditResult,
    DemoEnvironment,
    DemoError,
    LaunchOutcome,
    tamper_firmware,
    verify_audit_chain,
)
from sevlaunch.demo.services import (
    ServiceProcess,
    ServiceStartError,
    start_service,
    wait_serving,
    wait_started,
)

__all__ = [
    "DEFAULT_FIRMWARE",
    "AuditResult",
    "DemoEnvironment",
    "DemoError",
    "LaunchOutcome",
    "ServiceProcess",
    "ServiceStartError",
    "start_service",
    "tamper_firmware",
    "verify_audit_chain",
    "wait_serving",
    "wait_started",
]
