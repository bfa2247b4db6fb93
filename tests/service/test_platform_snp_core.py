"""The platform's SNP core on its own ports (no gRPC): a caller whose deadline passes leaves the shared
KDS fetch running for the others, and a KDS answer that is not this chip's VCEK is refused, not cached."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from platform_svc.adapters.firmware import AsyncFirmware, FirmwareMetrics
from platform_svc.adapters.metrics import PrometheusPlatformMetrics
from platform_svc.adapters.snp_store import VekDiskCache
from platform_svc.core.snp import SnpCore, VekSources
from sevlaunch.errors import FailedPrecondition, Unavailable
from sevlaunch.firmware.emulator import EmulatedFirmware, EmulatedRoot
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.tcb import Product, TcbVersion


class SlowKDS:
    """The emulated chip's VCEK, after `delay` seconds; counts fetches; `vcek_for` may lie."""

    def __init__(self, chip: EmulatedFirmware, delay: float, vcek_for: TcbVersion | None = None) -> None:
        self.chip, self.delay, self.vcek_for = chip, delay, vcek_for
        self.vcek_fetches = 0

    async def fetch_vcek(self, product: Product, hwid: bytes, tcb: TcbVersion, timeout: float) -> bytes:
        self.vcek_fetches += 1
        await asyncio.sleep(self.delay)
        return self.chip.snp_vcek_der(self.vcek_for or tcb)

    async def fetch_cert_chain(self, product: Product, timeout: float) -> bytes:
        return self.chip.snp_cert_chain_pem()


def _core(chip: EmulatedFirmware, kds: SlowKDS, cache: VekDiskCache | None = None) -> SnpCore:
    registry = CollectorRegistry()
    fw = AsyncFirmware(chip, FirmwareMetrics(registry), emulator=chip)
    return SnpCore(
        fw,
        [chip.snp_trusted_root()],
        VekSources(fetcher=kds, cache=cache, kds_timeout=10),
        PrometheusPlatformMetrics(registry),
        clock=lambda: datetime.now(UTC),
    )


@pytest.fixture
def chip(tmp_path: Path, emulated_root: EmulatedRoot, emulated_snp_root: EmulatedSnpRoot) -> EmulatedFirmware:
    return EmulatedFirmware(tmp_path / "chip", root=emulated_root, snp_root=emulated_snp_root)


def test_a_caller_past_its_deadline_leaves_the_fetch_to_the_others(chip: EmulatedFirmware) -> None:
    kds = SlowKDS(chip, delay=0.6)
    core = _core(chip, kds)

    async def scenario() -> None:
        with pytest.raises(Unavailable) as late:
            await core.vek_chain(timeout=0.2)
        assert late.value.reason == "kds_unavailable"
        follower = await core.vek_chain(timeout=5)  # joins the fetch the first caller started
        assert follower.vek == chip.snp_vcek_der() and kds.vcek_fetches == 1
        assert (await core.vek_chain(timeout=0.01)).vek == follower.vek  # from memory, no deadline needed

    asyncio.run(scenario())


def test_a_kds_answer_for_another_tcb_is_refused_and_not_cached(
    chip: EmulatedFirmware, tmp_path: Path
) -> None:
    reported = chip.snp_tcb_status().reported
    other = TcbVersion(Product.GENOA, **{**reported.components(), "snp": reported.snp - 1})
    cache = VekDiskCache(tmp_path / "cache")
    core = _core(chip, SlowKDS(chip, delay=0, vcek_for=other), cache)

    async def scenario() -> None:
        with pytest.raises(Unavailable) as bad:
            await core.vek_chain()
        assert bad.value.reason == "kds_bad_response"

    asyncio.run(scenario())
    assert cache.load_vcek(Product.GENOA, chip.snp_hwid().hex(), reported.raw) is None


def test_no_source_at_all_is_a_typed_refusal(chip: EmulatedFirmware) -> None:
    registry = CollectorRegistry()
    core = SnpCore(
        AsyncFirmware(chip, FirmwareMetrics(registry), emulator=chip),
        [chip.snp_trusted_root()],
        VekSources(),
        PrometheusPlatformMetrics(registry),
        clock=lambda: datetime.now(UTC),
    )
    with pytest.raises(FailedPrecondition) as err:
        asyncio.run(core.vek_chain())
    assert err.value.reason == "no_vek_source"
