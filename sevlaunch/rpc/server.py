"""The server builder: a grpc.aio server with mTLS, the shell interceptor, health, reflection, metrics.

    server = RpcServer(service_name="sevlaunch.v1.PlatformService", tls_dir=..., identity="platform",
                       authz=AuthzPolicy(method_rules(...)), listen="127.0.0.1:0", metrics_listen=":9101",
                       health_listen="0.0.0.0:50061")
    platform_pb2_grpc.add_PlatformServiceServicer_to_server(servicer, server.grpc_server)
    await server.start()            # binds, health SERVING, metrics HTTP up
    await server.serve_until_signal()  # SIGTERM/SIGINT → graceful stop

`health_listen` adds a second, plaintext server that serves only grpc.health.v1.Health, for probes that
cannot present a client certificate (Kubernetes' `grpc:` probes). It shares the HealthServicer with the
mTLS server, so it reports what that one reports (NOT_SERVING from the start of a shutdown), and it
closes after the mTLS server has stopped.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from sevlaunch.rpc.authz import AuthzPolicy
from sevlaunch.rpc.interceptor import ShellInterceptor
from sevlaunch.rpc.metrics import MetricsHTTPServer, RpcMetrics, service_label, start_metrics_server
from sevlaunch.rpc.tls import server_credentials

log = logging.getLogger("sevlaunch.rpc")

DEFAULT_GRACE_SECONDS = 10.0

#: The largest request a server accepts; gRPC refuses a larger one with RESOURCE_EXHAUSTED before any
#: handler runs (nothing parsed, nothing changed). The largest legitimate requests are a reference value
#: envelope (at most 1 MiB, `sevlaunch.refvalues.MAX_ENVELOPE_BYTES`) and a secret payload (at most the
#: 1 MiB secret area); 4 MiB leaves room for both and bounds what one call makes a server buffer.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class RpcServer:
    def __init__(
        self,
        *,
        service_name: str,
        tls_dir: str | Path,
        identity: str,
        authz: AuthzPolicy,
        listen: str = "127.0.0.1:0",
        metrics_listen: str | None = None,
        health_listen: str | None = None,
        grace: float = DEFAULT_GRACE_SECONDS,
        extra_service_names: Sequence[str] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.service_names = (service_name, *extra_service_names)
        self.metrics = RpcMetrics(service=service_label(service_name))
        self.grace = grace
        self._listen = listen
        self._metrics_listen = metrics_listen
        # Read the TLS material now so that a missing file fails at construction, before anything binds.
        self._credentials = server_credentials(tls_dir, identity)
        self.grpc_server: grpc.aio.Server = grpc.aio.server(
            interceptors=[ShellInterceptor(authz.with_standard_methods(), self.metrics)],
            # Set here, not left to gRPC's default: `options` may still override it.
            options=list({"grpc.max_receive_message_length": MAX_MESSAGE_BYTES, **dict(options)}.items()),
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self._health_listen = health_listen
        # Plaintext, so it gets nothing but the health service: no interceptor (no caller identity to
        # authorise), no reflection, no servicer of the service itself.
        self.health_server: grpc.aio.Server | None = None
        if health_listen is not None:
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_port: int | None = None
        self._metrics_http: MetricsHTTPServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._stop_task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_http.port if self._metrics_http else None

    @property
    def address(self) -> str:
        """A dialable address of the bound port (the listen host, or localhost for wildcard hosts)."""
        host = self._listen.rpartition(":")[0].strip("[]")
        if host in ("", "0.0.0.0", "::"):  # noqa: S104 - parsing, not binding
            host = "localhost"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> None:
        # Reflection after the servicers were added, so that it lists them.
        reflection.enable_server_reflection(
            [
                *self.service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.grpc_server,
        )
        self.port = _bind(self.grpc_server, self._listen, self._credentials)
        if self.health_server is not None and self._health_listen is not None:
            self.health_port = _bind(self.health_server, self._health_listen, None)
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self._metrics_listen:
            self._metrics_http = start_metrics_server(self._metrics_listen, self.metrics.registry)
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "server started",
            extra={
                "services": list(self.service_names),
                "port": self.port,
                "metrics_port": self.metrics_port,
                "health_port": self.health_port,
            },
        )

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(self.grace if grace is None else grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None
        log.info("server stopped")
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("signal received, shutting down", extra={"signal": sig.name, "grace_seconds": self.grace})
        # Keep a reference: the loop holds tasks weakly, and a collected stop task would never finish.
        self._stop_task = asyncio.get_running_loop().create_task(self.stop())

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def serve_until_signal(self) -> None:
        """Serves until SIGTERM or SIGINT, then stops gracefully. Call after start()."""
        self.install_signal_handlers()
        await self._stopped.wait()


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Binds a port (plaintext without credentials); OSError when it cannot."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # how grpc reports a failed bind
        port = 0
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return port
