"""The launcher's clients authenticate the server as an identity: gRPC's own TLS checks the server
certificate against the expected identity's server name (`grpc.ssl_target_name_override`), so a server
holding any other certificate of the CA (or another CA's) fails the handshake before a call reaches it,
and the call becomes `<who>_not_authenticated`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from launcher_svc.adapters.grpc_clients import OwnerClient, PlatformClient, _Diagnosis, split_endpoint
from launcher_svc.core.ports import PlatformChain
from launcher_svc.server import build_parser, config_from_args
from sevlaunch.cli.devcerts import default_ca_dir
from sevlaunch.errors import PermissionDenied, Unavailable
from sevlaunch.rpc.tls import server_credentials
from sevlaunch.rpc.v1 import (
    owner_pb2,
    owner_pb2_grpc,
    platform_pb2,
    platform_pb2_grpc,
)
from sevlaunch.tlsnames import SERVER_NAME_DOMAIN, is_reserved, server_name

PROD_NAME = "sevlaunch-owner.tenant.svc.cluster.local"


class _Owner(owner_pb2_grpc.OwnerServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def OpenSession(self, request: Any, context: Any) -> owner_pb2.OpenSessionResponse:
        self.calls += 1
        return owner_pb2.OpenSessionResponse(session_id="s-1", policy=request.policy)


class _Platform(platform_pb2_grpc.PlatformServiceServicer):
    async def GetCertificateChain(self, request: Any, context: Any) -> Any:
        return platform_pb2.GetCertificateChainResponse()


@asynccontextmanager
async def _serve(tls_dir: Path, identity: str) -> AsyncIterator[tuple[str, _Owner]]:
    """An owner (and platform) gRPC server over mTLS with `identity`'s certificate."""
    server = grpc.aio.server()
    owner = _Owner()
    owner_pb2_grpc.add_OwnerServiceServicer_to_server(owner, server)
    platform_pb2_grpc.add_PlatformServiceServicer_to_server(_Platform(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls_dir, identity))
    await server.start()
    try:
        yield f"127.0.0.1:{port}", owner
    finally:
        await server.stop(None)


async def _open(client: OwnerClient, endpoint: str) -> Any:
    return await client.open_session(
        endpoint, workload_id="w", chain=PlatformChain(b"", b"", b"", b"", b"", b""), policy=3
    )


def _run(main: Callable[[], Any]) -> None:
    asyncio.run(main())


def test_the_owner_certificate_is_accepted(tls_dir: Path) -> None:
    async def main() -> None:
        async with _serve(tls_dir, "owner") as (endpoint, owner):
            client = OwnerClient(tls_dir, "launcher")
            try:
                assert (await _open(client, endpoint)).session_id == "s-1"
            finally:
                await client.close()
            assert owner.calls == 1

    _run(main)


@pytest.mark.parametrize("served_as", ["client", "launcher", "platform", "nobody"])
def test_another_identitys_certificate_is_refused(tls_dir: Path, served_as: str) -> None:
    async def main() -> None:
        async with _serve(tls_dir, served_as) as (endpoint, owner):
            client = OwnerClient(tls_dir, "launcher")
            try:
                for _ in range(2):  # also while gRPC backs off after the failed handshake
                    with pytest.raises(PermissionDenied) as err:
                        await _open(client, endpoint)
                    assert err.value.reason == "owner_not_authenticated"
                    assert repr(served_as) in err.value.detail
                    assert "owner.sevlaunch.internal" in err.value.detail
            finally:
                await client.close()
            assert owner.calls == 0  # the server never saw a call

    _run(main)


def test_a_server_of_another_ca_is_refused(tls_dir: Path, foreign_tls_dir: Path) -> None:
    async def main() -> None:
        async with _serve(foreign_tls_dir, "owner") as (endpoint, owner):
            client = OwnerClient(tls_dir, "launcher")
            try:
                with pytest.raises(PermissionDenied) as err:
                    await _open(client, endpoint)
                assert err.value.reason == "owner_not_authenticated"
            finally:
                await client.close()
            assert owner.calls == 0

    _run(main)


@pytest.mark.parametrize("client_auth", ["optional", "required"])
def test_the_diagnosis_presents_no_client_certificate_to_an_unverified_server(
    tls_dir: Path, client_auth: str
) -> None:
    """The diagnosis reads the certificate of a server that already failed authentication: the launcher
    must not show it its own certificate (nor sign with its key) there. A server that insists on one
    only makes the subject unknown; the refusal stays a refusal."""
    seen: list[object] = []

    async def main() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls_dir / "client.pem"), str(tls_dir / "client.key"))
        ctx.load_verify_locations(cafile=str(tls_dir / "ca.pem"))
        ctx.verify_mode = ssl.CERT_OPTIONAL if client_auth == "optional" else ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["h2"])

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ssl_object = writer.get_extra_info("ssl_object")
            seen.append(ssl_object.getpeercert() if ssl_object is not None else None)
            with contextlib.suppress(Exception):
                await reader.read(1)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            why = await _Diagnosis(tls_dir, "launcher").refusal(
                f"127.0.0.1:{port}", "owner.sevlaunch.internal"
            )
        finally:
            server.close()
            await server.wait_closed()
        assert why is not None and "not valid for owner.sevlaunch.internal" in why
        if client_auth == "optional":
            assert "'client'" in why and "seen on a second connection" in why
        assert all(not cert for cert in seen)  # no connection carried the launcher's certificate

    _run(main)


def test_an_unreachable_owner_is_unavailable_not_a_refusal(tls_dir: Path) -> None:
    async def main() -> None:
        async with _serve(tls_dir, "owner") as (endpoint, _):
            pass  # stopped: nothing listens there any more
        client = OwnerClient(tls_dir, "launcher")
        try:
            with pytest.raises(Unavailable) as err:
                await _open(client, endpoint)
            assert err.value.reason == "owner_unavailable"
        finally:
            await client.close()

    _run(main)


def test_platform_identity_is_checked_too(tls_dir: Path) -> None:
    async def main() -> None:
        for served_as, ok in (("platform", True), ("owner", False)):
            async with _serve(tls_dir, served_as) as (endpoint, _):
                client = PlatformClient(endpoint, tls_dir, "launcher")
                try:
                    if ok:
                        await client.certificate_chain()
                    else:
                        with pytest.raises(PermissionDenied) as err:
                            await client.certificate_chain()
                        assert err.value.reason == "platform_not_authenticated"
                        assert "'owner'" in err.value.detail
                finally:
                    await client.close()

    _run(main)


def _issue_production_cert(tls_dir: Path, out: Path, name: str, dns: str) -> None:
    """A server certificate from the deployment's CA for a Kubernetes-style service name only (no
    localhost, no sevlaunch.internal name), as a production CA would issue it."""
    ca_key = serialization.load_pem_private_key((default_ca_dir(tls_dir) / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "owner")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(exist_ok=True)
    shutil.copy(tls_dir / "ca.pem", out / "ca.pem")
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def test_a_production_name_is_accepted_when_the_certificate_carries_it(tls_dir: Path, tmp_path: Path) -> None:
    _issue_production_cert(tls_dir, tmp_path, "owner", PROD_NAME)

    async def main() -> None:
        async with _serve(tmp_path, "owner") as (endpoint, owner):
            # The endpoint's host (127.0.0.1) is not in that certificate: the identity replaces it.
            good = OwnerClient(tls_dir, "launcher", owner_identity=PROD_NAME)
            default = OwnerClient(tls_dir, "launcher")  # expects owner.sevlaunch.internal: not in it
            try:
                assert (await _open(good, endpoint)).session_id == "s-1"
                with pytest.raises(PermissionDenied) as err:
                    await _open(default, endpoint)
                assert err.value.reason == "owner_not_authenticated"
            finally:
                await good.close()
                await default.close()
            assert owner.calls == 1
        # ... and a dev `owner` certificate is not valid for the production name.
        async with _serve(tls_dir, "owner") as (endpoint, owner):
            client = OwnerClient(tls_dir, "launcher", owner_identity=PROD_NAME)
            try:
                with pytest.raises(PermissionDenied):
                    await _open(client, endpoint)
            finally:
                await client.close()
            assert owner.calls == 0

    _run(main)


def test_server_names() -> None:
    assert server_name("owner") == f"owner.{SERVER_NAME_DOMAIN}" == "owner.sevlaunch.internal"
    assert server_name("platform") == "platform.sevlaunch.internal"
    assert server_name("Owner.Tenant.SVC.") == "owner.tenant.svc"  # a full DNS name as given
    for bad in ("", "a b", "*.example.com", "owner:50053", "-x", "x" * 64, "a..b"):
        with pytest.raises(ValueError):
            server_name(bad)
    assert is_reserved("owner.sevlaunch.internal") and is_reserved("SEVLAUNCH.INTERNAL.")
    assert not is_reserved("sevlaunch.internal.example.com") and not is_reserved("owner")


def test_ip_literals_are_not_identities() -> None:
    # Every dev server certificate carries 127.0.0.1 and ::1: such a name would accept any of them.
    for ip in (
        "127.0.0.1",
        "10.1.2.3",
        "::1",
        "[::1]",
        "fe80::1%eth0",
        "::ffff:127.0.0.1",
        "127.1",
        "1.2.3.0x4",
    ):
        with pytest.raises(ValueError, match="IP address"):
            server_name(ip)
    assert server_name("host1.example.com") == "host1.example.com"
    assert server_name("10") == "10.sevlaunch.internal"  # a (numeric) identity name, not an address


def test_bad_expected_identities_stop_the_launcher_at_start(tmp_path: Path) -> None:
    base = ["--tls-dir", str(tmp_path), "--db", str(tmp_path / "l.db")]
    cfg = config_from_args(build_parser().parse_args([*base, "--owner-identity", PROD_NAME]))
    assert cfg.owner_identity == PROD_NAME
    for flag in ("--owner-identity", "--platform-identity"):
        with pytest.raises(ValueError, match=flag):
            config_from_args(build_parser().parse_args([*base, flag, "not a name"]))
        with pytest.raises(ValueError, match=f"{flag}: .*IP address"):
            config_from_args(build_parser().parse_args([*base, flag, "127.0.0.1"]))


def test_split_endpoint() -> None:
    assert split_endpoint("owner.example:50053") == ("owner.example", 50053)
    assert split_endpoint("[::1]:50053") == ("::1", 50053)
    with pytest.raises(ValueError):
        split_endpoint("no-port")
