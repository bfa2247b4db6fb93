"""Prometheus metrics of the server shell, in a registry per server.

A per-server `CollectorRegistry` (not the global default) lets several servers live in one process, as
they do in tests; services register their own metrics in `RpcMetrics.registry`. Labels are method and
status code names only: never identities, ids or anything secret.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "sevlaunch_rpc_requests",
            "RPCs handled, by full method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sevlaunch_rpc_duration_seconds",
            "RPC handling time, by full method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.denied = Counter(
            "sevlaunch_rpc_denied",
            "RPCs refused by authorisation, by full method",
            ["method"],
            registry=self.registry,
        )
        self.undecodable = Counter(
            "sevlaunch_rpc_undecodable_requests",
            "Requests of authorised callers whose bytes are not a message of the RPC's type, by full method",
            ["method"],
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


def split_host_port(address: str) -> tuple[str, int]:
    """"HOST:PORT", "[::1]:PORT" or ":PORT" → (host, port); an empty host means all interfaces."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - an explicit ":PORT" asks for every interface
    return host, int(port)


def start_metrics_server(address: str, registry: CollectorRegistry) -> MetricsHTTPServer:
    host, port = split_host_port(address)
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsHTTPServer(httpd, thread)
