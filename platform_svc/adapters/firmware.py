"""The firmware behind an asyncio façade, with per-command metrics.

Firmware commands block (an ioctl, or the emulator's crypto and file I/O), so each runs in a worker
thread and the event loop keeps serving other calls. Metrics are labelled by command and status name
only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram

from sevlaunch.firmware.interface import Firmware, PlatformStatus
from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.sev.types import ChipId

T = TypeVar("T")


class FirmwareMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.commands = Counter(
            "sevlaunch_firmware_commands",
            "Firmware commands issued, by command and firmware status",
            ["command", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "sevlaunch_firmware_command_duration_seconds",
            "Firmware command time, by command",
            ["command"],
            registry=registry,
        )


class AsyncFirmware:
    def __init__(self, firmware: Firmware, metrics: FirmwareMetrics, *, emulator: Any | None = None) -> None:
        self.firmware = firmware
        self.metrics = metrics
        #: The EmulatedFirmware when the backend is the emulator (for its ASK/ARK and KDS CEK).
        self.emulator = emulator

    async def _run(self, command: str, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        status = StatusCode.SUCCESS.name
        try:
            return await asyncio.to_thread(fn, *args)
        except FirmwareError as exc:
            status = exc.status.name if isinstance(exc.status, StatusCode) else f"0x{exc.status:02x}"
            raise
        except Exception:
            status = "ERROR"  # not a firmware status: the device or the emulator failed
            raise
        finally:
            self.metrics.commands.labels(command, status).inc()
            self.metrics.latency.labels(command).observe(time.perf_counter() - start)

    async def platform_status(self) -> PlatformStatus:
        return await self._run("PLATFORM_STATUS", self.firmware.platform_status)

    async def get_id(self) -> ChipId:
        return await self._run("GET_ID", self.firmware.get_id)

    async def pdh_cert_export(self) -> tuple[bytes, bytes]:
        return await self._run("PDH_CERT_EXPORT", self.firmware.pdh_cert_export)

    async def pdh_gen(self) -> None:
        await self._run("PDH_GEN", self.firmware.pdh_gen)

    async def pek_gen(self) -> None:
        await self._run("PEK_GEN", self.firmware.pek_gen)

    async def pek_csr(self) -> bytes:
        return await self._run("PEK_CSR", self.firmware.pek_csr)

    async def pek_cert_import(self, pek: bytes, oca: bytes) -> None:
        await self._run("PEK_CERT_IMPORT", self.firmware.pek_cert_import, pek, oca)

    async def factory_reset(self) -> None:
        await self._run("FACTORY_RESET", self.firmware.factory_reset)
