"""The orchestrated flow: the launcher fetches the platform's chain, opens a session with the guest
owner, launches, and gets the secret from the owner, streaming an event per phase.

Each launch runs as a task of its own; the progress stream only reads its events, so a client that goes
away does not stop a launch from finishing or from being cleaned up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from launcher_svc.core.config import LaunchEvent
from launcher_svc.core.ports import OwnerPort, OwnerSession, PlatformChain, PlatformPort, ReleasedSecret
from launcher_svc.core.preflight import Preflight, SessionMaterial, parse_session_material
from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.spec import GuestSpec, validate_endpoint, validate_workload
from launcher_svc.core.state import LaunchFlow, LaunchRecord, Phase, PhaseChange
from launcher_svc.core.steps import ABORTED, StepMachine, classify, failed_event
from sevlaunch.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger("launcher_svc")


class OrchestratedFlow:
    def __init__(self, machine: StepMachine, platform: PlatformPort | None, owners: OwnerPort | None) -> None:
        self.m = machine
        self.platform = platform
        self.owners = owners

    async def launch(
        self, spec: GuestSpec, *, owner_endpoint: str, workload_id: str, requested_by: str
    ) -> tuple[LaunchRecord, AsyncIterator[LaunchEvent]]:
        """Admits and starts a launch; returns its record and the stream of its events."""
        if self.platform is None or self.owners is None:
            raise FailedPrecondition(LaunchReason.NOT_CONFIGURED, "orchestrated launches need --platform")
        validate_endpoint(owner_endpoint)
        validate_workload(workload_id)
        spec = self.m.pin_vcpu_type(spec)
        pre = await self.m.preflight(spec)
        rec = self.m.new_record(
            spec,
            LaunchFlow.ORCHESTRATED,
            requested_by,
            owner_endpoint=owner_endpoint,
            workload_id=workload_id,
        )
        platform, owners = self.platform, self.owners
        events = await self.m.start_driven(
            spec, rec, lambda queue: self._drive(rec, pre, platform, owners, queue)
        )
        return rec, events

    async def _drive(
        self,
        rec: LaunchRecord,
        pre: Preflight,
        platform: PlatformPort,
        owners: OwnerPort,
        queue: asyncio.Queue[LaunchEvent],
    ) -> None:
        m = self.m
        emit = m.emitter(queue)

        try:
            fetched = await m.step(rec, Phase.CHAIN_FETCHED, platform.certificate_chain)
            emit(fetched)
            chain: PlatformChain = fetched.result

            async def open_session() -> tuple[OwnerSession, SessionMaterial]:
                s = await owners.open_session(
                    rec.owner_endpoint, workload_id=rec.workload_id, chain=chain, policy=rec.spec.policy
                )
                if s.policy != rec.spec.policy:
                    raise FailedPrecondition(
                        LaunchReason.POLICY_MISMATCH, "the owner's session is for another policy"
                    )
                try:
                    return s, parse_session_material(s.godh_cert, s.session)
                except InvalidArgument as exc:
                    # The owner's fault, not the caller's: a failed precondition of this launch.
                    raise FailedPrecondition(
                        LaunchReason.BAD_SESSION,
                        f"the owner returned a malformed GODH or session: {exc.detail}",
                    ) from None

            opened = await m.step(
                fetched.record,
                Phase.SESSION_OPENED,
                open_session,
                lambda r: PhaseChange(Phase.SESSION_OPENED, session_id=r[0].session_id),
            )
            emit(opened)

            measured = await m.define_and_start(opened.record, opened.result[1], pre, emit)
            info = measured.result
            rec = measured.record

            async def release() -> ReleasedSecret:
                secret = await owners.release_secret(
                    rec.owner_endpoint,
                    session_id=rec.session_id,
                    measurement=info.measurement,
                    api_major=info.api_major,
                    api_minor=info.api_minor,
                    build_id=info.build_id,
                    policy=info.policy,
                )
                # Running without a secret takes two explicit yeses: the spec's `launch_without_secret`
                # and the owner's `no_secret`. Empty blobs are not consent: they fail the secret's checks.
                if secret.no_secret:
                    if secret.header or secret.payload:
                        raise FailedPrecondition(
                            LaunchReason.BAD_OWNER_REPLY,
                            "the owner sent a secret and agreed to run without one",
                        )
                    if not rec.spec.launch_without_secret:
                        raise FailedPrecondition(
                            LaunchReason.NO_SECRET_NOT_REQUESTED,
                            "the owner released no secret and the spec did not ask to run without one",
                        )
                    return secret
                # A secret (also when the spec would have done without one) must be injected.
                m.check_secret(secret, pre)
                return secret

            released = await m.step(
                rec,
                Phase.SECRET_RELEASED,
                release,
                lambda s: PhaseChange(Phase.SECRET_RELEASED, secret_waived=s.no_secret),
            )
            emit(released)
            rec = released.record
            if not rec.secret_waived:
                injected = await m.inject(rec, released.result, pre)
                emit(injected)
                rec = injected.record
            del released  # the wrapped secret is not kept beyond its use
            emit(await m.resume(rec))
        except asyncio.CancelledError:
            active = m.active.get(rec.launch_id)
            reason, detail = active.cancel_reason if active and active.cancel_reason else ABORTED
            target = m.target(rec)
            failed = await m.shielded(m.fail_closed(rec, target, reason, detail))
            queue.put_nowait(failed_event(failed, target, m.clock.time()))
        except Exception as exc:
            reason, detail = classify(exc)
            if reason == LaunchReason.INTERNAL:
                log.exception("launch failed with an unexpected error", extra={"launch_id": rec.launch_id})
            target = m.target(rec)
            failed = await m.fail_closed(rec, target, reason, detail)
            queue.put_nowait(failed_event(failed, target, m.clock.time()))

