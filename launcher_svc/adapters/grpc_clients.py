"""The launcher's clients of platform_svc and owner_svc, over mTLS with the launcher's identity.

The server at the other end is authenticated by its certificate's subject CN, not only by the CA: the
owner must be `owner_identity` (`--owner-identity`), the platform `platform_identity`
(`--platform-identity`). The connections are made by `peer_tls.VerifiedTLSConnector`, whose docstring
says why gRPC's own checks are not enough and how the check covers the very connection the calls use.

gRPC failures become `ServiceError`s that keep the remote's ErrorInfo reason (an owner's
`measurement_mismatch` stays `measurement_mismatch`), so a FAILED event says why the owner refused.
A server refused for its identity becomes `PermissionDenied("<who>_not_authenticated")`.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import grpc
import grpc.aio

from launcher_svc.adapters.peer_tls import VerifiedTLSConnector, client_context
from launcher_svc.core.ports import OwnerSession, ReleasedSecret
from sevlaunch.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from sevlaunch.rpc import error_info
from sevlaunch.rpc.v1 import common_pb2, owner_pb2, owner_pb2_grpc, platform_pb2, platform_pb2_grpc

# Channels are kept per endpoint; owners are few per host, and the set is bounded anyway.
MAX_OWNER_CHANNELS = 64


def remote_error(exc: grpc.RpcError, who: str) -> ServiceError:
    info = error_info(exc)
    reason = info.reason or f"{who}_error"
    detail = f"{who}: {info.message}"[:512]
    if info.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"{who}_unavailable", detail)
    if info.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{who}_deadline", detail)
    if info.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return PermissionDenied(reason, detail)
    if info.code is grpc.StatusCode.NOT_FOUND:
        return NotFound(reason, detail)
    if info.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(reason, detail)
    return FailedPrecondition(reason, detail)


class _VerifiedChannel:
    """A gRPC channel to one endpoint through a `VerifiedTLSConnector` expecting one identity."""

    def __init__(self, endpoint: str, context: ssl.SSLContext, expected: str, who: str) -> None:
        self.who = who
        self.connector = VerifiedTLSConnector(endpoint, context, expected)
        self.channel: grpc.aio.Channel | None = None

    async def open(self) -> grpc.aio.Channel:
        if self.channel is None:
            target = await self.connector.start()
            self.channel = grpc.aio.insecure_channel(target)  # plaintext only to our private socket
        return self.channel

    def error(self, exc: grpc.RpcError, refusals_before: int) -> ServiceError:
        if self.connector.refusals > refusals_before or self.connector.refused_last:
            return PermissionDenied(
                f"{self.who}_not_authenticated", f"{self.who}: {self.connector.last_refusal}"[:512]
            )
        return remote_error(exc, self.who)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
            self.channel = None
        await self.connector.close()


class PlatformClient:
    def __init__(
        self,
        endpoint: str,
        tls_dir: str | Path,
        identity: str = "launcher",
        *,
        platform_identity: str = "platform",
    ) -> None:
        self._conn = _VerifiedChannel(
            endpoint, client_context(tls_dir, identity), platform_identity, "platform"
        )
        self._lock = asyncio.Lock()

    async def certificate_chain(self) -> object:
        async with self._lock:
            channel = await self._conn.open()
        stub = platform_pb2_grpc.PlatformServiceStub(channel)
        before = self._conn.connector.refusals
        try:
            reply = await stub.GetCertificateChain(platform_pb2.GetCertificateChainRequest())
        except grpc.RpcError as exc:
            raise self._conn.error(exc, before) from None
        return reply.platform.chain

    async def close(self) -> None:
        await self._conn.close()


class OwnerClient:
    """One verified channel per owner endpoint named in launch requests; every owner must present the
    `owner_identity` certificate, whoever named the endpoint."""

    def __init__(
        self, tls_dir: str | Path, identity: str = "launcher", *, owner_identity: str = "owner"
    ) -> None:
        self._context = client_context(tls_dir, identity)
        self._owner_identity = owner_identity
        self._channels: dict[str, _VerifiedChannel] = {}
        self._lock = asyncio.Lock()

    async def _conn(self, endpoint: str) -> tuple[_VerifiedChannel, owner_pb2_grpc.OwnerServiceAsyncStub]:
        async with self._lock:
            conn = self._channels.get(endpoint)
            if conn is None:
                if len(self._channels) >= MAX_OWNER_CHANNELS:
                    _, oldest = self._channels.popitem()
                    await oldest.close()
                conn = _VerifiedChannel(endpoint, self._context, self._owner_identity, "owner")
                self._channels[endpoint] = conn
            channel = await conn.open()
            return conn, owner_pb2_grpc.OwnerServiceStub(channel)  # an aio channel gives the async stub

    async def open_session(
        self, endpoint: str, *, workload_id: str, chain: object, policy: int
    ) -> OwnerSession:
        if not isinstance(chain, common_pb2.CertificateChain):
            raise TypeError("the chain comes from PlatformClient")
        conn, stub = await self._conn(endpoint)
        before = conn.connector.refusals
        try:
            reply = await stub.OpenSession(
                owner_pb2.OpenSessionRequest(workload_id=workload_id, chain=chain, policy=policy)
            )
        except grpc.RpcError as exc:
            raise conn.error(exc, before) from None
        return OwnerSession(reply.session_id, reply.godh_cert, reply.session_blob, reply.policy)

    async def release_secret(
        self,
        endpoint: str,
        *,
        session_id: str,
        measurement: bytes,
        api_major: int,
        api_minor: int,
        build_id: int,
        policy: int,
    ) -> ReleasedSecret:
        conn, stub = await self._conn(endpoint)
        before = conn.connector.refusals
        try:
            reply = await stub.ReleaseSecret(
                owner_pb2.ReleaseSecretRequest(
                    session_id=session_id,
                    launch_measurement=measurement,
                    firmware=common_pb2.FirmwareVersion(
                        api_major=api_major, api_minor=api_minor, build_id=build_id
                    ),
                    policy=policy,
                )
            )
        except grpc.RpcError as exc:
            raise conn.error(exc, before) from None
        # Consent to run without a secret is the owner's explicit `no_secret`, never empty blobs; the
        # core also needs the spec's own `launch_without_secret` before it resumes without injecting.
        return ReleasedSecret(
            header=reply.secret_header, payload=reply.secret_payload, no_secret=reply.no_secret
        )

    async def close(self) -> None:
        async with self._lock:
            for conn in self._channels.values():
                await conn.close()
            self._channels.clear()
