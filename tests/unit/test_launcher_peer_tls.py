"""`VerifiedTLSConnector`: a connection reaches the endpoint only when its server certificate names the
expected identity; otherwise nothing is relayed. A plain TLS echo server plays the remote end."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
from pathlib import Path

import pytest

from launcher_svc.adapters.peer_tls import VerifiedTLSConnector, client_context, split_endpoint


async def _echo_server(tls_dir: Path, identity: str) -> tuple[asyncio.AbstractServer, int, list[bytes]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_dir / f"{identity}.pem", tls_dir / f"{identity}.key")
    ctx.load_verify_locations(tls_dir / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    received: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read(100)
        received.append(data)
        w.write(data.upper())
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1], received


async def _roundtrip(target: str) -> bytes:
    r, w = await asyncio.open_unix_connection(target.removeprefix("unix:"))
    w.write(b"hello")
    await w.drain()
    data = await asyncio.wait_for(r.read(100), 5)
    w.close()
    return data


@pytest.mark.parametrize(("served_as", "accepted"), [("owner", True), ("client", False), ("launcher", False)])
def test_only_the_expected_identity_is_relayed(tls_dir: Path, served_as: str, accepted: bool) -> None:
    async def main() -> None:
        server, port, received = await _echo_server(tls_dir, served_as)
        conn = VerifiedTLSConnector(f"localhost:{port}", client_context(tls_dir, "launcher"), "owner")
        target = await conn.start()
        try:
            sock_dir = Path(target.removeprefix("unix:")).parent
            assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o700  # only this user reaches it
            reply = await _roundtrip(target)
            if accepted:
                assert reply == b"HELLO" and received == [b"hello"]
                assert (conn.refusals, conn.refused_last) == (0, False)
            else:
                assert reply == b""
                await asyncio.sleep(0.1)
                assert received in ([], [b""])  # the server never saw a byte of the call
                assert (conn.refusals, conn.refused_last) == (1, True)
                assert conn.last_refusal == f"the server is {served_as!r}, not 'owner'"
        finally:
            await conn.close()
            server.close()
        assert not sock_dir.exists()

    asyncio.run(main())


def test_a_server_of_another_ca_is_not_relayed(tls_dir: Path, foreign_tls_dir: Path) -> None:
    async def main() -> None:
        server, port, received = await _echo_server(foreign_tls_dir, "owner")
        conn = VerifiedTLSConnector(f"localhost:{port}", client_context(tls_dir, "launcher"), "owner")
        target = await conn.start()
        try:
            assert await _roundtrip(target) == b""
            assert received in ([], [b""]) and conn.refusals == 0  # a failed handshake, not an identity
        finally:
            await conn.close()
            server.close()

    asyncio.run(main())


def test_split_endpoint() -> None:
    assert split_endpoint("owner.example:50053") == ("owner.example", 50053)
    assert split_endpoint("[::1]:50053") == ("::1", 50053)
    with pytest.raises(ValueError):
        split_endpoint("no-port")
