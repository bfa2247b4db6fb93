"""The platform core's metrics port on Prometheus."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class PrometheusPlatformMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.hits = Counter(
            "sevlaunch_chain_cache_hits", "GetCertificateChain served without a firmware export",
            registry=registry,
        )
        self.misses = Counter(
            "sevlaunch_chain_cache_misses", "GetCertificateChain calls that caused a firmware export",
            registry=registry,
        )

    def chain_served(self, *, exported: bool) -> None:
        (self.misses if exported else self.hits).inc()
