"""The host's SEV ASID pools as Prometheus gauges, read when Prometheus scrapes.

The hardware splits its ASIDs at MIN_SEV_ASID into two pools that run out separately, named here as
Linux's misc cgroup controller names them (KVM registers both, arch/x86/kvm/svm/sev.c): `sev` for plain
SEV guests and `sev_es` for SEV-ES and SEV-SNP guests. Hence one series per pool (label `kind`).

Two sources behind `AsidPools`:

* `MiscCgroupAsids`: the root cgroup's `misc.capacity` (each pool's size, as KVM registered it) and
  `misc.current` (what guests hold host-wide; the root cgroup shows it on kernels since 2023). That is the
  accounting KVM refuses a new guest on. PLATFORM_STATUS's guest count cannot stand in for it: it does
  not say which pool a guest holds an ASID of.
* `EmulatorAsids`: the emulated chip's configured pool sizes and its guests' ASIDs.

A number a source cannot state is not exported, never guessed: no file, a missing or garbled line, or a
capacity of 0 (the kernel's "not initialised or not present") leaves that series out. A failed read is
logged once and leaves the scrape without these series; the rest of /metrics is served as always.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sevlaunch.firmware import EmulatedFirmware

log = logging.getLogger("platform_svc")

#: The pools, by their misc cgroup names.
KINDS = ("sev", "sev_es")
DEFAULT_MISC_CGROUP_DIR = Path("/sys/fs/cgroup")
#: A flat-keyed misc file is a few short lines; anything larger is not one.
_MAX_FILE = 4096
_ENTRY = re.compile(r"([a-z][a-z0-9_]*)[ \t]+([0-9]{1,20})")
_U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class AsidPool:
    kind: str
    total: int
    #: None when the source does not know (the kernel shows no misc.current in the root cgroup).
    in_use: int | None


class AsidPools(Protocol):
    def pools(self) -> Sequence[AsidPool]:
        """The pools this source can state; raises OSError or ValueError when it cannot read at all."""
        ...


def parse_flat_keyed(text: str) -> dict[str, int]:
    """A cgroup flat-keyed file ("KEY VALUE" lines) as numbers. A key whose line is anything else (a
    "max", a stray field, a negative or oversized number) or that appears twice is left out."""
    values: dict[str, int] = {}
    bad: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        key = line.split(maxsplit=1)[0]
        match = _ENTRY.fullmatch(line)
        if match is None or key in values or int(match.group(2)) > _U64_MAX:
            bad.add(key)
            continue
        values[key] = int(match.group(2))
    return {key: value for key, value in values.items() if key not in bad}


class MiscCgroupAsids:
    """The kernel's ASID accounting in the root of the cgroup v2 hierarchy mounted at `root`."""

    def __init__(self, root: Path = DEFAULT_MISC_CGROUP_DIR) -> None:
        self.root = root

    def _read(self, name: str) -> dict[str, int]:
        with open(self.root / name, "rb") as handle:
            data = handle.read(_MAX_FILE + 1)
        if len(data) > _MAX_FILE:
            raise ValueError(f"{self.root / name} is larger than a misc cgroup file")
        return parse_flat_keyed(data.decode("ascii", errors="replace"))

    def pools(self) -> Sequence[AsidPool]:
        capacity = self._read("misc.capacity")  # only the root cgroup has it: absent elsewhere
        try:
            current = self._read("misc.current")
        except (OSError, ValueError):
            current = {}
        return [
            AsidPool(kind, capacity[kind], current.get(kind)) for kind in KINDS if capacity.get(kind, 0) > 0
        ]


class EmulatorAsids:
    """The emulated chip: `max_guests` SEV and `max_es_guests` SEV-ES/SNP ASIDs, and its guests'."""

    def __init__(self, emulator: EmulatedFirmware) -> None:
        self.emulator = emulator

    def pools(self) -> Sequence[AsidPool]:
        config = self.emulator.config
        used = self.emulator.asids_in_use()
        totals = {"sev": config.max_guests, "sev_es": config.max_es_guests}
        return [AsidPool(kind, totals[kind], used[kind]) for kind in KINDS if totals[kind] > 0]


class AsidCollector(Collector):
    """`sevlaunch_platform_asids_in_use{kind}` and `sevlaunch_platform_asids_capacity{kind}` (not
    `_total`: that suffix is for counters), read at each scrape."""

    def __init__(self, source: AsidPools) -> None:
        self.source = source
        self._last_problem: str | None = None

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        in_use = GaugeMetricFamily(
            "sevlaunch_platform_asids_in_use",
            "SEV ASIDs held by guests on this host, by pool (kind sev: SEV guests; sev_es: SEV-ES and "
            "SEV-SNP guests)",
            labels=["kind"],
        )
        total = GaugeMetricFamily(
            "sevlaunch_platform_asids_capacity",
            "SEV ASIDs this host has, by pool (kind sev: SEV guests; sev_es: SEV-ES and SEV-SNP guests)",
            labels=["kind"],
        )
        return in_use, total

    def describe(self) -> Iterable[Metric]:
        # Names only: registering must not read the source.
        return self._families()

    def collect(self) -> Iterable[Metric]:
        in_use, total = self._families()
        try:
            pools = self.source.pools()
        except Exception as exc:  # a scrape must not fail for a device or file fault
            self._problem(f"{type(exc).__name__}: {exc}")
            return []
        self._last_problem = None
        for pool in pools:
            total.add_metric([pool.kind], pool.total)
            if pool.in_use is not None:
                in_use.add_metric([pool.kind], pool.in_use)
        return [in_use, total]

    def _problem(self, message: str) -> None:
        # Once per distinct problem: scrapes come every few seconds, the cause rarely changes.
        if message != self._last_problem:
            self._last_problem = message
            log.warning("SEV ASID gauges not exported", extra={"error": message})
