"""The step machine both launch flows share: admission, phase deadlines, hypervisor calls in workers, the
steps every launch takes (define, start paused, measure, inject, resume) and fail-closed.

Fail closed means: every path that does not end in RUNNING ends in `fail_closed`, which destroys and
undefines the domain (the backend frees the firmware guest context with it) before the launch is
recorded as FAILED. A guest is resumed only through `resume`, which checks `may_resume` on the
persisted record first: a secret must have been injected, or the spec asked to run without one and the
owner explicitly agreed (`no_secret`).

Hypervisor calls run in worker threads and cannot be interrupted: fail-closed waits for a call still in
flight before it destroys the domain (see `hv_call`), so a call that outlives its deadline cannot recreate
or keep a paused domain behind the destroy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from launcher_svc.core.clock import Clock, Timer, wait_some, within
from launcher_svc.core.config import LauncherConfig, LaunchEvent
from launcher_svc.core.domain_xml import SevLaunchParams, build_domain_xml, domain_name_for
from launcher_svc.core.metrics import DestroyPath, LaunchMetrics, Outcome
from launcher_svc.core.ports import Hypervisor, LaunchSecurityInfo, ReleasedSecret
from launcher_svc.core.preflight import FirmwareImage, Preflight, SessionMaterial, preflight
from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.spec import GuestSpec
from launcher_svc.core.state import (
    PRE_RUNNING,
    LaunchFlow,
    LaunchRecord,
    LaunchStore,
    Phase,
    PhaseChange,
    may_resume,
    next_phase,
)
from launcher_svc.core.tracing import NoTracing, PhaseTracer
from sevlaunch.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from sevlaunch.sev.errors import SevError
from sevlaunch.sev.measurement import LAUNCH_MEASUREMENT_SIZE as MEASUREMENT_SIZE
from sevlaunch.sev.secret import SECRET_HEADER_SIZE
from sevlaunch.sev.technology import Technology

log = logging.getLogger("launcher_svc")

T = TypeVar("T")
R = TypeVar("R")

#: Called with a step's name ("before DEFINED", "after DEFINED", ...) as a launch passes it. Tests use it
#: to kill or stop a launcher at an exact point; production passes none.
Checkpoint = Callable[[str], None]

_ES_RANGE = frozenset({Technology.SEV_ES, Technology.SEV_SNP})

Why = tuple[str, str]  # (reason, detail) of a failure, safe to show to the caller and to log
STOPPING: Why = (LaunchReason.LAUNCHER_STOPPING, "the launcher is shutting down")
ABORTED: Why = (LaunchReason.ABORTED, "launch aborted")


def classify(exc: BaseException) -> Why:
    if isinstance(exc, ServiceError):
        return exc.reason, exc.detail
    if isinstance(exc, SevError):
        return exc.reason.value, exc.detail
    if isinstance(exc, TimeoutError):
        return LaunchReason.DEADLINE_EXCEEDED, "the phase did not finish within its deadline"
    return LaunchReason.INTERNAL, "internal error"


@dataclass
class Active:
    """A launch driven by this process."""

    mode: Technology
    started: bool = False
    task: asyncio.Task[None] | None = None
    timer: Timer | None = None
    pending: set[asyncio.Future[Any]] = field(default_factory=set)
    cancel_reason: Why | None = None
    closing: bool = False  # fail-closed has begun; nothing may interrupt it
    waiting: Preflight | None = None  # a two-phase launch waiting for CompleteLaunch


@dataclass(frozen=True)
class Stepped(Generic[R]):
    record: LaunchRecord
    result: R
    seconds: float


#: Makes the context a launch's work runs in (sevlaunch.rpc.launch_id_scope in the server).
LaunchScope = Callable[[str], AbstractContextManager[object]]


class StepMachine:
    def __init__(
        self,
        *,
        hypervisor: Hypervisor,
        store: LaunchStore,
        config: LauncherConfig,
        clock: Clock,
        metrics: LaunchMetrics,
        checkpoint: Checkpoint | None = None,
        launch_scope: LaunchScope | None = None,
        tracer: PhaseTracer | None = None,
    ) -> None:
        self.hv = hypervisor
        self.tracer: PhaseTracer = tracer or NoTracing()
        self.store = store
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self._checkpoint = checkpoint
        self._launch_scope = launch_scope
        # A launch whose record names another incarnation is not driven by this process: orphaned.
        self.incarnation = uuid.uuid4().hex
        self.active: dict[str, Active] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._admit_lock = asyncio.Lock()
        self.closing = False
        self._attempting: dict[str, Phase] = {}
        self.background: set[asyncio.Future[Any]] = set()

    def scope(self, launch_id: str) -> AbstractContextManager[object]:
        """The launch's context: with the server's scope, log lines and calls to the platform and owner
        in it carry the launch id (the core knows only this callable, not gRPC)."""
        return self._launch_scope(launch_id) if self._launch_scope is not None else nullcontext()

    async def in_scope(self, launch_id: str, work: Awaitable[R]) -> R:
        with self.scope(launch_id):
            return await work

    def emitter(self, queue: asyncio.Queue[LaunchEvent]) -> Callable[[Stepped[Any]], None]:
        """Puts a finished step's progress event on a driven launch's stream."""

        def emit(done: Stepped[Any]) -> None:
            r, now = done.record, self.clock.time()
            queue.put_nowait(LaunchEvent(r.launch_id, r.state, done.seconds, r.domain_name, now))

        return emit

    async def start_driven(
        self,
        spec: GuestSpec,
        rec: LaunchRecord,
        drive: Callable[[asyncio.Queue[LaunchEvent]], Coroutine[Any, Any, None]],
    ) -> AsyncIterator[LaunchEvent]:
        """Admits and stores `rec`, then drives it as a task of its own in the launch's scope (so a
        client that goes away stops nothing); returns the stream of its events."""
        await self.admit(spec, rec.launch_id)
        try:
            self.store.insert(rec)
        except Exception:
            self.release(rec.launch_id)
            raise
        queue: asyncio.Queue[LaunchEvent] = asyncio.Queue()
        self.active[rec.launch_id].task = asyncio.create_task(self.in_scope(rec.launch_id, drive(queue)))
        return launch_events(queue)

    def checkpoint(self, name: str) -> None:
        if self._checkpoint is not None:
            self._checkpoint(name)

    def lock(self, launch_id: str) -> asyncio.Lock:
        return self._locks.setdefault(launch_id, asyncio.Lock())

    # ----------------------------------------------------------------------------------------------
    # hypervisor calls, background work

    async def hv_call(self, launch_id: str, fn: Callable[..., T], *args: object, timeout: float | None) -> T:
        """Runs a blocking hypervisor call in a worker.

        A worker thread cannot be stopped: a call that has begun (say `start_paused`, which may have
        done LAUNCH_START already) runs to its end whatever its caller does. So the executor future is
        never cancelled: it is awaited through `shield`, and a phase deadline, an abort or a SIGTERM
        only cancels the waiting. The future stays in `pending` until its thread has returned, which is
        what fail-closed waits for before destroying (and destroys again after, if it had to give up
        waiting). Cancelling `fut` itself would drop it from `pending` at once while the thread goes on
        and leaves a paused domain behind the destroy."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.run_in_executor(None, fn, *args)
        active = self.active.get(launch_id)
        if active is not None:
            active.pending.add(fut)
            fut.add_done_callback(active.pending.discard)
        if timeout is None:
            return await asyncio.shield(fut)
        return await within(self.clock, timeout, asyncio.shield(fut))

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def shielded(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Runs `coro` (a fail-closed) to its end even if the awaiting call is cancelled (again): it is
        a background task of its own, which `stop` also waits for."""
        return asyncio.shield(self.spawn(coro))

    def driver_idle(self, launch_id: str) -> bool:
        active = self.active.get(launch_id)
        return active is None or active.task is None or active.task.done()

    def has(self, launch_id: str) -> bool:
        try:
            self.store.get(launch_id)
        except NotFound:
            return False
        return True

    # ----------------------------------------------------------------------------------------------
    # before the first step

    def pin_vcpu_type(self, spec: GuestSpec) -> GuestSpec:
        # SEV-ES and SEV-SNP measure each vCPU's VMSA, which depends on the model.
        if spec.vcpu_type is None and spec.mode in (Technology.SEV_ES, Technology.SEV_SNP):
            return dataclasses.replace(spec, vcpu_type=self.config.vcpu_type)
        return spec

    async def preflight(self, spec: GuestSpec) -> Preflight:
        """What the firmware image allows, checked before anything is defined or anyone is called."""
        return await asyncio.to_thread(preflight, spec, secret_gpa=self.config.secret_gpa)

    async def admit(self, spec: GuestSpec, launch_id: str) -> None:
        """Bounded concurrency, and an ASID for this guest, or RESOURCE_EXHAUSTED."""
        async with self._admit_lock:
            if self.closing:
                raise FailedPrecondition(*STOPPING)
            if len(self.active) >= self.config.max_concurrent:
                raise ResourceExhausted(
                    LaunchReason.TOO_MANY_LAUNCHES, f"{len(self.active)} launches in flight"
                )
            timeout = self.config.phase_timeout
            # SEV-SNP guests take SEV-ES ASIDs: both count against the same range.
            es = spec.mode in _ES_RANGE
            if spec.mode is Technology.SEV_SNP:
                snp_caps = await self.hv_call(launch_id, self.hv.snp_capabilities, timeout=timeout)
                limit = snp_caps.max_snp_guests
            else:
                caps = await self.hv_call(launch_id, self.hv.sev_capabilities, timeout=timeout)
                limit = caps.max_es_guests if es else caps.max_guests
            domains = await self.hv_call(launch_id, self.hv.list_domains, timeout=timeout)
            used = sum(1 for d in domains if d.sev and d.active and d.sev_es == es)
            reserved = sum(1 for a in self.active.values() if not a.started and (a.mode in _ES_RANGE) == es)
            if used + reserved >= limit:
                raise ResourceExhausted(
                    LaunchReason.NO_FREE_ASID,
                    f"{used + reserved} of {limit} {spec.mode.value} guest ASIDs in use",
                )
            self.active[launch_id] = Active(mode=spec.mode)
            self.metrics.in_flight(len(self.active))

    def release(self, launch_id: str) -> None:
        active = self.active.pop(launch_id, None)
        if active is not None and active.timer is not None:
            active.timer.cancel()
        self.metrics.in_flight(len(self.active))

    def new_record(
        self,
        spec: GuestSpec,
        flow: LaunchFlow,
        requested_by: str,
        *,
        owner_endpoint: str = "",
        workload_id: str = "",
    ) -> LaunchRecord:
        launch_id = uuid.uuid4().hex
        now = self.clock.time()
        return LaunchRecord(
            launch_id=launch_id,
            mode=flow,
            state=Phase.ACCEPTED,
            spec=spec,
            domain_name=domain_name_for(launch_id, spec.name),
            requested_by=requested_by,
            incarnation=self.incarnation,
            created_at=now,
            updated_at=now,
            owner_endpoint=owner_endpoint,
            workload_id=workload_id,
        )

    def target(self, rec: LaunchRecord) -> Phase | None:
        """The phase a launch was attempting: the one its current step aims at, else the next one."""
        attempting = self._attempting.get(rec.launch_id)
        if attempting is not None:
            return attempting
        current = self.store.get(rec.launch_id).state
        if current in PRE_RUNNING:
            return next_phase(rec.mode, current)
        return None

    def deadline(self, phase: Phase) -> float:
        return self.clock.time() + self.config.timeout(phase)

    # ----------------------------------------------------------------------------------------------
    # fail closed

    async def fail_closed(
        self,
        rec: LaunchRecord,
        failed_phase: Phase | None,
        reason: str,
        detail: str,
        *,
        path: DestroyPath = DestroyPath.FAIL_CLOSED,
    ) -> LaunchRecord:
        """Destroys the domain, then records FAILED. Never raises: the reconciler retries a destroy
        that failed, since it destroys every domain of ours whose launch is over."""
        active = self.active.get(rec.launch_id)
        if active is not None:
            active.closing = True
            active.waiting = None
        in_flight: set[asyncio.Future[Any]] = set(active.pending) if active is not None else set()
        if in_flight:
            # A call that missed its deadline (or whose waiter was cancelled) may still be starting the
            # domain: let it end first, so that the destroy comes after it and not before.
            in_flight = await wait_some(self.clock, in_flight, self.config.cleanup_grace)
        await self._destroy_for(rec, path)
        if in_flight:
            # Still running after the grace: destroy once more when it ends (and the reconciler
            # destroys whatever a launch that is over left, as a backstop).
            log.warning("hypervisor call outlived the cleanup grace", extra={"launch_id": rec.launch_id})
            self.spawn(self._destroy_after(rec, in_flight, path))
        try:
            rec = self.store.finish(
                rec, Phase.FAILED, failed_phase=failed_phase, reason=reason, detail=detail
            )
        except Exception:
            log.exception("cannot record failed launch", extra={"launch_id": rec.launch_id})
        self.release(rec.launch_id)
        self._attempting.pop(rec.launch_id, None)
        self.metrics.launch_finished(rec.mode, Outcome.FAILED, failed_phase)
        log.warning(
            "launch failed closed",
            extra={
                "launch_id": rec.launch_id,
                "failed_phase": failed_phase.value if failed_phase else None,
                "reason": reason,
                "path": path.value,
            },
        )
        return rec

    async def _destroy_for(self, rec: LaunchRecord, path: DestroyPath) -> None:
        try:
            destroyed = await self.hv_call(
                rec.launch_id, self.hv.destroy, rec.domain_name, timeout=self.config.cleanup_grace
            )
            if destroyed:
                self.metrics.domain_destroyed(path)
        except Exception as exc:
            log.error("destroy failed", extra={"launch_id": rec.launch_id, "error": classify(exc)[0]})

    async def _destroy_after(
        self, rec: LaunchRecord, calls: set[asyncio.Future[Any]], path: DestroyPath
    ) -> None:
        await asyncio.wait(calls)
        await self._destroy_for(rec, path)

    async def abort(self, launch_id: str, *, reason: Why = ABORTED) -> LaunchRecord:
        """Fails a launch closed, whoever drives it: cancels its driving task, or fails it here."""
        active = self.active.get(launch_id)
        if active is not None and active.task is not None and not active.task.done():
            if not active.closing:
                active.cancel_reason = reason
                active.task.cancel()
            await asyncio.wait({active.task})
            return self.store.get(launch_id)
        async with self.lock(launch_id):
            rec = self.store.get(launch_id)
            if rec.state in PRE_RUNNING:
                rec = await self.fail_closed(rec, next_phase(rec.mode, rec.state), *reason)
            elif rec.state is Phase.RUNNING:
                raise FailedPrecondition(LaunchReason.LAUNCH_RUNNING, "the guest runs; use DestroyGuest")
            return rec

    # ----------------------------------------------------------------------------------------------
    # steps

    async def step(
        self,
        rec: LaunchRecord,
        to: Phase,
        work: Callable[[], Awaitable[R]],
        note: Callable[[R], PhaseChange] | None = None,
    ) -> Stepped[R]:
        """Runs one phase's work under its deadline and persists the transition `note` makes of its
        result (by default only the phase); returns the new record, the result and the seconds."""
        start = self.clock.monotonic()
        self._attempting[rec.launch_id] = to
        self.checkpoint(f"before {to.value}")
        try:
            with self.tracer.phase(to.value, rec.launch_id):
                result = await within(self.clock, self.config.timeout(to), work())
        except TimeoutError:
            raise DeadlineExceeded(
                LaunchReason.PHASE_DEADLINE, f"{to.value} not reached within {self.config.timeout(to)} s"
            ) from None
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled (abort, SIGTERM, a caller gone) just as the work ended: never advance past it.
            raise asyncio.CancelledError
        change = note(result) if note is not None else PhaseChange(to)
        if change.to is not to:
            raise RuntimeError(f"a step to {to.value} recorded {change.to.value}")
        rec = self.store.advance(rec, change)
        self.checkpoint(f"after {to.value}")
        elapsed = self.clock.monotonic() - start
        self.metrics.phase_done(to, elapsed)
        return Stepped(rec, result, elapsed)

    async def define_and_start(
        self,
        rec: LaunchRecord,
        material: SessionMaterial,
        pre: Preflight,
        emit: Callable[[Stepped[Any]], None],
    ) -> Stepped[LaunchSecurityInfo]:
        """DEFINED, STARTED_PAUSED, MEASURED: shared by both launch flows."""
        caps = await self.hv_call(
            rec.launch_id, self.hv.sev_capabilities, timeout=self.config.timeout(Phase.DEFINED)
        )
        xml = build_domain_xml(
            rec.spec,
            launch_id=rec.launch_id,
            domain_name=rec.domain_name,
            loader=pre.loader,
            sev=SevLaunchParams(
                cbitpos=caps.cbitpos,
                reduced_phys_bits=caps.reduced_phys_bits,
                policy=rec.spec.policy,
                dh_cert=material.godh.to_bytes(),
                session=material.session.to_bytes(),
            ),
        )
        started = await self.define_then_start(
            rec, xml, emit, Phase.STARTED_PAUSED, self.hv.start_paused, pre.firmware
        )
        launch_id, name = rec.launch_id, rec.domain_name

        async def measure() -> LaunchSecurityInfo:
            info = await self.hv_call(launch_id, self.hv.launch_security_info, name, timeout=None)
            if len(info.measurement) != MEASUREMENT_SIZE:
                raise FailedPrecondition(
                    LaunchReason.BAD_MEASUREMENT, "the hypervisor returned a malformed measurement"
                )
            if info.policy != rec.spec.policy:
                raise FailedPrecondition(
                    LaunchReason.POLICY_MISMATCH,
                    f"guest runs with policy {info.policy:#x}, asked for {rec.spec.policy:#x}",
                )
            return info

        measured = await self.step(
            started.record,
            Phase.MEASURED,
            measure,
            lambda info: PhaseChange(Phase.MEASURED, measurement=info.measurement),
        )
        emit(measured)
        return measured

    async def define_then_start(
        self,
        rec: LaunchRecord,
        xml: str,
        emit: Callable[[Stepped[Any]], None],
        started_phase: Phase,
        start_domain: Callable[[str, FirmwareImage], None],
        firmware: FirmwareImage,
    ) -> Stepped[None]:
        """DEFINED (the domain from `xml`), then `started_phase` (`start_domain` starts it): shared by
        the SEV and SEV-SNP flows."""
        launch_id, name = rec.launch_id, rec.domain_name

        async def define() -> str:
            return await self.hv_call(launch_id, self.hv.define, xml, timeout=None)

        defined = await self.step(
            rec, Phase.DEFINED, define, lambda uuid_: PhaseChange(Phase.DEFINED, domain_uuid=uuid_)
        )
        emit(defined)

        async def start() -> None:
            await self.hv_call(launch_id, start_domain, name, firmware, timeout=None)
            active = self.active.get(launch_id)
            if active is not None:
                active.started = True  # its ASID now counts on the chip, no longer as a reservation

        started = await self.step(defined.record, started_phase, start)
        emit(started)
        return started

    @staticmethod
    def check_secret(secret: ReleasedSecret, pre: Preflight) -> None:
        area = pre.secret_area
        if area is None:
            # Preflight let a launch_without_secret spec through without a secret location.
            raise FailedPrecondition(
                LaunchReason.NO_SECRET_AREA,
                "the OVMF declares no secret area and no secret guest physical address is configured",
            )
        if len(secret.header) != SECRET_HEADER_SIZE:
            raise InvalidArgument(
                LaunchReason.BAD_SECRET_HEADER, f"the secret header is {SECRET_HEADER_SIZE} bytes"
            )
        if not secret.payload or len(secret.payload) % 16:
            raise InvalidArgument(
                LaunchReason.BAD_SECRET_PAYLOAD, "the secret payload must be a non-empty multiple of 16 bytes"
            )
        if len(secret.payload) > area.size:
            raise InvalidArgument(
                LaunchReason.SECRET_TOO_LARGE, f"the secret does not fit the {area.size}-byte area"
            )

    async def inject(self, rec: LaunchRecord, secret: ReleasedSecret, pre: Preflight) -> Stepped[None]:
        self.check_secret(secret, pre)
        area = pre.secret_area
        assert area is not None  # check_secret refused a launch without one

        async def inject() -> None:
            await self.hv_call(
                rec.launch_id,
                self.hv.inject_secret,
                rec.domain_name,
                secret.header,
                secret.payload,
                area,
                timeout=None,
            )

        return await self.step(rec, Phase.SECRET_INJECTED, inject)

    async def resume(self, rec: LaunchRecord) -> Stepped[None]:
        # The gate: re-read the persisted record, never trust the caller's copy.
        if not may_resume(self.store.get(rec.launch_id)):
            raise FailedPrecondition(
                LaunchReason.NO_SECRET_INJECTED, "refusing to resume a guest without an injected secret"
            )

        async def resume() -> None:
            await self.hv_call(rec.launch_id, self.hv.resume, rec.domain_name, timeout=None)

        running = await self.step(rec, Phase.RUNNING, resume)
        self.ran(running.record)
        return running

    def ran(self, rec: LaunchRecord) -> None:
        """A launch reached RUNNING: it is this process's no longer."""
        self.release(rec.launch_id)
        self._attempting.pop(rec.launch_id, None)
        self.metrics.launch_finished(rec.mode, Outcome.RUNNING, None)
        log.info("launch running", extra={"launch_id": rec.launch_id, "domain": rec.domain_name})


async def launch_events(queue: asyncio.Queue[LaunchEvent]) -> AsyncIterator[LaunchEvent]:
    """A driven launch's events, up to and including RUNNING or FAILED."""
    while True:
        event = await queue.get()
        yield event
        if event.phase in (Phase.RUNNING, Phase.FAILED):
            return


def failed_event(rec: LaunchRecord, target: Phase | None, now: float) -> LaunchEvent:
    return LaunchEvent(
        rec.launch_id,
        Phase.FAILED,
        now - rec.created_at,
        rec.domain_name,
        now,
        failed_phase=target,
        reason=rec.reason,
        detail=rec.detail,
    )
