"""What the core reports about its decisions, as a small protocol: the Prometheus adapter lives in
`owner_svc.adapters.metrics`, so the core imports no metrics library. Labels are reason and step names
from a fixed vocabulary, never ids, identities or secrets."""

from __future__ import annotations

from typing import Protocol


class Metrics(Protocol):
    def session_opened(self) -> None: ...

    def session_refused(self, reason: str) -> None: ...

    def secret_released(self) -> None: ...

    def release_refused(self, reason: str) -> None: ...

    def observe(self, step: str, seconds: float) -> None: ...

    def chain_cache(self, *, hit: bool) -> None:
        """An OpenSession's chain was found verified in the cache (hit), or is verified in full."""
        ...

    def snp_authorization(self, outcome: str, reason: str) -> None:
        """An AuthorizeSnpLaunch decision: outcome "allowed" (reason "") or "refused"."""
        ...

    def snp_attestation(self, outcome: str, reason: str) -> None:
        """A guest-port decision (GetChallenge refusals, Attest): "allowed" is a secret released."""
        ...

    def audit_checkpoint(self, seq: int, digest: str, mac: str) -> None:
        """The newest audit checkpoint, exported so it is kept outside the database."""
        ...


class NullMetrics:
    """For a core built without metrics (tests, benchmarks)."""

    def session_opened(self) -> None:
        pass

    def session_refused(self, reason: str) -> None:
        pass

    def secret_released(self) -> None:
        pass

    def release_refused(self, reason: str) -> None:
        pass

    def observe(self, step: str, seconds: float) -> None:
        pass

    def chain_cache(self, *, hit: bool) -> None:
        pass

    def snp_authorization(self, outcome: str, reason: str) -> None:
        pass

    def snp_attestation(self, outcome: str, reason: str) -> None:
        pass

    def audit_checkpoint(self, seq: int, digest: str, mac: str) -> None:
        pass
