"""The launcher core: one object the servicer calls, over the two flows, the reconciler and the step
machine they share (`steps`, `orchestrated`, `two_phase`, `reconciler`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from launcher_svc.core.clock import Clock, SystemClock, wait_some
from launcher_svc.core.config import LauncherConfig, LaunchEvent
from launcher_svc.core.metrics import DestroyPath, LaunchMetrics, NoMetrics
from launcher_svc.core.orchestrated import OrchestratedFlow
from launcher_svc.core.ports import Hypervisor, LaunchSecurityInfo, OwnerPort, PlatformPort
from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.reconciler import Reconciler
from launcher_svc.core.snp_flow import SnpFlow
from launcher_svc.core.spec import GuestSpec
from launcher_svc.core.state import PRE_RUNNING, LaunchRecord, LaunchStore, Phase
from launcher_svc.core.steps import ABORTED, STOPPING, Active, Checkpoint, LaunchScope, StepMachine, Why
from launcher_svc.core.two_phase import TwoPhaseFlow
from sevlaunch.errors import FailedPrecondition, InvalidArgument, NotFound
from sevlaunch.sev.technology import Technology

__all__ = ["LaunchEvent", "Launcher", "LauncherConfig"]

log = logging.getLogger("launcher_svc")


class Launcher:
    def __init__(
        self,
        *,
        hypervisor: Hypervisor,
        store: LaunchStore,
        platform: PlatformPort | None,
        owners: OwnerPort | None,
        config: LauncherConfig,
        metrics: LaunchMetrics | None = None,
        clock: Clock | None = None,
        checkpoint: Checkpoint | None = None,
        launch_scope: LaunchScope | None = None,
    ) -> None:
        self.machine = StepMachine(
            hypervisor=hypervisor,
            store=store,
            config=config,
            clock=clock or SystemClock(),
            metrics=metrics or NoMetrics(),
            checkpoint=checkpoint,
            launch_scope=launch_scope,
        )
        self.orchestrated = OrchestratedFlow(self.machine, platform, owners)
        self.two_phase = TwoPhaseFlow(self.machine)
        self.snp = SnpFlow(self.machine, platform, owners)
        self.reconciler = Reconciler(self.machine)

    # Read-only views for the servicer, the server and tests.
    @property
    def hv(self) -> Hypervisor:
        return self.machine.hv

    @property
    def store(self) -> LaunchStore:
        return self.machine.store

    @property
    def config(self) -> LauncherConfig:
        return self.machine.config

    @property
    def incarnation(self) -> str:
        return self.machine.incarnation

    @property
    def active(self) -> dict[str, Active]:
        return self.machine.active

    # ----------------------------------------------------------------------------------------------
    # lifecycle

    async def start(self) -> None:
        await self.reconciler.start()

    async def stop(self) -> None:
        """Stops the reconciler and fails closed every launch still in flight in this process.

        The launches are aborted all at once, and the whole stop (aborts, then the expiries, fail-closes
        and late destroys already under way) gets one budget, `config.shutdown_budget`: one abort takes
        at most two cleanup graces (wait for a call in flight, then the destroy), however many launches
        there are. A launch that reached RUNNING meanwhile is done, not an error. Whatever is still
        left when the budget is spent is logged and left to the reconciler of the next start (it fails
        launches of an earlier process and destroys their domains)."""
        m = self.machine
        m.closing = True
        clock = m.clock
        deadline = clock.monotonic() + m.config.shutdown_budget
        await self.reconciler.stop()
        aborts: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(self._stop_one(launch_id, STOPPING)) for launch_id in list(m.active)
        }
        if aborts:
            late = await wait_some(clock, aborts, max(0.0, deadline - clock.monotonic()))
            for task in aborts - late:
                if not task.cancelled() and task.exception() is not None:
                    log.error("abort at stop failed", exc_info=task.exception())
            if late:
                log.warning(
                    "launches still failing closed when the shutdown budget ran out",
                    extra={"count": len(late)},
                )
        if m.background:
            # Expiries, fail-closes and late destroys already under way: the rest of the budget.
            await wait_some(clock, set(m.background), max(0.0, deadline - clock.monotonic()))
        self.reconciler.detach()

    async def _stop_one(self, launch_id: str, reason: Why) -> None:
        try:
            await self.machine.abort(launch_id, reason=reason)
        except FailedPrecondition as exc:
            if exc.reason != LaunchReason.LAUNCH_RUNNING:  # it made it meanwhile: nothing to fail
                raise

    async def settle(self) -> None:
        """Waits for the background work under way (expiries, fail-closes, late destroys)."""
        while self.machine.background:
            await asyncio.wait(set(self.machine.background))

    # ----------------------------------------------------------------------------------------------
    # the flows

    async def launch(
        self, spec: GuestSpec, *, owner_endpoint: str, workload_id: str, requested_by: str
    ) -> tuple[LaunchRecord, AsyncIterator[LaunchEvent]]:
        flow = self.snp if spec.mode is Technology.SEV_SNP else self.orchestrated
        return await flow.launch(
            spec, owner_endpoint=owner_endpoint, workload_id=workload_id, requested_by=requested_by
        )

    async def prepare(
        self, spec: GuestSpec, *, godh_cert: bytes, session: bytes, requested_by: str
    ) -> tuple[LaunchRecord, LaunchSecurityInfo]:
        if spec.mode is Technology.SEV_SNP:
            # An SNP guest attests itself to its owner after boot: there is no measurement to hand back.
            raise InvalidArgument(
                LaunchReason.SNP_NEEDS_ORCHESTRATED, "SEV-SNP guests are launched with Launch only"
            )
        return await self.two_phase.prepare(
            spec, godh_cert=godh_cert, session=session, requested_by=requested_by
        )

    async def complete(
        self, launch_id: str, *, header: bytes, payload: bytes, requested_by: str
    ) -> LaunchRecord:
        self.owned(launch_id, requested_by)
        return await self.two_phase.complete(launch_id, header=header, payload=payload)

    # ----------------------------------------------------------------------------------------------
    # abort, destroy, queries

    async def abort(self, launch_id: str, *, reason: Why = ABORTED) -> LaunchRecord:
        return await self.machine.abort(launch_id, reason=reason)

    async def abort_owned(self, launch_id: str, *, requested_by: str) -> LaunchRecord:
        self.owned(launch_id, requested_by)
        return await self.machine.abort(launch_id, reason=(LaunchReason.ABORTED, "launch aborted by request"))

    async def destroy_guest(self, launch_id: str, *, requested_by: str) -> LaunchRecord:
        m = self.machine
        rec = self.owned(launch_id, requested_by)
        if rec.state in PRE_RUNNING:
            return await m.abort(
                launch_id, reason=(LaunchReason.DESTROYED_BY_REQUEST, "guest destroyed by request")
            )
        async with m.lock(launch_id):
            rec = m.store.get(launch_id)
            destroyed = await m.hv_call(
                launch_id, m.hv.destroy, rec.domain_name, timeout=m.config.cleanup_grace
            )
            if destroyed:
                m.metrics.domain_destroyed(DestroyPath.REQUEST)
            if rec.state is Phase.RUNNING:
                rec = m.store.finish(
                    rec,
                    Phase.DESTROYED,
                    failed_phase=None,
                    reason=LaunchReason.DESTROYED_BY_REQUEST,
                    detail="guest destroyed",
                )
            return rec

    def owned(self, launch_id: str, requested_by: str) -> LaunchRecord:
        """The record, if `requested_by` started it; NotFound otherwise (existence is not revealed)."""
        rec = self.machine.store.get(launch_id)
        if rec.requested_by != requested_by:
            raise NotFound(LaunchReason.LAUNCH_NOT_FOUND, "no such launch")
        return rec

    def list(self, *, requested_by: str, include_finished: bool) -> list[LaunchRecord]:
        return [
            r
            for r in self.machine.store.records(include_terminal=include_finished)
            if r.requested_by == requested_by
        ]

    async def reconcile(self) -> int:
        return await self.reconciler.reconcile()
