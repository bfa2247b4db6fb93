"""The AMD Key Distribution Service client for the ASK-signed CEK, and its on-disk cache.

`GET {base}/cek/id/{chip id hex}` returns the 0x824-byte CEK signed by the ASK. The KDS is rate
limited and may be slow or away, so a fetch has one overall deadline; 429/503 honour Retry-After when it
fits in the deadline, other transient failures back off; retries are bounded. A CEK never changes for a
chip, so once fetched (and checked against the chip by the caller) it is kept on disk, keyed by chip id,
and a KDS outage then costs nothing.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter

from platform_svc.core.reasons import PlatformReason
from sevlaunch.errors import FailedPrecondition, Unavailable
from sevlaunch.sev.cert import CERT_SIZE
from sevlaunch.snp.kds import vcek_cert_chain_url, vcek_url
from sevlaunch.snp.tcb import Product, TcbVersion

log = logging.getLogger("platform_svc.kds")

DEFAULT_KDS_URL = "https://kdsintf.amd.com"
_HEX_RE = re.compile(r"^[0-9a-f]{16,256}$")


_KDS_OUTCOMES_HELP = (
    "lookups, by outcome (ok, cache_hit, timeout, unavailable, rate_limited, not_found, http_error, "
    "bad_response)"
)


class KDSMetrics:
    """The SEV CEK lookups (`sevlaunch_kds_fetches_total`) or, with `snp=True`, the SEV-SNP VCEK and
    chain lookups (`sevlaunch_snp_kds_fetches_total`). Literal names, so dashboards and alert rules can
    be checked against the code."""

    def __init__(self, registry: CollectorRegistry, *, snp: bool = False) -> None:
        if snp:
            self.fetches = Counter(
                "sevlaunch_snp_kds_fetches",
                f"SEV-SNP KDS {_KDS_OUTCOMES_HELP}",
                ["outcome"],
                registry=registry,
            )
        else:
            self.fetches = Counter(
                "sevlaunch_kds_fetches", f"KDS {_KDS_OUTCOMES_HELP}", ["outcome"], registry=registry
            )


class CEKDiskCache:
    """`DIR/<chip id hex>.cek`, written atomically (a crash never leaves a half CEK to be served)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, chip_hex: str) -> Path:
        if not _HEX_RE.match(chip_hex):
            raise ValueError("chip id must be lower hex")
        return self.directory / f"{chip_hex}.cek"

    def load(self, chip_hex: str) -> bytes | None:
        try:
            return self._path(chip_hex).read_bytes()
        except FileNotFoundError:
            return None

    def store(self, chip_hex: str, cek: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self._path(chip_hex)
        tmp = final.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cek)
        os.replace(tmp, final)

    def discard(self, chip_hex: str) -> None:
        self._path(chip_hex).unlink(missing_ok=True)


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    retry_after: float | None


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


#: The largest answer read from the KDS: a VCEK or a PEM cert chain is a few KiB.
MAX_BODY = 64 * 1024


def _get(url: str, timeout: float, limit: int = CERT_SIZE + 1) -> _Reply:
    request = urllib.request.Request(url, headers={"Accept": "application/octet-stream"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - scheme checked at init
            return _Reply(resp.status, resp.read(limit), None)
    except urllib.error.HTTPError as exc:
        return _Reply(exc.code, b"", _parse_retry_after(exc.headers.get("Retry-After")))


class KDSClient:
    def __init__(
        self,
        base_url: str,
        metrics: KDSMetrics,
        *,
        timeout: float = 10.0,
        max_attempts: int = 3,
        backoff: float = 0.2,
    ) -> None:
        if not base_url.startswith(("https://", "http://")):
            raise ValueError("KDS URL must be http(s)")
        self.base_url = base_url.rstrip("/")
        self.metrics = metrics
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff

    async def fetch_cek(self, chip_hex: str) -> bytes:
        """The ASK-signed CEK of the chip; Unavailable when the KDS does not answer within the deadline."""
        body = await self._fetch(
            f"{self.base_url}/cek/id/{chip_hex}",
            timeout=self.timeout,
            limit=CERT_SIZE + 1,
            not_found=FailedPrecondition(PlatformReason.CEK_NOT_FOUND, "the KDS does not know this chip id"),
            what="the CEK",
        )
        if len(body) != CERT_SIZE:
            self.metrics.fetches.labels("bad_response").inc()
            raise Unavailable(PlatformReason.KDS_BAD_RESPONSE, f"KDS returned {len(body)} bytes, not a CEK")
        self.metrics.fetches.labels("ok").inc()
        return body

    async def fetch_vcek(self, product: Product, hwid: bytes, tcb: TcbVersion, timeout: float) -> bytes:
        """A chip's VCEK (DER) at a TCB: `/vcek/v1/{product}/{hwid}?blSPL=..`, within `timeout` seconds."""
        body = await self._fetch(
            vcek_url(hwid, tcb, base_url=self.base_url),
            timeout=min(timeout, self.timeout),
            limit=MAX_BODY,
            not_found=FailedPrecondition(
                PlatformReason.VCEK_NOT_FOUND, f"the KDS knows no VCEK for this chip at TCB {tcb}"
            ),
            what="the VCEK",
        )
        self.metrics.fetches.labels("ok").inc()
        return body

    async def fetch_cert_chain(self, product: Product, timeout: float) -> bytes:
        """ASK then ARK (PEM): `/vcek/v1/{product}/cert_chain`."""
        body = await self._fetch(
            vcek_cert_chain_url(product, base_url=self.base_url),
            timeout=min(timeout, self.timeout),
            limit=MAX_BODY,
            not_found=Unavailable(
                PlatformReason.KDS_BAD_RESPONSE, f"the KDS has no {product.kds_name} chain"
            ),
            what="the cert chain",
        )
        self.metrics.fetches.labels("ok").inc()
        return body

    async def _fetch(self, url: str, *, timeout: float, limit: int, not_found: Exception, what: str) -> bytes:
        """One answer of the KDS within `timeout`: 429/503 wait out Retry-After when it fits in the
        deadline, other transient failures back off, at most `max_attempts` tries."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "unavailable"
        for attempt in range(1, self.max_attempts + 1):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                # wait_for bounds a server that trickles bytes; urllib's timeout is per socket operation.
                reply = await asyncio.wait_for(asyncio.to_thread(_get, url, remaining, limit), remaining)
            except TimeoutError:
                last = "timeout"
                break
            except (OSError, urllib.error.URLError) as exc:
                last = "unavailable"
                log.warning("KDS unreachable", extra={"attempt": attempt, "error": type(exc).__name__})
                await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), max(0.0, deadline - loop.time())))
                continue
            if reply.status == 200:
                if len(reply.body) >= limit:
                    self.metrics.fetches.labels("bad_response").inc()
                    raise Unavailable(
                        PlatformReason.KDS_BAD_RESPONSE, f"the KDS's answer for {what} is too large"
                    )
                return reply.body
            if reply.status == 404:
                self.metrics.fetches.labels("not_found").inc()
                raise not_found
            if reply.status in (429, 503):
                last = "rate_limited"
                wait = reply.retry_after
                if wait is None:
                    wait = self.backoff * 2 ** (attempt - 1)
                if wait > deadline - loop.time():
                    break  # the KDS asks us to come back after our deadline: fail now, do not hang
                await asyncio.sleep(wait)
                continue
            last = "http_error"
            if 400 <= reply.status < 500:
                break  # a client error will not improve on retry
            await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), max(0.0, deadline - loop.time())))
        self.metrics.fetches.labels(last).inc()
        raise Unavailable(
            PlatformReason.KDS_UNAVAILABLE,
            f"the AMD KDS did not provide {what} ({last}) and none is cached",
            metadata={"kds_outcome": last},
        )


class EmulatorVekFetcher:
    """An emulated chip's VCEK and chain straight from the emulator (no KDS configured): what its KDS
    would serve."""

    def __init__(self, emulator: Any) -> None:
        self.emulator = emulator

    async def fetch_vcek(self, product: Product, hwid: bytes, tcb: TcbVersion, timeout: float) -> bytes:
        return cast(bytes, await asyncio.to_thread(self.emulator.snp_vcek_der, tcb))

    async def fetch_cert_chain(self, product: Product, timeout: float) -> bytes:
        return cast(bytes, await asyncio.to_thread(self.emulator.snp_cert_chain_pem))
