"""The plaintext health port (`--health-listen`) for Kubernetes' gRPC probes, through real servers on port 0.

It serves grpc.health.v1.Health and nothing else, without TLS; it reports what the mTLS server reports,
so a shutdown shows there as NOT_SERVING, and it closes once the server has stopped.
"""

from __future__ import annotations

import asyncio
import importlib
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
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sevlaunch.rpc import AuthzPolicy, RpcServer, method_rules, parse_args_with_env, secure_channel_sync
from sevlaunch.rpc.v1 import owner_pb2, owner_pb2_grpc

SERVICE = "sevlaunch.test.HealthPortTest"
ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _slow(request: bytes, context: Any) -> bytes:
    await asyncio.sleep(float(request.decode()))
    return b"done"


def _factory(tls_dir: Path) -> Any:
    async def build() -> RpcServer:
        server = RpcServer(
            service_name=SERVICE,
            tls_dir=tls_dir,
            identity="platform",
            authz=AuthzPolicy(method_rules(SERVICE, {"Slow": ["client"]})),
            listen="localhost:0",
            health_listen="127.0.0.1:0",
        )
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {"Slow": grpc.unary_unary_rpc_method_handler(_slow)},
        )
        server.grpc_server.add_generic_rpc_handlers((handler,))
        await server.start()
        return server

    return build


def _check(address: str, service: str = "", timeout: float = 5) -> int:
    with grpc.insecure_channel(address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return int(reply.status)


def test_health_port_serves_health_in_plaintext_and_nothing_else(serve: Any, tls_dir: Path) -> None:
    running = serve(_factory(tls_dir))
    port = running.server.health_port
    assert port and port != running.server.port
    health = f"127.0.0.1:{port}"
    assert _check(health) == SERVING
    assert _check(health, SERVICE) == SERVING
    with grpc.insecure_channel(health) as ch:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        # The service itself and reflection are not there: UNIMPLEMENTED, not a TLS or authz refusal.
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(f"/{SERVICE}/Slow", None, None)(b"0", timeout=5)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            list(
                reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
            )
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    # The mTLS port stays mTLS: plaintext gets no answer there.
    with grpc.insecure_channel(running.address) as ch, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE


def test_health_port_shows_shutdown_then_closes(serve: Any, tls_dir: Path) -> None:
    running = serve(_factory(tls_dir))
    health = f"127.0.0.1:{running.server.health_port}"
    results: list[bytes] = []
    with secure_channel_sync(running.address, tls_dir, "client") as ch:
        slow = ch.unary_unary(f"/{SERVICE}/Slow", None, None)
        slow(b"0", timeout=5)  # connection up before the race
        worker = threading.Thread(target=lambda: results.append(slow(b"1.0", timeout=10)))
        worker.start()
        time.sleep(0.2)
        stopping = threading.Thread(target=lambda: running.run(running.server.stop(grace=5)))
        stopping.start()
        time.sleep(0.2)
        # In the grace period: the in-flight call still runs, the probe already sees NOT_SERVING.
        assert _check(health) == NOT_SERVING
        assert _check(health, SERVICE) == NOT_SERVING
        worker.join(10)
        stopping.join(10)
    assert results == [b"done"]
    with pytest.raises(grpc.RpcError) as err:
        _check(health, timeout=2)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE


def test_platform_server_serves_its_health_port(start_platform: Any) -> None:
    running, _ = start_platform(health_listen="127.0.0.1:0")
    assert _check(f"127.0.0.1:{running.server.health_port}", "sevlaunch.v1.PlatformService") == SERVING


@pytest.mark.parametrize("module", ["platform_svc.server", "launcher_svc.server", "owner_svc.server"])
def test_every_server_takes_the_flag_and_its_variable(module: str, tmp_path: Path) -> None:
    mod = importlib.import_module(module)
    required = {
        "platform_svc.server": ["--emulator", str(tmp_path)],
        "launcher_svc.server": [],
        "owner_svc.server": ["--db", str(tmp_path / "db"), "--kek-file", str(tmp_path / "kek")],
    }[module]
    base = ["--tls-dir", str(tmp_path), *required]
    env = {"SEVLAUNCH_HEALTH_LISTEN": "0.0.0.0:50061"}
    cfg = mod.config_from_args(parse_args_with_env(mod.build_parser(), base, env=env))
    assert cfg.health_listen == "0.0.0.0:50061"
    argv = [*base, "--health-listen", "127.0.0.1:9"]
    assert mod.config_from_args(parse_args_with_env(mod.build_parser(), argv, env=env)).health_listen == (
        "127.0.0.1:9"
    )
    for off in ("", "off"):
        argv = [*base, "--health-listen", off]
        assert (
            mod.config_from_args(parse_args_with_env(mod.build_parser(), argv, env={})).health_listen is None
        )
    assert mod.config_from_args(parse_args_with_env(mod.build_parser(), base, env={})).health_listen is None


def test_owner_process_health_port_until_sigterm(tmp_path: Path, tls_dir: Path) -> None:
    """`sevlaunch-owner` with SEVLAUNCH_HEALTH_LISTEN: SERVING in plaintext; SIGTERM closes it."""
    env = {
        **os.environ,
        "SEVLAUNCH_TLS_DIR": str(tls_dir),
        "SEVLAUNCH_HEALTH_LISTEN": "127.0.0.1:0",
        "SEVLAUNCH_METRICS_LISTEN": "off",
    }
    argv = [sys.executable, "-m", "owner_svc.server", "--listen", "127.0.0.1:0", "--grace", "2"]
    argv += ["--db", str(tmp_path / "owner.db"), "--kek-file", str(tmp_path / "kek"), "--create-kek"]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    try:
        started: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while not started and time.monotonic() < deadline:
            record = lines.get(timeout=30)
            if record["message"] == "server started":
                started = record
        health = f"127.0.0.1:{started['health_port']}"
        assert _check(health) == SERVING
        assert _check(health, "sevlaunch.v1.OwnerService") == SERVING
        with grpc.insecure_channel(health) as ch, pytest.raises(grpc.RpcError) as err:
            owner_pb2_grpc.OwnerServiceStub(ch).ListSessions(owner_pb2.ListSessionsRequest(), timeout=5)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        with pytest.raises(grpc.RpcError) as err:
            _check(health, timeout=2)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
