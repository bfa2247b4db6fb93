"""OwnerService servicer: protobuf ↔ domain objects, the caller's identity, and nothing else.

The core is synchronous (SQLite, RSA/ECDSA verification). Its calls run in a worker thread, so a slow one
never stalls the event loop, except the launch storm's two (OpenSession, ReleaseSecret) when the server
gives a `hot_path` runner: over SQLite they run on the loop's own thread and await their writes'
durability (`owner_svc.adapters.walflush.run_deferred`), because handing each call to a thread and back
cost more CPU than its cryptography. Errors propagate to the shell's interceptor, which maps them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, Protocol, TypeVar

import grpc.aio

from owner_svc.api.snp_convert import (
    KIND_FROM_PROTO,
    authorization_to_proto,
    authorized_to_proto,
    config_from_proto,
    key_info_to_proto,
    platform_from_proto,
    snp_rules_from_proto,
    snp_rules_to_proto,
)
from owner_svc.core.model import (
    DEFAULT_SECRET_AREA_SIZE,
    FirmwareMinimum,
    KernelHashesRule,
    RefSelector,
    SessionStatus,
    Workload,
)
from owner_svc.core.reasons import Reason
from owner_svc.core.service import ChainInput, OwnerCore, SessionView, WorkloadSummary
from sevlaunch.errors import InvalidArgument
from sevlaunch.refvalues import VerifiedManifest
from sevlaunch.rpc import AuthzPolicy, current_caller, method_rules
from sevlaunch.rpc.v1 import common_pb2, owner_pb2, owner_pb2_grpc
from sevlaunch.sev.technology import Technology

Ctx = grpc.aio.ServicerContext[Any, Any]
P = ParamSpec("P")
T = TypeVar("T")


class CallRunner(Protocol):
    """Runs a synchronous core call for a coroutine (`asyncio.to_thread` is one)."""

    def __call__(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]: ...


SERVICE_NAME = owner_pb2.DESCRIPTOR.services_by_name["OwnerService"].full_name
LAUNCH_ROLES = ("launcher", "client")
ADMIN_ROLES = ("owner-admin",)
AUTHZ = AuthzPolicy(
    method_rules(
        SERVICE_NAME,
        {
            "OpenSession": LAUNCH_ROLES,
            "ReleaseSecret": LAUNCH_ROLES,
            "PutWorkload": ADMIN_ROLES,
            "GetWorkload": ADMIN_ROLES,
            "PutSecret": ADMIN_ROLES,
            "ImportReferenceValues": ADMIN_ROLES,
            "ListReferenceValues": ADMIN_ROLES,
            "ListSessions": ADMIN_ROLES,
            "GetAuditLog": ADMIN_ROLES,
            "RevokeSession": ADMIN_ROLES,
            "AuthorizeSnpLaunch": LAUNCH_ROLES,
            "GetSnpAttestation": LAUNCH_ROLES,
            "RotateSnpKey": ADMIN_ROLES,
            "ListSnpKeys": ADMIN_ROLES,
            "ListSnpAuthorizations": ADMIN_ROLES,
            # Admins revoke any; a launcher its own authorisation of a launch it gave up (core checks).
            "RevokeSnpAuthorization": (*ADMIN_ROLES, *LAUNCH_ROLES),
            "ListWorkloads": ADMIN_ROLES,
            "DeleteWorkload": ADMIN_ROLES,
            "DeleteSecret": ADMIN_ROLES,
            "RevokeReferenceValues": ADMIN_ROLES,
        },
    )
)

_MODE_TO_PROTO = {
    Technology.SEV: owner_pb2.REFERENCE_MODE_SEV,
    Technology.SEV_ES: owner_pb2.REFERENCE_MODE_SEV_ES,
    Technology.SEV_SNP: owner_pb2.REFERENCE_MODE_SEV_SNP,
}
_MODE_FROM_PROTO = {v: k for k, v in _MODE_TO_PROTO.items()}
_KERNEL_TO_PROTO = {
    KernelHashesRule.FORBIDDEN: owner_pb2.KERNEL_HASHES_FORBIDDEN,
    KernelHashesRule.REQUIRED: owner_pb2.KERNEL_HASHES_REQUIRED,
    KernelHashesRule.ANY: owner_pb2.KERNEL_HASHES_ANY,
}
# Unspecified is the safe default: no kernel hashes.
_KERNEL_FROM_PROTO = {owner_pb2.KERNEL_HASHES_UNSPECIFIED: KernelHashesRule.FORBIDDEN} | {
    v: k for k, v in _KERNEL_TO_PROTO.items()
}
_STATUS_TO_PROTO = {
    SessionStatus.OPEN: owner_pb2.OWNER_SESSION_STATE_OPEN,
    SessionStatus.EXPIRED: owner_pb2.OWNER_SESSION_STATE_EXPIRED,
    SessionStatus.RELEASED: owner_pb2.OWNER_SESSION_STATE_RELEASED,
    SessionStatus.REFUSED: owner_pb2.OWNER_SESSION_STATE_REFUSED,
    SessionStatus.REVOKED: owner_pb2.OWNER_SESSION_STATE_REVOKED,
}


def workload_from_proto(msg: owner_pb2.Workload) -> Workload:
    selectors = []
    for s in msg.selectors:
        try:
            modes = tuple(_MODE_FROM_PROTO[m] for m in s.modes)
        except KeyError:
            raise InvalidArgument(
                Reason.BAD_SELECTOR,
                "selector mode must be SEV, SEV_ES or SEV_SNP",
                metadata={"field": "modes"},
            ) from None
        kernel = _KERNEL_FROM_PROTO.get(s.kernel_hashes)
        if kernel is None:
            raise InvalidArgument(
                Reason.BAD_SELECTOR,
                "kernel_hashes must be FORBIDDEN, REQUIRED or ANY",
                metadata={"field": "kernel_hashes"},
            )
        selectors.append(
            RefSelector(
                firmware_name=s.firmware_name,
                modes=modes,
                version_min=s.version_min,
                version_max=s.version_max,
                sev_es_vcpus=tuple(s.sev_es_vcpus),
                kernel_hashes=kernel,
                vcpu_type=s.vcpu_type,
                vmsa_layout=s.vmsa_layout,
            )
        )
    fw = msg.firmware_minimum
    return Workload(
        workload_id=msg.workload_id,
        allowed_policies=tuple(msg.allowed_policies),
        generations=tuple(msg.generations),
        selectors=tuple(selectors),
        firmware_minimum=FirmwareMinimum(fw.api_major, fw.api_minor, fw.build_id),
        allow_debug=msg.allow_debug,
        allow_key_sharing=msg.allow_key_sharing,
        secret_area_size=msg.secret_area_size or DEFAULT_SECRET_AREA_SIZE,
        allow_launch_without_secret=msg.allow_launch_without_secret,
        allow_pre_0_17=msg.allow_pre_0_17,
        snp=snp_rules_from_proto(msg.snp) if msg.HasField("snp") else None,
    )


def workload_to_proto(w: Workload) -> owner_pb2.Workload:
    return owner_pb2.Workload(
        workload_id=w.workload_id,
        allowed_policies=list(w.allowed_policies),
        generations=list(w.generations),
        firmware_minimum=common_pb2.FirmwareVersion(
            api_major=w.firmware_minimum.api_major,
            api_minor=w.firmware_minimum.api_minor,
            build_id=w.firmware_minimum.build_id,
        ),
        selectors=[
            owner_pb2.ReferenceSelector(
                firmware_name=s.firmware_name,
                version_min=s.version_min,
                version_max=s.version_max,
                modes=[_MODE_TO_PROTO[m] for m in s.modes],
                sev_es_vcpus=list(s.sev_es_vcpus),
                kernel_hashes=_KERNEL_TO_PROTO[s.kernel_hashes],
                vcpu_type=s.vcpu_type,
                vmsa_layout=s.vmsa_layout,
            )
            for s in w.selectors
        ],
        secret_area_size=w.secret_area_size,
        allow_debug=w.allow_debug,
        allow_key_sharing=w.allow_key_sharing,
        allow_launch_without_secret=w.allow_launch_without_secret,
        allow_pre_0_17=w.allow_pre_0_17,
        snp=None if w.snp is None else snp_rules_to_proto(w.snp),
    )


def manifest_summary(vm: VerifiedManifest) -> owner_pb2.ManifestSummary:
    m = vm.manifest
    return owner_pb2.ManifestSummary(
        manifest_id=vm.id,
        publisher=m.publisher,
        firmware_name=m.firmware_name,
        firmware_version=m.firmware_version,
        not_before_unix=int(m.not_before.timestamp()),
        not_after_unix=int(m.not_after.timestamp()),
        digests=len(m.digests),
        keyid=vm.keyid,
    )


def session_info(view: SessionView) -> owner_pb2.SessionInfo:
    s = view.record
    return owner_pb2.SessionInfo(
        session_id=s.session_id,
        workload_id=s.workload_id,
        caller=s.caller,
        policy=s.policy,
        generation=s.generation,
        cek_fingerprint=s.cek_fingerprint,
        state=_STATUS_TO_PROTO[view.status],
        created_at_unix=int(s.created_at),
        expires_at_unix=int(s.expires_at),
        matched_digest=s.matched_digest,
        reason=s.reason,
    )


class OwnerServicer(owner_pb2_grpc.OwnerServiceServicer):
    def __init__(self, core: OwnerCore, *, hot_path: CallRunner = asyncio.to_thread) -> None:
        self.core = core
        self._hot = hot_path

    async def OpenSession(
        self, request: owner_pb2.OpenSessionRequest, context: Ctx
    ) -> owner_pb2.OpenSessionResponse:
        caller = current_caller().identity
        c = request.chain
        chain = ChainInput(c.pdh_cert, c.pek_cert, c.oca_cert, c.cek_cert, c.ask_cert, c.ark_cert)
        opened = await self._hot(self.core.open_session, caller, request.workload_id, chain, request.policy)
        return owner_pb2.OpenSessionResponse(
            session_id=opened.session_id,
            godh_cert=opened.godh_cert,
            session_blob=opened.session_blob,
            policy=opened.policy,
            expires_at_unix=int(opened.expires_at),
            generation=opened.generation,
        )

    async def ReleaseSecret(
        self, request: owner_pb2.ReleaseSecretRequest, context: Ctx
    ) -> owner_pb2.ReleaseSecretResponse:
        caller = current_caller().identity
        if not request.HasField("firmware"):
            raise InvalidArgument(Reason.BAD_FIRMWARE_VERSION, "firmware version is required")
        fw = request.firmware
        released = await self._hot(
            self.core.release_secret,
            caller,
            request.session_id,
            request.launch_measurement,
            api_major=fw.api_major,
            api_minor=fw.api_minor,
            build_id=fw.build_id,
            policy=request.policy,
        )
        return owner_pb2.ReleaseSecretResponse(
            secret_header=released.header,
            secret_payload=released.payload,
            matched_launch_digest=released.matched_digest,
            manifest_id=released.manifest_id,
            no_secret=released.no_secret,
        )

    async def PutWorkload(
        self, request: owner_pb2.PutWorkloadRequest, context: Ctx
    ) -> owner_pb2.PutWorkloadResponse:
        caller = current_caller().identity
        if not request.HasField("workload"):
            raise InvalidArgument(Reason.BAD_WORKLOAD, "workload is required")
        workload = workload_from_proto(request.workload)
        await asyncio.to_thread(self.core.put_workload, caller, workload)
        return owner_pb2.PutWorkloadResponse()

    async def GetWorkload(
        self, request: owner_pb2.GetWorkloadRequest, context: Ctx
    ) -> owner_pb2.GetWorkloadResponse:
        summary: WorkloadSummary = await asyncio.to_thread(self.core.workload_summary, request.workload_id)
        return owner_pb2.GetWorkloadResponse(
            workload=workload_to_proto(summary.workload),
            has_secret=summary.has_secret,
            accepted_digests_sev=summary.accepted_sev,
            accepted_digests_sev_es=summary.accepted_sev_es,
        )

    async def PutSecret(
        self, request: owner_pb2.PutSecretRequest, context: Ctx
    ) -> owner_pb2.PutSecretResponse:
        caller = current_caller().identity
        entries = [(e.guid, e.data) for e in request.entries]
        size = await asyncio.to_thread(self.core.put_secret, caller, request.workload_id, entries)
        return owner_pb2.PutSecretResponse(table_size=size)

    async def ImportReferenceValues(
        self, request: owner_pb2.ImportReferenceValuesRequest, context: Ctx
    ) -> owner_pb2.ImportReferenceValuesResponse:
        caller = current_caller().identity
        if not request.envelope:
            raise InvalidArgument(Reason.BAD_ENVELOPE, "envelope is required")
        vm, new = await asyncio.to_thread(
            self.core.import_reference_values, caller, request.envelope, f"rpc:{caller}"
        )
        return owner_pb2.ImportReferenceValuesResponse(
            manifest_id=vm.id, newly_imported=new, manifest=manifest_summary(vm)
        )

    async def ListReferenceValues(
        self, request: owner_pb2.ListReferenceValuesRequest, context: Ctx
    ) -> owner_pb2.ListReferenceValuesResponse:
        manifests = await asyncio.to_thread(self.core.reference_values_in_force)
        return owner_pb2.ListReferenceValuesResponse(manifests=[manifest_summary(vm) for vm in manifests])

    async def ListSessions(
        self, request: owner_pb2.ListSessionsRequest, context: Ctx
    ) -> owner_pb2.ListSessionsResponse:
        sessions = await asyncio.to_thread(self.core.list_sessions, request.workload_id, request.limit)
        return owner_pb2.ListSessionsResponse(sessions=[session_info(v) for v in sessions])

    async def GetAuditLog(
        self, request: owner_pb2.GetAuditLogRequest, context: Ctx
    ) -> owner_pb2.GetAuditLogResponse:
        records = await asyncio.to_thread(self.core.audit_log, request.after_seq, request.limit)
        return owner_pb2.GetAuditLogResponse(
            records=[
                owner_pb2.AuditRecord(
                    seq=r.seq,
                    time_unix=r.time,
                    actor=r.event.actor,
                    action=r.event.action,
                    outcome=r.event.outcome,
                    workload_id=r.event.workload_id,
                    session_id=r.event.session_id,
                    cek_fingerprint=r.event.cek_fingerprint,
                    reason=r.event.reason,
                    digest=r.event.digest,
                    detail=r.event.detail,
                    launch_id=r.event.launch_id,
                    prev_hash=r.prev_hash,
                    hash=r.hash,
                )
                for r in records
            ]
        )

    async def RevokeSession(
        self, request: owner_pb2.RevokeSessionRequest, context: Ctx
    ) -> owner_pb2.RevokeSessionResponse:
        caller = current_caller().identity
        await asyncio.to_thread(self.core.revoke_session, caller, request.session_id)
        return owner_pb2.RevokeSessionResponse()

    # ---------------------------------------------------------------------------------- SEV-SNP

    async def AuthorizeSnpLaunch(
        self, request: owner_pb2.AuthorizeSnpLaunchRequest, context: Ctx
    ) -> owner_pb2.AuthorizeSnpLaunchResponse:
        caller = current_caller().identity
        if not request.HasField("platform") or not request.HasField("config"):
            raise InvalidArgument(Reason.BAD_LAUNCH_CONFIG, "platform and config are required")
        authorized = await asyncio.to_thread(
            self.core.authorize_snp_launch,
            caller,
            request.workload_id,
            platform_from_proto(request.platform),
            config_from_proto(request.config),
        )
        return authorized_to_proto(authorized)

    async def RotateSnpKey(
        self, request: owner_pb2.RotateSnpKeyRequest, context: Ctx
    ) -> owner_pb2.RotateSnpKeyResponse:
        caller = current_caller().identity
        kind = KIND_FROM_PROTO.get(request.kind)
        if kind is None:
            raise InvalidArgument(Reason.BAD_SNP_KEY, "kind must be SNP_KEY_KIND_ID or SNP_KEY_KIND_AUTHOR")
        info = await asyncio.to_thread(
            self.core.rotate_snp_key, caller, request.workload_id, kind, bytes(request.private_key_pem)
        )
        return owner_pb2.RotateSnpKeyResponse(key=key_info_to_proto(info))

    async def ListSnpKeys(
        self, request: owner_pb2.ListSnpKeysRequest, context: Ctx
    ) -> owner_pb2.ListSnpKeysResponse:
        infos = await asyncio.to_thread(self.core.snp_key_infos, request.workload_id)
        return owner_pb2.ListSnpKeysResponse(keys=[key_info_to_proto(k) for k in infos])

    async def ListSnpAuthorizations(
        self, request: owner_pb2.ListSnpAuthorizationsRequest, context: Ctx
    ) -> owner_pb2.ListSnpAuthorizationsResponse:
        records = await asyncio.to_thread(
            self.core.list_snp_authorizations, request.workload_id, request.limit
        )
        now = self.core.clock()
        return owner_pb2.ListSnpAuthorizationsResponse(
            authorizations=[authorization_to_proto(a, now) for a in records]
        )

    async def GetSnpAttestation(
        self, request: owner_pb2.GetSnpAttestationRequest, context: Ctx
    ) -> owner_pb2.GetSnpAttestationResponse:
        caller = current_caller().identity
        record = await asyncio.to_thread(self.core.snp_authorization_of, caller, request.authorization_id)
        return owner_pb2.GetSnpAttestationResponse(
            authorization=authorization_to_proto(record, self.core.clock())
        )

    async def RevokeSnpAuthorization(
        self, request: owner_pb2.RevokeSnpAuthorizationRequest, context: Ctx
    ) -> owner_pb2.RevokeSnpAuthorizationResponse:
        caller = current_caller().identity
        await asyncio.to_thread(
            self.core.revoke_snp_authorization,
            caller,
            request.authorization_id,
            admin=bool(AUTHZ.roles_of(caller) & frozenset(ADMIN_ROLES)),
        )
        return owner_pb2.RevokeSnpAuthorizationResponse()

    async def ListWorkloads(
        self, request: owner_pb2.ListWorkloadsRequest, context: Ctx
    ) -> owner_pb2.ListWorkloadsResponse:
        rows = await asyncio.to_thread(self.core.list_workloads, request.after_workload_id, request.limit)
        return owner_pb2.ListWorkloadsResponse(
            workloads=[
                owner_pb2.WorkloadEntry(
                    workload_id=r.workload_id,
                    has_secret=r.has_secret,
                    open_sessions=r.open_sessions,
                    updated_at_unix=int(r.updated_at),
                )
                for r in rows
            ]
        )

    async def DeleteWorkload(
        self, request: owner_pb2.DeleteWorkloadRequest, context: Ctx
    ) -> owner_pb2.DeleteWorkloadResponse:
        caller = current_caller().identity
        done = await asyncio.to_thread(
            self.core.delete_workload, caller, request.workload_id, force=request.force
        )
        return owner_pb2.DeleteWorkloadResponse(
            had_secret=done.had_secret,
            revoked_sessions=done.revoked,
            revoked_snp_authorizations=done.revoked_authorizations,
        )

    async def DeleteSecret(
        self, request: owner_pb2.DeleteSecretRequest, context: Ctx
    ) -> owner_pb2.DeleteSecretResponse:
        caller = current_caller().identity
        done = await asyncio.to_thread(
            self.core.delete_secret, caller, request.workload_id, force=request.force
        )
        return owner_pb2.DeleteSecretResponse(
            revoked_sessions=done.revoked, revoked_snp_authorizations=done.revoked_authorizations
        )

    async def RevokeReferenceValues(
        self, request: owner_pb2.RevokeReferenceValuesRequest, context: Ctx
    ) -> owner_pb2.RevokeReferenceValuesResponse:
        caller = current_caller().identity
        done = await asyncio.to_thread(self.core.revoke_reference_values, caller, list(request.manifest_ids))
        return owner_pb2.RevokeReferenceValuesResponse(
            revoked=done.revoked, already_revoked=done.already_revoked
        )
