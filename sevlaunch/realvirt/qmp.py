"""QMP framing for the stand-in: one JSON object per line, file descriptors riding along (SCM_RIGHTS).

libvirt sends one command at a time and waits for its answer (its monitor code is synchronous), so a
proxy can answer some commands itself and forward the rest without reordering anything.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any

_MAX_FDS = 16
_MAX_LINE = 16 << 20


class QmpConnection:
    """A QMP peer on a stream socket: `read()` gives (message, fds) or None at EOF; `write()` is
    thread-safe."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self._fds: list[int] = []
        self._wlock = threading.Lock()

    def read(self) -> tuple[dict[str, Any], list[int]] | None:
        while b"\n" not in self._buf:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, _MAX_FDS)
            except OSError:
                return None
            self._fds += fds
            if not data:
                return None
            self._buf += data
            if len(self._buf) > _MAX_LINE:
                raise ValueError("QMP message too long")
        line, _, self._buf = self._buf.partition(b"\n")
        fds, self._fds = self._fds, []
        if not line.strip():
            for fd in fds:
                os.close(fd)
            return self.read()
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("a QMP message is a JSON object")
        return message, fds

    def write(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message).encode() + b"\r\n"
        with self._wlock:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def reply(request: dict[str, Any], value: object) -> dict[str, Any]:
    out: dict[str, Any] = {"return": value}
    if "id" in request:
        out["id"] = request["id"]
    return out


def error(request: dict[str, Any], desc: str, klass: str = "GenericError") -> dict[str, Any]:
    out: dict[str, Any] = {"error": {"class": klass, "desc": desc}}
    if "id" in request:
        out["id"] = request["id"]
    return out
