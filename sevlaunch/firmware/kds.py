"""An emulated AMD Key Distribution Service for emulated chips.

AMD's KDS serves a chip's ASK-signed CEK at `GET /cek/id/<lower-hex GET_ID>` (PROTOCOL.md section 1),
and for SEV-SNP (VCEK/KDS specification, publication 57230; PROTOCOL.md section 11)

    /vcek/v1/{Milan|Genoa|Turin}/{hwid}?blSPL=&teeSPL=&snpSPL=&ucodeSPL=[&fmcSPL=]   the VCEK (DER)
    /vcek/v1/{product}/cert_chain     ASK then ARK (PEM)       /vlek/v1/{product}/cert_chain  ASVK, ARK
    /vcek/v1/{product}/crl            the ARK's CRL (DER)      /vlek/v1/{product}/crl

This server does the same for the chips it is given, with `http.server` (one thread per request), so
tests, the demo and `sevlaunch emulator kds` can run the platform service's real KDS client against it.
An unknown id is a 404, a malformed query a 400, as at AMD. AMD rate-limits its KDS (429 with
Retry-After); `rate_limit` (a window) and `throttle` (the next n requests) make this one do the same.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

from sevlaunch.firmware.emulator import EmulatedFirmware
from sevlaunch.firmware.status import FirmwareError
from sevlaunch.snp.tcb import Product, TcbVersion

log = logging.getLogger(__name__)

CEK_PATH_PREFIX = "/cek/id/"
_SPL_PARAMS = {
    "blSPL": "bootloader",
    "teeSPL": "tee",
    "snpSPL": "snp",
    "ucodeSPL": "microcode",
    "fmcSPL": "fmc",
}


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/octet-stream"
    headers: tuple[tuple[str, str], ...] = ()


class _Limiter:
    """At most `limit` requests per `window` seconds, then 429 with Retry-After; or the next n requests
    429 whatever the rate (`throttle`)."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.window = 1.0
        self.retry_after = 1
        self.forced = 0
        self._times: list[float] = []

    def check(self, now: float) -> int | None:
        """None to serve the request, else the Retry-After seconds of a 429."""
        if self.forced > 0:
            self.forced -= 1
            return self.retry_after
        if self.limit is None:
            return None
        self._times = [t for t in self._times if now - t < self.window]
        if len(self._times) >= self.limit:
            return self.retry_after
        self._times.append(now)
        return None


class KDSServer:
    """Serves `/cek/id/<chip id>` for each emulated chip directory given.

    `KDSServer(chips, host="127.0.0.1", port=0)`; `start()` runs it in a daemon thread, `url` is its
    base URL once bound, `stop()` shuts it down. Also a context manager.
    """

    def __init__(
        self, chips: Iterable[EmulatedFirmware | str | Path], *, host: str = "127.0.0.1", port: int = 0
    ):
        self._chips: dict[str, EmulatedFirmware] = {}
        for chip in chips:
            firmware = chip if isinstance(chip, EmulatedFirmware) else EmulatedFirmware(chip, create=False)
            self._chips[firmware.chip_id_hex()] = firmware
        self.requests = 0
        #: Requests answered by path kind ("cek", "vcek", "cert_chain", "crl", "rate_limited", ...).
        self.counts: dict[str, int] = {}
        self._limiter = _Limiter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def cek_for(self, chip_id_hex: str) -> bytes | None:
        """The ASK-signed CEK of a known chip (freshly signed, as the KDS does), else None."""
        firmware = self._chips.get(chip_id_hex)
        return firmware.kds_cek() if firmware is not None else None

    # -- rate limiting, switched on by tests ----------------------------------------------------------

    def rate_limit(self, limit: int | None, *, window: float = 1.0, retry_after: int = 1) -> None:
        """At most `limit` answered requests per `window` seconds (None: no limit); the others get
        429 with `Retry-After: retry_after`."""
        with self._lock:
            self._limiter.limit, self._limiter.window, self._limiter.retry_after = limit, window, retry_after

    def throttle(self, count: int, *, retry_after: int = 1) -> None:
        """The next `count` requests get 429 with `Retry-After: retry_after`."""
        with self._lock:
            self._limiter.forced, self._limiter.retry_after = count, retry_after

    def count(self, kind: str) -> int:
        with self._lock:
            return self.counts.get(kind, 0)

    # -- SEV-SNP ------------------------------------------------------------------------------------

    def _snp_chips(self, product: Product) -> dict[str, EmulatedFirmware]:
        return {fw.snp_hwid().hex(): fw for fw in self._chips.values() if fw.config.snp_product is product}

    def snp_reply(self, path: str, query: str) -> tuple[str, Reply]:
        """(kind, reply) for a `/vcek/v1/...` or `/vlek/v1/...` request."""
        parts = path.strip("/").split("/")
        if len(parts) != 4 or parts[0] not in ("vcek", "vlek") or parts[1] != "v1":
            return "unknown", Reply(HTTPStatus.NOT_FOUND)
        family, product_name, leaf = parts[0], parts[2], parts[3]
        product = next((p for p in Product if p.kds_name == product_name), None)
        if product is None:
            return "unknown", Reply(HTTPStatus.NOT_FOUND)
        chips = self._snp_chips(product)
        if not chips:
            return "unknown", Reply(HTTPStatus.NOT_FOUND)
        any_chip = next(iter(chips.values()))
        if leaf == "cert_chain":
            pem = any_chip.snp_cert_chain_pem(vlek=family == "vlek")
            return "cert_chain", Reply(HTTPStatus.OK, pem, "application/x-pem-file")
        if leaf == "crl":
            return "crl", Reply(HTTPStatus.OK, any_chip.snp_crl_der(), "application/pkix-crl")
        if family != "vcek" or leaf != leaf.lower() or leaf not in chips:
            return "vcek", Reply(HTTPStatus.NOT_FOUND)
        tcb = _tcb_from_query(query, product)
        if tcb is None:
            return "vcek", Reply(HTTPStatus.BAD_REQUEST)
        return "vcek", Reply(HTTPStatus.OK, chips[leaf].snp_vcek_der(tcb), "application/x-x509-ca-cert")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "sevlaunch-emulated-kds"

            def _send(self, kind: str, reply: Reply) -> None:
                with server._lock:
                    server.counts[kind] = server.counts.get(kind, 0) + 1
                if reply.status != HTTPStatus.OK:
                    self.send_response(reply.status)
                    for name, value in reply.headers:
                        self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                    retry_after = server._limiter.check(time.monotonic())
                if retry_after is not None:
                    headers = (("Retry-After", str(retry_after)),)
                    self._send("rate_limited", Reply(HTTPStatus.TOO_MANY_REQUESTS, headers=headers))
                    return
                split = urlsplit(self.path)
                path = split.path
                if path.startswith(("/vcek/", "/vlek/")):
                    try:
                        kind, reply = server.snp_reply(path, split.query)
                    except FirmwareError as exc:  # the chip's state is damaged: AMD would say 500
                        log.warning("kds: cannot issue for %s: %s", path[:40], exc)
                        kind, reply = "error", Reply(HTTPStatus.INTERNAL_SERVER_ERROR)
                    self._send(kind, reply)
                    return
                body: bytes | None = None
                if path.startswith(CEK_PATH_PREFIX):
                    chip = path[len(CEK_PATH_PREFIX) :]
                    # AMD's KDS takes the lower-hex id; anything else is simply not found.
                    if chip == chip.lower():
                        try:
                            body = server.cek_for(chip)
                        except FirmwareError as exc:  # the chip's state is damaged: AMD would say 500
                            log.warning("kds: cannot sign the CEK of chip %s: %s", chip[:16], exc)
                            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, "chip unavailable")
                            return
                if body is None:
                    self.send_error(HTTPStatus.NOT_FOUND, "unknown chip id")
                    return
                self._send("cek", Reply(HTTPStatus.OK, body))

            def log_message(self, format: str, *args: object) -> None:
                log.debug("kds: " + format, *args)

        return Handler

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def start(self) -> KDSServer:
        # A short poll interval: stop() waits up to one interval, and tests and the demo stop it often.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="emulated-kds",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> KDSServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _tcb_from_query(query: str, product: Product) -> TcbVersion | None:
    """The TCB of a VCEK request's SPL parameters; None when one is missing, repeated, unknown or not
    0..255 (fmcSPL is required on Turin and refused elsewhere)."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        return None
    wanted = {k for k, v in _SPL_PARAMS.items() if v != "fmc" or product.has_fmc}
    if set(params) != wanted or any(len(v) != 1 for v in params.values()):
        return None
    values: dict[str, int] = {}
    for name, (text,) in params.items():
        if not text.isdigit() or int(text) > 0xFF:
            return None
        values[_SPL_PARAMS[name]] = int(text)
    return TcbVersion(product, **values)
