"""The launch core: drives a `Hypervisor` through an attested launch and fails closed.

Fail closed means: every path that does not end in RUNNING ends in `_fail_closed`, which destroys and
undefines the domain (the backend frees the firmware guest context with it) before the launch is
recorded as FAILED. A guest is resumed only through `_resume`, which checks `may_resume` on the
persisted record first: a secret must have been injected, or the spec asked to run without one and the
owner explicitly agreed (`no_secret`).

Orchestrated launches run as tasks of their own; the progress stream only reads their events, so a
client that goes away does not stop a launch from finishing or from being cleaned up. Two-phase launches
wait for CompleteLaunch until a deadline, checked by CompleteLaunch itself under the launch's lock and
enforced by a timer and, as a backstop, by the reconciler.

Hypervisor calls run in worker threads and cannot be interrupted: fail-closed waits for a call still in
flight before it destroys the domain (see `_hv`), so a call that outlives its deadline cannot recreate
or keep a paused domain behind the destroy.

The reconciler runs at start and periodically: it fails every launch left in flight by an earlier
launcher process, and destroys SEV domains of ours that no advancing launch owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from launcher_svc.core.domain_xml import SevLaunchParams, build_domain_xml, domain_name_for
from launcher_svc.core.ports import (
    DomainState,
    Hypervisor,
    LaunchSecurityInfo,
    LifecycleKind,
    OwnerPort,
    PlatformPort,
    ReleasedSecret,
)
from launcher_svc.core.spec import GuestSpec, PathPolicy, validate_endpoint, validate_workload
from launcher_svc.core.state import (
    PRE_RUNNING,
    LaunchFlow,
    LaunchRecord,
    LaunchStore,
    Phase,
    may_resume,
    next_phase,
)
from sevlaunch.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from sevlaunch.sev.cert import Algorithm, Curve, ECKey, SEVCertificate, Usage
from sevlaunch.sev.errors import SevError
from sevlaunch.sev.ovmf import OVMF
from sevlaunch.sev.session import SessionBlob
from sevlaunch.sev.technology import Technology

log = logging.getLogger("launcher_svc")

T = TypeVar("T")

SECRET_HEADER_SIZE = 52
GODH_SIZE = 0x824
SESSION_SIZE = 128


def check_godh(godh_cert: bytes) -> None:
    """Refuses (InvalidArgument bad_godh) a GODH the firmware could not use: it must parse as a SEV
    certificate for a PDH (usage 0x1003) with an ECDH algorithm and a P-384 public key on its curve."""
    if len(godh_cert) != GODH_SIZE:
        raise InvalidArgument("bad_godh", f"the GODH certificate is {GODH_SIZE} bytes")
    try:
        cert = SEVCertificate.from_bytes(godh_cert)
    except SevError as exc:
        raise InvalidArgument("bad_godh", f"the GODH certificate does not parse: {exc.detail}") from None
    if cert.usage is not Usage.PDH:
        raise InvalidArgument("bad_godh", f"the GODH certificate is for a {cert.usage.name} key, not a PDH")
    if cert.algorithm not in (Algorithm.ECDH_SHA256, Algorithm.ECDH_SHA384):
        raise InvalidArgument("bad_godh", f"the GODH algorithm is {cert.algorithm.name}, not ECDH")
    if not isinstance(cert.key, ECKey) or cert.key.curve is not Curve.P384:
        raise InvalidArgument("bad_godh", "the GODH key is not an EC P-384 key")
    try:
        cert.public_key()
    except SevError as exc:
        raise InvalidArgument("bad_godh", f"the GODH public key does not load: {exc.detail}") from None


def check_session(session: bytes) -> None:
    """Refuses (InvalidArgument bad_session) a session blob that does not parse."""
    if len(session) != SESSION_SIZE:
        raise InvalidArgument("bad_session", f"the session blob is {SESSION_SIZE} bytes")
    try:
        SessionBlob.from_bytes(session)
    except SevError as exc:
        raise InvalidArgument("bad_session", f"the session blob does not parse: {exc.detail}") from None


MEASUREMENT_SIZE = 48
DEFAULT_SECRET_AREA_SIZE = 3072  # OVMF's default (PROTOCOL.md section 6), used with an explicit address
MAX_FIRMWARE_READ = 64 << 20


@dataclass(frozen=True)
class LaunchEvent:
    launch_id: str
    phase: Phase
    duration: float
    domain_name: str
    at: float
    failed_phase: Phase | None = None
    reason: str = ""
    detail: str = ""


class LaunchObserver:
    """Metrics hooks; the default does nothing. Labels must never carry ids or secrets."""

    def phase_done(self, phase: Phase, seconds: float) -> None: ...

    def launch_finished(self, mode: LaunchFlow, outcome: str, failed_phase: Phase | None) -> None: ...

    def domain_destroyed(self, path: str) -> None: ...

    def in_flight(self, count: int) -> None: ...


@dataclass(frozen=True)
class LauncherConfig:
    paths: PathPolicy = field(default_factory=PathPolicy)
    phase_timeout: float = 30.0
    # Per-phase overrides, e.g. {Phase.SECRET_RELEASED: 60}; for a two-phase launch the wait for
    # CompleteLaunch is the SECRET_INJECTED phase.
    phase_timeouts: dict[Phase, float] = field(default_factory=dict)
    max_concurrent: int = 8
    secret_gpa: int | None = None  # for OVMF images without a declared secret area (Debian's)
    reconcile_interval: float = 10.0
    reconcile_foreign: bool = False  # also destroy paused SEV domains the launcher did not create
    cleanup_grace: float = 10.0  # how long fail-closed waits for a hypervisor call still in a worker
    # The vCPU model pinned for SEV-ES guests whose spec names none (`--vcpu-type`): an SEV-ES launch
    # always runs on a pinned model, since its VMSAs (and so its measurement) depend on it.
    vcpu_type: str = "EPYC-v4"

    def timeout(self, phase: Phase) -> float:
        return self.phase_timeouts.get(phase, self.phase_timeout)

    @property
    def shutdown_budget(self) -> float:
        """What `Launcher.stop` may take in all: one abort's worst case (a cleanup grace waiting for a
        hypervisor call in flight, another for the destroy), since all launches are aborted at once.
        A SIGTERM takes the server's `--grace` (calls in flight) plus this; Kubernetes'
        terminationGracePeriodSeconds must exceed the sum (k8s/base/host-daemonset.yaml: 60 > 10 + 20)."""
        return 2 * self.cleanup_grace


@dataclass
class _Preflight:
    secret_gpa: int | None
    secret_area_size: int


@dataclass
class _Active:
    mode: Technology
    started: bool = False
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    pending: set[asyncio.Future[object]] = field(default_factory=set)
    cancel_reason: tuple[str, str] | None = None
    closing: bool = False  # fail-closed has begun; nothing may interrupt it


def _classify(exc: BaseException) -> tuple[str, str]:
    """(reason, detail) of a failure, safe to show to the caller and to log."""
    if isinstance(exc, ServiceError):
        return exc.reason, exc.detail
    if isinstance(exc, SevError):
        return exc.reason.value, exc.detail
    if isinstance(exc, TimeoutError):
        return "deadline_exceeded", "the phase did not finish within its deadline"
    return "internal", "internal error"


_STOPPING = ("launcher_stopping", "the launcher is shutting down")


class Launcher:
    def __init__(
        self,
        *,
        hypervisor: Hypervisor,
        store: LaunchStore,
        platform: PlatformPort | None,
        owners: OwnerPort | None,
        config: LauncherConfig,
        observer: LaunchObserver | None = None,
    ) -> None:
        self.hv = hypervisor
        self.store = store
        self.platform = platform
        self.owners = owners
        self.config = config
        self.observer = observer or LaunchObserver()
        # A launch whose record names another incarnation is not driven by this process: orphaned.
        self.incarnation = uuid.uuid4().hex
        self._active: dict[str, _Active] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._admit_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._closing = False
        self._attempting: dict[str, Phase] = {}
        self._background: set[asyncio.Future[object]] = set()
        self._pre: dict[str, _Preflight] = {}

    # ----------------------------------------------------------------------------------------------
    # lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.hv.set_lifecycle_handler(self._lifecycle_from_thread)
        await self.reconcile()
        if self.config.reconcile_interval > 0:
            self._reconciler = asyncio.create_task(self._reconcile_forever())

    async def stop(self) -> None:
        """Stops the reconciler and fails closed every launch still in flight in this process.

        The launches are aborted all at once, and the whole stop (aborts, then the expiries, fail-closes
        and late destroys already under way) gets one budget, `config.shutdown_budget`: one abort takes
        at most two cleanup graces (wait for a call in flight, then the destroy), however many launches
        there are. A launch that reached RUNNING meanwhile is done, not an error. Whatever is still
        left when the budget is spent is logged and left to the reconciler of the next start (it fails
        launches of an earlier process and destroys their domains)."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_budget
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        aborts = [
            asyncio.ensure_future(self._stop_one(launch_id, _STOPPING)) for launch_id in list(self._active)
        ]
        if aborts:
            done, late = await asyncio.wait(aborts, timeout=max(0.0, deadline - loop.time()))
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("abort at stop failed", exc_info=task.exception())
            if late:
                log.warning(
                    "launches still failing closed when the shutdown budget ran out",
                    extra={"count": len(late)},
                )
        if self._background:
            # Expiries, fail-closes and late destroys already under way: the rest of the budget.
            await asyncio.wait(set(self._background), timeout=max(0.0, deadline - loop.time()))
        self.hv.set_lifecycle_handler(None)

    async def _stop_one(self, launch_id: str, reason: tuple[str, str]) -> None:
        try:
            await self.abort(launch_id, reason=reason)
        except FailedPrecondition as exc:
            if exc.reason != "launch_running":  # it made it meanwhile: nothing to fail
                raise

    def _lock(self, launch_id: str) -> asyncio.Lock:
        return self._locks.setdefault(launch_id, asyncio.Lock())

    # ----------------------------------------------------------------------------------------------
    # helpers

    async def _hv(self, launch_id: str, fn: Callable[..., T], *args: object, timeout: float | None) -> T:
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
        active = self._active.get(launch_id)
        if active is not None:
            active.pending.add(fut)  # type: ignore[arg-type]
            fut.add_done_callback(active.pending.discard)
        if timeout is None:
            return await asyncio.shield(fut)
        return await asyncio.wait_for(asyncio.shield(fut), timeout)

    def _pin_vcpu_type(self, spec: GuestSpec) -> GuestSpec:
        if spec.vcpu_type is None and spec.mode is Technology.SEV_ES:
            return dataclasses.replace(spec, vcpu_type=self.config.vcpu_type)
        return spec

    def _preflight(self, spec: GuestSpec) -> _Preflight:
        """What the firmware image allows, checked before anything is defined or anyone is called."""
        try:
            image = Path(spec.firmware_path).read_bytes()[: MAX_FIRMWARE_READ + 1]
        except OSError:
            raise InvalidArgument("bad_path", "firmware image cannot be read") from None
        try:
            ovmf = OVMF.from_bytes(image)
        except SevError as exc:
            raise InvalidArgument("bad_firmware", str(exc)) from None
        if spec.kernel_path is not None and ovmf.hashes_table is None:
            # Without a hashes table the kernel would run unmeasured (PROTOCOL.md section 7).
            raise FailedPrecondition("no_hashes_table", "a kernel needs an OVMF with a kernel hashes table")
        if spec.mode is Technology.SEV_ES and ovmf.sev_es_reset_eip is None:
            raise FailedPrecondition("no_sev_es_reset_block", "the OVMF cannot boot SEV-ES guests")
        if ovmf.secret_area is not None:
            return _Preflight(secret_gpa=None, secret_area_size=ovmf.secret_area[1])
        if self.config.secret_gpa is not None:
            return _Preflight(secret_gpa=self.config.secret_gpa, secret_area_size=DEFAULT_SECRET_AREA_SIZE)
        if spec.launch_without_secret:
            return _Preflight(secret_gpa=None, secret_area_size=0)
        raise FailedPrecondition(
            "no_secret_area",
            "the OVMF declares no secret area and no secret guest physical address is configured",
        )

    async def _admit(self, spec: GuestSpec, launch_id: str) -> None:
        """Bounded concurrency, and an ASID for this guest, or RESOURCE_EXHAUSTED."""
        async with self._admit_lock:
            if self._closing:
                raise FailedPrecondition("launcher_stopping", "the launcher is shutting down")
            if len(self._active) >= self.config.max_concurrent:
                raise ResourceExhausted("too_many_launches", f"{len(self._active)} launches in flight")
            caps = await self._hv(launch_id, self.hv.sev_capabilities, timeout=self.config.phase_timeout)
            domains = await self._hv(launch_id, self.hv.list_domains, timeout=self.config.phase_timeout)
            es = spec.mode is Technology.SEV_ES
            used = sum(1 for d in domains if d.sev and d.active and d.sev_es == es)
            reserved = sum(
                1 for a in self._active.values() if not a.started and (a.mode is Technology.SEV_ES) == es
            )
            limit = caps.max_es_guests if es else caps.max_guests
            if used + reserved >= limit:
                raise ResourceExhausted(
                    "no_free_asid", f"{used + reserved} of {limit} {spec.mode.value} guest ASIDs in use"
                )
            self._active[launch_id] = _Active(mode=spec.mode)
            self.observer.in_flight(len(self._active))

    def _release(self, launch_id: str) -> None:
        active = self._active.pop(launch_id, None)
        if active is not None and active.timer is not None:
            active.timer.cancel()
        self.observer.in_flight(len(self._active))

    def _new_record(self, spec: GuestSpec, mode: LaunchFlow, requested_by: str, **extra: str) -> LaunchRecord:
        launch_id = uuid.uuid4().hex
        now = time.time()
        return LaunchRecord(
            launch_id=launch_id,
            mode=mode,
            state=Phase.ACCEPTED,
            spec=spec,
            domain_name=domain_name_for(launch_id, spec.name),
            requested_by=requested_by,
            incarnation=self.incarnation,
            created_at=now,
            updated_at=now,
            **extra,  # type: ignore[arg-type]
        )

    def _target(self, rec: LaunchRecord) -> Phase | None:
        """The phase a launch was attempting: the one its current step aims at, else the next one."""
        attempting = self._attempting.get(rec.launch_id)
        if attempting is not None:
            return attempting
        current = self.store.get(rec.launch_id).state
        if current in PRE_RUNNING:
            return next_phase(rec.mode, current)
        return None

    def _deadline(self, phase: Phase) -> float:
        return time.time() + self.config.timeout(phase)

    async def _fail_closed(
        self,
        rec: LaunchRecord,
        failed_phase: Phase | None,
        reason: str,
        detail: str,
        *,
        path: str = "fail_closed",
    ) -> LaunchRecord:
        """Destroys the domain, then records FAILED. Never raises: the reconciler retries a destroy
        that failed, since it destroys every domain of ours whose launch is over."""
        active = self._active.get(rec.launch_id)
        if active is not None:
            active.closing = True
        in_flight: set[asyncio.Future[object]] = set(active.pending) if active is not None else set()
        if in_flight:
            # A call that missed its deadline (or whose waiter was cancelled) may still be starting the
            # domain: let it end first, so that the destroy comes after it and not before.
            _, in_flight = await asyncio.wait(in_flight, timeout=self.config.cleanup_grace)
        await self._destroy_for(rec, path)
        if in_flight:
            # Still running after the grace: destroy once more when it ends (and the reconciler
            # destroys whatever a launch that is over left, as a backstop).
            log.warning("hypervisor call outlived the cleanup grace", extra={"launch_id": rec.launch_id})
            self._spawn(self._destroy_after(rec, in_flight, path))
        try:
            rec = self.store.finish(
                rec, Phase.FAILED, failed_phase=failed_phase, reason=reason, detail=detail
            )
        except Exception:
            log.exception("cannot record failed launch", extra={"launch_id": rec.launch_id})
        self._release(rec.launch_id)
        self._attempting.pop(rec.launch_id, None)
        self.observer.launch_finished(rec.mode, "failed", failed_phase)
        log.warning(
            "launch failed closed",
            extra={
                "launch_id": rec.launch_id,
                "failed_phase": failed_phase.value if failed_phase else None,
                "reason": reason,
                "path": path,
            },
        )
        return rec

    async def _destroy_for(self, rec: LaunchRecord, path: str) -> None:
        try:
            destroyed = await self._hv(
                rec.launch_id, self.hv.destroy, rec.domain_name, timeout=self.config.cleanup_grace
            )
            if destroyed:
                self.observer.domain_destroyed(path)
        except Exception as exc:
            log.error("destroy failed", extra={"launch_id": rec.launch_id, "error": _classify(exc)[0]})

    async def _destroy_after(self, rec: LaunchRecord, calls: set[asyncio.Future[object]], path: str) -> None:
        await asyncio.wait(calls)
        await self._destroy_for(rec, path)

    async def _step(
        self, rec: LaunchRecord, to: Phase, work: Callable[[], Awaitable[dict[str, object]]]
    ) -> tuple[LaunchRecord, float]:
        """Runs one phase under its deadline and persists the transition; returns (record, seconds)."""
        start = time.monotonic()
        self._attempting[rec.launch_id] = to
        try:
            changes = await asyncio.wait_for(work(), self.config.timeout(to))
        except TimeoutError:
            raise DeadlineExceeded(
                "phase_deadline", f"{to.value} not reached within {self.config.timeout(to)} s"
            ) from None
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled (abort, SIGTERM, a caller gone) just as the work ended: before Python 3.12
            # `wait_for` then returns the result and drops the cancellation. Never advance past it.
            raise asyncio.CancelledError
        rec = self.store.advance(rec, to, **changes)  # type: ignore[arg-type]
        elapsed = time.monotonic() - start
        self.observer.phase_done(to, elapsed)
        return rec, elapsed

    async def _define_and_start(
        self,
        rec: LaunchRecord,
        godh: bytes,
        session: bytes,
        emit: Callable[[LaunchRecord, float], None],
    ) -> tuple[LaunchRecord, LaunchSecurityInfo]:
        """DEFINED, STARTED_PAUSED, MEASURED: shared by both launch modes."""
        caps = await self._hv(
            rec.launch_id, self.hv.sev_capabilities, timeout=self.config.timeout(Phase.DEFINED)
        )
        xml = build_domain_xml(
            rec.spec,
            launch_id=rec.launch_id,
            domain_name=rec.domain_name,
            sev=SevLaunchParams(
                cbitpos=caps.cbitpos,
                reduced_phys_bits=caps.reduced_phys_bits,
                policy=rec.spec.policy,
                dh_cert=godh,
                session=session,
            ),
        )

        async def define() -> dict[str, object]:
            uuid_ = await self._hv(rec.launch_id, self.hv.define, xml, timeout=None)
            return {"domain_uuid": uuid_}

        rec, took = await self._step(rec, Phase.DEFINED, define)
        emit(rec, took)

        async def start() -> dict[str, object]:
            await self._hv(rec.launch_id, self.hv.start_paused, rec.domain_name, timeout=None)
            active = self._active.get(rec.launch_id)
            if active is not None:
                active.started = True
            return {}

        rec, took = await self._step(rec, Phase.STARTED_PAUSED, start)
        emit(rec, took)

        info_box: list[LaunchSecurityInfo] = []

        async def measure() -> dict[str, object]:
            info = await self._hv(rec.launch_id, self.hv.launch_security_info, rec.domain_name, timeout=None)
            if len(info.measurement) != MEASUREMENT_SIZE:
                raise FailedPrecondition("bad_measurement", "the hypervisor returned a malformed measurement")
            if info.policy != rec.spec.policy:
                raise FailedPrecondition(
                    "policy_mismatch",
                    f"guest runs with policy {info.policy:#x}, asked for {rec.spec.policy:#x}",
                )
            info_box.append(info)
            return {"measurement": info.measurement}

        rec, took = await self._step(rec, Phase.MEASURED, measure)
        emit(rec, took)
        return rec, info_box[0]

    def _check_secret(self, header: bytes, payload: bytes, pre: _Preflight) -> None:
        if pre.secret_gpa is None and not pre.secret_area_size:
            # Preflight let a launch_without_secret spec through without a secret location.
            raise FailedPrecondition(
                "no_secret_area",
                "the OVMF declares no secret area and no secret guest physical address is configured",
            )
        if len(header) != SECRET_HEADER_SIZE:
            raise InvalidArgument("bad_secret_header", f"the secret header is {SECRET_HEADER_SIZE} bytes")
        if not payload or len(payload) % 16:
            raise InvalidArgument(
                "bad_secret_payload", "the secret payload must be a non-empty multiple of 16 bytes"
            )
        if pre.secret_area_size and len(payload) > pre.secret_area_size:
            raise InvalidArgument(
                "secret_too_large", f"the secret does not fit the {pre.secret_area_size}-byte area"
            )

    async def _inject(
        self, rec: LaunchRecord, secret: ReleasedSecret, pre: _Preflight
    ) -> tuple[LaunchRecord, float]:
        self._check_secret(secret.header, secret.payload, pre)

        async def inject() -> dict[str, object]:
            await self._hv(
                rec.launch_id,
                self.hv.inject_secret,
                rec.domain_name,
                secret.header,
                secret.payload,
                pre.secret_gpa,
                timeout=None,
            )
            return {}

        return await self._step(rec, Phase.SECRET_INJECTED, inject)

    async def _resume(self, rec: LaunchRecord) -> tuple[LaunchRecord, float]:
        # The gate: re-read the persisted record, never trust the caller's copy.
        if not may_resume(self.store.get(rec.launch_id)):
            raise FailedPrecondition(
                "no_secret_injected", "refusing to resume a guest without an injected secret"
            )

        async def resume() -> dict[str, object]:
            await self._hv(rec.launch_id, self.hv.resume, rec.domain_name, timeout=None)
            return {}

        rec, took = await self._step(rec, Phase.RUNNING, resume)
        self._release(rec.launch_id)
        self._attempting.pop(rec.launch_id, None)
        self.observer.launch_finished(rec.mode, "running", None)
        log.info("launch running", extra={"launch_id": rec.launch_id, "domain": rec.domain_name})
        return rec, took

    # ----------------------------------------------------------------------------------------------
    # orchestrated launch

    async def launch(
        self, spec: GuestSpec, *, owner_endpoint: str, workload_id: str, requested_by: str
    ) -> tuple[LaunchRecord, AsyncIterator[LaunchEvent]]:
        """Admits and starts a launch; returns its record and the stream of its events."""
        if self.platform is None or self.owners is None:
            raise FailedPrecondition("not_configured", "orchestrated launches need --platform")
        validate_endpoint(owner_endpoint)
        validate_workload(workload_id)
        spec = self._pin_vcpu_type(spec)
        pre = await asyncio.to_thread(self._preflight, spec)
        rec = self._new_record(
            spec,
            LaunchFlow.ORCHESTRATED,
            requested_by,
            owner_endpoint=owner_endpoint,
            workload_id=workload_id,
        )
        await self._admit(spec, rec.launch_id)
        try:
            self.store.insert(rec)
        except Exception:
            self._release(rec.launch_id)
            raise
        queue: asyncio.Queue[LaunchEvent] = asyncio.Queue()
        task = asyncio.create_task(self._drive_orchestrated(rec, pre, queue))
        self._active[rec.launch_id].task = task
        return rec, self._events(queue)

    @staticmethod
    async def _events(queue: asyncio.Queue[LaunchEvent]) -> AsyncIterator[LaunchEvent]:
        while True:
            event = await queue.get()
            yield event
            if event.phase in (Phase.RUNNING, Phase.FAILED):
                return

    async def _drive_orchestrated(
        self, rec: LaunchRecord, pre: _Preflight, queue: asyncio.Queue[LaunchEvent]
    ) -> None:
        assert self.platform is not None and self.owners is not None
        platform, owners = self.platform, self.owners

        def emit(r: LaunchRecord, took: float) -> None:
            queue.put_nowait(LaunchEvent(r.launch_id, r.state, took, r.domain_name, time.time()))

        try:
            chain_box: list[object] = []

            async def fetch_chain() -> dict[str, object]:
                chain_box.append(await platform.certificate_chain())
                return {}

            rec, took = await self._step(rec, Phase.CHAIN_FETCHED, fetch_chain)
            emit(rec, took)

            session_box: list[tuple[bytes, bytes]] = []

            async def open_session() -> dict[str, object]:
                s = await owners.open_session(
                    rec.owner_endpoint,
                    workload_id=rec.workload_id,
                    chain=chain_box[0],
                    policy=rec.spec.policy,
                )
                if s.policy != rec.spec.policy:
                    raise FailedPrecondition("policy_mismatch", "the owner's session is for another policy")
                if len(s.godh_cert) != GODH_SIZE or len(s.session) != SESSION_SIZE:
                    raise FailedPrecondition("bad_session", "the owner returned a malformed GODH or session")
                session_box.append((s.godh_cert, s.session))
                return {"session_id": s.session_id}

            rec, took = await self._step(rec, Phase.SESSION_OPENED, open_session)
            emit(rec, took)

            rec, info = await self._define_and_start(rec, *session_box[0], emit)

            secret_box: list[ReleasedSecret] = []

            async def release() -> dict[str, object]:
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
                            "bad_owner_reply", "the owner sent a secret and agreed to run without one"
                        )
                    if not rec.spec.launch_without_secret:
                        raise FailedPrecondition(
                            "no_secret_not_requested",
                            "the owner released no secret and the spec did not ask to run without one",
                        )
                    return {"secret_waived": True}
                # A secret (also when the spec would have done without one) must be injected.
                self._check_secret(secret.header, secret.payload, pre)
                secret_box.append(secret)
                return {"secret_waived": False}

            rec, took = await self._step(rec, Phase.SECRET_RELEASED, release)
            emit(rec, took)

            if not rec.secret_waived:
                rec, took = await self._inject(rec, secret_box[0], pre)
                emit(rec, took)
            secret_box.clear()  # the wrapped secret is not kept beyond its use

            rec, took = await self._resume(rec)
            emit(rec, took)
        except asyncio.CancelledError:
            active = self._active.get(rec.launch_id)
            reason, detail = (
                active.cancel_reason if active and active.cancel_reason else ("aborted", "launch aborted")
            )
            target = self._target(rec)
            failed = await self._shielded(self._fail_closed(rec, target, reason, detail))
            queue.put_nowait(self._failed_event(failed, target))
        except Exception as exc:
            reason, detail = _classify(exc)
            if reason == "internal":
                log.exception("launch failed with an unexpected error", extra={"launch_id": rec.launch_id})
            target = self._target(rec)
            failed = await self._fail_closed(rec, target, reason, detail)
            queue.put_nowait(self._failed_event(failed, target))

    @staticmethod
    def _failed_event(rec: LaunchRecord, target: Phase | None) -> LaunchEvent:
        return LaunchEvent(
            rec.launch_id,
            Phase.FAILED,
            time.time() - rec.created_at,
            rec.domain_name,
            time.time(),
            failed_phase=target,
            reason=rec.reason,
            detail=rec.detail,
        )

    # ----------------------------------------------------------------------------------------------
    # two-phase launch

    async def prepare(
        self, spec: GuestSpec, *, godh_cert: bytes, session: bytes, requested_by: str
    ) -> tuple[LaunchRecord, LaunchSecurityInfo]:
        check_godh(godh_cert)
        check_session(session)
        if spec.launch_without_secret:
            # The launcher cannot see an owner's consent in a client-driven launch: fail closed.
            raise InvalidArgument("no_secret_two_phase", "a two-phase launch always needs a secret")
        spec = self._pin_vcpu_type(spec)
        pre = await asyncio.to_thread(self._preflight, spec)
        rec = self._new_record(spec, LaunchFlow.TWO_PHASE, requested_by)
        await self._admit(spec, rec.launch_id)
        async with self._lock(rec.launch_id):
            try:
                self.store.insert(rec)
                rec, info = await self._define_and_start(rec, godh_cert, session, lambda _r, _t: None)
                rec = self.store.update(rec, deadline=self._deadline(Phase.SECRET_INJECTED))
                self._pre[rec.launch_id] = pre
                assert self._loop is not None and rec.deadline is not None
                active = self._active[rec.launch_id]
                active.timer = self._loop.call_at(
                    self._loop.time() + (rec.deadline - time.time()),
                    lambda lid=rec.launch_id: self._spawn(self._expire(lid)),  # type: ignore[misc]
                )
                return rec, info
            except BaseException as exc:
                reason, detail = (
                    _classify(exc) if isinstance(exc, Exception) else ("aborted", "launch aborted")
                )
                if self.store_has(rec.launch_id):
                    rec = await self._shielded(self._fail_closed(rec, self._target(rec), reason, detail))
                else:
                    self._release(rec.launch_id)
                if isinstance(exc, ServiceError | SevError):
                    raise
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise FailedPrecondition(reason, detail) from None

    def store_has(self, launch_id: str) -> bool:
        try:
            self.store.get(launch_id)
        except NotFound:
            return False
        return True

    async def _expire(self, launch_id: str) -> None:
        async with self._lock(launch_id):
            rec = self.store.get(launch_id)
            if rec.state in PRE_RUNNING and rec.deadline is not None and time.time() >= rec.deadline - 0.05:
                self._pre.pop(launch_id, None)
                await self._fail_closed(
                    rec,
                    next_phase(rec.mode, rec.state),
                    "deadline_exceeded",
                    "no secret arrived before the deadline",
                )

    def owned(self, launch_id: str, requested_by: str) -> LaunchRecord:
        """The record, if `requested_by` started it; NotFound otherwise (existence is not revealed)."""
        rec = self.store.get(launch_id)
        if rec.requested_by != requested_by:
            raise NotFound("launch_not_found", "no such launch")
        return rec

    async def complete(
        self, launch_id: str, *, header: bytes, payload: bytes, requested_by: str
    ) -> LaunchRecord:
        self.owned(launch_id, requested_by)
        async with self._lock(launch_id):
            rec = self.store.get(launch_id)
            if rec.mode is not LaunchFlow.TWO_PHASE or rec.state is not Phase.MEASURED:
                raise FailedPrecondition(
                    "launch_not_waiting", f"launch is {rec.state.value}, not waiting for a secret"
                )
            pre = self._pre.pop(launch_id, None)
            active = self._active.get(launch_id)
            if pre is None or active is None:
                raise FailedPrecondition("launch_not_waiting", "launch is not driven by this launcher")
            if active.timer is not None:
                active.timer.cancel()
            # The timer is not the deadline, only its usual enforcer: a busy loop can run it late, and
            # a CompleteLaunch that takes the lock first must not inject into an expired launch.
            if rec.deadline is None or time.time() >= rec.deadline:
                # Shielded: a caller cancelled now (gRPC deadline, disconnect) must not stop the destroy.
                await self._shielded(
                    self._fail_closed(
                        rec,
                        Phase.SECRET_INJECTED,
                        "deadline_exceeded",
                        "no secret arrived before the deadline",
                    )
                )
                raise DeadlineExceeded(
                    "deadline_exceeded", "the launch's deadline for CompleteLaunch has passed"
                )
            try:
                rec, _ = await self._inject(rec, ReleasedSecret(header=header, payload=payload), pre)
                rec, _ = await self._resume(rec)
                return rec
            except BaseException as exc:
                # Also a cancellation (the caller went away during inject or resume): the timer is off and
                # the preflight gone, so nothing else would fail this launch closed before the reconciler.
                reason, detail = (
                    _classify(exc) if isinstance(exc, Exception) else ("aborted", "launch aborted")
                )
                rec = await self._shielded(self._fail_closed(rec, self._target(rec), reason, detail))
                if isinstance(exc, ServiceError | SevError) or not isinstance(exc, Exception):
                    raise
                raise FailedPrecondition(reason, detail) from None

    # ----------------------------------------------------------------------------------------------
    # abort, destroy, queries

    async def abort(
        self, launch_id: str, *, reason: tuple[str, str] = ("aborted", "launch aborted by request")
    ) -> LaunchRecord:
        active = self._active.get(launch_id)
        if active is not None and active.task is not None and not active.task.done():
            if not active.closing:
                active.cancel_reason = reason
                active.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await active.task
            return self.store.get(launch_id)
        async with self._lock(launch_id):
            rec = self.store.get(launch_id)
            if rec.state in PRE_RUNNING:
                self._pre.pop(launch_id, None)
                rec = await self._fail_closed(rec, next_phase(rec.mode, rec.state), *reason)
            elif rec.state is Phase.RUNNING:
                raise FailedPrecondition("launch_running", "the guest runs; use DestroyGuest")
            return rec

    async def destroy_guest(self, launch_id: str, *, requested_by: str) -> LaunchRecord:
        rec = self.owned(launch_id, requested_by)
        if rec.state in PRE_RUNNING:
            return await self.abort(launch_id, reason=("destroyed_by_request", "guest destroyed by request"))
        async with self._lock(launch_id):
            rec = self.store.get(launch_id)
            destroyed = await self._hv(
                launch_id, self.hv.destroy, rec.domain_name, timeout=self.config.cleanup_grace
            )
            if destroyed:
                self.observer.domain_destroyed("request")
            if rec.state is Phase.RUNNING:
                rec = self.store.finish(
                    rec,
                    Phase.DESTROYED,
                    failed_phase=None,
                    reason="destroyed_by_request",
                    detail="guest destroyed",
                )
            return rec

    def list(self, *, requested_by: str, include_finished: bool) -> list[LaunchRecord]:
        return [
            r for r in self.store.records(include_terminal=include_finished) if r.requested_by == requested_by
        ]

    # ----------------------------------------------------------------------------------------------
    # lifecycle events and the reconciler

    def _lifecycle_from_thread(self, name: str, kind: LifecycleKind) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_lifecycle, name, kind)

    def _on_lifecycle(self, name: str, kind: LifecycleKind) -> None:
        rec = self.store.by_domain(name)
        if rec is None or rec.state not in PRE_RUNNING:
            return
        active = self._active.get(rec.launch_id)
        if active is None or active.closing:
            return  # not driven here (the reconciler's business), or our own fail-closed destroy
        if kind is LifecycleKind.RESUMED and rec.state is not Phase.SECRET_INJECTED and not may_resume(rec):
            # Someone resumed the guest behind our back, before it got its secret: fail closed now.
            self._spawn(
                self.abort(rec.launch_id, reason=("resumed_without_secret", "guest resumed externally"))
            )
        elif kind in (LifecycleKind.STOPPED, LifecycleKind.CRASHED) and rec.state not in (
            Phase.ACCEPTED,
            Phase.DEFINED,
        ):
            self._spawn(self.abort(rec.launch_id, reason=("domain_stopped", f"the domain {kind.value}")))

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.reconcile_interval)
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile round failed")

    async def reconcile(self) -> int:
        """Fails orphaned launches and destroys SEV domains of ours that no advancing launch owns.
        Returns how many domains were destroyed."""
        destroyed = 0
        now = time.time()
        for rec in self.store.in_flight():
            orphan = rec.incarnation != self.incarnation
            stuck = rec.launch_id not in self._active or (
                rec.deadline is not None and now > rec.deadline + self.config.cleanup_grace
            )
            if orphan or (
                stuck and not self._lock(rec.launch_id).locked() and self._driver_idle(rec.launch_id)
            ):
                reason = (
                    ("launcher_restarted", "the launcher restarted during the launch")
                    if orphan
                    else ("not_advancing", "the launch stopped advancing")
                )
                with contextlib.suppress(Exception):
                    domains_before = {d.name for d in await asyncio.to_thread(self.hv.list_domains)}
                    if rec.domain_name in domains_before:
                        destroyed += 1
                await self._fail_closed(rec, next_phase(rec.mode, rec.state), *reason, path="reconciler")
        for dom in await asyncio.to_thread(self.hv.list_domains):
            if not dom.sev:
                continue
            if dom.launch_id is None:
                if self.config.reconcile_foreign and dom.state is DomainState.PAUSED:
                    if await asyncio.to_thread(self.hv.destroy, dom.name):
                        destroyed += 1
                        self.observer.domain_destroyed("reconciler")
                continue
            owner = self.store.by_domain(dom.name)
            if owner is not None and (owner.state is Phase.RUNNING or owner.launch_id in self._active):
                continue
            # Ours, and its launch is over or unknown: nothing may keep it (paused or not).
            if await asyncio.to_thread(self.hv.destroy, dom.name):
                destroyed += 1
                self.observer.domain_destroyed("reconciler")
                log.warning("reconciler destroyed a domain", extra={"domain": dom.name})
        return destroyed

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._background.discard)
        return task

    def _shielded(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Runs `coro` (a fail-closed) to its end even if the awaiting call is cancelled (again): it is
        a background task of its own, which `stop` also waits for."""
        return asyncio.shield(self._spawn(coro))

    def _driver_idle(self, launch_id: str) -> bool:
        active = self._active.get(launch_id)
        return active is None or active.task is None or active.task.done()
