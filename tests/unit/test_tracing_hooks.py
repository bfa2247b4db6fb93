"""The shell's tracing hooks (`sevlaunch.rpc.tracing`) with the OpenTelemetry SDK's in-memory exporter:
W3C trace context out of a client span and into a server span, INTERNAL spans and their errors, the
endpoint flag's checks, and nothing at all while tracing is off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from launcher_svc.adapters.tracing import ShellPhaseTracer
from sevlaunch.errors import FailedPrecondition
from sevlaunch.rpc import tracing
from sevlaunch.rpc.launchid import launch_id_scope

METHOD = "/sevlaunch.v1.OwnerService/OpenSession"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.configure("sevlaunch-test", None, exporter=memory)
    yield memory
    tracing.shutdown()


def test_off_by_default_nothing_is_traced() -> None:
    assert not tracing.enabled()
    tracing.configure("sevlaunch-test", None)
    tracing.configure("sevlaunch-test", "")
    assert not tracing.enabled()
    assert tracing.start_client_span(METHOD) == (None, [])
    assert (
        tracing.start_server_span(METHOD, [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")])
        is None
    )
    with tracing.span("x") as current:
        assert current is None


def test_client_context_continues_in_the_server_span(exporter: InMemorySpanExporter) -> None:
    with launch_id_scope("launch-1"):
        client, metadata = tracing.start_client_span(METHOD)
    assert client is not None
    keys = [k for k, _ in metadata]
    assert keys == ["traceparent"]  # W3C trace context, lower case as gRPC metadata must be
    # The server sees that metadata (and other keys, ignored) and continues the trace.
    server = tracing.start_server_span(METHOD, [("x-sevlaunch-launch-id", "launch-1"), *metadata])
    assert server is not None
    with tracing.span("inside the handler"):
        pass
    server.end("NOT_FOUND", 5)
    client.end("NOT_FOUND", 5)
    finished = exporter.get_finished_spans()
    [c] = [x for x in finished if x.kind is SpanKind.CLIENT]
    [s] = [x for x in finished if x.kind is SpanKind.SERVER]
    [inner] = [x for x in finished if x.name == "inside the handler"]
    assert c.name == s.name == METHOD.strip("/")
    assert c.kind is SpanKind.CLIENT and c.parent is None
    assert s.context.trace_id == c.context.trace_id == inner.context.trace_id
    assert s.parent is not None and s.parent.span_id == c.context.span_id
    assert inner.parent is not None and inner.parent.span_id == s.context.span_id  # current while served
    assert c.attributes is not None and s.attributes is not None
    assert dict(c.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "sevlaunch.v1.OwnerService",
        "rpc.method": "OpenSession",
        "sevlaunch.launch_id": "launch-1",
        "rpc.grpc.status_code": 5,
    }
    assert s.status.status_code is StatusCode.ERROR and s.status.description == "NOT_FOUND"
    assert s.resource.attributes["service.name"] == "sevlaunch-test"
    # After the call the server span is no longer current.
    with tracing.span("after") as after:
        assert after.parent is None


def test_server_span_without_context_is_a_root(exporter: InMemorySpanExporter) -> None:
    span = tracing.start_server_span(METHOD, [("traceparent", "not a trace context")])
    assert span is not None
    span.end("OK", 0)
    [s] = exporter.get_finished_spans()
    assert s.parent is None and s.status.status_code is StatusCode.UNSET


def test_phase_spans_record_the_reason_of_a_failure(exporter: InMemorySpanExporter) -> None:
    tracer = ShellPhaseTracer()
    with tracer.phase("DEFINED", "launch-2"):
        pass
    with pytest.raises(FailedPrecondition), tracer.phase("MEASURED", "launch-2"):
        raise FailedPrecondition("policy_mismatch", "secret detail that is not recorded")
    ok, failed = exporter.get_finished_spans()
    assert ok.name == "launch phase DEFINED" and ok.status.status_code is StatusCode.UNSET
    assert failed.name == "launch phase MEASURED" and failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["sevlaunch.reason"] == "policy_mismatch"
    assert failed.attributes["sevlaunch.launch_id"] == "launch-2"
    assert "secret detail" not in repr(dict(failed.attributes)) + str(failed.status.description)
    assert not failed.events  # no exception event with its message


@pytest.mark.parametrize(
    ("url", "target", "insecure"),
    [
        ("http://127.0.0.1:4317", "127.0.0.1:4317", True),
        ("https://collector.example:443/", "collector.example:443", False),
        ("http://[::1]:4317", "[::1]:4317", True),
        ("http://collector", "collector:4317", True),
    ],
)
def test_endpoint_urls(url: str, target: str, insecure: bool) -> None:
    assert tracing.parse_endpoint(url) == (target, insecure)


@pytest.mark.parametrize("url", ["127.0.0.1:4317", "ftp://x:1", "http://x:1/v1/traces", "http://x:port"])
def test_bad_endpoints_are_refused(url: str) -> None:
    with pytest.raises(tracing.TracingConfigError, match="--otlp-endpoint"):
        tracing.parse_endpoint(url)


def test_a_service_with_a_bad_endpoint_does_not_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from platform_svc.server import main

    monkeypatch.setenv("SEVLAUNCH_OTLP_ENDPOINT", "collector:4317")  # every flag is also a variable
    assert main(["--tls-dir", str(tmp_path), "--emulator", str(tmp_path / "chip")]) == 1
    err = capsys.readouterr().err
    assert "cannot start" in err and "http://HOST:PORT" in err
    assert not tracing.enabled()
