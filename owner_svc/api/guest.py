"""The owner's guest port: OwnerGuest (GetChallenge, Attest) and health, on a gRPC server of its own.

A guest has no client certificate: its attestation report is its credential. So this port is
server-authenticated TLS only (it never asks for a client certificate), and nothing but OwnerGuest and
the health service is registered on it: every other RPC of the owner answers UNIMPLEMENTED here. Each
call first passes the rate limits (per peer address, then for the port as a whole), before its request
is even decoded; then the core decides. Errors go out typed, as on the main port (the shell's mapping).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import Counter

from owner_svc.api.ratelimit import GuestRateLimiter, peer_address
from owner_svc.core.reasons import Reason
from owner_svc.core.service import OwnerCore
from sevlaunch.errors import InvalidArgument, ResourceExhausted
from sevlaunch.rpc import ANY_AUTHENTICATED, AuthzPolicy, RpcMetrics, map_exception, method_rules
from sevlaunch.rpc.authz import STANDARD_METHODS
from sevlaunch.rpc.interceptor import Caller, ShellInterceptor, _request_id
from sevlaunch.rpc.tls import TLSMaterialError
from sevlaunch.rpc.v1 import guest_pb2, guest_pb2_grpc
from sevlaunch.snp.secret_wrap import SUITE_NAME

log = logging.getLogger("owner_svc.guest")

Ctx = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = guest_pb2.DESCRIPTOR.services_by_name["OwnerGuest"].full_name
#: A report (1184 bytes), a certificate table of a few certificates and a key: far below this.
MAX_MESSAGE_BYTES = 256 * 1024
DEFAULT_PEER_RATE = 2.0
DEFAULT_PEER_BURST = 10.0
DEFAULT_GLOBAL_RATE = 50.0
DEFAULT_GLOBAL_BURST = 200.0


class GuestServicer(guest_pb2_grpc.OwnerGuestServicer):
    def __init__(self, core: OwnerCore) -> None:
        self.core = core

    async def GetChallenge(
        self, request: guest_pb2.GetChallengeRequest, context: Ctx
    ) -> guest_pb2.GetChallengeResponse:
        peer = peer_address(context.peer())
        issued = await asyncio.to_thread(self.core.issue_snp_challenge, peer, request.authorization_id)
        expires = timestamp_pb2.Timestamp()
        expires.FromDatetime(issued.expires_at)
        return guest_pb2.GetChallengeResponse(challenge=issued.value, expires_at=expires)

    async def Attest(self, request: guest_pb2.AttestRequest, context: Ctx) -> guest_pb2.AttestResponse:
        peer = peer_address(context.peer())
        which = request.WhichOneof("certificates")
        vek: bytes = b""
        chain: tuple[bytes, ...] = ()
        if which == "certs":
            c = request.certs
            if not c.vek_cert and (c.ask_cert or c.ark_cert):
                raise InvalidArgument(Reason.BAD_CERTIFICATES, "certs: an ASK or ARK without its VCEK/VLEK")
            vek, chain = bytes(c.vek_cert), tuple(bytes(x) for x in (c.ask_cert, c.ark_cert) if x)
        released = await asyncio.to_thread(
            self.core.attest_snp,
            peer,
            request.authorization_id,
            bytes(request.challenge),
            bytes(request.report),
            vek=vek,
            chain=chain,
            cert_table=bytes(request.cert_table) if which == "cert_table" else b"",
            guest_public_key=bytes(request.guest_public_key),
        )
        if released.no_secret:
            # Every check passed; the workload consents to launching without a secret and has none.
            return guest_pb2.AttestResponse(suite=SUITE_NAME)
        return guest_pb2.AttestResponse(
            hpke_enc=released.enc, ciphertext=released.ciphertext, suite=SUITE_NAME
        )


class _AnyPeer(AuthzPolicy):
    """The guest port's rule: any peer may call the methods registered there (there is no identity to
    check: the report is the credential), nothing else."""

    def allows(self, method: str, identity: str | None) -> bool:
        return method in self.rules

    def with_standard_methods(self) -> AuthzPolicy:
        return _AnyPeer({**STANDARD_METHODS, **self.rules}, self.identity_roles)


class GuestInterceptor(ShellInterceptor):
    """The shell's interceptor (decode after the check, typed errors, metrics, one log line a call) with
    the rate limits in front, keyed by the peer's address, and no role check (`_AnyPeer`)."""

    def __init__(self, limiter: GuestRateLimiter, metrics: RpcMetrics, limited: Counter) -> None:
        methods = {
            m.name: (ANY_AUTHENTICATED,) for m in guest_pb2.DESCRIPTOR.services_by_name["OwnerGuest"].methods
        }
        super().__init__(_AnyPeer(method_rules(SERVICE_NAME, methods)).with_standard_methods(), metrics)
        self._limiter = limiter
        self._limited = limited

    async def _enter(self, method: str, *args: Any) -> Caller:
        context: grpc.aio.ServicerContext[Any, Any] = args[-1]
        scope = self._limiter.allow(peer_address(context.peer()))
        if scope is not None:
            self._limited.labels(scope).inc()
            refusal = ResourceExhausted(
                Reason.RATE_LIMITED, f"too many requests ({scope} limit); retry later"
            )
            status = map_exception(refusal, _request_id(context)).to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        caller: Caller = await super()._enter(method, *args)
        return caller


def guest_credentials(cert_file: str | Path, key_file: str | Path) -> grpc.ServerCredentials:
    try:
        cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    except OSError as exc:
        raise TLSMaterialError(f"cannot read {exc.filename}: {exc.strerror}") from None
    # No root certificates and no client authentication: guests present no certificate.
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=None, require_client_auth=False)


class GuestServer:
    def __init__(
        self,
        core: OwnerCore,
        *,
        listen: str,
        cert_file: str | Path,
        key_file: str | Path,
        metrics: RpcMetrics,
        limiter: GuestRateLimiter,
    ) -> None:
        self._listen = listen
        self._credentials = guest_credentials(cert_file, key_file)
        limited = Counter(
            "sevlaunch_owner_guest_rate_limited",
            "Guest-port calls refused by a rate limit, by scope (peer, global)",
            ["scope"],
            registry=metrics.registry,
        )
        self.grpc_server: grpc.aio.Server = grpc.aio.server(
            interceptors=[GuestInterceptor(limiter, metrics, limited)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        guest_pb2_grpc.add_OwnerGuestServicer_to_server(GuestServicer(core), self.grpc_server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self.port = 0

    @property
    def host(self) -> str:
        return self._listen.rpartition(":")[0].strip("[]")

    async def start(self) -> None:
        try:
            port = self.grpc_server.add_secure_port(self._listen, self._credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"cannot bind the guest port {self._listen}")
        self.port = port
        await self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("guest port started", extra={"port": port})

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)
