"""What the platform core counts, as a port: the Prometheus adapter (adapters/metrics.py) implements it,
and the core stays free of any metrics library."""

from __future__ import annotations

from typing import Protocol


class PlatformMetrics(Protocol):
    def chain_served(self, *, exported: bool) -> None:
        """One GetCertificateChain answer: `exported` when it cost a firmware export, else a cache hit
        or a share of a concurrent caller's export."""
        ...

    def vek_chain_served(self, *, source: str, fetched: bool) -> None:
        """One GetVekChain answer: `source` is where the VEK came from (kds, kds-cache, file);
        `fetched` when this call's computation produced it (not a memory hit or a share of another's)."""
        ...
