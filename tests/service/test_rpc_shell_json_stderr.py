"""Issue 12, item 10: every line a service writes is JSON, including the gRPC core's own lines.

The core logs TLS handshake failures (a client that rejects the server's name, a certificate from a
foreign CA, no certificate, plaintext bytes) straight to fd 2 in glog form; a real owner process is
provoked with each, and every line of its stderr must parse as a JSON object.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from sevlaunch.rpc.stderr import to_json_line
from sevlaunch.rpc.v1 import owner_pb2, owner_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def _provoke(port: int, tls_dir: Path, foreign_tls_dir: Path) -> None:
    ca = (tls_dir / "ca.pem").read_bytes()
    attempts = [
        # The client expects another name than the server's certificate has: a TLS name mismatch.
        (
            grpc.ssl_channel_credentials(
                ca, (tls_dir / "client.key").read_bytes(), (tls_dir / "client.pem").read_bytes()
            ),
            [("grpc.ssl_target_name_override", "platform.sevlaunch.internal")],
        ),
        # A certificate from another CA.
        (
            grpc.ssl_channel_credentials(
                ca,
                (foreign_tls_dir / "client.key").read_bytes(),
                (foreign_tls_dir / "client.pem").read_bytes(),
            ),
            [],
        ),
        # No certificate at all.
        (grpc.ssl_channel_credentials(ca), []),
    ]
    for creds, options in attempts:
        with grpc.secure_channel(f"localhost:{port}", creds, options=options) as ch:
            stub = owner_pb2_grpc.OwnerServiceStub(ch)
            with pytest.raises(grpc.RpcError):
                stub.ListSessions(owner_pb2.ListSessionsRequest(), timeout=3)
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(3)
        try:
            sock.recv(100)
        except OSError:
            pass


def test_grpc_core_lines_on_tls_name_mismatch_and_bad_peers_come_out_as_json(
    tmp_path: Path, tls_dir: Path, foreign_tls_dir: Path
) -> None:
    env = {**os.environ, "SEVLAUNCH_TLS_DIR": str(tls_dir), "SEVLAUNCH_METRICS_LISTEN": "off"}
    env.pop("GRPC_VERBOSITY", None)
    env["GRPC_TRACE"] = ""  # the defaults: nothing silenced by the test's environment
    argv = [sys.executable, "-m", "owner_svc.server", "--listen", "127.0.0.1:0", "--grace", "1"]
    argv += ["--db", str(tmp_path / "owner.db"), "--kek-file", str(tmp_path / "kek"), "--create-kek"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    raw_lines: queue.Queue[bytes] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            raw_lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[bytes] = []
    try:
        port = 0
        deadline = time.monotonic() + 30
        while not port and time.monotonic() < deadline:
            line = raw_lines.get(timeout=30)
            seen.append(line)
            record = json.loads(line)
            if record.get("message") == "server started":
                port = record["port"]
        assert port
        _provoke(port, tls_dir, foreign_tls_dir)
        time.sleep(0.3)  # the core logs a failed handshake after the client saw it fail
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    while not raw_lines.empty():
        seen.append(raw_lines.get())
    records: list[dict[str, Any]] = []
    for line in seen:
        record = json.loads(line)  # every line, or this fails with the offending line
        assert isinstance(record, dict), line
        records.append(record)
    core = [r for r in records if r["logger"] == "grpc"]
    assert core, "the provocations should have made the gRPC core log (else this test proves nothing)"
    assert any("Handshake failed" in r["message"] for r in core), core
    assert all(r.get("source") and r["level"] in ("info", "warning", "error") for r in core)
    # A clean stop; after it only the owner's shutdown audit checkpoint (issue 12, item 1) may follow.
    stops = [i for i, r in enumerate(records) if r["message"] == "server stopped"]
    assert stops, records[-3:]
    assert all(r["message"] == "audit checkpoint" for r in records[stops[-1] + 1 :]), records[stops[-1] :]


@pytest.mark.parametrize(
    ("raw", "logger", "level"),
    [
        (b"E1206 11:58:36.195059   19204 ssl_transport_security.cc:3238] No match found for server name: x",
         "grpc", "error"),
        (b"I1206 11:58:43.463720   19570 ssl_transport_security.cc:2563] Handshake failed", "grpc", "info"),
        (b"W0000 00:00:1733485116.1 1 init.cc:1] odd", "grpc", "warning"),
        (b"Traceback (most recent call last):", "stderr", "warning"),
        (b"\xff\xfe not utf-8", "stderr", "warning"),
        (b"{not json", "stderr", "warning"),
        (b"[1, 2]", "stderr", "warning"),
    ],
)
def test_a_raw_stderr_line_becomes_one_json_record(raw: bytes, logger: str, level: str) -> None:
    record = json.loads(to_json_line(raw))
    assert (record["logger"], record["level"]) == (logger, level)
    assert record["message"]


def test_a_json_line_passes_unchanged() -> None:
    line = b'{"time":"t","level":"info","logger":"sevlaunch.rpc","message":"rpc"}'
    assert to_json_line(line) == line
