"""Optional OpenTelemetry tracing of the gRPC shell: off unless a service is given `--otlp-endpoint`.

With an endpoint (`--otlp-endpoint http://collector:4317`, or SEVLAUNCH_OTLP_ENDPOINT), `configure`
installs a tracer provider exporting over OTLP/gRPC in batches, and then:

* the server shell (`interceptor.py`) opens a SERVER span for every authorised call, continuing the
  caller's trace from the W3C `traceparent`/`tracestate` metadata, beside `x-sevlaunch-launch-id`;
* the client interceptors (`client.py`) open a CLIENT span for every outgoing call and send its context
  in that metadata, so one launch is one trace across the launcher, the platform and the owner;
* `span(name, attributes)` opens an INTERNAL span (the launcher's phases, through its core's port).

Spans are named `package.Service/Method` and carry the OpenTelemetry RPC attributes (`rpc.system`,
`rpc.service`, `rpc.method`, `rpc.grpc.status_code`) and `sevlaunch.launch_id`. Nothing else from a
request is recorded: no bodies, no metadata, no secrets. Without an endpoint nothing here imports
OpenTelemetry and every hook is one `is None` test; the packages come with `sevlaunch[otel]`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sevlaunch.rpc.launchid import current_launch_id

log = logging.getLogger("sevlaunch.rpc")

TRACE_HEADERS = ("traceparent", "tracestate")
ENDPOINT_HELP = (
    "send OpenTelemetry traces over OTLP/gRPC to this collector URL, e.g. http://127.0.0.1:4317 "
    "(https:// verifies the collector with the system's CAs); '' or 'off' disables (needs sevlaunch[otel])"
)


class TracingConfigError(ValueError):
    """`--otlp-endpoint` is not a URL this build can export to (or OpenTelemetry is not installed)."""


@dataclass
class _Tracing:
    provider: Any
    tracer: Any
    propagator: Any


_active: _Tracing | None = None


def enabled() -> bool:
    return _active is not None


def parse_endpoint(endpoint: str) -> tuple[str, bool]:
    """(host:port, insecure) of an `http://` or `https://` collector URL."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise TracingConfigError(
            f"--otlp-endpoint {endpoint!r}: give the collector as http://HOST:PORT or https://HOST:PORT"
        )
    try:
        port = parts.port or 4317
    except ValueError:
        raise TracingConfigError(f"--otlp-endpoint {endpoint!r}: the port is not a number") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}", parts.scheme == "http"


def configure(service_name: str, endpoint: str | None, *, exporter: Any = None) -> None:
    """Starts tracing for this process (`endpoint` None or '' leaves it off). `exporter` replaces the
    OTLP exporter (tests hand in the SDK's in-memory one)."""
    global _active
    if not endpoint and exporter is None:
        return
    target, insecure = parse_endpoint(endpoint) if endpoint else ("", True)
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        raise TracingConfigError(
            f"--otlp-endpoint needs OpenTelemetry ({exc.name} is missing): install sevlaunch[otel]"
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise TracingConfigError(
                f"--otlp-endpoint needs the OTLP exporter ({exc.name} is missing): install sevlaunch[otel]"
            ) from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=target, insecure=insecure)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    from sevlaunch import __version__

    _active = _Tracing(
        provider=provider,
        tracer=provider.get_tracer("sevlaunch", __version__),
        propagator=TraceContextTextMapPropagator(),
    )
    log.info("tracing on", extra={"otlp_endpoint": endpoint or "(in-process exporter)"})


def shutdown() -> None:
    """Exports what is buffered and stops tracing (at server stop)."""
    global _active
    active, _active = _active, None
    if active is not None:
        active.provider.shutdown()


# ------------------------------------------------------------------------------------- spans


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.strip("/").partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    launch_id = current_launch_id()
    if launch_id is not None:
        attributes["sevlaunch.launch_id"] = launch_id
    return attributes


class RpcSpan:
    """An open RPC span, current in this context until `end`."""

    def __init__(self, span: Any, token: Any) -> None:
        self._span = span
        self._token = token

    def end(self, code_name: str, code_value: int) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("rpc.grpc.status_code", code_value)
        if code_name != "OK":
            self._span.set_status(Status(StatusCode.ERROR, code_name))
        self._span.end()
        if self._token is not None:
            try:
                otel_context.detach(self._token)
            except ValueError:  # ended in another context than it began in: nothing to restore there
                pass


def start_server_span(method: str, metadata: Iterable[tuple[str, Any]] | None) -> RpcSpan | None:
    """A SERVER span for an incoming call, child of the caller's span when its metadata carries one."""
    active = _active
    if active is None:
        return None
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    carrier = {k: v for k, v in metadata or () if k in TRACE_HEADERS and isinstance(v, str)}
    parent = active.propagator.extract(carrier)
    span = active.tracer.start_span(
        method.strip("/"), context=parent, kind=trace.SpanKind.SERVER, attributes=_rpc_attributes(method)
    )
    return RpcSpan(span, otel_context.attach(trace.set_span_in_context(span, parent)))


def start_client_span(method: str) -> tuple[RpcSpan | None, list[tuple[str, str]]]:
    """A CLIENT span for an outgoing call (child of the current span), and the metadata carrying it."""
    active = _active
    if active is None:
        return None, []
    from opentelemetry import trace

    span = active.tracer.start_span(
        method.strip("/"), kind=trace.SpanKind.CLIENT, attributes=_rpc_attributes(method)
    )
    carrier: dict[str, str] = {}
    active.propagator.inject(carrier, context=trace.set_span_in_context(span))
    # Not made current: the call's own work runs in gRPC, and the span ends in a done callback.
    return RpcSpan(span, None), sorted(carrier.items())


@contextmanager
def span(name: str, attributes: Mapping[str, str | int] | None = None) -> Iterator[Any]:
    """An INTERNAL span around a block, current inside it; yields it (None when tracing is off). An
    exception leaving the block marks the span as an error with the exception's `reason` if it has one."""
    active = _active
    if active is None:
        yield None
        return
    from opentelemetry.trace import Status, StatusCode

    attrs: dict[str, str | int] = dict(attributes or {})
    launch_id = current_launch_id()
    if launch_id is not None:
        attrs.setdefault("sevlaunch.launch_id", launch_id)
    with active.tracer.start_as_current_span(
        name, attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as exc:
            reason = getattr(exc, "reason", None)
            text = str(getattr(reason, "value", reason) or type(exc).__name__)
            current.set_attribute("sevlaunch.reason", text)
            current.set_status(Status(StatusCode.ERROR, text))
            raise
