"""The launcher's clients of platform_svc and owner_svc, over mTLS with the launcher's identity.

The server at the other end is authenticated as an identity, not only by the CA. Every certificate of
the deployment comes from one CA, and the owner endpoint is chosen by the launch's caller: a caller
holding the `client` (or any other) certificate could run its own "owner" there, release a secret of
its choosing and learn the measurement, as if it were the tenant. So each channel sets gRPC's
`grpc.ssl_target_name_override` to the expected identity's server name (`sevlaunch.tlsnames`:
`--owner-identity owner` → `owner.sevlaunch.internal`, `--platform-identity platform` →
`platform.sevlaunch.internal`, or a full DNS name as given), and gRPC's own TLS handshake checks that
the server certificate is valid for that name (chain to the CA, serverAuth, the name in its SANs).
A server whose certificate is not (the `client` or `launcher` certificate, another CA's) fails the
handshake before any call is sent on the connection; the call fails UNAVAILABLE and becomes
`PermissionDenied("<who>_not_authenticated")`.

The override replaces the check of the endpoint's host name: the host in `--platform` or in a launch's
`OwnerRef.endpoint` is not matched against the certificate. That is the point: the endpoint is only
where to connect (and the caller picks the owner's), the identity is what the server must prove.

gRPC failures become `ServiceError`s that keep the remote's ErrorInfo reason (an owner's
`measurement_mismatch` stays `measurement_mismatch`), so a FAILED event says why the owner refused.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.x509.oid import NameOID

from launcher_svc.core.ports import (
    AttestationState,
    AttestationVerdict,
    OwnerSession,
    PlatformChain,
    ReleasedSecret,
    SnpAuthorization,
    SnpLaunchConfig,
    SnpPlatformEvidence,
    SnpPlatformStatus,
)
from launcher_svc.core.reasons import LaunchReason, peer_reason
from sevlaunch.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from sevlaunch.rpc import TLSMaterialError, channel_credentials, error_info
from sevlaunch.rpc.v1 import common_pb2, owner_pb2, owner_pb2_grpc, platform_pb2, platform_pb2_grpc
from sevlaunch.tlsnames import server_name

log = logging.getLogger("launcher_svc")

# Channels are kept per endpoint; owners are few per host, and the set is bounded anyway.
MAX_OWNER_CHANNELS = 64
# The diagnosis of a failed connection (below) waits at most this long.
DIAGNOSIS_TIMEOUT = 3.0
# Reconnect backoff: gRPC's default starts at 1 s and grows by 1.6x up to 120 s, so after a long peer
# outage the channel would keep failing fast for up to two minutes after the peer is back. A launch is
# worth a connection attempt a second: capped here, and a channel that failed to connect is replaced
# (see `_IdentityChannel.error`), so the next launch after an outage does not wait for the backoff at all.
INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 1000
# How long a replaced channel keeps serving the calls still in flight on it before it is closed.
REPLACED_CHANNEL_GRACE = 30.0


def channel_options(expected: str) -> list[tuple[str, str | int]]:
    return [
        # The override is both the SNI and the name gRPC checks the certificate against, instead of the
        # endpoint's host (module docstring).
        ("grpc.ssl_target_name_override", expected),
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        # Channels otherwise share connections (and their backoff) through a process-wide pool: the
        # replacement of a channel that failed to connect must really start afresh.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def remote_error(exc: grpc.RpcError, who: str) -> ServiceError:
    info = error_info(exc)
    reason = info.reason or peer_reason(who, "error")
    detail = f"{who}: {info.message}"[:512]
    if info.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(peer_reason(who, "unavailable"), detail)
    if info.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(peer_reason(who, "deadline"), detail)
    if info.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return PermissionDenied(reason, detail)
    if info.code is grpc.StatusCode.NOT_FOUND:
        return NotFound(reason, detail)
    if info.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(reason, detail)
    return FailedPrecondition(reason, detail)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' → (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _subject_cn(der: bytes | None) -> str:
    if not der:
        return "?"
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if len(names) == 1 else "?"
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _context(base: Path, identity: str | None) -> ssl.SSLContext:
    """A client context; with `identity`, one that checks the server (CA, serverAuth, name) and presents
    that identity's certificate. Without: one that checks nothing and presents no certificate, only to
    read the certificate of a server that already failed the check (`_Diagnosis`): the launcher's
    certificate is never shown, nor its key used, to an endpoint it has not authenticated."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if identity is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        try:
            ctx.load_verify_locations(cafile=str(base / "ca.pem"))
            ctx.load_cert_chain(str(base / f"{identity}.pem"), str(base / f"{identity}.key"))
        except (OSError, ssl.SSLError) as exc:
            raise TLSMaterialError(f"cannot load the TLS identity {identity!r} from {base}: {exc}") from None
    ctx.set_alpn_protocols(["h2"])  # gRPC servers require it
    return ctx


class _Diagnosis:
    """Why a connection failed, for the error only. gRPC's handshake has already decided (and refused);
    this tells a server that failed authentication (its certificate is not valid for the expected name,
    or not trusted) from one that cannot be reached, and names the certificate's subject in the refusal.
    It runs only after a call failed UNAVAILABLE, never on the path of a good call, and its verdict never
    lets a call through: at worst a refusal is reported as `<who>_unavailable`.

    The subject is read on a second, unverified connection that presents no client certificate (the
    server's certificate arrives before the client would send one). It is what that connection saw,
    which need not be what refused the first: the detail says so. A server that insists on a client
    certificate may end the second handshake first; the subject is then "unknown"."""

    def __init__(self, tls_dir: str | Path, identity: str) -> None:
        base = Path(tls_dir)
        self._strict = _context(base, identity)  # what gRPC checks: CA, serverAuth, name
        self._peek = _context(base, None)  # only to read the certificate's subject

    async def _handshake(self, host: str, port: int, ctx: ssl.SSLContext, name: str) -> bytes | None:
        _, w = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=name), DIAGNOSIS_TIMEOUT
        )
        try:
            ssl_object = w.get_extra_info("ssl_object")
            return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        finally:
            w.close()

    async def refusal(self, endpoint: str, expected: str) -> str | None:
        """Why the server at `endpoint` is not `expected`; None when it cannot be reached, or when its
        certificate passes now (then the failure was not about its identity)."""
        try:
            host, port = split_endpoint(endpoint)
            await self._handshake(host, port, self._strict, expected)
        except ssl.SSLCertVerificationError as exc:
            why = str(exc.verify_message)
        except (OSError, TimeoutError, ValueError):
            return None
        else:
            return None
        try:
            subject = repr(_subject_cn(await self._handshake(host, port, self._peek, expected)))
        except (OSError, TimeoutError, ValueError):
            subject = "unknown"
        return (
            f"the server's certificate is not valid for {expected}: {why}"
            f" (subject {subject} seen on a second connection)"
        )


class _IdentityChannel:
    """A gRPC channel to one endpoint whose server must hold a certificate valid for `expected`."""

    def __init__(
        self,
        endpoint: str,
        credentials: grpc.ChannelCredentials,
        diagnosis: _Diagnosis,
        expected: str,
        who: str,
        interceptors: Sequence[Any] = (),
    ) -> None:
        self.endpoint = endpoint
        # Carry the current launch id to the peer (its logs and audit records) and count client metrics.
        self._interceptors = list(interceptors)
        self.expected = expected
        self.who = who
        self._credentials = credentials
        self._diagnosis = diagnosis
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self.channel = self._open()

    def _open(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            self.endpoint,
            self._credentials,
            options=channel_options(self.expected),
            interceptors=self._interceptors or None,
        )

    def _replace_if_disconnected(self) -> None:
        """A channel that could not connect sits in backoff and fails calls fast until its next attempt:
        replace it, so that the next call connects at once. A channel still connected (the peer itself
        answered UNAVAILABLE, say its store is down) is kept. The old one finishes its calls in flight."""
        if self.channel.get_state(try_to_connect=False) is grpc.ChannelConnectivity.READY:
            return
        old, self.channel = self.channel, self._open()
        task = asyncio.ensure_future(old.close(REPLACED_CHANNEL_GRACE))
        self._retiring[task] = old
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def error(self, exc: grpc.RpcError) -> ServiceError:
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            self._replace_if_disconnected()
            why = await self._diagnosis.refusal(self.endpoint, self.expected)
            if why is not None:
                log.warning(
                    "server refused: not the expected identity",
                    extra={"endpoint": self.endpoint, "expected": self.expected, "error": why},
                )
                return PermissionDenied(
                    peer_reason(self.who, "not_authenticated"), f"{self.who}: {why}"[:512]
                )
        return remote_error(exc, self.who)

    async def close(self) -> None:
        await self.channel.close(None)
        for task, old in list(self._retiring.items()):
            task.cancel()
            await old.close(None)


_SNP_PRODUCTS = {
    platform_pb2.SNP_PRODUCT_MILAN: "Milan",
    platform_pb2.SNP_PRODUCT_GENOA: "Genoa",
    platform_pb2.SNP_PRODUCT_TURIN: "Turin",
}
_VEK_KINDS = {platform_pb2.VEK_KIND_VCEK: "vcek", platform_pb2.VEK_KIND_VLEK: "vlek"}


def snp_authorize_request(
    workload_id: str, platform: SnpPlatformEvidence, config: SnpLaunchConfig
) -> owner_pb2.AuthorizeSnpLaunchRequest:
    """The launcher's view of an SNP launch as owner.proto asks for it. The TCBs are the firmware's raw
    u64s from GetSnpStatus: the committed one only when the platform knows it, the current one (the TCB
    the guest will be launched at) always. The VEK's chain goes as [ASK or ASVK, ARK]."""
    status = platform.status
    snp_platform = owner_pb2.SnpPlatform(
        vek_cert=platform.vek_der,
        chain=[c for c in (platform.ask_der, platform.ark_der) if c],
        current_tcb=status.current_tcb,
    )
    if status.committed_tcb is not None:
        snp_platform.committed_tcb = status.committed_tcb
    snp_config = owner_pb2.SnpLaunchConfig(
        vcpus=config.vcpus,
        vcpu_type=config.vcpu_type,
        guest_features=config.guest_features,
        vmm_type=config.vmm_type,
        policy=config.policy,
        firmware_sha256=config.firmware_sha256,
    )
    kh = config.kernel_hashes
    if kh is not None:
        snp_config.kernel_hashes.CopyFrom(
            owner_pb2.SnpKernelHashes(
                kernel=kh.kernel_hash.hex(), initrd=kh.initrd_hash.hex(), cmdline=kh.cmdline_hash.hex()
            )
        )
    return owner_pb2.AuthorizeSnpLaunchRequest(
        workload_id=workload_id, platform=snp_platform, config=snp_config
    )


#: owner.proto's authorisation states as the launcher waits on them: still open is PENDING; an expired,
#: revoked or refused authorisation can never release any more, so the launch fails (fail closed).
_ATTESTATION_STATES = {
    owner_pb2.SNP_AUTHORIZATION_STATE_AUTHORIZED: AttestationState.PENDING,
    owner_pb2.SNP_AUTHORIZATION_STATE_RELEASED: AttestationState.RELEASED,
}
_ENDED = {
    owner_pb2.SNP_AUTHORIZATION_STATE_REFUSED: ("", "refused the guest's attestation"),
    owner_pb2.SNP_AUTHORIZATION_STATE_EXPIRED: (
        "authorization_expired",
        "the guest did not attest before its authorisation expired",
    ),
    owner_pb2.SNP_AUTHORIZATION_STATE_REVOKED: (
        "authorization_revoked",
        "revoked the authorisation",
    ),
}


def attestation_verdict(info: owner_pb2.SnpAuthorizationInfo) -> AttestationVerdict:
    state = _ATTESTATION_STATES.get(info.state)
    if state is not None:
        return AttestationVerdict(state)
    if info.state in _ENDED:
        default_reason, detail = _ENDED[info.state]
        reason = info.reason or default_reason or LaunchReason.ATTESTATION_REFUSED
        return AttestationVerdict(AttestationState.REFUSED, reason=reason[:64], detail=f"owner: {detail}")
    raise FailedPrecondition(
        peer_reason("owner", "error"), f"owner: unknown SNP authorisation state {int(info.state)}"
    )


class PlatformClient:
    """platform_svc at `endpoint`, which must hold a certificate valid for `platform_identity`'s name."""

    def __init__(
        self,
        endpoint: str,
        tls_dir: str | Path,
        identity: str = "launcher",
        *,
        platform_identity: str = "platform",
        interceptors: Sequence[Any] = (),
    ) -> None:
        self._conn = _IdentityChannel(
            endpoint,
            channel_credentials(tls_dir, identity),
            _Diagnosis(tls_dir, identity),
            server_name(platform_identity),
            "platform",
            interceptors,
        )

    async def certificate_chain(self) -> PlatformChain:
        stub = platform_pb2_grpc.PlatformServiceStub(self._conn.channel)  # the channel may be replaced
        try:
            reply = await stub.GetCertificateChain(platform_pb2.GetCertificateChainRequest())
        except grpc.RpcError as exc:
            raise await self._conn.error(exc) from None
        c = reply.platform.chain
        return PlatformChain(c.pdh_cert, c.pek_cert, c.oca_cert, c.cek_cert, c.ask_cert, c.ark_cert)

    async def snp_evidence(self) -> SnpPlatformEvidence:
        """GetSnpStatus, then GetVekChain (the VCEK, or the VLEK when one is loaded): carried to the
        owner as the platform sent them; the owner verifies the chain and the TCBs."""
        stub = platform_pb2_grpc.PlatformServiceStub(self._conn.channel)
        try:
            status = await stub.GetSnpStatus(platform_pb2.GetSnpStatusRequest())
            chain = await stub.GetVekChain(platform_pb2.GetVekChainRequest(kind=platform_pb2.VEK_KIND_AUTO))
        except grpc.RpcError as exc:
            raise await self._conn.error(exc) from None
        product = _SNP_PRODUCTS.get(status.product)
        kind = _VEK_KINDS.get(chain.kind)
        if product is None or kind is None:
            raise FailedPrecondition(
                LaunchReason.SNP_UNSUPPORTED, "platform_svc reports no SEV-SNP product or VEK kind"
            )
        return SnpPlatformEvidence(
            status=SnpPlatformStatus(
                product=product,
                api_major=status.api_major,
                api_minor=status.api_minor,
                build_id=status.build_id,
                current_tcb=status.current_tcb.raw,
                reported_tcb=status.reported_tcb.raw,
                committed_tcb=status.committed_tcb.raw if status.HasField("committed_tcb") else None,
                mask_chip_id=status.mask_chip_id,
                guest_count=status.guest_count,
                hwid=status.hwid,
            ),
            vek_type=kind,
            vek_der=chain.vek_cert,
            ask_der=chain.ask_cert,
            ark_der=chain.ark_cert,
            vek_tcb=chain.tcb.raw,
        )

    async def close(self) -> None:
        await self._conn.close()


class OwnerClient:
    """One channel per owner endpoint named in launch requests; every owner must hold a certificate
    valid for `owner_identity`'s name, whoever named the endpoint."""

    def __init__(
        self,
        tls_dir: str | Path,
        identity: str = "launcher",
        *,
        owner_identity: str = "owner",
        interceptors: Sequence[Any] = (),
    ) -> None:
        self._interceptors = list(interceptors)
        self._credentials = channel_credentials(tls_dir, identity)
        self._diagnosis = _Diagnosis(tls_dir, identity)
        self._expected = server_name(owner_identity)
        self._channels: dict[str, _IdentityChannel] = {}
        self._lock = asyncio.Lock()

    async def _conn(self, endpoint: str) -> tuple[_IdentityChannel, owner_pb2_grpc.OwnerServiceAsyncStub]:
        async with self._lock:
            conn = self._channels.get(endpoint)
            if conn is None:
                if len(self._channels) >= MAX_OWNER_CHANNELS:
                    _, oldest = self._channels.popitem()
                    await oldest.close()
                conn = _IdentityChannel(
                    endpoint, self._credentials, self._diagnosis, self._expected, "owner", self._interceptors
                )
                self._channels[endpoint] = conn
            return conn, owner_pb2_grpc.OwnerServiceStub(conn.channel)  # an aio channel: the async stub

    async def open_session(
        self, endpoint: str, *, workload_id: str, chain: PlatformChain, policy: int
    ) -> OwnerSession:
        conn, stub = await self._conn(endpoint)
        chain_pb = common_pb2.CertificateChain(
            pdh_cert=chain.pdh_cert,
            pek_cert=chain.pek_cert,
            oca_cert=chain.oca_cert,
            cek_cert=chain.cek_cert,
            ask_cert=chain.ask_cert,
            ark_cert=chain.ark_cert,
        )
        try:
            reply = await stub.OpenSession(
                owner_pb2.OpenSessionRequest(workload_id=workload_id, chain=chain_pb, policy=policy)
            )
        except grpc.RpcError as exc:
            raise await conn.error(exc) from None
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
            raise await conn.error(exc) from None
        # Consent to run without a secret is the owner's explicit `no_secret`, never empty blobs; the
        # core also needs the spec's own `launch_without_secret` before it resumes without injecting.
        return ReleasedSecret(
            header=reply.secret_header, payload=reply.secret_payload, no_secret=reply.no_secret
        )

    async def authorize_snp_launch(
        self,
        endpoint: str,
        *,
        workload_id: str,
        platform: SnpPlatformEvidence,
        config: SnpLaunchConfig,
    ) -> SnpAuthorization:
        """owner.proto `AuthorizeSnpLaunch`. The platform's evidence goes as platform_svc sent it (the
        owner verifies the chain and the TCBs); `check_authorization` in the core checks the answer."""
        conn, stub = await self._conn(endpoint)
        try:
            reply = await stub.AuthorizeSnpLaunch(snp_authorize_request(workload_id, platform, config))
        except grpc.RpcError as exc:
            raise await conn.error(exc) from None
        return SnpAuthorization(
            authorization_id=reply.authorization_id,
            id_block=bytes(reply.id_block),
            id_auth=bytes(reply.id_auth),
            author_key=reply.author_key,
            policy=reply.policy,
            host_data=bytes(reply.host_data),
            init_data=bytes(reply.init_data),
        )

    async def snp_attestation(self, endpoint: str, *, authorization_id: str) -> AttestationVerdict:
        """owner.proto `GetSnpAttestation` (only the identity that got the authorisation may ask)."""
        conn, stub = await self._conn(endpoint)
        try:
            reply = await stub.GetSnpAttestation(
                owner_pb2.GetSnpAttestationRequest(authorization_id=authorization_id)
            )
        except grpc.RpcError as exc:
            raise await conn.error(exc) from None
        return attestation_verdict(reply.authorization)

    async def revoke_snp_authorization(self, endpoint: str, *, authorization_id: str) -> None:
        """owner.proto `RevokeSnpAuthorization` (the owner lets the identity that got it revoke its own)."""
        conn, stub = await self._conn(endpoint)
        try:
            await stub.RevokeSnpAuthorization(
                owner_pb2.RevokeSnpAuthorizationRequest(authorization_id=authorization_id)
            )
        except grpc.RpcError as exc:
            raise await conn.error(exc) from None

    async def close(self) -> None:
        async with self._lock:
            for conn in self._channels.values():
                await conn.close()
            self._channels.clear()
