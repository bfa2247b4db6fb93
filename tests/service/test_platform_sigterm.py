"""`sevlaunch-platform` as a real process: env-var flags, JSON logs, SIGTERM lets in-flight calls finish."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from sevlaunch.rpc import secure_channel_sync
from sevlaunch.rpc.v1 import platform_pb2 as pb
from sevlaunch.rpc.v1 import platform_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def _json_lines(stream: Any, out: queue.Queue[dict[str, Any]]) -> None:
    for line in stream:
        out.put(json.loads(line))  # every log line must be one JSON object


def test_sigterm_lets_in_flight_calls_finish(tls_dir: Path, emulated_chip: Any, scripted_kds: Any) -> None:
    cek = emulated_chip.kds_cek()
    # The KDS answers only once the server has taken the SIGTERM: the chain call is in flight then.
    answer = threading.Event()
    kds = scripted_kds(lambda n: (answer.wait(15), (200, {}, cek))[1])
    env = {
        **os.environ,
        "SEVLAUNCH_TLS_DIR": str(tls_dir),
        "SEVLAUNCH_EMULATOR": str(emulated_chip.state_dir),
        "SEVLAUNCH_KDS_URL": kds.url,
        "SEVLAUNCH_METRICS_LISTEN": "off",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "platform_svc.server",
            "--listen",
            "127.0.0.1:0",
            "--grace",
            "8",
            "--kds-timeout",
            "10",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    logs: queue.Queue[dict[str, Any]] = queue.Queue()
    reader = threading.Thread(target=_json_lines, args=(proc.stderr, logs), daemon=True)
    reader.start()
    try:
        port = None
        deadline = time.monotonic() + 20
        while port is None and time.monotonic() < deadline:
            record = logs.get(timeout=20)
            if record["message"] == "server started":
                port = record["port"]
        assert port, "server did not start"
        address = f"localhost:{port}"
        results: list[object] = []

        def call() -> None:
            with secure_channel_sync(address, tls_dir, "launcher") as ch:
                stub = platform_pb2_grpc.PlatformServiceStub(ch)
                try:
                    reply = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=15)
                    results.append(reply.cek_source)
                except grpc.RpcError as err:
                    results.append(err.code())

        callers = [threading.Thread(target=call) for _ in range(5)]
        for t in callers:
            t.start()
        while kds.requests == 0 and time.monotonic() < deadline:  # the export is under way
            time.sleep(0.02)
        time.sleep(0.2)  # the other callers' calls reach the server and join the export
        proc.send_signal(signal.SIGTERM)
        messages = []
        while not any(m["message"] == "signal received, shutting down" for m in messages):
            messages.append(logs.get(timeout=15))
        answer.set()
        for t in callers:
            t.join(15)
        assert results == ["kds"] * 5
        assert proc.wait(timeout=15) == 0
        with secure_channel_sync(address, tls_dir, "launcher") as ch:
            try:
                platform_pb2_grpc.PlatformServiceStub(ch).GetIdentifier(pb.GetIdentifierRequest(), timeout=2)
                raise AssertionError("server still answering after SIGTERM")
            except grpc.RpcError as err:
                assert err.code() is grpc.StatusCode.UNAVAILABLE
        reader.join(5)
        while not logs.empty():
            messages.append(logs.get())
        assert any(m["message"] == "signal received, shutting down" for m in messages)
        assert any(m["message"] == "server stopped" for m in messages)
        ok_rpcs = [m for m in messages if m["message"] == "rpc" and m.get("code") == "OK"]
        assert len(ok_rpcs) == 5 and all(m["identity"] == "launcher" for m in ok_rpcs)
    finally:
        answer.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
