"""LauncherService: protobuf in, `Launcher` calls, protobuf out. Callers are authorised per RPC by the
shell (role `client`); each launch belongs to the identity that started it, and other identities get
NOT_FOUND for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from launcher_svc.core.config import LaunchEvent
from launcher_svc.core.launcher import Launcher
from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.spec import DiskFormat, DiskSpec, GuestSpec, create_spec
from launcher_svc.core.state import LaunchFlow, LaunchRecord, Phase
from sevlaunch.errors import InvalidArgument
from sevlaunch.rpc import REFUSED, AuthzPolicy, current_caller, mark_outcome, method_rules
from sevlaunch.rpc.v1 import launcher_pb2, launcher_pb2_grpc
from sevlaunch.sev.policy import PolicyFlags
from sevlaunch.sev.technology import Technology

SERVICE_NAME = launcher_pb2.DESCRIPTOR.services_by_name["LauncherService"].full_name

AUTHZ = AuthzPolicy(
    method_rules(
        SERVICE_NAME,
        {
            "Launch": ["client"],
            "PrepareLaunch": ["client"],
            "CompleteLaunch": ["client"],
            "AbortLaunch": ["client"],
            "GetLaunch": ["client"],
            "ListLaunches": ["client"],
            "DestroyGuest": ["client"],
        },
    )
)

_MODES = {
    launcher_pb2.SEV_MODE_SEV: Technology.SEV,
    launcher_pb2.SEV_MODE_SEV_ES: Technology.SEV_ES,
    launcher_pb2.SEV_MODE_SEV_SNP: Technology.SEV_SNP,
}
_MODES_PB = {tech: pb for pb, tech in _MODES.items()}
_FLOWS_PB = {
    LaunchFlow.ORCHESTRATED: launcher_pb2.LAUNCH_MODE_ORCHESTRATED,
    LaunchFlow.TWO_PHASE: launcher_pb2.LAUNCH_MODE_TWO_PHASE,
    LaunchFlow.SNP: launcher_pb2.LAUNCH_MODE_SNP,
}
_FORMATS = {
    launcher_pb2.DISK_FORMAT_UNSPECIFIED: DiskFormat.RAW,
    launcher_pb2.DISK_FORMAT_RAW: DiskFormat.RAW,
    launcher_pb2.DISK_FORMAT_QCOW2: DiskFormat.QCOW2,
}


def phase_pb(phase: Phase | None) -> launcher_pb2.Phase.ValueType:
    if phase is None:
        return launcher_pb2.PHASE_UNSPECIFIED
    return launcher_pb2.Phase.Value(f"PHASE_{phase.value}")


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return d


def event_pb(ev: LaunchEvent) -> launcher_pb2.LaunchEvent:
    return launcher_pb2.LaunchEvent(
        launch_id=ev.launch_id,
        phase=phase_pb(ev.phase),
        duration=_duration(ev.duration),
        failed_phase=phase_pb(ev.failed_phase),
        reason=ev.reason,
        detail=ev.detail,
        domain_name=ev.domain_name,
        at=_timestamp(ev.at),
    )


def info_pb(rec: LaunchRecord) -> launcher_pb2.LaunchInfo:
    return launcher_pb2.LaunchInfo(
        launch_id=rec.launch_id,
        mode=_FLOWS_PB[rec.mode],
        state=phase_pb(rec.state),
        failed_phase=phase_pb(rec.failed_phase),
        reason=rec.reason,
        detail=rec.detail,
        guest_name=rec.spec.name,
        domain_name=rec.domain_name,
        domain_uuid=rec.domain_uuid,
        owner_endpoint=rec.owner_endpoint,
        workload_id=rec.workload_id,
        sev_mode=_MODES_PB[rec.spec.mode],
        policy=0 if rec.spec.snp else rec.spec.policy,
        vcpus=rec.spec.vcpus,
        created_at=_timestamp(rec.created_at),
        updated_at=_timestamp(rec.updated_at),
        measurement=rec.measurement,
        vcpu_type=rec.spec.vcpu_type or "",
        snp_policy=rec.spec.policy if rec.spec.snp else 0,
        authorization_id=rec.authorization_id,
        guest_features=rec.spec.guest_features or 0,
    )


def _launch_id(value: str) -> str:
    if not (len(value) == 32 and all(c in "0123456789abcdef" for c in value)):
        raise InvalidArgument(LaunchReason.BAD_LAUNCH_ID, "launch ids are 32 lower-hex characters")
    return value


class LauncherServicer(launcher_pb2_grpc.LauncherServiceServicer):
    def __init__(self, core: Launcher) -> None:
        self.core = core

    def spec_from_pb(self, spec: launcher_pb2.GuestSpec) -> GuestSpec:
        if spec.mode == launcher_pb2.SEV_MODE_UNSPECIFIED:
            mode = Technology.SEV_ES if spec.policy & PolicyFlags.ES else Technology.SEV
        elif spec.mode in _MODES:
            mode = _MODES[spec.mode]
        else:
            raise InvalidArgument(LaunchReason.BAD_MODE, "unknown SEV mode")
        for disk in spec.disks:
            if disk.format not in _FORMATS:
                raise InvalidArgument(LaunchReason.BAD_DISK_FORMAT, "unknown disk format")
        try:
            return self._create_spec(spec, mode)
        except OSError as exc:
            # The path checks stat the caller's paths: a name too long for the file system, a
            # directory the launcher may not search, ... are the caller's bad paths, not our errors.
            reason = exc.strerror or type(exc).__name__
            raise InvalidArgument(LaunchReason.BAD_PATH, f"a path cannot be checked: {reason}") from None

    def _create_spec(self, spec: launcher_pb2.GuestSpec, mode: Technology) -> GuestSpec:
        snp = mode is Technology.SEV_SNP
        return create_spec(
            name=spec.name,
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            firmware_path=spec.firmware_path,
            mode=mode,
            policy=spec.snp_policy if snp else spec.policy,
            paths=self.core.config.paths,
            kernel_path=spec.kernel_path or None,
            initrd_path=spec.initrd_path or None,
            cmdline=spec.cmdline or None,
            disks=tuple(DiskSpec(d.path, d.target, _FORMATS[d.format], d.readonly) for d in spec.disks),
            networks=tuple(n.network for n in spec.networks),
            launch_without_secret=spec.launch_without_secret,
            vcpu_type=spec.vcpu_type or None,
            guest_features=spec.guest_features if spec.HasField("guest_features") else None,
            vmm_type=spec.vmm_type or None,
            kernel_hashes=spec.kernel_hashes if spec.HasField("kernel_hashes") else None,
        )

    async def Launch(
        self, request: launcher_pb2.LaunchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[launcher_pb2.LaunchEvent]:
        spec = self.spec_from_pb(request.spec)
        _rec, events = await self.core.launch(
            spec,
            owner_endpoint=request.owner.endpoint,
            workload_id=request.owner.workload_id,
            requested_by=current_caller().identity,
        )
        async for event in events:
            if event.phase is Phase.FAILED:
                mark_outcome(REFUSED)  # the status stays OK: the failure rides in the stream
            yield event_pb(event)

    async def PrepareLaunch(
        self, request: launcher_pb2.PrepareLaunchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> launcher_pb2.PrepareLaunchResponse:
        spec = self.spec_from_pb(request.spec)
        rec, info = await self.core.prepare(
            spec, godh_cert=request.godh_cert, session=request.session, requested_by=current_caller().identity
        )
        return launcher_pb2.PrepareLaunchResponse(
            launch_id=rec.launch_id,
            measurement=info.measurement,
            api_major=info.api_major,
            api_minor=info.api_minor,
            build_id=info.build_id,
            policy=info.policy,
            domain_name=rec.domain_name,
            complete_by=_timestamp(rec.deadline or 0.0),
        )

    async def CompleteLaunch(
        self, request: launcher_pb2.CompleteLaunchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> launcher_pb2.LaunchInfo:
        rec = await self.core.complete(
            _launch_id(request.launch_id),
            header=request.secret_header,
            payload=request.secret_payload,
            requested_by=current_caller().identity,
        )
        return info_pb(rec)

    async def AbortLaunch(
        self, request: launcher_pb2.AbortLaunchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> launcher_pb2.LaunchInfo:
        rec = await self.core.abort_owned(
            _launch_id(request.launch_id), requested_by=current_caller().identity
        )
        return info_pb(rec)

    async def GetLaunch(
        self, request: launcher_pb2.GetLaunchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> launcher_pb2.LaunchInfo:
        return info_pb(self.core.owned(_launch_id(request.launch_id), current_caller().identity))

    async def ListLaunches(
        self, request: launcher_pb2.ListLaunchesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> launcher_pb2.ListLaunchesResponse:
        records = self.core.list(
            requested_by=current_caller().identity, include_finished=request.include_finished
        )
        return launcher_pb2.ListLaunchesResponse(launches=[info_pb(r) for r in records])

    async def DestroyGuest(
        self, request: launcher_pb2.DestroyGuestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> launcher_pb2.LaunchInfo:
        rec = await self.core.destroy_guest(
            _launch_id(request.launch_id), requested_by=current_caller().identity
        )
        return info_pb(rec)
