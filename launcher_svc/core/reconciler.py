"""The reconciler and the hypervisor's lifecycle events.

The reconciler runs at start and periodically: it fails every launch left in flight by an earlier
launcher process (or stuck past its deadline here), and destroys SEV domains of ours that no advancing
launch owns, except a running one that no record knows at all (after a lost or corrupt database): that
one is left alone and logged. It never resumes anything.

Lifecycle events catch what happens behind the launcher's back: a guest resumed before it got its secret,
or a domain that stopped mid-launch, fails its launch closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from launcher_svc.core.metrics import DestroyPath
from launcher_svc.core.ports import DomainState, LifecycleKind
from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.state import PRE_RUNNING, Phase, may_resume, next_phase
from launcher_svc.core.steps import StepMachine

log = logging.getLogger("launcher_svc")


class Reconciler:
    def __init__(self, machine: StepMachine) -> None:
        self.m = machine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.m.hv.set_lifecycle_handler(self._lifecycle_from_thread)
        await self.reconcile()
        if self.m.config.reconcile_interval > 0:
            self._task = asyncio.create_task(self._forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def detach(self) -> None:
        self.m.hv.set_lifecycle_handler(None)

    # -- lifecycle events -----------------------------------------------------------------------

    def _lifecycle_from_thread(self, name: str, kind: LifecycleKind) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_lifecycle, name, kind)

    def _on_lifecycle(self, name: str, kind: LifecycleKind) -> None:
        m = self.m
        try:
            rec = m.store.by_domain(name)
        except Exception as exc:
            # An event that arrives after the store was closed (a launcher going away), or while it
            # fails: one line, not an asyncio traceback; the next reconcile round looks at the domain.
            log.warning(
                "lifecycle event not checked: the launch store failed",
                extra={"domain": name, "event": kind.value, "error": str(exc)},
            )
            return
        if rec is None or rec.state not in PRE_RUNNING:
            return
        active = m.active.get(rec.launch_id)
        if active is None or active.closing:
            return  # not driven here (the reconciler's business), or our own fail-closed destroy
        if kind is LifecycleKind.RESUMED and rec.state is not Phase.SECRET_INJECTED and not may_resume(rec):
            # Someone resumed the guest behind our back, before it got its secret: fail closed now.
            m.spawn(
                m.abort(
                    rec.launch_id, reason=(LaunchReason.RESUMED_WITHOUT_SECRET, "guest resumed externally")
                )
            )
        elif kind in (LifecycleKind.STOPPED, LifecycleKind.CRASHED) and rec.state not in (
            Phase.ACCEPTED,
            Phase.DEFINED,
        ):
            m.spawn(m.abort(rec.launch_id, reason=(LaunchReason.DOMAIN_STOPPED, f"the domain {kind.value}")))

    # -- rounds ---------------------------------------------------------------------------------

    async def _forever(self) -> None:
        while True:
            await self.m.clock.sleep(self.m.config.reconcile_interval)
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile round failed")

    async def reconcile(self) -> int:
        """Fails orphaned launches and destroys SEV domains of ours that no advancing launch owns.
        Returns how many domains were destroyed."""
        m = self.m
        destroyed = 0
        now = m.clock.time()
        for rec in m.store.in_flight():
            orphan = rec.incarnation != m.incarnation
            stuck = rec.launch_id not in m.active or (
                rec.deadline is not None and now > rec.deadline + m.config.cleanup_grace
            )
            if orphan or (stuck and not m.lock(rec.launch_id).locked() and m.driver_idle(rec.launch_id)):
                reason = (
                    (LaunchReason.LAUNCHER_RESTARTED, "the launcher restarted during the launch")
                    if orphan
                    else (LaunchReason.NOT_ADVANCING, "the launch stopped advancing")
                )
                with contextlib.suppress(Exception):
                    domains_before = {d.name for d in await asyncio.to_thread(m.hv.list_domains)}
                    if rec.domain_name in domains_before:
                        destroyed += 1
                await m.fail_closed(
                    rec, next_phase(rec.mode, rec.state), *reason, path=DestroyPath.RECONCILER
                )
        for dom in await asyncio.to_thread(m.hv.list_domains):
            if not dom.sev:
                continue
            if dom.launch_id is None:
                if m.config.reconcile_foreign and dom.state is DomainState.PAUSED:
                    if await asyncio.to_thread(m.hv.destroy, dom.name):
                        destroyed += 1
                        m.metrics.domain_destroyed(DestroyPath.RECONCILER)
                continue
            owner = m.store.by_domain(dom.name)
            if owner is not None and (owner.state is Phase.RUNNING or owner.launch_id in m.active):
                continue
            if owner is None and dom.state is DomainState.RUNNING:
                # Ours, but no record says how it came to run (a lost or set-aside database): it may be
                # a tenant's guest that got its secret. The reconciler never resumes and never guesses
                # about a running guest; it says so, and an operator decides.
                log.warning("running SEV domain with no launch record left alone", extra={"domain": dom.name})
                continue
            # Ours, and its launch is over, or unknown and the guest never ran: nothing may keep it.
            if await asyncio.to_thread(m.hv.destroy, dom.name):
                destroyed += 1
                m.metrics.domain_destroyed(DestroyPath.RECONCILER)
                log.warning("reconciler destroyed a domain", extra={"domain": dom.name})
        return destroyed
