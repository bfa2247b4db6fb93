"""The server shell through a real grpc.aio server on port 0 with mTLS, using a small bytes service."""

from __future__ import annotations

import asyncio
import enum
import io
import json
import logging
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sevlaunch.errors import NotFound
from sevlaunch.rpc import (
    AuthzPolicy,
    JsonFormatter,
    RpcServer,
    error_info,
    method_rules,
    parse_args_with_env,
    secure_channel,
    secure_channel_sync,
)
from sevlaunch.sev.errors import MalformedInput, Reason, SevError, VerificationFailed

SERVICE = "sevlaunch.test.ShellTest"


class FakeStatus(enum.IntEnum):
    INVALID_PLATFORM_STATE = 0x01
    INVALID_CERTIFICATE = 0x06
    BAD_SIGNATURE = 0x0A
    RESOURCE_LIMIT = 0x17


class FakeFirmwareError(SevError):
    """Shaped like sevlaunch.firmware.FirmwareError (a SevError with .status and .command)."""

    def __init__(self, status: FakeStatus) -> None:
        self.status = status
        self.command = "PDH_GEN"
        super().__init__(Reason.BAD_FIELD, f"firmware returned {status.name}")


ERRORS: dict[bytes, Exception] = {
    b"malformed": MalformedInput(Reason.TRUNCATED, "PDH is 12 bytes"),
    b"verify": VerificationFailed(Reason.BAD_SIGNATURE, "signature does not verify", link="ASK->CEK"),
    b"notfound": NotFound("no_such_session", "session s-1 is unknown", metadata={"session": "s-1"}),
    b"fw-state": FakeFirmwareError(FakeStatus.INVALID_PLATFORM_STATE),
    b"fw-cert": FakeFirmwareError(FakeStatus.INVALID_CERTIFICATE),
    b"fw-sig": FakeFirmwareError(FakeStatus.BAD_SIGNATURE),
    b"fw-limit": FakeFirmwareError(FakeStatus.RESOURCE_LIMIT),
    b"bug": RuntimeError("TEK=00112233 leaked in a bug"),
}


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _raise(request: bytes, context: Any) -> bytes:
    raise ERRORS[request]


async def _slow(request: bytes, context: Any) -> bytes:
    await asyncio.sleep(float(request.decode()))
    return b"done"


def _handler() -> grpc.GenericRpcHandler[Any, Any]:
    ident = {"request_deserializer": None, "response_serializer": None}
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo, **ident),
            "Raise": grpc.unary_unary_rpc_method_handler(_raise, **ident),
            "Slow": grpc.unary_unary_rpc_method_handler(_slow, **ident),
            "Unlisted": grpc.unary_unary_rpc_method_handler(_echo, **ident),
        },
    )


def _factory(tls_dir: Path) -> Any:
    async def build() -> RpcServer:
        authz = AuthzPolicy(
            method_rules(SERVICE, {"Echo": ["client", "launcher"], "Raise": ["client"], "Slow": ["client"]})
        )
        server = RpcServer(
            service_name=SERVICE,
            tls_dir=tls_dir,
            identity="platform",
            authz=authz,
            listen="localhost:0",
            metrics_listen="127.0.0.1:0",
        )
        server.grpc_server.add_generic_rpc_handlers((_handler(),))
        await server.start()
        return server

    return build


def _call(channel: grpc.Channel, method: str, payload: bytes, timeout: float = 5) -> bytes:
    result: bytes = channel.unary_unary(f"/{SERVICE}/{method}", None, None)(payload, timeout=timeout)
    return result


@pytest.fixture
def shell(serve: Any, tls_dir: Path) -> Any:
    return serve(_factory(tls_dir))


def test_authorised_call_succeeds_and_reports_request_id(shell: Any, tls_dir: Path) -> None:
    with secure_channel_sync(shell.address, tls_dir, "client") as ch:
        assert _call(ch, "Echo", b"hello") == b"hello"
    with secure_channel_sync(shell.address, tls_dir, "launcher") as ch:
        assert _call(ch, "Echo", b"x") == b"x"


def test_client_without_certificate_fails_the_handshake(shell: Any, tls_dir: Path) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=(tls_dir / "ca.pem").read_bytes())
    with grpc.secure_channel(shell.address, creds) as ch, pytest.raises(grpc.RpcError) as err:
        _call(ch, "Echo", b"x")
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def test_client_certificate_from_another_ca_fails_the_handshake(
    shell: Any, tls_dir: Path, foreign_tls_dir: Path
) -> None:
    # The foreign client trusts our server's CA, so only its own certificate can be the problem.
    creds = grpc.ssl_channel_credentials(
        root_certificates=(tls_dir / "ca.pem").read_bytes(),
        private_key=(foreign_tls_dir / "client.key").read_bytes(),
        certificate_chain=(foreign_tls_dir / "client.pem").read_bytes(),
    )
    with grpc.secure_channel(shell.address, creds) as ch, pytest.raises(grpc.RpcError) as err:
        _call(ch, "Echo", b"x")
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def test_wrong_role_and_unlisted_rpc_are_denied(shell: Any, tls_dir: Path) -> None:
    with secure_channel_sync(shell.address, tls_dir, "nobody") as ch, pytest.raises(grpc.RpcError) as err:
        _call(ch, "Echo", b"x")
    info = error_info(err.value)
    assert info.code is grpc.StatusCode.PERMISSION_DENIED
    assert (info.domain, info.reason) == ("sevlaunch", "caller_not_authorized")
    assert info.metadata["request_id"]
    # Deny by default: a method served but absent from the table is closed even to a known caller.
    with secure_channel_sync(shell.address, tls_dir, "client") as ch, pytest.raises(grpc.RpcError) as err:
        _call(ch, "Unlisted", b"x")
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # launcher may Echo but not Raise.
    with secure_channel_sync(shell.address, tls_dir, "launcher") as ch, pytest.raises(grpc.RpcError) as err:
        _call(ch, "Raise", b"malformed")
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("key", "code", "reason", "meta"),
    [
        (b"malformed", grpc.StatusCode.INVALID_ARGUMENT, "truncated", {}),
        (b"verify", grpc.StatusCode.PERMISSION_DENIED, "bad_signature", {"link": "ASK->CEK"}),
        (b"notfound", grpc.StatusCode.NOT_FOUND, "no_such_session", {"session": "s-1"}),
        (
            b"fw-state",
            grpc.StatusCode.FAILED_PRECONDITION,
            "bad_field",
            {"firmware_status": "INVALID_PLATFORM_STATE", "firmware_status_code": "1", "command": "PDH_GEN"},
        ),
        (
            b"fw-cert",
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_field",
            {"firmware_status": "INVALID_CERTIFICATE"},
        ),
        (b"fw-sig", grpc.StatusCode.PERMISSION_DENIED, "bad_field", {"firmware_status": "BAD_SIGNATURE"}),
        (b"fw-limit", grpc.StatusCode.RESOURCE_EXHAUSTED, "bad_field", {"firmware_status": "RESOURCE_LIMIT"}),
    ],
)
def test_typed_errors_map_to_status_with_error_info(
    shell: Any, tls_dir: Path, key: bytes, code: grpc.StatusCode, reason: str, meta: dict[str, str]
) -> None:
    with secure_channel_sync(shell.address, tls_dir, "client") as ch, pytest.raises(grpc.RpcError) as err:
        _call(ch, "Raise", key)
    info = error_info(err.value)
    assert info.code is code
    assert info.domain == "sevlaunch"
    assert info.reason == reason
    assert meta.items() <= info.metadata.items()
    assert info.metadata["request_id"]


def test_unknown_error_is_internal_with_nothing_leaked(
    shell: Any, tls_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="sevlaunch.rpc"),
        secure_channel_sync(shell.address, tls_dir, "client") as ch,
        pytest.raises(grpc.RpcError) as err,
    ):
        raise_ = ch.unary_unary(f"/{SERVICE}/Raise", None, None)
        raise_(b"bug", timeout=5, metadata=(("x-request-id", "req-42"),))
    info = error_info(err.value)
    assert info.code is grpc.StatusCode.INTERNAL
    assert info.message == "internal error (request id req-42)"
    assert "TEK" not in info.message and "00112233" not in str(info.metadata)
    assert info.reason == "internal"
    # The full error is logged server-side, under the same request id.
    records = [r for r in caplog.records if getattr(r, "request_id", None) == "req-42"]
    assert records and records[0].exc_info is not None


def test_health_and_reflection(shell: Any, tls_dir: Path) -> None:
    with secure_channel_sync(shell.address, tls_dir, "nobody") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_aio_channel_helper(shell: Any, tls_dir: Path) -> None:
    async def go() -> bytes:
        async with secure_channel(shell.address, tls_dir, "client") as ch:
            result: bytes = await ch.unary_unary(f"/{SERVICE}/Echo", None, None)(b"aio", timeout=5)
            return result

    assert asyncio.run(go()) == b"aio"


def test_graceful_stop_lets_in_flight_calls_finish(shell: Any, tls_dir: Path) -> None:
    results: list[object] = []
    with secure_channel_sync(shell.address, tls_dir, "client") as ch:
        _call(ch, "Echo", b"warm")  # connection up before the race
        worker = threading.Thread(target=lambda: results.append(_call(ch, "Slow", b"0.5")))
        worker.start()
        time.sleep(0.15)
        started = time.monotonic()
        shell.run(shell.server.stop(grace=5))
        worker.join(5)
        elapsed = time.monotonic() - started
    assert results == [b"done"]
    assert elapsed < 4  # stop returned once the call finished, not at the end of the grace period
    status = shell.run(shell.server.health.Check(health_pb2.HealthCheckRequest(service=""), None))
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_metrics_count_rpcs_by_method_and_code(shell: Any, tls_dir: Path) -> None:
    with secure_channel_sync(shell.address, tls_dir, "client") as ch:
        for _ in range(3):
            _call(ch, "Echo", b"x")
        with pytest.raises(grpc.RpcError):
            _call(ch, "Raise", b"malformed")
    with secure_channel_sync(shell.address, tls_dir, "nobody") as ch, pytest.raises(grpc.RpcError):
        _call(ch, "Echo", b"x")
    text = urllib.request.urlopen(shell.metrics_url, timeout=5).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }

    def handled(method: str, code: str) -> float:
        labels = (
            ("grpc_code", code),
            ("grpc_method", method),
            ("grpc_service", SERVICE),
            ("grpc_type", "unary"),
        )
        return samples[("grpc_server_handled_total", labels)]

    assert handled("Echo", "OK") == 3
    assert handled("Echo", "PERMISSION_DENIED") == 1
    assert handled("Raise", "INVALID_ARGUMENT") == 1
    echo = (("grpc_method", "Echo"), ("grpc_service", SERVICE))
    assert samples[("grpc_server_handling_seconds_count", (*echo, ("grpc_type", "unary")))] == 3
    assert samples[("grpc_server_started_total", (*echo, ("grpc_type", "unary")))] == 4
    assert samples[("sevlaunch_rpc_denied_total", echo)] == 1
    # Outcomes: the refusals (denied, invalid argument) are counted as refused, not as errors.
    assert samples[("sevlaunch_rpc_outcomes_total", (*echo, ("outcome", "ok")))] == 3
    assert samples[("sevlaunch_rpc_outcomes_total", (*echo, ("outcome", "refused")))] == 1
    raise_ = (("grpc_method", "Raise"), ("grpc_service", SERVICE), ("outcome", "refused"))
    assert samples[("sevlaunch_rpc_outcomes_total", raise_)] == 1


def test_json_formatter_emits_one_object_per_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sevlaunch.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("rpc %s", "denied", extra={"method": "/a/B", "request_id": "r1"})
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["message"] == "rpc denied" and obj["level"] == "warning"
    assert obj["method"] == "/a/B" and obj["request_id"] == "r1" and "time" in obj


def test_env_flags_fill_in_and_flags_win() -> None:
    import argparse

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_argument("--tls-dir", required=True, help="TLS folder")
        p.add_argument("--kds-timeout", type=float, default=5.0, help="seconds")
        p.add_argument("--verbose", action="store_true", help="more logs")
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--emulator", help="state dir")
        g.add_argument("--dev-sev", help="device")
        return p

    env = {
        "SEVLAUNCH_TLS_DIR": "/env/tls",
        "SEVLAUNCH_KDS_TIMEOUT": "2.5",
        "SEVLAUNCH_VERBOSE": "yes",
        "SEVLAUNCH_EMULATOR": "/env/state",
    }
    args = parse_args_with_env(parser(), [], env)
    assert (args.tls_dir, args.kds_timeout, args.verbose, args.emulator) == (
        "/env/tls",
        2.5,
        True,
        "/env/state",
    )
    args = parse_args_with_env(parser(), ["--tls-dir=/cli", "--dev-sev", "/dev/sev"], env)
    assert (args.tls_dir, args.dev_sev, args.emulator) == ("/cli", "/dev/sev", None)
    with pytest.raises(SystemExit):
        parse_args_with_env(parser(), ["--emulator", "x"], {})  # --tls-dir required, no variable
