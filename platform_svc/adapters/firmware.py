"""The firmware behind an asyncio façade, with per-command metrics.

Firmware commands block (an ioctl, or the emulator's crypto and file I/O), so each runs in a worker
thread and the event loop keeps serving other calls. Metrics are labelled by command and status name
only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Histogram

from platform_svc.core.reasons import PlatformReason
from sevlaunch.errors import FailedPrecondition
from sevlaunch.firmware.devsev_snp import SnpConfig, SnpPlatformStatus
from sevlaunch.firmware.interface import Firmware, PlatformStatus
from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.sev.types import ChipId
from sevlaunch.snp.tcb import Product, product_from_cpuid

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

    # -- SEV-SNP (the emulator, or `DevSevSnp`) -------------------------------------------------------

    def _snp(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.firmware, name, None)
        if fn is None:
            raise FailedPrecondition(PlatformReason.SNP_UNSUPPORTED, "the firmware backend has no SEV-SNP")
        return cast(Callable[..., Any], fn)

    async def snp_platform_status(self) -> SnpPlatformStatus:
        return cast(
            SnpPlatformStatus, await self._run("SNP_PLATFORM_STATUS", self._snp("snp_platform_status"))
        )

    async def snp_committed_tcb(self) -> int | None:
        """The committed TCB when the backend knows it: the emulator does; the kernel does not report it."""
        if self.emulator is None:
            return None
        tcbs = await asyncio.to_thread(self.emulator.snp_tcb_status)
        return int(tcbs.committed.raw)

    async def snp_product(self) -> Product:
        if self.emulator is not None:
            return cast(Product, self.emulator.snp_product())
        self._snp("snp_platform_status")
        return await asyncio.to_thread(cpu_product)

    async def snp_commit(self) -> None:
        await self._run("SNP_COMMIT", self._snp("snp_commit"))

    async def snp_set_config(self, config: SnpConfig) -> None:
        await self._run("SNP_SET_CONFIG", self._snp("snp_set_config"), config)


class EmulatorCertTable:
    """The emulated chip's certificate table for extended guest requests (SNP_SET_EXT_CONFIG)."""

    def __init__(self, emulator: Any) -> None:
        self.emulator = emulator

    async def load(self) -> bytes | None:
        return cast(bytes | None, await asyncio.to_thread(self.emulator.snp_get_ext_config))

    async def store(self, table: bytes) -> None:
        await asyncio.to_thread(self.emulator.snp_set_ext_config, table)


def cpu_product(cpuinfo: str = "/proc/cpuinfo") -> Product:
    """The SEV-SNP product of this host's CPU (family and model of the first processor)."""
    family = model = None
    with open(cpuinfo, encoding="ascii", errors="replace") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "cpu family" and family is None:
                family = int(value)
            elif key == "model" and model is None:
                model = int(value)
            if family is not None and model is not None:
                break
    product = product_from_cpuid(family or 0, model or 0)
    if product is None:
        raise FailedPrecondition(
            PlatformReason.SNP_UNSUPPORTED, f"CPU family {family} model {model} is no SEV-SNP product"
        )
    return product
