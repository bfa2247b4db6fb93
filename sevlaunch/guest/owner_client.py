"""`OwnerClient` over gRPC: the owner's OwnerGuest service, server-authenticated TLS only.

The channel trusts exactly one CA, the one the init data names (never the system's store), and presents
no client certificate. The server must carry the endpoint's host name; a server whose certificate does
not chain to that CA fails the handshake, which surfaces as `OwnerUnavailable`.
"""

from __future__ import annotations

import grpc

from sevlaunch.guest.agent import OwnerRefused, OwnerUnavailable
from sevlaunch.rpc.errors import error_info
from sevlaunch.rpc.v1 import guest_pb2, guest_pb2_grpc
from sevlaunch.sev.errors import MalformedInput
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.secret_wrap import WrappedSecret

DEFAULT_TIMEOUT = 30.0
# A report, a certificate table of a few pages and a key: far below this; the owner answers less still.
MAX_MESSAGE_BYTES = 256 * 1024
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class GrpcOwnerClient:
    def __init__(self, init_data: InitData, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        endpoint = init_data.endpoint
        credentials = grpc.ssl_channel_credentials(root_certificates=init_data.ca_pem.encode("ascii"))
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.ssl_target_name_override", endpoint.server_name),
            ("grpc.enable_retries", 0),
        ]
        self._channel = grpc.secure_channel(endpoint.grpc_target, credentials, options=options)
        self._stub = guest_pb2_grpc.OwnerGuestStub(self._channel)
        self._timeout = timeout
        self._target = endpoint.url

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcOwnerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _failed(self, err: grpc.RpcError, call: str) -> Exception:
        info = error_info(err)
        if info.code in _UNREACHABLE:
            return OwnerUnavailable(f"{call} to {self._target}: {info.code.name.lower()}: {info.message}")
        return OwnerRefused(info.reason or info.code.name.lower(), f"{call}: {info.message}")

    def get_challenge(self, authorization_id: str) -> bytes:
        request = guest_pb2.GetChallengeRequest(authorization_id=authorization_id)
        try:
            response = self._stub.GetChallenge(request, timeout=self._timeout, wait_for_ready=False)
        except grpc.RpcError as err:
            raise self._failed(err, "GetChallenge") from None
        return bytes(response.challenge)

    def attest(
        self,
        *,
        authorization_id: str,
        challenge: bytes,
        report: bytes,
        cert_table: bytes | None,
        guest_public_key: bytes,
    ) -> WrappedSecret:
        request = guest_pb2.AttestRequest(
            authorization_id=authorization_id,
            challenge=challenge,
            report=report,
            guest_public_key=guest_public_key,
        )
        if cert_table is not None:
            request.cert_table = cert_table
        try:
            response = self._stub.Attest(request, timeout=self._timeout, wait_for_ready=False)
        except grpc.RpcError as err:
            raise self._failed(err, "Attest") from None
        try:
            return WrappedSecret(bytes(response.hpke_enc), bytes(response.ciphertext))
        except MalformedInput as exc:
            raise OwnerRefused("bad_owner_answer", f"Attest: {exc.detail}") from None
