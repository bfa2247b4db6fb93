"""An emulated AMD Key Distribution Service for emulated chips.

AMD's KDS serves a chip's ASK-signed CEK at `GET /cek/id/<lower-hex GET_ID>` (PROTOCOL.md section 1);
this server does the same for the chips it is given, with `http.server` (one thread per request), so
tests, the demo and `sevlaunch emulator kds` can run the platform service's real KDS client against it.
An unknown or malformed id is a 404, as at AMD.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from sevlaunch.firmware.emulator import EmulatedFirmware
from sevlaunch.firmware.status import FirmwareError

log = logging.getLogger(__name__)

CEK_PATH_PREFIX = "/cek/id/"


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

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "sevlaunch-emulated-kds"

            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                path = self.path.split("?", 1)[0]
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
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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
