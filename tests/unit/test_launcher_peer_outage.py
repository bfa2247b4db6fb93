"""A peer outage must not outlast the peer (issue 12, item 4): once the owner or platform serves again,
launches get through within about a second, however long the outage was. gRPC's default reconnect
backoff (1 s growing by 1.6x to 120 s) kept the launcher's cached channel refusing `owner_unavailable`
for seconds to minutes after the peer was back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from launcher_svc.adapters.grpc_clients import (
    MAX_RECONNECT_BACKOFF_MS,
    OwnerClient,
    PlatformClient,
    channel_options,
)
from launcher_svc.core.ports import PlatformChain
from sevlaunch.errors import Unavailable
from sevlaunch.rpc.tls import server_credentials
from sevlaunch.rpc.v1 import owner_pb2, owner_pb2_grpc, platform_pb2, platform_pb2_grpc

CHAIN = PlatformChain(b"", b"", b"", b"", b"", b"")


class _Owner(owner_pb2_grpc.OwnerServiceServicer):
    async def OpenSession(self, request: Any, context: Any) -> owner_pb2.OpenSessionResponse:
        return owner_pb2.OpenSessionResponse(session_id="s-1", policy=request.policy)


class _Platform(platform_pb2_grpc.PlatformServiceServicer):
    async def GetCertificateChain(self, request: Any, context: Any) -> Any:
        return platform_pb2.GetCertificateChainResponse()


async def _serve(tls_dir: Path, port: int = 0) -> tuple[grpc.aio.Server, int]:
    """The owner and platform services over mTLS, as `owner` (and `platform`: one certificate each)."""
    server = grpc.aio.server()
    owner_pb2_grpc.add_OwnerServiceServicer_to_server(_Owner(), server)
    platform_pb2_grpc.add_PlatformServiceServicer_to_server(_Platform(), server)
    bound = server.add_secure_port(f"127.0.0.1:{port}", server_credentials(tls_dir, "owner"))
    await server.start()
    return server, bound


@pytest.mark.parametrize("peer", ["owner", "platform"])
def test_a_peer_outage_does_not_keep_launches_refused_after_the_peer_is_back(
    tls_dir: Path, peer: str
) -> None:
    async def main() -> None:
        server, port = await _serve(tls_dir)
        endpoint = f"127.0.0.1:{port}"
        owners = OwnerClient(tls_dir, "launcher")
        platform = PlatformClient(endpoint, tls_dir, "launcher", platform_identity="owner")

        async def call() -> None:
            if peer == "owner":
                await owners.open_session(endpoint, workload_id="w", chain=CHAIN, policy=3)
            else:
                await platform.certificate_chain()

        try:
            await call()
            await server.stop(None)
            # The outage: the channel tries to reconnect and fails, and backs off.
            for _ in range(3):
                with pytest.raises(Unavailable) as err:
                    await call()
                assert err.value.reason == f"{peer}_unavailable"
            server, again = await _serve(tls_dir, port)
            assert again == port
            # Back: the very next launch gets through. (With gRPC's default backoff the cached channel
            # kept failing fast for a second after even this short outage, and for minutes after a long
            # one: its next connection attempt was due only then.)
            began = time.monotonic()
            await call()
            assert time.monotonic() - began < 1.0
        finally:
            await owners.close()
            await platform.close()
            await server.stop(None)

    asyncio.run(main())


def test_reconnect_backoff_is_capped_at_a_second() -> None:
    # However long an outage lasts, a channel retries its connection at least once a second.
    options = dict(channel_options("owner.sevlaunch.internal"))
    assert options["grpc.max_reconnect_backoff_ms"] == MAX_RECONNECT_BACKOFF_MS <= 1000
    assert options["grpc.initial_reconnect_backoff_ms"] <= MAX_RECONNECT_BACKOFF_MS
    # A channel made after an outage must not share a backed-off connection with the one it replaces.
    assert options["grpc.use_local_subchannel_pool"] == 1
    assert options["grpc.ssl_target_name_override"] == "owner.sevlaunch.internal"


class _OwnerStoreDown(owner_pb2_grpc.OwnerServiceServicer):
    async def OpenSession(self, request: Any, context: Any) -> owner_pb2.OpenSessionResponse:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "store_unavailable")
        raise AssertionError("unreachable")


def test_a_connected_peer_answering_unavailable_keeps_its_channel(tls_dir: Path) -> None:
    # Only a channel that could not connect is replaced: an owner that answers UNAVAILABLE itself (its
    # store is down) keeps the connection, and the other launches' calls on it go on.
    async def main() -> None:
        server = grpc.aio.server()
        owner_pb2_grpc.add_OwnerServiceServicer_to_server(_OwnerStoreDown(), server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(tls_dir, "owner"))
        await server.start()
        endpoint = f"127.0.0.1:{port}"
        owners = OwnerClient(tls_dir, "launcher")
        try:
            with pytest.raises(Unavailable):
                await owners.open_session(endpoint, workload_id="w", chain=CHAIN, policy=3)
            conn, _ = await owners._conn(endpoint)
            first = conn.channel
            with pytest.raises(Unavailable):
                await owners.open_session(endpoint, workload_id="w", chain=CHAIN, policy=3)
            assert conn.channel is first
        finally:
            await owners.close()
            await server.stop(None)

    asyncio.run(main())
