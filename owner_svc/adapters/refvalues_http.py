"""Polls reference value manifests (DSSE envelopes) over HTTP(S), with ETag revalidation.

What the server returns is untrusted: each new body goes through the same verification as an admin
import. A body that fails is logged and dropped; the manifests in force stay. Its ETag is not kept, so a
manifest refused for a transient reason (not valid yet) is tried again at the next poll.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from sevlaunch.refvalues import MAX_ENVELOPE_BYTES
from sevlaunch.sev.errors import SevError

log = logging.getLogger("owner_svc.refvalues")


class RefValuesPoller:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        interval: float,
        importer: Callable[[bytes, str], bool],
        timeout: float = 10.0,
    ) -> None:
        for url in urls:
            if urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"reference value URL {url!r} must be http or https")
        if interval <= 0:
            raise ValueError("the polling interval must be positive")
        self.urls = tuple(urls)
        self.interval = interval
        self.timeout = timeout
        self._importer = importer
        self._etags: dict[str, str] = {}

    def fetch(self, url: str) -> tuple[bytes, str | None] | None:
        """(body, ETag) when the body changed since the last accepted fetch, None on 304."""
        headers = {"Accept": "application/json"}
        if url in self._etags:
            headers["If-None-Match"] = self._etags[url]
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked in __init__
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                body: bytes = response.read(MAX_ENVELOPE_BYTES + 1)
                etag = response.headers.get("ETag")
        except urllib.error.HTTPError as exc:
            if exc.code == 304:
                return None
            raise
        if len(body) > MAX_ENVELOPE_BYTES:
            raise ValueError(f"body larger than {MAX_ENVELOPE_BYTES} bytes")
        return body, etag

    def poll_once(self) -> None:
        """One round over every URL. Failures are per URL: one that cannot be fetched, or serves a body
        that is refused (or even trips a bug), is logged and the others are still polled."""
        for url in self.urls:
            try:
                self._poll_url(url)
            except Exception:  # the next URL must still be polled; the log has the trace
                log.exception("reference values poll failed", extra={"url": url})

    def _poll_url(self, url: str) -> None:
        try:
            fetched = self.fetch(url)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            log.warning("reference values fetch failed", extra={"url": url, "error": str(exc)})
            return
        if fetched is None:
            return
        body, etag = fetched
        try:
            new = self._importer(body, url)
        except SevError as exc:
            log.warning(
                "reference values rejected",
                extra={"url": url, "reason": exc.reason.value, "error": str(exc)},
            )
            return
        if etag:
            self._etags[url] = etag
        if new:
            log.info("reference values imported", extra={"url": url})

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.poll_once)
            except Exception:  # the poller must outlive any bug in one round; the log has the trace
                log.exception("reference values poll failed")
            await asyncio.sleep(self.interval)
