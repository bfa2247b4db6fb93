"""mTLS connections whose server is checked by identity, for the launcher's gRPC clients.

Why this exists. Every certificate of the deployment comes from one CA, and the dev certificates (and
any made with `sevlaunch dev-certs --san`) share SANs, so gRPC's checks (chain to the CA, endpoint name
in the SANs, even with `grpc.ssl_target_name_override`) accept *any* service's certificate. The owner
endpoint is chosen by the launch's caller: a caller holding the `client` certificate could run its own
"owner" there, release a secret of its choosing and learn the measurement, as if it were the tenant.
The services tell identities apart by the certificate's subject CN; the launcher must do the same for
the servers it calls: the owner must be `--owner-identity`, the platform `--platform-identity`.

How. grpcio's Python API exposes neither a peer-verification callback nor the server's certificate on
the client side (no client `auth_context`), and a separate probe handshake would check another
connection than the one the calls travel on. So the launcher makes the TLS connections itself:
`VerifiedTLSConnector` listens on a unix socket in a private (0700) directory, and for every connection
gRPC opens there it opens one TLS connection to the endpoint (the launcher's client certificate, the
CA, the endpoint name in the SANs as before, ALPN h2), checks that the server certificate's subject CN
is exactly the expected identity, and only then relays bytes. A connection whose peer is anyone else
is closed before a single byte of a call has been sent on it, so the call fails (UNAVAILABLE) and the
client turns it into `PermissionDenied(<who>_not_authenticated)`. gRPC itself speaks plaintext HTTP/2
over the unix socket, which only this process can reach (anyone who could would act with the
launcher's certificate, hence the private directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import ssl
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from sevlaunch.rpc import TLSMaterialError

log = logging.getLogger("launcher_svc")

HANDSHAKE_TIMEOUT = 10.0
_CHUNK = 1 << 16


class PeerIdentityError(Exception):
    """The server's certificate names another identity than the one expected."""


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' → (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def client_context(tls_dir: str | Path, identity: str) -> ssl.SSLContext:
    """TLS 1.2+ with the identity's certificate, trusting only the folder's CA, checking the endpoint
    name against the SANs (what gRPC checked) and offering h2 (gRPC servers require it)."""
    base = Path(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(base / "ca.pem"))
        ctx.load_cert_chain(str(base / f"{identity}.pem"), str(base / f"{identity}.key"))
    except (OSError, ssl.SSLError) as exc:
        raise TLSMaterialError(f"cannot load the TLS identity {identity!r} from {base}: {exc}") from None
    ctx.set_alpn_protocols(["h2"])
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The subject CN of the verified server certificate; one CN exactly, else PeerIdentityError."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise PeerIdentityError("the server presented no certificate")
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PeerIdentityError("the server certificate does not carry exactly one subject CN")
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


class VerifiedTLSConnector:
    """A local gRPC target (`unix:...`) whose connections reach `endpoint` over mTLS, each one only
    after its server proved to be `expected` (see the module docstring)."""

    def __init__(
        self,
        endpoint: str,
        context: ssl.SSLContext,
        expected: str,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.endpoint = endpoint
        self.expected = expected
        self._host, self._port = split_endpoint(endpoint)
        self._ctx = context
        self._timeout = handshake_timeout
        self._dir: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Connections refused for their peer's identity, why the last one was (no secrets in it), and
        #: whether the latest connection that reached a handshake was refused (gRPC may fail calls
        #: during its reconnect backoff without opening a new connection).
        self.refusals = 0
        self.last_refusal = ""
        self.refused_last = False

    async def start(self) -> str:
        """Starts listening; returns the gRPC target to dial."""
        self._dir = tempfile.mkdtemp(prefix="sevlaunch-peer-")  # 0700: only this user reaches it
        path = os.path.join(self._dir, "s")
        self._server = await asyncio.start_unix_server(self._handle, path=path)
        os.chmod(path, 0o600)
        return f"unix:{path}"

    async def _handle(self, local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            try:
                remote_r, remote_w = await asyncio.wait_for(
                    asyncio.open_connection(
                        self._host, self._port, ssl=self._ctx, server_hostname=self._host
                    ),
                    self._timeout,
                )
            except (OSError, TimeoutError) as exc:  # ssl.SSLError (a bad chain, a name) is an OSError
                self.refused_last = False
                log.warning(
                    "TLS connection failed",
                    extra={"endpoint": self.endpoint, "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
                return
            try:
                who = peer_identity(remote_w.get_extra_info("ssl_object"))
                if who != self.expected:
                    raise PeerIdentityError(f"the server is {who!r}, not {self.expected!r}")
            except (PeerIdentityError, ValueError) as exc:
                # Closed before one byte of a call went out on it.
                remote_w.close()
                self.refusals += 1
                self.last_refusal = str(exc)[:200]
                self.refused_last = True
                log.warning(
                    "server refused: wrong identity",
                    extra={"endpoint": self.endpoint, "expected": self.expected, "error": self.last_refusal},
                )
                return
            self.refused_last = False
            try:
                await asyncio.gather(self._pipe(local_r, remote_w), self._pipe(remote_r, local_w))
            finally:
                remote_w.close()
        finally:
            local_w.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(_CHUNK):
                dst.write(data)
                await dst.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            dst.close()  # the other direction then reads EOF and ends too

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
