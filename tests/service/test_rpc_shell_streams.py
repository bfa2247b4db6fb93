"""The server shell's edges: server-streaming handlers that fail mid-stream, unknown methods and metric
label cardinality, and each service's role table against its proto."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sevlaunch.errors import FailedPrecondition
from sevlaunch.rpc import AuthzPolicy, RpcServer, error_info, method_rules, secure_channel_sync
from sevlaunch.rpc.authz import STANDARD_METHODS
from sevlaunch.rpc.v1 import launcher_pb2, owner_pb2, platform_pb2
from sevlaunch.sev.errors import MalformedInput, Reason

SERVICE = "sevlaunch.test.StreamTest"


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    """Yields two items, then does what the request says."""
    yield b"one"
    yield b"two"
    what = request.decode()
    if what == "typed":
        raise FailedPrecondition("gone_away", "the launch went away mid-stream")
    if what == "malformed":
        raise MalformedInput(Reason.TRUNCATED, "half a message")
    if what == "bug":
        raise RuntimeError("TIK=0011 in a bug")
    if what == "hang":
        await asyncio.sleep(3600)
    yield b"three"


async def _early(request: bytes, context: Any) -> AsyncIterator[bytes]:
    raise FailedPrecondition("not_configured", "refused before the first item")
    yield b""  # pragma: no cover - makes this an async generator


def _factory(tls_dir: Path) -> Any:
    async def build() -> RpcServer:
        server = RpcServer(
            service_name=SERVICE,
            tls_dir=tls_dir,
            identity="platform",
            authz=AuthzPolicy(method_rules(SERVICE, {"Stream": ["client"], "Early": ["client"]})),
            listen="localhost:0",
            metrics_listen="127.0.0.1:0",
        )
        ident = {"request_deserializer": None, "response_serializer": None}
        server.grpc_server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Stream": grpc.unary_stream_rpc_method_handler(_stream, **ident),
                        "Early": grpc.unary_stream_rpc_method_handler(_early, **ident),
                    },
                ),
            )
        )
        await server.start()
        return server

    return build


def _drain(channel: grpc.Channel, method: str, payload: bytes, timeout: float = 10) -> list[bytes]:
    call = channel.unary_stream(f"/{SERVICE}/{method}", None, None)(payload, timeout=timeout)
    return list(call)


def _samples_eventually(
    url: str, expected: tuple[str, dict[str, str], float], within: float = 5.0
) -> list[tuple[str, dict[str, str], float]]:
    """The client sees a stream's status as the server sends it, a moment before the server's
    interceptor has counted it: scrape until the sample is there or `within` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        samples = _samples(url)
        if expected in samples or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def _samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return [
        (s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples
    ]


@pytest.mark.parametrize(
    ("what", "code", "reason"),
    [
        ("typed", grpc.StatusCode.FAILED_PRECONDITION, "gone_away"),
        ("malformed", grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        ("bug", grpc.StatusCode.INTERNAL, "internal"),
    ],
)
def test_an_error_mid_stream_ends_the_stream_with_its_status(
    serve: Any, tls_dir: Path, what: str, code: grpc.StatusCode, reason: str
) -> None:
    running = serve(_factory(tls_dir))
    received: list[bytes] = []
    with secure_channel_sync(running.address, tls_dir, "client") as ch:
        call = ch.unary_stream(f"/{SERVICE}/Stream", None, None)(what.encode(), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            for item in call:
                received.append(item)
    assert received == [b"one", b"two"]
    info = error_info(err.value)
    assert (info.code, info.reason, info.domain) == (code, reason, "sevlaunch")
    assert info.metadata["request_id"]
    if code is grpc.StatusCode.INTERNAL:
        assert "TIK" not in info.message
    labels = {
        "grpc_type": "server_stream",
        "grpc_service": SERVICE,
        "grpc_method": "Stream",
        "grpc_code": code.name,
    }
    expected = ("grpc_server_handled_total", labels, 1.0)
    assert expected in _samples_eventually(running.metrics_url, expected)


def test_an_error_before_the_first_item_is_typed(serve: Any, tls_dir: Path) -> None:
    running = serve(_factory(tls_dir))
    with secure_channel_sync(running.address, tls_dir, "client") as ch, pytest.raises(grpc.RpcError) as err:
        _drain(ch, "Early", b"")
    info = error_info(err.value)
    assert (info.code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "not_configured")


def test_a_stream_past_its_deadline_ends_and_is_counted(serve: Any, tls_dir: Path) -> None:
    running = serve(_factory(tls_dir))
    with secure_channel_sync(running.address, tls_dir, "client") as ch, pytest.raises(grpc.RpcError) as err:
        _drain(ch, "Stream", b"hang", timeout=0.5)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The server side ends too (the handler is cancelled), so the call is recorded, not left hanging.
    for _ in range(50):
        names = {
            s[1].get("grpc_method")
            for s in _samples(running.metrics_url)
            if s[0] == "grpc_server_handled_total" and s[1].get("grpc_service") == SERVICE
        }
        if "Stream" in names:
            break
        running.run(asyncio.sleep(0.1))
    else:
        pytest.fail("the cancelled stream was never recorded as finished")


def test_unknown_methods_are_unimplemented_and_add_no_metric_labels(serve: Any, tls_dir: Path) -> None:
    """The method label comes from the registered handlers: a caller inventing method names (here 30
    distinct ones, some with odd characters) cannot grow the label sets of any series."""
    running = serve(_factory(tls_dir))
    before = _samples(running.metrics_url)
    with secure_channel_sync(running.address, tls_dir, "client") as ch:
        for i in range(30):
            name = f"/{SERVICE}/Nope{uuid.uuid4().hex}" if i % 2 else f"/x.Y{i}/{'é' if i % 3 else 'a'}{i}"
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(name, None, None)(b"x", timeout=5)
            assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    methods = {s[1]["method"] for s in _samples(running.metrics_url) if "method" in s[1]}
    assert methods <= {f"/{SERVICE}/Stream", f"/{SERVICE}/Early"}
    assert len(_samples(running.metrics_url)) == len(before)


def _proto_methods(module: Any, service: str) -> set[str]:
    desc = module.DESCRIPTOR.services_by_name[service]
    return {f"/{desc.full_name}/{m.name}" for m in desc.methods}


@pytest.mark.parametrize(
    ("module", "service", "authz_path"),
    [
        (platform_pb2, "PlatformService", "platform_svc.api.servicer"),
        (owner_pb2, "OwnerService", "owner_svc.server"),
        (launcher_pb2, "LauncherService", "launcher_svc.api.servicer"),
    ],
)
def test_each_service_role_table_names_exactly_its_proto_methods(
    module: Any, service: str, authz_path: str
) -> None:
    """Deny by default keeps a method added to a proto closed; this keeps the table honest in both
    directions: every RPC of the proto has roles (a new RPC is a conscious decision, not a silent
    PERMISSION_DENIED in production) and no entry names a method that does not exist (a typo that would
    leave the real method closed and the intended roles unapplied)."""
    import importlib

    authz: AuthzPolicy = importlib.import_module(authz_path).AUTHZ
    listed = {m for m in authz.rules if m not in STANDARD_METHODS}
    assert listed == _proto_methods(module, service)
    assert all(authz.rules[m] for m in listed), "an RPC with an empty role set"
    # ... and nothing outside the table is open, whoever calls.
    invented = f"/{module.DESCRIPTOR.package}.{service}/NotInTheProto"
    assert not any(
        authz.allows(invented, who) for who in ("client", "launcher", "owner-admin", "platform-admin")
    )
