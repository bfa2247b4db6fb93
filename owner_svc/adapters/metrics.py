"""Prometheus metrics of the owner's decisions, in the server's registry.

Labels are reason names from a fixed vocabulary (the core's and the protocol's reasons) and step names:
never session ids, workloads, identities or anything secret.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class PrometheusOwnerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sessions_opened = Counter(
            "sevlaunch_owner_sessions_opened", "Launch sessions opened", registry=registry
        )
        self.sessions_refused = Counter(
            "sevlaunch_owner_sessions_refused",
            "OpenSession refusals, by reason",
            ["reason"],
            registry=registry,
        )
        self.releases = Counter("sevlaunch_owner_secrets_released", "Secrets released", registry=registry)
        self.release_refusals = Counter(
            "sevlaunch_owner_release_refusals",
            "ReleaseSecret refusals, by reason",
            ["reason"],
            registry=registry,
        )
        self.verification = Histogram(
            "sevlaunch_owner_verification_seconds",
            "Time spent verifying, by step (chain, measurement)",
            ["step"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.chain_lookups = Counter(
            "sevlaunch_owner_chain_cache_lookups",
            "OpenSession chain lookups in the verified-chain cache, by result (hit, miss)",
            ["result"],
            registry=registry,
        )
        self._chain_hit = self.chain_lookups.labels("hit")
        self._chain_miss = self.chain_lookups.labels("miss")

        self.snp_authorizations = Counter(
            "sevlaunch_owner_snp_authorizations",
            "AuthorizeSnpLaunch decisions, by outcome (allowed, refused) and reason",
            ["outcome", "reason"],
            registry=registry,
        )
        self.snp_attestations = Counter(
            "sevlaunch_owner_snp_attestations",
            "Guest-port decisions (Attest; GetChallenge refusals), by outcome (allowed: a secret released) "
            "and reason",
            ["outcome", "reason"],
            registry=registry,
        )
        # One series at a time: the value is the head's seq, the labels its hash and MAC (neither is
        # secret: the MAC proves the owner wrote this head, it opens nothing).
        self.checkpoint = Gauge(
            "sevlaunch_owner_audit_checkpoint",
            "The newest audit checkpoint: the head's seq, with its hash and MAC as labels",
            ["hash", "mac"],
            registry=registry,
        )
        # When the newest checkpoint was made, for the staleness alert: 0 until the first one (made as
        # the owner starts), so an owner that cannot checkpoint at all alerts as well.
        self.checkpoint_time = Gauge(
            "sevlaunch_owner_audit_checkpoint_timestamp_seconds",
            "Unix time of the newest audit checkpoint this process made (0: none yet)",
            registry=registry,
        )

    def session_opened(self) -> None:
        self.sessions_opened.inc()

    def session_refused(self, reason: str) -> None:
        self.sessions_refused.labels(reason).inc()

    def secret_released(self) -> None:
        self.releases.inc()

    def release_refused(self, reason: str) -> None:
        self.release_refusals.labels(reason).inc()

    def observe(self, step: str, seconds: float) -> None:
        self.verification.labels(step).observe(seconds)

    def chain_cache(self, *, hit: bool) -> None:
        (self._chain_hit if hit else self._chain_miss).inc()

    def snp_authorization(self, outcome: str, reason: str) -> None:
        self.snp_authorizations.labels(outcome, reason).inc()

    def snp_attestation(self, outcome: str, reason: str) -> None:
        self.snp_attestations.labels(outcome, reason).inc()

    def audit_checkpoint(self, seq: int, digest: str, mac: str) -> None:
        self.checkpoint.clear()
        self.checkpoint.labels(digest, mac).set(seq)
        self.checkpoint_time.set_to_current_time()
