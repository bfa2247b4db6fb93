"""Prometheus metrics of the server shell, in a registry per server.

A per-server `CollectorRegistry` (not the global default) lets several servers live in one process, as
they do in tests; services register their own metrics in `RpcMetrics.registry`. Labels are method,
service and status code names only: never identities, ids or anything secret.

The gRPC series follow the names and labels dashboards for gRPC servers already use (those of the Go
and Java gRPC Prometheus interceptors): `grpc_server_started_total`, `grpc_server_handled_total` and
`grpc_server_handling_seconds` with `grpc_type`, `grpc_service` (the full service name,
`sevlaunch.v1.LauncherService`), `grpc_method` (`Launch`) and `grpc_code` (`OK`, `PERMISSION_DENIED`);
outgoing calls are `grpc_client_*` with the same labels (`ClientMetrics`, `sevlaunch.rpc.client`). The
process series (`process_*`, `python_*`) and `sevlaunch_build_info{service,version}` come with every
server's registry.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

#: `grpc_type` values: how many messages each side sends.
UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI_STREAM = "unary", "client_stream", "server_stream", "bidi_stream"


def split_method(full_method: str) -> tuple[str, str]:
    """ "/sevlaunch.v1.LauncherService/Launch" -> ("sevlaunch.v1.LauncherService", "Launch")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return (service or "unknown"), (method or "unknown")


def grpc_type(*, client_streaming: bool, server_streaming: bool) -> str:
    if client_streaming and server_streaming:
        return BIDI_STREAM
    if client_streaming:
        return CLIENT_STREAM
    return SERVER_STREAM if server_streaming else UNARY


def service_label(service_name: str) -> str:
    """The short service name of `sevlaunch_build_info`: "sevlaunch.v1.PlatformService" -> "platform"."""
    return service_name.rpartition(".")[2].removesuffix("Service").lower() or service_name


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, service: str = "") -> None:
        from sevlaunch import __version__

        self.registry = registry or CollectorRegistry()
        # The process's CPU, memory, file descriptors and start time (Linux /proc), and the Python
        # version: the series every Prometheus client exports by default, here in the server's registry.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.build_info = Gauge(
            "sevlaunch_build_info",
            "Always 1; the labels say which sevlaunch version this service runs",
            ["service", "version"],
            registry=self.registry,
        )
        if service:
            self.build_info.labels(service, __version__).set(1)
        self.started = Counter(
            "grpc_server_started",
            "RPCs started on the server (after the TLS handshake, before authorisation)",
            GRPC_LABELS,
            registry=self.registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code",
            (*GRPC_LABELS, "grpc_code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status, seconds",
            GRPC_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.outcomes = Counter(
            "sevlaunch_rpc_outcomes",
            "RPCs completed, by outcome: ok, refused (the caller's request was refused: a client-fault "
            "status, or a stream that reported a refusal in its messages), or error",
            ("grpc_service", "grpc_method", "outcome"),
            registry=self.registry,
        )
        self.denied = Counter(
            "sevlaunch_rpc_denied",
            "RPCs refused by authorisation",
            ("grpc_service", "grpc_method"),
            registry=self.registry,
        )
        self.undecodable = Counter(
            "sevlaunch_rpc_undecodable_requests",
            "Requests of authorised callers whose bytes are not a message of the RPC's type",
            ("grpc_service", "grpc_method"),
            registry=self.registry,
        )


@dataclass
class MetricsHTTPServer:
    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_port)

    def close(self, *, wait: bool = False) -> None:
        """Stops serving. `shutdown()` blocks for up to the server's 0.5 s poll interval, so by default
        it runs in the background: a stopping gRPC server (or a test teardown) need not wait for it."""

        def _shutdown() -> None:
            self.httpd.shutdown()
            self.httpd.server_close()

        closer = threading.Thread(target=_shutdown, name="metrics-http-close", daemon=True)
        closer.start()
        if wait:
            closer.join(timeout=5)
            self.thread.join(timeout=5)


def split_host_port(address: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:  # noqa: S104
    """ "HOST:PORT", "[::1]:PORT" or ":PORT" → (host, port); an empty host is `default_host`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    host = host.strip("[]") or default_host
    return host, int(port)


def start_metrics_server(address: str, registry: CollectorRegistry) -> MetricsHTTPServer:
    """Serves /metrics. A bare ":PORT" means localhost: metrics reveal load and refusals, so listening
    on every interface must be asked for by name (0.0.0.0:PORT, as the Kubernetes manifests do)."""
    host, port = split_host_port(address, default_host="127.0.0.1")
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsHTTPServer(httpd, thread)
