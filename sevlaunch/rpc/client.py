"""Client interceptors: the current launch id on every outgoing call, and client-side gRPC metrics.

    metrics = ClientMetrics(server.metrics.registry)             # grpc_client_* in the service's registry
    channel = grpc.aio.secure_channel(target, creds, interceptors=aio_client_interceptors(metrics))
    with launch_id_scope(launch_id):                             # sevlaunch.rpc.launchid
        await stub.OpenSession(...)     # carries x-sevlaunch-launch-id; counted in grpc_client_handled_total

`secure_channel` / `secure_channel_sync` (sevlaunch.rpc.tls) install these by default, so a channel made
there passes the launch id on without further wiring. The metrics follow the gRPC Prometheus
conventions: `grpc_client_started_total`, `grpc_client_handled_total` (with `grpc_code`) and
`grpc_client_handling_seconds`, labelled `grpc_type`, `grpc_service`, `grpc_method`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry, Counter, Histogram

from sevlaunch.rpc.launchid import with_launch_id
from sevlaunch.rpc.metrics import GRPC_LABELS, LATENCY_BUCKETS, SERVER_STREAM, UNARY, split_method


class ClientMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_client_started", "RPCs started by this process", GRPC_LABELS, registry=registry
        )
        self.handled = Counter(
            "grpc_client_handled",
            "RPCs this process made that completed, by status code",
            (*GRPC_LABELS, "grpc_code"),
            registry=registry,
        )
        self.latency = Histogram(
            "grpc_client_handling_seconds",
            "Time from the start of an outgoing RPC to its status, seconds",
            GRPC_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def begin(self, kind: str, method: str) -> Callable[[grpc.StatusCode | None], None]:
        """Counts a started call; returns the function that records its end with its status code."""
        service, name = split_method(method)
        self.started.labels(kind, service, name).inc()
        start = time.perf_counter()

        def end(code: grpc.StatusCode | None) -> None:
            status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            self.handled.labels(kind, service, name, status).inc()
            self.latency.labels(kind, service, name).observe(time.perf_counter() - start)

        return end


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


# ------------------------------------------------------------------------------------ blocking


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _SyncDetails(_Details, grpc.ClientCallDetails):  # type: ignore[misc]
    pass


if TYPE_CHECKING:
    _SyncUU = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _SyncUS = grpc.UnaryStreamClientInterceptor[Any, Any]
else:
    _SyncUU = grpc.UnaryUnaryClientInterceptor
    _SyncUS = grpc.UnaryStreamClientInterceptor


class SyncClientInterceptor(_SyncUU, _SyncUS):
    """For `grpc.intercept_channel`: launch id metadata and (optional) client metrics."""

    def __init__(self, metrics: ClientMetrics | None = None) -> None:
        self._metrics = metrics

    def _details(self, details: grpc.ClientCallDetails) -> _SyncDetails:
        return _SyncDetails(
            _method_name(details.method),
            details.timeout,
            with_launch_id(details.metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def _call(self, kind: str, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        new = self._details(details)
        call = continuation(new, request)
        if self._metrics is not None:
            end = self._metrics.begin(kind, new.method)
            call.add_done_callback(lambda done: end(done.code()))
        return call

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._call(UNARY, continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._call(SERVER_STREAM, continuation, client_call_details, request)


# -------------------------------------------------------------------------------------- asyncio

if TYPE_CHECKING:
    _AioUU = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _AioUS = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
else:
    _AioUU = grpc.aio.UnaryUnaryClientInterceptor
    _AioUS = grpc.aio.UnaryStreamClientInterceptor


class _AioBase:
    def __init__(self, metrics: ClientMetrics | None) -> None:
        self._metrics = metrics
        self._pending: set[asyncio.Task[None]] = set()

    @staticmethod
    def _details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*with_launch_id(tuple(details.metadata or ())))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    def _track(self, kind: str, method: str | bytes, call: Any) -> None:
        if self._metrics is None:
            return
        end = self._metrics.begin(kind, _method_name(method))

        async def record(done: Any) -> None:
            end(await done.code())

        def on_done(done: Any) -> None:
            # aio's code() is a coroutine (answered at once here: the call is over).
            task = asyncio.get_running_loop().create_task(record(done))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        call.add_done_callback(on_done)


class AioUnaryUnaryInterceptor(_AioBase, _AioUU):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details = self._details(client_call_details)
        call = await continuation(details, request)
        self._track(UNARY, details.method, call)
        return call


class AioUnaryStreamInterceptor(_AioBase, _AioUS):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details = self._details(client_call_details)
        call = await continuation(details, request)
        self._track(SERVER_STREAM, details.method, call)
        return call


def aio_client_interceptors(metrics: ClientMetrics | None = None) -> list[Any]:
    """The interceptors for `grpc.aio.secure_channel(..., interceptors=...)`."""
    return [AioUnaryUnaryInterceptor(metrics), AioUnaryStreamInterceptor(metrics)]


def intercept_sync(channel: grpc.Channel, metrics: ClientMetrics | None = None) -> grpc.Channel:
    """A blocking channel whose calls carry the launch id (and are counted with `metrics`)."""
    return grpc.intercept_channel(channel, SyncClientInterceptor(metrics))
