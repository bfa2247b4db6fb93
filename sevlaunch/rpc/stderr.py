"""Every line a server writes to stderr is JSON, including the lines Python's logging never sees.

gRPC's C core logs through its own (absl) logger straight to file descriptor 2: TLS handshake failures,
name mismatches, resolver errors, in glog's `E1206 11:58:36.195059 19204 file.cc:3238] text` form, at a
rate an outsider controls (one line per failed handshake). Its verbosity is read once, when the library
is loaded, so an environment variable set by the server would come too late; and the lines are worth
keeping, as JSON. So while a server runs, fd 2 is a pipe: a thread passes JSON lines through to the real
stderr and wraps every other line as a JSON record (logger `grpc`, level from the glog prefix, the
source file and line), so log shippers see one format.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

from sevlaunch.rpc.logs import JsonFormatter, TextSink

#: glog / absl prefix: severity letter, MMDD, time, thread id, file:line].
_GLOG = re.compile(rb"^([IWEF])\d{4} [0-9:.]+\s+\d+ ([^\]\s]+:\d+)\] ?(.*)$")
_LEVELS = {b"I": logging.INFO, b"W": logging.WARNING, b"E": logging.ERROR, b"F": logging.CRITICAL}
_MAX_LINE = 16 * 1024


def to_json_line(raw: bytes, formatter: logging.Formatter | None = None) -> bytes:
    """The JSON line for one line of stderr (without its newline): unchanged when it is a JSON object
    already, else a record of logger `grpc` (glog-prefixed lines) or `stderr` (anything else)."""
    text = raw.rstrip(b"\r")
    if text.startswith(b"{"):
        try:
            if isinstance(json.loads(text), dict):
                return text
        except ValueError:
            pass
    if len(text) > _MAX_LINE:
        text = text[:_MAX_LINE] + b"...(truncated)"
    match = _GLOG.match(text)
    extra: dict[str, str] = {}
    if match:
        level, name, message = _LEVELS[match.group(1)], "grpc", match.group(3)
        extra["source"] = match.group(2).decode("utf-8", "replace")
    else:
        level, name, message = logging.WARNING, "stderr", text
    record = logging.LogRecord(name, level, "", 0, message.decode("utf-8", "replace"), None, None)
    record.__dict__.update(extra)
    return (formatter or JsonFormatter()).format(record).encode()


class DirectStream:
    """A text stream onto the real stderr, past the pipe: for Python's logging, whose lines are JSON
    already. Through the pipe each line cost two more system calls, a thread wake-up and a JSON parse
    (the owner logs ~4 lines per session, ~10% of its CPU under load). Writes of whole lines, under the
    router's lock, so they never interleave with the router's own."""

    name = "<stderr>"

    def __init__(self, fd: int, lock: threading.Lock) -> None:
        self.fd = fd
        self._lock = lock

    def write(self, text: str) -> int:
        view = memoryview(text.encode("utf-8", "backslashreplace"))
        with self._lock:
            while view:
                view = view[os.write(self.fd, view) :]
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered."""


class _Router:
    def __init__(self) -> None:
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.lock = threading.Lock()
        self.direct = DirectStream(self.saved, self.lock)
        read_end, write_end = os.pipe()
        os.set_inheritable(read_end, False)
        os.dup2(write_end, 2)
        os.close(write_end)
        self.read_end = read_end
        self.formatter = JsonFormatter()
        self.thread = threading.Thread(target=self._pump, name="stderr-json", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(self.read_end, 65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > _MAX_LINE:  # a line without end: emit what there is
                    lines.append(pending)
                    pending = b""
                self._emit(lines)
            if pending:
                self._emit([pending])
        except OSError:
            pass
        finally:
            os.close(self.read_end)

    def _emit(self, lines: list[bytes]) -> None:
        out = b"".join(to_json_line(line, self.formatter) + b"\n" for line in lines if line.strip())
        view = memoryview(out)
        with self.lock:
            while view:
                written = os.write(self.saved, view)
                view = view[written:]

    def close(self) -> None:
        """Restores fd 2; the pipe's last writer goes with it, so the thread drains it and ends."""
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(self.saved, 2)
        self.thread.join(timeout=5)
        with self.lock:
            self.direct.fd = 2  # a handler still holding the stream writes to the restored stderr
            os.close(self.saved)


def _writes_to_fd2(stream: object) -> bool:
    try:
        return bool(stream.fileno() == 2)  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


@contextlib.contextmanager
def json_stderr() -> Iterator[TextSink]:
    """Within the block, every line written to fd 2 (by Python, the gRPC core or any library) comes
    out on the real stderr as one JSON object. Yields the stream for Python's logging handler, whose
    lines are JSON already and need no routing: the real stderr, past the pipe, when sys.stderr is fd 2;
    else (a caller that replaced sys.stderr, as a test capturing it does) sys.stderr itself."""
    router = _Router()
    try:
        yield router.direct if _writes_to_fd2(sys.stderr) else sys.stderr
    finally:
        router.close()
