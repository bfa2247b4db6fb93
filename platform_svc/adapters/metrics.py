"""The platform core's metrics port on Prometheus."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class PrometheusPlatformMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.hits = Counter(
            "sevlaunch_chain_cache_hits",
            "GetCertificateChain served without a firmware export",
            registry=registry,
        )
        self.misses = Counter(
            "sevlaunch_chain_cache_misses",
            "GetCertificateChain calls that caused a firmware export",
            registry=registry,
        )

        self.vek_chains = Counter(
            "sevlaunch_vek_chain_served",
            "GetVekChain answers, by source (kds, kds-cache, file) and whether the call computed it",
            ["source", "computed"],
            registry=registry,
        )

    def vek_chain_served(self, *, source: str, fetched: bool) -> None:
        self.vek_chains.labels(source, "yes" if fetched else "no").inc()

    def chain_served(self, *, exported: bool) -> None:
        (self.misses if exported else self.hits).inc()
