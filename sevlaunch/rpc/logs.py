"""JSON logs: one object per line on stderr, so log shippers need no parser configuration."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any, Protocol

from sevlaunch.rpc.launchid import current_launch_id

# LogRecord attributes that are plumbing, not content; everything else passed via `extra=` is emitted.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as a JSON object: time, level, logger, message, and the record's `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # The launch this line belongs to (an incoming call's x-sevlaunch-launch-id, or a launch scope):
        # one id ties the launcher's, platform's and owner's lines of a launch together.
        launch_id = current_launch_id()
        if launch_id is not None:
            obj["launch_id"] = launch_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                obj[key] = value
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, separators=(",", ":"))


class TextSink(Protocol):
    """What a logging handler writes to: stderr, or the router's direct stream (`stderr.json_stderr`)."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> None: ...


def configure_logging(level: str | int = "INFO", stream: TextSink | None = None) -> None:
    """Routes the root logger to `stream` (default stderr) as JSON lines (idempotent: replaces earlier
    handlers)."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    # The JSON lines leave out a record's source file, thread and process (standard attributes), so
    # logging need not find them: the caller's frame walk and the thread/process look-ups were ~20% of
    # a record's cost, and a busy service writes several records per request.
    logging._srcfile = None  # the documented switch for the frame walk (findCaller)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Python warnings are printed raw by default (file:line and a source line): log them as records.
    logging.captureWarnings(True)
