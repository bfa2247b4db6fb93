"""The two-phase (client-driven) flow: PrepareLaunch defines and starts the guest with the client's GODH
and session and returns the measurement; CompleteLaunch injects the client's wrapped secret and resumes.

Between the two the launch waits until a deadline, checked by CompleteLaunch itself under the launch's
lock and enforced by a timer and, as a backstop, by the reconciler.
"""

from __future__ import annotations

import asyncio
from typing import Any

from launcher_svc.core.ports import LaunchSecurityInfo, ReleasedSecret
from launcher_svc.core.preflight import Preflight, SessionMaterial, parse_session_material
from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.spec import GuestSpec
from launcher_svc.core.state import PRE_RUNNING, LaunchFlow, LaunchRecord, Phase, next_phase
from launcher_svc.core.steps import ABORTED, StepMachine, Stepped, classify
from sevlaunch.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ServiceError
from sevlaunch.sev.errors import SevError

_EXPIRED = (LaunchReason.DEADLINE_EXCEEDED, "no secret arrived before the deadline")


def _ignore(_: Stepped[Any]) -> None:
    pass


class TwoPhaseFlow:
    def __init__(self, machine: StepMachine) -> None:
        self.m = machine

    async def prepare(
        self, spec: GuestSpec, *, godh_cert: bytes, session: bytes, requested_by: str
    ) -> tuple[LaunchRecord, LaunchSecurityInfo]:
        m = self.m
        material = parse_session_material(godh_cert, session)
        if spec.launch_without_secret:
            # The launcher cannot see an owner's consent in a client-driven launch: fail closed.
            raise InvalidArgument(
                LaunchReason.NO_SECRET_TWO_PHASE, "a two-phase launch always needs a secret"
            )
        spec = m.pin_vcpu_type(spec)
        pre = await m.preflight(spec)
        rec = m.new_record(spec, LaunchFlow.TWO_PHASE, requested_by)
        await m.admit(spec, rec.launch_id)
        with m.scope(rec.launch_id):
            return await self._prepare(rec, material, pre)

    async def _prepare(
        self, rec: LaunchRecord, material: SessionMaterial, pre: Preflight
    ) -> tuple[LaunchRecord, LaunchSecurityInfo]:
        m = self.m
        async with m.lock(rec.launch_id):
            try:
                m.store.insert(rec)
                measured = await m.define_and_start(rec, material, pre, _ignore)
                rec = m.store.set_deadline(measured.record, m.deadline(Phase.SECRET_INJECTED))
                assert rec.deadline is not None
                active = m.active[rec.launch_id]
                active.waiting = pre
                launch_id = rec.launch_id
                active.timer = m.clock.call_later(
                    rec.deadline - m.clock.time(), lambda: self._on_timer(launch_id)
                )
                return rec, measured.result
            except BaseException as exc:
                reason, detail = classify(exc) if isinstance(exc, Exception) else ABORTED
                if m.has(rec.launch_id):
                    rec = await m.shielded(m.fail_closed(rec, m.target(rec), reason, detail))
                else:
                    m.release(rec.launch_id)
                if isinstance(exc, ServiceError | SevError | asyncio.CancelledError):
                    raise
                raise FailedPrecondition(reason, detail) from None

    def _on_timer(self, launch_id: str) -> None:
        self.m.spawn(self._expire(launch_id))

    async def _expire(self, launch_id: str) -> None:
        m = self.m
        async with m.lock(launch_id):
            rec = m.store.get(launch_id)
            if (
                rec.state in PRE_RUNNING
                and rec.deadline is not None
                and m.clock.time() >= rec.deadline - 0.05
            ):
                await m.fail_closed(rec, next_phase(rec.mode, rec.state), *_EXPIRED)

    async def complete(self, launch_id: str, *, header: bytes, payload: bytes) -> LaunchRecord:
        """The caller's ownership is checked by the caller (`Launcher.complete`)."""
        with self.m.scope(launch_id):
            return await self._complete(launch_id, header=header, payload=payload)

    async def _complete(self, launch_id: str, *, header: bytes, payload: bytes) -> LaunchRecord:
        m = self.m
        async with m.lock(launch_id):
            rec = m.store.get(launch_id)
            if rec.mode is not LaunchFlow.TWO_PHASE or rec.state is not Phase.MEASURED:
                raise FailedPrecondition(
                    LaunchReason.LAUNCH_NOT_WAITING, f"launch is {rec.state.value}, not waiting for a secret"
                )
            active = m.active.get(launch_id)
            pre = active.waiting if active is not None else None
            if active is None or pre is None:
                raise FailedPrecondition(
                    LaunchReason.LAUNCH_NOT_WAITING, "launch is not driven by this launcher"
                )
            active.waiting = None
            if active.timer is not None:
                active.timer.cancel()
            # The timer is not the deadline, only its usual enforcer: a busy loop can run it late, and
            # a CompleteLaunch that takes the lock first must not inject into an expired launch.
            if rec.deadline is None or m.clock.time() >= rec.deadline:
                # Shielded: a caller cancelled now (gRPC deadline, disconnect) must not stop the destroy.
                await m.shielded(m.fail_closed(rec, Phase.SECRET_INJECTED, *_EXPIRED))
                raise DeadlineExceeded(
                    LaunchReason.DEADLINE_EXCEEDED, "the launch's deadline for CompleteLaunch has passed"
                )
            try:
                injected = await m.inject(rec, ReleasedSecret(header=header, payload=payload), pre)
                return (await m.resume(injected.record)).record
            except BaseException as exc:
                # Also a cancellation (the caller went away during inject or resume): the timer is off and
                # the preflight gone, so nothing else would fail this launch closed before the reconciler.
                reason, detail = classify(exc) if isinstance(exc, Exception) else ABORTED
                rec = await m.shielded(m.fail_closed(rec, m.target(rec), reason, detail))
                if isinstance(exc, ServiceError | SevError) or not isinstance(exc, Exception):
                    raise
                raise FailedPrecondition(reason, detail) from None
