"""The SEV ASID gauges (platform_svc/adapters/asids.py): the misc cgroup files parsed strictly, a number
that cannot be stated left out rather than guessed, the emulated chip's pools, and a scrape that never
fails for a bad source."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from platform_svc.adapters.asids import (
    AsidCollector,
    AsidPool,
    EmulatorAsids,
    MiscCgroupAsids,
    parse_flat_keyed,
)
from sevlaunch.firmware import ChipConfig, EmulatedFirmware, EmulatedRoot
from sevlaunch.sev.cert import CERT_SIZE, SEVCertificate
from sevlaunch.sev.session import create_session
from sevlaunch.snp.issue import EmulatedSnpRoot

SEV_POLICY = 0x0003
ES_POLICY = 0x0007
SNP_POLICY = 0x30000


def _scrape(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (name, kind): value
        for name in ("sevlaunch_platform_asids_in_use", "sevlaunch_platform_asids_capacity")
        for kind in ("sev", "sev_es")
        if (value := registry.get_sample_value(name, {"kind": kind})) is not None  # type: ignore[assignment]
    }


def _registry(source: object) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(AsidCollector(source))  # type: ignore[arg-type]
    return registry


# -- the flat-keyed files -------------------------------------------------------------------------


def test_parse_the_kernels_format() -> None:
    assert parse_flat_keyed("sev 410\nsev_es 99\n") == {"sev": 410, "sev_es": 99}
    # Other controllers' resources (TDX) are kept, unknown ones are harmless; blank lines are skipped.
    assert parse_flat_keyed("sev 0\n\nsev_es 0\ntdx 31\n") == {"sev": 0, "sev_es": 0, "tdx": 31}
    assert parse_flat_keyed("") == {}


@pytest.mark.parametrize(
    "garbled",
    [
        "sev max",  # misc.max's value, not a number
        "sev -3",
        "sev 3 4",
        "sev 3.5",
        "sev",
        "sev 0x10",
        "sev 99999999999999999999",  # above u64
        "sev 3\nsev 4",  # twice: which one?
        "sev \uff13",  # a non-ASCII digit (fullwidth three)
    ],
)
def test_a_garbled_line_drops_its_key_and_keeps_the_others(garbled: str) -> None:
    assert parse_flat_keyed(f"{garbled}\nsev_es 7\n") == {"sev_es": 7}


def _misc(root: Path, capacity: str | bytes | None, current: str | None = None) -> MiscCgroupAsids:
    """A cgroup root with these misc.capacity and misc.current (None: no such file)."""
    root.mkdir(parents=True, exist_ok=True)
    if capacity is not None:
        (root / "misc.capacity").write_bytes(capacity if isinstance(capacity, bytes) else capacity.encode())
    if current is not None:
        (root / "misc.current").write_text(current)
    return MiscCgroupAsids(root)


def test_misc_cgroup_pools(tmp_path: Path) -> None:
    source = _misc(tmp_path, "sev 410\nsev_es 99\n", "sev 12\nsev_es 98\n")
    assert list(source.pools()) == [AsidPool("sev", 410, 12), AsidPool("sev_es", 99, 98)]
    assert _scrape(_registry(source)) == {
        ("sevlaunch_platform_asids_in_use", "sev"): 12,
        ("sevlaunch_platform_asids_in_use", "sev_es"): 98,
        ("sevlaunch_platform_asids_capacity", "sev"): 410,
        ("sevlaunch_platform_asids_capacity", "sev_es"): 99,
    }


def test_what_the_kernel_does_not_state_is_not_exported(tmp_path: Path) -> None:
    # No misc.current in the root (kernels before 2023): the capacity only, no "in use" guessed.
    assert _scrape(_registry(_misc(tmp_path / "a", "sev 410\nsev_es 99\n"))) == {
        ("sevlaunch_platform_asids_capacity", "sev"): 410,
        ("sevlaunch_platform_asids_capacity", "sev_es"): 99,
    }
    # Capacity 0 is the kernel's "not present or not initialised" (SEV-ES off): no such pool.
    assert list(_misc(tmp_path / "b", "sev 509\nsev_es 0\n", "sev 1\nsev_es 0\n").pools()) == [
        AsidPool("sev", 509, 1)
    ]
    # A garbled capacity line leaves its pool out; a garbled usage line, that pool's "in use".
    assert list(_misc(tmp_path / "c", "sev banana\nsev_es 99\n", "sev 1\nsev_es x\n").pools()) == [
        AsidPool("sev_es", 99, None)
    ]
    # Not text of the kernel's (binary bytes on the line): nothing.
    assert list(_misc(tmp_path / "d", b"\xff\xfe sev 3\n").pools()) == []
    # Oversized: not a misc file, refused before parsing.
    with pytest.raises(ValueError, match="larger than a misc cgroup file"):
        _misc(tmp_path / "e", "sev_es 1\n" * 1000).pools()
    # No misc.capacity: not the root cgroup (a container's own namespace), or no misc controller.
    with pytest.raises(FileNotFoundError):
        _misc(tmp_path / "f", None).pools()


def test_a_scrape_without_a_source_serves_the_rest_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = _registry(MiscCgroupAsids(tmp_path / "absent"))
    with caplog.at_level(logging.WARNING, logger="platform_svc"):
        for _ in range(3):
            text = generate_latest(registry).decode()
            assert "sevlaunch_platform_asids_capacity{" not in text
            assert "sevlaunch_platform_asids_in_use{" not in text
    warnings = [r for r in caplog.records if r.getMessage() == "SEV ASID gauges not exported"]
    assert len(warnings) == 1 and "misc.capacity" in warnings[0].error  # type: ignore[attr-defined]


class _Other(Collector):
    def collect(self) -> list[Metric]:
        return [GaugeMetricFamily("other_up", "another collector of the same registry", value=1)]


class _FailingDevice:
    def pools(self) -> list[AsidPool]:
        raise RuntimeError("device gone")


def test_any_source_fault_leaves_the_series_out_not_the_scrape() -> None:
    registry = _registry(_FailingDevice())
    registry.register(_Other())
    text = generate_latest(registry).decode()  # no exception: the scrape is served
    assert "sevlaunch_platform_asids" not in text
    assert registry.get_sample_value("other_up") == 1
    assert _scrape(registry) == {}


# -- the emulated chip -----------------------------------------------------------------------------


def _sev_launch(fw: EmulatedFirmware, policy: int) -> int:
    pdh, _ = fw.pdh_cert_export()
    session = create_session(SEVCertificate.from_bytes(pdh[:CERT_SIZE]), policy)
    return fw.launch_start(session.godh.to_bytes(), session.blob.to_bytes(), policy)


def test_the_emulated_chip_counts_launched_guests_against_its_configured_pools(
    tmp_path: Path, emulated_root: EmulatedRoot, emulated_snp_root: EmulatedSnpRoot
) -> None:
    fw = EmulatedFirmware(
        tmp_path / "chip",
        config=ChipConfig(max_guests=3, max_es_guests=2),
        root=emulated_root,
        snp_root=emulated_snp_root,
    )
    registry = _registry(EmulatorAsids(fw))

    def gauges() -> tuple[float, float, float, float]:
        s = _scrape(registry)
        return (
            s[("sevlaunch_platform_asids_in_use", "sev")],
            s[("sevlaunch_platform_asids_capacity", "sev")],
            s[("sevlaunch_platform_asids_in_use", "sev_es")],
            s[("sevlaunch_platform_asids_capacity", "sev_es")],
        )

    assert gauges() == (0, 3, 0, 2)
    sev = _sev_launch(fw, SEV_POLICY)
    assert gauges() == (1, 3, 0, 2)
    _sev_launch(fw, ES_POLICY)
    assert gauges() == (1, 3, 1, 2)
    fw.snp_launch_start(SNP_POLICY)  # SNP guests hold ASIDs of the SEV-ES pool
    assert gauges() == (1, 3, 2, 2)
    fw.decommission(sev)
    assert gauges() == (0, 3, 2, 2)


def test_an_emulated_chip_without_es_asids_has_no_es_pool(
    tmp_path: Path, emulated_root: EmulatedRoot
) -> None:
    fw = EmulatedFirmware(tmp_path / "chip", config=ChipConfig(max_es_guests=0), root=emulated_root)
    assert list(EmulatorAsids(fw).pools()) == [AsidPool("sev", 16, 0)]
