"""OpenTelemetry tracing of one launch across the three services (issue 13): the demo environment's
services run as processes with `--otlp-endpoint` pointing at an OTLP/gRPC receiver this test runs on
127.0.0.1 (the service definition is opentelemetry-proto's). One attested launch yields one trace: the
launcher's Launch SERVER span, one span per launch phase, the launcher's CLIENT spans, and the
platform's and owner's SERVER spans as their children, all under one trace id, with the launch id on
every span that belongs to it. Services without the flag export nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from sevlaunch.demo.env import DEFAULT_FIRMWARE, DemoEnvironment

pytestmark = pytest.mark.skipif(not DEFAULT_FIRMWARE.is_file(), reason="needs Debian's ovmf package")

PHASES = ("CHAIN_FETCHED", "SESSION_OPENED", "DEFINED", "STARTED_PAUSED", "MEASURED", "SECRET_RELEASED",
          "SECRET_INJECTED", "RUNNING")  # fmt: skip


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent: str
    attributes: dict[str, Any]
    error: bool


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP trace collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        self.spans.append(
                            Span(
                                service=attrs.get("service.name", ""),
                                name=s.name,
                                kind=s.kind,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent=s.parent_span_id.hex(),
                                attributes={a.key: _value(a.value) for a in s.attributes},
                                error=s.status.code == trace_pb2.Status.STATUS_CODE_ERROR,
                            )
                        )
        return trace_service_pb2.ExportTraceServiceResponse()


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"http://127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture(scope="module")
def traced(receiver: tuple[Receiver, str]) -> tuple[list[Span], str]:
    """One launch through three traced services, which are then stopped (flushing their spans)."""
    collector, endpoint = receiver
    with DemoEnvironment(otlp_endpoint=endpoint) as env:
        env.prepare()
        env.start()
        env.configure_owner()
        outcome = env.launch("traced", env.firmware)
        assert outcome.outcome == "running", outcome
        env.destroy(outcome.launch_id)
    return list(collector.spans), outcome.launch_id


SERVER, CLIENT, INTERNAL = (
    trace_pb2.Span.SPAN_KIND_SERVER,
    trace_pb2.Span.SPAN_KIND_CLIENT,
    trace_pb2.Span.SPAN_KIND_INTERNAL,
)


def test_one_launch_is_one_trace_across_the_three_services(traced: tuple[list[Span], str]) -> None:
    spans, launch_id = traced
    [launch] = [s for s in spans if s.name == "sevlaunch.v1.LauncherService/Launch"]
    assert (launch.service, launch.kind, launch.parent) == ("sevlaunch-launcher", SERVER, "")
    assert launch.attributes["rpc.system"] == "grpc" and launch.attributes["rpc.grpc.status_code"] == 0
    trace = [s for s in spans if s.trace_id == launch.trace_id]
    by_id = {s.span_id: s for s in trace}
    assert len(by_id) == len(trace) >= 1 + len(PHASES) + 2 * 3
    assert {s.service for s in trace} == {"sevlaunch-launcher", "sevlaunch-platform", "sevlaunch-owner"}

    # One span per phase, each a child of the Launch span (the phases run in its task), in the launcher.
    phases = {s.name.removeprefix("launch phase "): s for s in trace if s.name.startswith("launch phase ")}
    assert set(phases) == set(PHASES)
    for phase in phases.values():
        assert (phase.service, phase.kind, phase.error) == ("sevlaunch-launcher", INTERNAL, False)
        assert phase.attributes["sevlaunch.launch_id"] == launch_id
        assert phase.attributes["sevlaunch.phase"] == phase.name.removeprefix("launch phase ")
        assert phase.parent == launch.span_id

    # The owner's and platform's server spans continue the launcher's client spans, inside the phase
    # that made the call.
    def server_span(service: str, method: str) -> Span:
        [found] = [s for s in trace if s.service == service and s.kind == SERVER and s.name.endswith(method)]
        return found

    expected = {
        ("sevlaunch-platform", "PlatformService/GetCertificateChain"): "CHAIN_FETCHED",
        ("sevlaunch-owner", "OwnerService/OpenSession"): "SESSION_OPENED",
        ("sevlaunch-owner", "OwnerService/ReleaseSecret"): "SECRET_RELEASED",
    }
    for (service, method), phase_name in expected.items():
        served = server_span(service, method)
        client = by_id[served.parent]
        assert (client.service, client.kind, client.name) == ("sevlaunch-launcher", CLIENT, served.name)
        assert client.parent == phases[phase_name].span_id
        assert (
            served.attributes["sevlaunch.launch_id"] == launch_id == client.attributes["sevlaunch.launch_id"]
        )
        assert served.attributes["rpc.service"] == f"sevlaunch.v1.{method.split('/')[0]}"
        assert served.attributes["rpc.grpc.status_code"] == client.attributes["rpc.grpc.status_code"] == 0
    # Every span of the trace hangs off the Launch span.
    for s in trace:
        hops = 0
        while s.parent:
            s = by_id[s.parent]
            hops += 1
            assert hops < 10
        assert s is launch


def test_calls_outside_a_launch_are_traces_of_their_own(traced: tuple[list[Span], str]) -> None:
    spans, _ = traced
    [launch] = [s for s in spans if s.name == "sevlaunch.v1.LauncherService/Launch"]
    # The test's own admin calls carry no trace context: each is a root span on the owner.
    imports = [s for s in spans if s.name == "sevlaunch.v1.OwnerService/ImportReferenceValues"]
    assert imports and all(s.parent == "" and s.trace_id != launch.trace_id for s in imports)
    assert all("sevlaunch.launch_id" not in s.attributes for s in imports)
    # Nothing from a request body or metadata but the launch id is recorded.
    allowed = {"rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code", "sevlaunch.launch_id",
               "sevlaunch.phase", "sevlaunch.reason"}  # fmt: skip
    assert {k for s in spans for k in s.attributes} <= allowed
