"""The platform service's logic, over two ports: the firmware (async) and the CEK sources.

The servicer (api/) translates protobuf to these calls and back; this module knows nothing of gRPC, and
counts through the `PlatformMetrics` port.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from platform_svc.core.chain import PlatformChain, check_signed_cek, split_exported_chain
from platform_svc.core.metrics import PlatformMetrics
from platform_svc.core.reasons import PlatformReason
from platform_svc.core.singleflight import SingleFlightCache
from sevlaunch.errors import FailedPrecondition, InvalidArgument
from sevlaunch.firmware.interface import PlatformStatus
from sevlaunch.sev.cert import CERT_SIZE, SEVCertificate, Usage
from sevlaunch.sev.chain import TrustedRoot, root_for_cek
from sevlaunch.sev.errors import SevError
from sevlaunch.sev.types import ChipId

log = logging.getLogger("platform_svc")


class FirmwarePort(Protocol):
    async def platform_status(self) -> PlatformStatus: ...
    async def get_id(self) -> ChipId: ...
    async def pdh_cert_export(self) -> tuple[bytes, bytes]: ...
    async def pdh_gen(self) -> None: ...
    async def pek_gen(self) -> None: ...
    async def pek_csr(self) -> bytes: ...
    async def pek_cert_import(self, pek: bytes, oca: bytes) -> None: ...
    async def factory_reset(self) -> None: ...


class CEKCache(Protocol):
    def load(self, chip_hex: str) -> bytes | None: ...
    def store(self, chip_hex: str, cek: bytes) -> None: ...
    def discard(self, chip_hex: str) -> None: ...


@dataclass(frozen=True)
class CEKSources:
    """Where the ASK-signed CEK comes from, tried in this order: a provisioned file, the disk cache,
    then `fetch` (the KDS, or the emulator's own KDS). `fetch` None means: no network source."""

    file_cek: bytes | None = None
    cache: CEKCache | None = None
    fetch: Callable[[str], Awaitable[bytes]] | None = None
    fetch_name: str = "kds"


class PlatformCore:
    def __init__(
        self,
        firmware: FirmwarePort,
        roots: Sequence[TrustedRoot],
        cek_sources: CEKSources,
        metrics: PlatformMetrics,
        *,
        chain_max_age: float | None = None,
    ) -> None:
        if not roots:
            raise ValueError("at least one trusted root is needed to name the chip's ASK/ARK")
        self._fw = firmware
        self._roots = tuple(roots)
        self._sources = cek_sources
        self._metrics = metrics
        self._chain: SingleFlightCache[PlatformChain] = SingleFlightCache(max_age=chain_max_age)
        self._signed_cek: dict[str, tuple[bytes, str]] = {}
        self._chip_hex: str | None = None

    # -- reads ------------------------------------------------------------------------------------

    async def status(self) -> PlatformStatus:
        return await self._fw.platform_status()

    async def chip_id(self) -> str:
        if self._chip_hex is None:
            self._chip_hex = bytes(await self._fw.get_id()).hex()
        return self._chip_hex

    async def chain(self) -> PlatformChain:
        value, exported = await self._chain.get(self._export_chain)
        self._metrics.chain_served(exported=exported)
        return value

    async def _export_chain(self) -> PlatformChain:
        pdh, blob = await self._fw.pdh_cert_export()
        pek, oca, cek = split_exported_chain(blob)
        status = await self._fw.platform_status()
        chip_hex = await self.chip_id()
        signed_cek, source = await self._signed_cek_for(chip_hex, cek)
        root = root_for_cek(SEVCertificate.from_bytes(signed_cek), self._roots)
        return PlatformChain(
            pdh=pdh,
            pek=pek,
            oca=oca,
            cek=signed_cek,
            ask=root.ask.to_bytes(),
            ark=root.ark.to_bytes(),
            generation=root.name,
            chip_id=chip_hex,
            api_major=status.api_major,
            api_minor=status.api_minor,
            build=status.build,
            cek_source=source,
        )

    async def _signed_cek_for(self, chip_hex: str, exported_cek: bytes) -> tuple[bytes, str]:
        known = self._signed_cek.get(chip_hex)
        if known is not None:
            return known
        src = self._sources
        result: tuple[bytes, str] | None = None
        if src.file_cek is not None:
            check_signed_cek(exported_cek, src.file_cek)  # a file for another chip is refused, not served
            result = (src.file_cek, "file")
        else:
            if src.cache is not None:
                cached = src.cache.load(chip_hex)
                if cached is not None:
                    try:
                        check_signed_cek(exported_cek, cached)
                        result = (cached, "kds-cache")
                    except SevError:
                        log.warning("cached CEK is not this chip's; discarded", extra={"chip_id": chip_hex})
                        src.cache.discard(chip_hex)
            if result is None:
                if src.fetch is None:
                    raise FailedPrecondition(
                        PlatformReason.NO_CEK_SOURCE, "no CEK file, cached CEK or KDS is configured"
                    )
                fetched = await src.fetch(chip_hex)
                check_signed_cek(exported_cek, fetched)
                if src.cache is not None:
                    src.cache.store(chip_hex, fetched)
                result = (fetched, src.fetch_name)
        assert result is not None
        self._signed_cek[chip_hex] = result
        return result

    # -- admin ------------------------------------------------------------------------------------
    # Each command that can change the PDH or PEK invalidates the cached chain, whatever its outcome:
    # a failed command may still have changed state on a real chip, and one extra export is cheap.

    async def rotate_pdh(self) -> bytes:
        try:
            await self._fw.pdh_gen()
        finally:
            self._chain.invalidate()
        pdh, _ = await self._fw.pdh_cert_export()
        return pdh

    async def generate_pek(self) -> None:
        try:
            await self._fw.pek_gen()
        finally:
            self._chain.invalidate()

    async def pek_csr(self) -> bytes:
        return await self._fw.pek_csr()

    async def import_pek_certificate(self, pek: bytes, oca: bytes) -> None:
        # Validate before the firmware sees anything: a bad request must change nothing.
        for name, data, usage in (("pek_cert", pek, Usage.PEK), ("oca_cert", oca, Usage.OCA)):
            if len(data) != CERT_SIZE:
                raise InvalidArgument(
                    PlatformReason.BAD_LENGTH, f"{name} must be {CERT_SIZE} bytes, got {len(data)}"
                )
            cert = SEVCertificate.from_bytes(data)
            if cert.usage is not usage:
                raise InvalidArgument(
                    PlatformReason.WRONG_USAGE, f"{name} has usage {cert.usage.name}, not {usage.name}"
                )
        try:
            await self._fw.pek_cert_import(pek, oca)
        finally:
            self._chain.invalidate()

    async def factory_reset(self, confirm: bool) -> None:
        if not confirm:
            raise InvalidArgument(PlatformReason.CONFIRMATION_REQUIRED, "FactoryReset needs confirm=true")
        try:
            await self._fw.factory_reset()
        finally:
            self._chain.invalidate()
