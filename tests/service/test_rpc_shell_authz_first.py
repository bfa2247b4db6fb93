"""Attacks on the shell's order of checks and on the caller's identity (issue 12, items 2 and 3).

* Undecodable bytes from a caller that holds a CA certificate: refused for who it is before anything
  is parsed; an authorised caller's undecodable bytes are INVALID_ARGUMENT with an ErrorInfo, counted,
  and logged without a traceback (gRPC's own deserializer answered UNKNOWN with the exception text).
* Certificates whose subject is not exactly one CN: no identity at all (the first of several CNs used to
  be taken), and a role named only in a SAN is no identity either.
"""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2
from hostile_certs import cn, issue_client
from prometheus_client.parser import text_string_to_metric_families

from sevlaunch.rpc import AuthzPolicy, RpcServer, error_info, method_rules, secure_channel_sync

SERVICE = "sevlaunch.test.AuthzFirst"
#: Not a protobuf message: field 1, length-delimited, claims 100 bytes and has 2.
UNDECODABLE = b"\x0a\x64ab"
#: Truncated varint tags, the other common way bytes fail to parse.
UNDECODABLE_TAGS = b"\xff\xff\xff\xff\xff"


async def _check(request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
    assert isinstance(request, health_pb2.HealthCheckRequest)  # decoded by the shell, after authz
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _handler() -> grpc.GenericRpcHandler[Any, Any]:
    typed = {
        "request_deserializer": health_pb2.HealthCheckRequest.FromString,
        "response_serializer": health_pb2.HealthCheckResponse.SerializeToString,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Admin": grpc.unary_unary_rpc_method_handler(_check, **typed),
            "Client": grpc.unary_unary_rpc_method_handler(_check, **typed),
        },
    )


@pytest.fixture
def shell(serve: Any, tls_dir: Path) -> Any:
    async def build() -> RpcServer:
        server = RpcServer(
            service_name=SERVICE,
            tls_dir=tls_dir,
            identity="platform",
            authz=AuthzPolicy(method_rules(SERVICE, {"Admin": ["owner-admin"], "Client": ["client"]})),
            listen="localhost:0",
            metrics_listen="127.0.0.1:0",
        )
        server.grpc_server.add_generic_rpc_handlers((_handler(),))
        await server.start()
        return server

    return serve(build)


def _raw(channel: grpc.Channel, method: str, payload: bytes) -> bytes:
    result: bytes = channel.unary_unary(method, None, None)(payload, timeout=5)
    return result


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    leaked = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not leaked, [(r.name, r.getMessage()) for r in leaked]


# ------------------------------------------------------------------------------------- item 2


@pytest.mark.parametrize("payload", [UNDECODABLE, UNDECODABLE_TAGS])
def test_no_role_caller_sending_undecodable_bytes_is_refused_before_parsing(
    shell: Any, tls_dir: Path, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    method = f"/{SERVICE}/Client"
    with secure_channel_sync(shell.address, tls_dir, "nobody") as ch, pytest.raises(grpc.RpcError) as err:
        _raw(ch, method, payload)
    info = error_info(err.value)
    assert info.code is grpc.StatusCode.PERMISSION_DENIED
    assert (info.domain, info.reason) == ("sevlaunch", "caller_not_authorized")
    samples = _samples(shell.metrics_url)
    labels = (("grpc_method", "Client"), ("grpc_service", SERVICE))
    assert samples[("sevlaunch_rpc_denied_total", labels)] == 1
    assert ("sevlaunch_rpc_undecodable_requests_total", labels) not in samples
    _no_traceback(caplog)


@pytest.mark.parametrize("payload", [UNDECODABLE, UNDECODABLE_TAGS])
def test_authorised_caller_sending_undecodable_bytes_gets_typed_invalid_argument(
    shell: Any, tls_dir: Path, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    method = f"/{SERVICE}/Client"
    with secure_channel_sync(shell.address, tls_dir, "client") as ch:
        with pytest.raises(grpc.RpcError) as err:
            _raw(ch, method, payload)
        # The same connection still serves a well-formed request.
        ok = _raw(ch, method, health_pb2.HealthCheckRequest(service="x").SerializeToString())
    assert health_pb2.HealthCheckResponse.FromString(ok).status == health_pb2.HealthCheckResponse.SERVING
    info = error_info(err.value)
    assert info.code is grpc.StatusCode.INVALID_ARGUMENT
    assert (info.domain, info.reason) == ("sevlaunch", "undecodable_request")
    assert info.metadata["request_id"]
    assert "Error" not in info.message and "Unexpected" not in info.message  # no Python exception text
    samples = _samples(shell.metrics_url)
    labels = (("grpc_method", "Client"), ("grpc_service", SERVICE))
    assert samples[("sevlaunch_rpc_undecodable_requests_total", labels)] == 1
    handled = (("grpc_code", "INVALID_ARGUMENT"), *labels, ("grpc_type", "unary"))
    assert samples[("grpc_server_handled_total", handled)] == 1
    _no_traceback(caplog)
    assert any(r.getMessage() == "rpc request undecodable" for r in caplog.records)


def test_undecodable_bytes_to_the_open_health_service_get_invalid_argument(
    shell: Any, tls_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Health is open to every authenticated caller, so a no-role certificate reaches its decoding."""
    caplog.set_level(logging.DEBUG)
    with secure_channel_sync(shell.address, tls_dir, "nobody") as ch, pytest.raises(grpc.RpcError) as err:
        _raw(ch, "/grpc.health.v1.Health/Check", UNDECODABLE)
    info = error_info(err.value)
    assert (info.code, info.domain, info.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "sevlaunch",
        "undecodable_request",
    )
    _no_traceback(caplog)


def test_undecodable_bytes_in_a_request_stream_get_invalid_argument(
    shell: Any, tls_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Reflection is the one stream of requests: each message is decoded as it is read, after authz."""
    caplog.set_level(logging.DEBUG)
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    with secure_channel_sync(shell.address, tls_dir, "nobody") as ch, pytest.raises(grpc.RpcError) as err:
        list(ch.stream_stream(method, None, None)(iter([UNDECODABLE]), timeout=5))
    info = error_info(err.value)
    assert (info.code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "undecodable_request")
    _no_traceback(caplog)


# ------------------------------------------------------------------------------------- item 3


@pytest.mark.parametrize(
    "names", [("owner-admin", "platform-admin"), ("owner-admin", "owner-admin"), ("nobody", "owner-admin")]
)
def test_certificate_with_two_cns_passes_for_neither(
    shell: Any, tls_dir: Path, tmp_path: Path, names: tuple[str, str]
) -> None:
    folder = issue_client(tls_dir, tmp_path / "two-cn", "two", cn(*names))
    ok = health_pb2.HealthCheckRequest().SerializeToString()
    with secure_channel_sync(shell.address, folder, "two") as ch, pytest.raises(grpc.RpcError) as err:
        _raw(ch, f"/{SERVICE}/Admin", ok)
    info = error_info(err.value)
    assert (info.code, info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "caller_not_authorized")


def test_two_cns_in_one_multivalued_rdn_pass_for_neither(shell: Any, tls_dir: Path, tmp_path: Path) -> None:
    subject = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "owner-admin"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "client"),
                ]
            )
        ]
    )
    folder = issue_client(tls_dir, tmp_path / "mv", "mv", subject)
    ok = health_pb2.HealthCheckRequest().SerializeToString()
    for method in ("Admin", "Client"):
        with secure_channel_sync(shell.address, folder, "mv") as ch, pytest.raises(grpc.RpcError) as err:
            _raw(ch, f"/{SERVICE}/{method}", ok)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_role_named_only_in_a_san_is_no_identity(shell: Any, tls_dir: Path, tmp_path: Path) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "owner-admin")])
    folder = issue_client(tls_dir, tmp_path / "san", "san", subject, san_dns=("owner-admin",))
    ok = health_pb2.HealthCheckRequest().SerializeToString()
    with secure_channel_sync(shell.address, folder, "san") as ch, pytest.raises(grpc.RpcError) as err:
        _raw(ch, f"/{SERVICE}/Admin", ok)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_one_cn_among_other_attributes_is_the_identity(shell: Any, tls_dir: Path, tmp_path: Path) -> None:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "platform-admin"),
            x509.NameAttribute(NameOID.COMMON_NAME, "owner-admin"),
        ]
    )
    folder = issue_client(tls_dir, tmp_path / "one", "one", subject)
    ok = health_pb2.HealthCheckRequest().SerializeToString()
    with secure_channel_sync(shell.address, folder, "one") as ch:
        assert _raw(ch, f"/{SERVICE}/Admin", ok)


# An empty CN is out of X.509's bounds: cryptography warns when such a name is built and when it is
# read. This case builds one on purpose, so the warning is expected here.
@pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")
def test_identity_from_certificate_refuses_odd_subjects(tls_dir: Path, tmp_path: Path) -> None:
    from sevlaunch.rpc.authz import identity_from_certificate

    assert identity_from_certificate((tls_dir / "owner-admin.pem").read_bytes()) == "owner-admin"
    for i, subject in enumerate(
        [
            cn("a", "b"),
            # An empty CN, which cryptography only writes with its validation off (other tools do).
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "", _validate=False)]),
            cn("ev\nil"),
            cn("tab\there"),
            x509.Name([]),
            cn("a", "a"),
        ]
    ):
        folder = issue_client(tls_dir, tmp_path / f"odd{i}", "odd", subject)
        assert identity_from_certificate((folder / "odd.pem").read_bytes()) is None, subject
    garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    assert identity_from_certificate(garbage) is None
    assert identity_from_certificate(b"not a pem") is None


def test_a_status_a_standard_servicer_aborts_with_is_typed_too(shell: Any, tls_dir: Path) -> None:
    """The health service aborts NOT_FOUND for a name it does not serve: same code, now with ErrorInfo."""
    unknown = health_pb2.HealthCheckRequest(service="no.such.Service").SerializeToString()
    with secure_channel_sync(shell.address, tls_dir, "nobody") as ch, pytest.raises(grpc.RpcError) as err:
        _raw(ch, "/grpc.health.v1.Health/Check", unknown)
    info = error_info(err.value)
    assert (info.code, info.domain, info.reason) == (grpc.StatusCode.NOT_FOUND, "sevlaunch", "not_found")
    assert info.metadata["request_id"]
