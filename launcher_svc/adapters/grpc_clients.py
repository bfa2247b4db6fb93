"""The launcher's clients of platform_svc and owner_svc, over mTLS with the launcher's identity.

gRPC failures become `ServiceError`s that keep the remote's ErrorInfo reason (an owner's
`measurement_mismatch` stays `measurement_mismatch`), so a FAILED event says why the owner refused.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio

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
from sevlaunch.rpc import error_info, secure_channel
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


class PlatformClient:
    def __init__(self, endpoint: str, tls_dir: str | Path, identity: str = "launcher") -> None:
        self._channel = secure_channel(endpoint, tls_dir, identity)
        self._stub = platform_pb2_grpc.PlatformServiceStub(self._channel)

    async def certificate_chain(self) -> object:
        try:
            reply = await self._stub.GetCertificateChain(platform_pb2.GetCertificateChainRequest())
        except grpc.RpcError as exc:
            raise remote_error(exc, "platform") from None
        return reply.platform.chain

    async def close(self) -> None:
        await self._channel.close(None)


class OwnerClient:
    """One mTLS channel per owner endpoint named in launch requests."""

    def __init__(self, tls_dir: str | Path, identity: str = "launcher") -> None:
        self._tls_dir = tls_dir
        self._identity = identity
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._lock = asyncio.Lock()

    async def _stub(self, endpoint: str) -> owner_pb2_grpc.OwnerServiceAsyncStub:
        async with self._lock:
            channel = self._channels.get(endpoint)
            if channel is None:
                if len(self._channels) >= MAX_OWNER_CHANNELS:
                    _, oldest = self._channels.popitem()
                    await oldest.close(None)
                channel = secure_channel(endpoint, self._tls_dir, self._identity)
                self._channels[endpoint] = channel
            return owner_pb2_grpc.OwnerServiceStub(channel)  # an aio channel gives the async stub

    async def open_session(
        self, endpoint: str, *, workload_id: str, chain: object, policy: int
    ) -> OwnerSession:
        if not isinstance(chain, common_pb2.CertificateChain):
            raise TypeError("the chain comes from PlatformClient")
        stub = await self._stub(endpoint)
        try:
            reply = await stub.OpenSession(
                owner_pb2.OpenSessionRequest(workload_id=workload_id, chain=chain, policy=policy)
            )
        except grpc.RpcError as exc:
            raise remote_error(exc, "owner") from None
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
        stub = await self._stub(endpoint)
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
            raise remote_error(exc, "owner") from None
        # An accepted measurement with nothing to inject is the owner's consent to run without a secret.
        waived = not reply.secret_header and not reply.secret_payload
        return ReleasedSecret(header=reply.secret_header, payload=reply.secret_payload, waived=waived)

    async def close(self) -> None:
        async with self._lock:
            for channel in self._channels.values():
                await channel.close(None)
            self._channels.clear()
