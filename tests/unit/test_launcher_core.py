"""The launch core against a fake hypervisor, platform and owner (fakes, not mocks: they keep state the
way libvirt and the firmware would). What these pin down is the fail-closed contract: whatever path a
launch takes that does not end in RUNNING, no domain and no firmware guest context is left behind, and
a guest runs without a secret only with both the spec's request and the owner's explicit consent."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from launcher_svc.core.domain_xml import parse_domain_xml
from launcher_svc.core.launcher import Launcher, LauncherConfig
from launcher_svc.core.ports import (
    DomainInfo,
    DomainState,
    LaunchSecurityInfo,
    LifecycleHandler,
    OwnerSession,
    ReleasedSecret,
    SevCapabilities,
)
from launcher_svc.core.spec import GuestSpec
from launcher_svc.core.state import LaunchStore, Phase
from sevlaunch.errors import DeadlineExceeded, FailedPrecondition
from sevlaunch.sev.cert import Algorithm, SEVCertificate, Usage
from sevlaunch.sev.technology import Technology

T = TypeVar("T")

OVMF = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
SECRET_GPA = 0x80C000
HEADER = b"\x11" * 52
PAYLOAD = b"\x22" * 64
# A GODH that passes the launcher's checks (the fake hypervisor never unwraps the session).
GODH = SEVCertificate.for_ec_key(
    usage=Usage.PDH,
    algorithm=Algorithm.ECDH_SHA256,
    public_key=ec.generate_private_key(ec.SECP384R1()).public_key(),
    api_major=0,
    api_minor=24,
).to_bytes()

pytestmark = pytest.mark.skipif(not OVMF.is_file(), reason="Debian's ovmf package is a test dependency")


class FakeHypervisor:
    """Domains and firmware guest contexts in memory. `delays` makes a call block its worker thread,
    the way a real libvirt call can: once started it runs to its end, whatever the caller does."""

    def __init__(self, delays: dict[str, float] | None = None) -> None:
        self.delays = delays or {}
        self.lock = threading.Lock()
        self.domains: dict[str, DomainState] = {}
        self.xml: dict[str, str] = {}
        self.contexts: set[str] = set()  # names holding an ASID and a firmware guest context
        self.injected: list[tuple[str, bytes, bytes, int | None]] = []
        self.calls: list[str] = []

    def _delay(self, what: str) -> None:
        self.calls.append(what)
        if what in self.delays:
            time.sleep(self.delays[what])

    def sev_capabilities(self) -> SevCapabilities:
        return SevCapabilities(cbitpos=51, reduced_phys_bits=1, max_guests=16, max_es_guests=16)

    def define(self, xml: str) -> str:
        self._delay("define")
        name = parse_domain_xml(xml).domain_name
        with self.lock:
            self.domains[name] = DomainState.SHUTOFF
            self.xml[name] = xml
        return str(uuid.uuid4())

    def start_paused(self, name: str) -> None:
        with self.lock:
            if name not in self.domains:
                raise FailedPrecondition("domain_not_found", name)
        # LAUNCH_START happens first: from here on the guest holds a firmware context...
        self._delay("start_paused")
        with self.lock:
            # ...and the call finishes what it started, as QEMU would.
            self.contexts.add(name)
            self.domains[name] = DomainState.PAUSED
            self.xml.setdefault(name, "")

    def launch_security_info(self, name: str) -> LaunchSecurityInfo:
        self._delay("launch_security_info")
        policy = parse_domain_xml(self.xml[name]).policy
        return LaunchSecurityInfo(b"\x33" * 48, api_major=0, api_minor=24, build_id=1, policy=policy)

    def inject_secret(self, name: str, header: bytes, payload: bytes, gpa: int | None) -> None:
        self._delay("inject_secret")
        self.injected.append((name, header, payload, gpa))

    def resume(self, name: str) -> None:
        self._delay("resume")
        with self.lock:
            self.domains[name] = DomainState.RUNNING

    def destroy(self, name: str) -> bool:
        self._delay("destroy")
        with self.lock:
            existed = self.domains.pop(name, None) is not None
            self.contexts.discard(name)
            self.xml.pop(name, None)
        return existed

    def list_domains(self) -> list[DomainInfo]:
        with self.lock:
            return [
                DomainInfo(name, name, state, sev=True, sev_es=False, launch_id=None)
                for name, state in self.domains.items()
            ]

    def set_lifecycle_handler(self, handler: LifecycleHandler | None) -> None:
        pass

    def close(self) -> None:
        pass


class FakePlatform:
    async def certificate_chain(self) -> object:
        return "chain"


@dataclass
class FakeOwner:
    secret: ReleasedSecret

    async def open_session(
        self, endpoint: str, *, workload_id: str, chain: object, policy: int
    ) -> OwnerSession:
        return OwnerSession("s-1", b"\x01" * 0x824, b"\x02" * 128, policy)

    async def release_secret(self, endpoint: str, **kwargs: Any) -> ReleasedSecret:
        return self.secret

    async def close(self) -> None:
        pass


def _spec(*, without_secret: bool = False) -> GuestSpec:
    return GuestSpec(
        name="g",
        memory_mib=256,
        vcpus=1,
        firmware_path=str(OVMF),
        mode=Technology.SEV,
        policy=0x3,
        launch_without_secret=without_secret,
    )


def _core(
    tmp_path: Path,
    hv: FakeHypervisor,
    *,
    owner: FakeOwner | None = None,
    phase_timeouts: dict[Phase, float] | None = None,
    secret_gpa: int | None = SECRET_GPA,
) -> Launcher:
    return Launcher(
        hypervisor=hv,
        store=LaunchStore(str(tmp_path / "launcher.db")),
        platform=FakePlatform(),
        owners=owner or FakeOwner(ReleasedSecret(header=HEADER, payload=PAYLOAD)),
        config=LauncherConfig(
            secret_gpa=secret_gpa,
            reconcile_interval=0,
            phase_timeouts=phase_timeouts or {},
            cleanup_grace=5.0,
        ),
    )


def _run(core: Launcher, body: Callable[[Launcher], Awaitable[T]]) -> T:
    async def main() -> T:
        await core.start()
        try:
            return await body(core)
        finally:
            await core.stop()

    return asyncio.run(main())


async def _orchestrated(core: Launcher, spec: GuestSpec) -> list[Any]:
    _rec, events = await core.launch(
        spec, owner_endpoint="owner:50053", workload_id="w", requested_by="client"
    )
    return [e async for e in events]


def _assert_nothing_left(hv: FakeHypervisor) -> None:
    assert hv.domains == {}
    assert hv.contexts == set()


# ---------------------------------------------------------------------------------------------------
# a hypervisor call still running when its phase gives up


def test_start_slower_than_its_deadline_leaves_no_paused_domain(tmp_path: Path) -> None:
    hv = FakeHypervisor({"start_paused": 1.0})
    core = _core(tmp_path, hv, phase_timeouts={Phase.STARTED_PAUSED: 0.2})

    async def body(core: Launcher) -> None:
        with pytest.raises(DeadlineExceeded) as err:
            await core.prepare(_spec(), godh_cert=GODH, session=b"\x02" * 128, requested_by="c")
        assert err.value.reason == "phase_deadline"
        (rec,) = core.store.records(include_terminal=True)
        assert (rec.state, rec.failed_phase) == (Phase.FAILED, Phase.STARTED_PAUSED)
        await asyncio.sleep(1.2)  # long enough for the start to have finished in its thread
        _assert_nothing_left(hv)

    _run(core, body)


def test_orchestrated_start_slower_than_its_deadline_leaves_no_paused_domain(tmp_path: Path) -> None:
    hv = FakeHypervisor({"start_paused": 1.0})
    core = _core(tmp_path, hv, phase_timeouts={Phase.STARTED_PAUSED: 0.2})

    async def body(core: Launcher) -> None:
        events = await _orchestrated(core, _spec())
        assert (events[-1].phase, events[-1].failed_phase, events[-1].reason) == (
            Phase.FAILED,
            Phase.STARTED_PAUSED,
            "phase_deadline",
        )
        await asyncio.sleep(1.2)
        _assert_nothing_left(hv)

    _run(core, body)


def test_abort_during_a_slow_start_leaves_no_paused_domain(tmp_path: Path) -> None:
    hv = FakeHypervisor({"start_paused": 1.0})
    core = _core(tmp_path, hv)

    async def body(core: Launcher) -> None:
        rec, events = await core.launch(
            _spec(), owner_endpoint="owner:50053", workload_id="w", requested_by="client"
        )
        while "start_paused" not in hv.calls:
            await asyncio.sleep(0.01)
        aborted = await core.abort(rec.launch_id)
        assert (aborted.state, aborted.failed_phase, aborted.reason) == (
            Phase.FAILED,
            Phase.STARTED_PAUSED,
            "aborted",
        )
        assert [e.phase for e in [e async for e in events]][-1] is Phase.FAILED
        await asyncio.sleep(1.2)
        _assert_nothing_left(hv)

    _run(core, body)


def test_stop_during_a_slow_start_leaves_no_paused_domain(tmp_path: Path) -> None:
    # SIGTERM: the server stops the core, which aborts every launch in flight.
    hv = FakeHypervisor({"start_paused": 1.0})
    core = _core(tmp_path, hv)

    async def main() -> None:
        await core.start()
        rec, _events = await core.launch(
            _spec(), owner_endpoint="owner:50053", workload_id="w", requested_by="client"
        )
        while "start_paused" not in hv.calls:
            await asyncio.sleep(0.01)
        await core.stop()
        assert core.store.get(rec.launch_id).reason == "launcher_stopping"
        await asyncio.sleep(1.2)
        _assert_nothing_left(hv)

    asyncio.run(main())


def test_a_call_outliving_the_cleanup_grace_is_destroyed_when_it_ends(tmp_path: Path) -> None:
    hv = FakeHypervisor({"start_paused": 1.0})
    core = _core(tmp_path, hv, phase_timeouts={Phase.STARTED_PAUSED: 0.1})
    core.config = LauncherConfig(
        secret_gpa=SECRET_GPA,
        reconcile_interval=0,
        phase_timeouts={Phase.STARTED_PAUSED: 0.1},
        cleanup_grace=0.2,
    )

    async def body(core: Launcher) -> None:
        with pytest.raises(DeadlineExceeded):
            await core.prepare(_spec(), godh_cert=GODH, session=b"\x02" * 128, requested_by="c")
        await asyncio.sleep(1.5)
        _assert_nothing_left(hv)

    _run(core, body)


# ---------------------------------------------------------------------------------------------------
# two-phase deadline


def test_complete_launch_after_the_deadline_is_refused_even_before_the_timer_runs(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    core = _core(tmp_path, hv, phase_timeouts={Phase.SECRET_INJECTED: 0.2})

    async def body(core: Launcher) -> None:
        rec, _ = await core.prepare(_spec(), godh_cert=GODH, session=b"\x02" * 128, requested_by="c")
        # A busy event loop: the deadline passes and the expiry timer has not had its turn yet, so
        # CompleteLaunch takes the launch's lock first.
        time.sleep(0.3)
        with pytest.raises(DeadlineExceeded) as err:
            await core.complete(rec.launch_id, header=HEADER, payload=PAYLOAD, requested_by="c")
        assert err.value.reason == "deadline_exceeded"
        assert hv.injected == [] and "resume" not in hv.calls
        failed = core.store.get(rec.launch_id)
        assert (failed.state, failed.failed_phase, failed.reason) == (
            Phase.FAILED,
            Phase.SECRET_INJECTED,
            "deadline_exceeded",
        )
        _assert_nothing_left(hv)

    _run(core, body)


def test_complete_launch_before_the_deadline_runs(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    core = _core(tmp_path, hv, phase_timeouts={Phase.SECRET_INJECTED: 5})

    async def body(core: Launcher) -> None:
        rec, _ = await core.prepare(_spec(), godh_cert=GODH, session=b"\x02" * 128, requested_by="c")
        done = await core.complete(rec.launch_id, header=HEADER, payload=PAYLOAD, requested_by="c")
        assert done.state is Phase.RUNNING
        assert hv.injected == [(rec.domain_name, HEADER, PAYLOAD, SECRET_GPA)]

    _run(core, body)


# ---------------------------------------------------------------------------------------------------
# running without a secret: the spec asks AND the owner says no_secret


@pytest.mark.parametrize(
    ("without_secret", "reply", "outcome", "injected"),
    [
        # both agree: runs, nothing injected
        (True, ReleasedSecret(no_secret=True), "running", False),
        # the spec allowed it but the owner sent a secret: it is injected
        (True, ReleasedSecret(header=HEADER, payload=PAYLOAD), "running", True),
        # the usual launch
        (False, ReleasedSecret(header=HEADER, payload=PAYLOAD), "running", True),
        # the owner waives a secret the spec did not offer to do without
        (False, ReleasedSecret(no_secret=True), "no_secret_not_requested", False),
        # empty blobs are not consent, whatever the spec says
        (True, ReleasedSecret(), "bad_secret_header", False),
        (False, ReleasedSecret(), "bad_secret_header", False),
        # consent and a secret at once: a confused owner, not consent
        (True, ReleasedSecret(header=HEADER, payload=PAYLOAD, no_secret=True), "bad_owner_reply", False),
    ],
    ids=["both", "spec-only", "secret", "owner-only", "empty-asked", "empty", "both-and-secret"],
)
def test_launch_without_secret_needs_the_spec_and_the_owners_no_secret(
    tmp_path: Path, without_secret: bool, reply: ReleasedSecret, outcome: str, injected: bool
) -> None:
    hv = FakeHypervisor()
    core = _core(tmp_path, hv, owner=FakeOwner(reply))

    async def body(core: Launcher) -> None:
        events = await _orchestrated(core, _spec(without_secret=without_secret))
        last = events[-1]
        if outcome == "running":
            assert last.phase is Phase.RUNNING
            assert list(hv.domains.values()) == [DomainState.RUNNING]
            rec = core.store.get(last.launch_id)
            assert rec.secret_waived is (not injected)
        else:
            assert (last.phase, last.failed_phase, last.reason) == (
                Phase.FAILED,
                Phase.SECRET_RELEASED,
                outcome,
            )
            assert "resume" not in hv.calls
            _assert_nothing_left(hv)
        assert bool(hv.injected) is injected

    _run(core, body)


def test_secret_sent_for_a_spec_without_a_secret_area_fails_closed(tmp_path: Path) -> None:
    # The spec asked to run without a secret, so no secret address was needed; the owner sent one anyway
    # and there is nowhere to put it: fail closed rather than resume without it.
    hv = FakeHypervisor()
    core = _core(
        tmp_path, hv, owner=FakeOwner(ReleasedSecret(header=HEADER, payload=PAYLOAD)), secret_gpa=None
    )

    async def body(core: Launcher) -> None:
        events = await _orchestrated(core, _spec(without_secret=True))
        assert (events[-1].phase, events[-1].reason) == (Phase.FAILED, "no_secret_area")
        assert hv.injected == [] and "resume" not in hv.calls
        _assert_nothing_left(hv)

    _run(core, body)


# ---------------------------------------------------------------------------------------------------
# a caller that goes away (gRPC cancels the handler: client disconnect or deadline)


def test_complete_launch_cancelled_during_inject_fails_closed(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    core = _core(tmp_path, hv, phase_timeouts={Phase.SECRET_INJECTED: 2})

    async def body(core: Launcher) -> None:
        rec, _ = await core.prepare(_spec(), godh_cert=GODH, session=b"\x02" * 128, requested_by="c")
        hv.delays["inject_secret"] = 0.5
        call = asyncio.create_task(
            core.complete(rec.launch_id, header=HEADER, payload=PAYLOAD, requested_by="c")
        )
        while "inject_secret" not in hv.calls:
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # Fail-closed ran before the cancellation reached the caller: no waiting for the deadline.
        failed = core.store.get(rec.launch_id)
        assert (failed.state, failed.failed_phase) == (Phase.FAILED, Phase.SECRET_INJECTED)
        assert rec.launch_id not in core._active
        assert "resume" not in hv.calls
        _assert_nothing_left(hv)
        await asyncio.sleep(0.6)  # well past the inject's end in its thread
        _assert_nothing_left(hv)

    _run(core, body)


def test_complete_launch_cancelled_during_resume_leaves_no_paused_domain(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    core = _core(tmp_path, hv, phase_timeouts={Phase.SECRET_INJECTED: 5})

    async def body(core: Launcher) -> None:
        rec, _ = await core.prepare(_spec(), godh_cert=GODH, session=b"\x02" * 128, requested_by="c")
        hv.delays["resume"] = 0.5
        call = asyncio.create_task(
            core.complete(rec.launch_id, header=HEADER, payload=PAYLOAD, requested_by="c")
        )
        while "resume" not in hv.calls:
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The resume ran to its end in its thread; fail-closed waited for it, then destroyed.
        failed = core.store.get(rec.launch_id)
        assert (failed.state, failed.failed_phase) == (Phase.FAILED, Phase.RUNNING)
        assert rec.launch_id not in core._active
        _assert_nothing_left(hv)

    _run(core, body)


def test_complete_launch_cancelled_in_the_deadline_path_still_fails_closed(tmp_path: Path) -> None:
    # Past the deadline, CompleteLaunch fails the launch closed itself; a cancellation arriving while
    # that destroy runs must not stop it half-way.
    hv = FakeHypervisor()
    core = _core(tmp_path, hv, phase_timeouts={Phase.SECRET_INJECTED: 0.2})

    async def body(core: Launcher) -> None:
        rec, _ = await core.prepare(_spec(), godh_cert=GODH, session=b"\x02" * 128, requested_by="c")
        time.sleep(0.3)  # deadline passed, the expiry timer has not run yet
        hv.delays["destroy"] = 0.5
        call = asyncio.create_task(
            core.complete(rec.launch_id, header=HEADER, payload=PAYLOAD, requested_by="c")
        )
        while "destroy" not in hv.calls:
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises((asyncio.CancelledError, DeadlineExceeded)):
            await call
        await asyncio.sleep(0.7)
        failed = core.store.get(rec.launch_id)
        assert (failed.state, failed.failed_phase, failed.reason) == (
            Phase.FAILED,
            Phase.SECRET_INJECTED,
            "deadline_exceeded",
        )
        assert rec.launch_id not in core._active
        assert hv.injected == []
        _assert_nothing_left(hv)

    _run(core, body)


@pytest.mark.parametrize("then", ["running", "refused"])
def test_launch_stream_cancelled_mid_launch_never_leaves_a_paused_domain(tmp_path: Path, then: str) -> None:
    # The stream only reads the launch's events: a client that goes away does not stop the launch,
    # which ends RUNNING or fails closed, never paused.
    hv = FakeHypervisor({"launch_security_info": 0.3})
    reply = ReleasedSecret(header=HEADER, payload=PAYLOAD) if then == "running" else ReleasedSecret()
    core = _core(tmp_path, hv, owner=FakeOwner(reply))

    async def body(core: Launcher) -> None:
        rec, events = await core.launch(
            _spec(), owner_endpoint="owner:50053", workload_id="w", requested_by="client"
        )

        async def consume() -> None:
            async for _ in events:
                pass

        reader = asyncio.create_task(consume())
        while "launch_security_info" not in hv.calls:
            await asyncio.sleep(0.01)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        deadline = time.monotonic() + 5
        while core.store.get(rec.launch_id).state not in (Phase.RUNNING, Phase.FAILED):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        final = core.store.get(rec.launch_id)
        assert rec.launch_id not in core._active
        if then == "running":
            assert final.state is Phase.RUNNING
            assert list(hv.domains.values()) == [DomainState.RUNNING]
        else:
            assert (final.state, final.reason) == (Phase.FAILED, "bad_secret_header")
            _assert_nothing_left(hv)

    _run(core, body)


# ---------------------------------------------------------------------------------------------------
# stop (SIGTERM)


def test_stop_fails_every_launch_closed_even_if_one_reaches_running_meanwhile(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    core = _core(tmp_path, hv, phase_timeouts={Phase.SECRET_INJECTED: 10})

    async def main() -> None:
        await core.start()
        # First in line: a two-phase launch whose CompleteLaunch is under way (it holds the launch's
        # lock), so stop's abort waits for it and finds it RUNNING.
        done, _ = await core.prepare(_spec(), godh_cert=GODH, session=b"\x02" * 128, requested_by="c")
        hv.delays["inject_secret"] = 0.3
        completing = asyncio.create_task(
            core.complete(done.launch_id, header=HEADER, payload=PAYLOAD, requested_by="c")
        )
        while "inject_secret" not in hv.calls:
            await asyncio.sleep(0.01)
        # Then two orchestrated launches stuck in a slow start.
        hv.delays["start_paused"] = 0.5
        recs = []
        for _ in range(2):
            rec, _events = await core.launch(
                _spec(), owner_endpoint="owner:50053", workload_id="w", requested_by="client"
            )
            recs.append(rec)
        while hv.calls.count("start_paused") < 3:  # the two-phase launch started once too
            await asyncio.sleep(0.01)
        await core.stop()  # must not raise launch_running
        assert (await completing).state is Phase.RUNNING
        assert core.store.get(done.launch_id).state is Phase.RUNNING
        for rec in recs:
            stopped = core.store.get(rec.launch_id)
            assert (stopped.state, stopped.reason) == (Phase.FAILED, "launcher_stopping")
        assert core._active == {}
        await asyncio.sleep(0.6)
        assert hv.domains == {done.domain_name: DomainState.RUNNING}
        assert hv.contexts == {done.domain_name}

    asyncio.run(main())


def test_stop_aborts_launches_concurrently_within_one_budget(tmp_path: Path) -> None:
    # Each launch is stuck in a start that outlives the cleanup grace: one abort takes about a grace,
    # so aborting them one after another would take about n graces. (Four: the starts and the
    # destroys share the default executor, six workers on a two-CPU machine.)
    hv = FakeHypervisor({"start_paused": 3.0})
    core = _core(tmp_path, hv)
    core.config = LauncherConfig(secret_gpa=SECRET_GPA, reconcile_interval=0, cleanup_grace=0.5)

    async def main() -> None:
        await core.start()
        recs = []
        for _ in range(4):
            rec, _events = await core.launch(
                _spec(), owner_endpoint="owner:50053", workload_id="w", requested_by="client"
            )
            recs.append(rec)
        while hv.calls.count("start_paused") < 4:
            await asyncio.sleep(0.01)
        began = time.monotonic()
        await core.stop()
        took = time.monotonic() - began
        assert took <= core.config.shutdown_budget + 0.5
        assert took < 1.5  # four sequential aborts: about 2 s
        for rec in recs:
            assert core.store.get(rec.launch_id).reason == "launcher_stopping"
        await asyncio.sleep(3.2)  # the starts end; the late destroys (or the reconciler) clean up
        _assert_nothing_left(hv)

    asyncio.run(main())


class _CancellingPlatform:
    """Cancels the launch's task (an abort, a SIGTERM) in the very step its chain fetch ends: the
    phase's work and the cancellation land together."""

    def __init__(self) -> None:
        self.victim: asyncio.Task[None] | None = None

    async def certificate_chain(self) -> object:
        assert self.victim is not None
        self.victim.cancel()
        return "chain"


def test_a_cancellation_landing_as_a_phase_ends_is_not_lost(tmp_path: Path) -> None:
    # asyncio.wait_for (before Python 3.12) returns the result instead of raising when the awaited work
    # is done by the time the cancellation is delivered: the abort must still stop the launch.
    hv = FakeHypervisor()
    core = _core(tmp_path, hv)
    platform = _CancellingPlatform()
    core.platform = platform

    async def body(core: Launcher) -> None:
        rec, events = await core.launch(
            _spec(), owner_endpoint="owner:50053", workload_id="w", requested_by="client"
        )
        platform.victim = core._active[rec.launch_id].task
        last = [e async for e in events][-1]
        assert (last.phase, last.failed_phase, last.reason) == (Phase.FAILED, Phase.CHAIN_FETCHED, "aborted")
        assert "define" not in hv.calls and "resume" not in hv.calls
        _assert_nothing_left(hv)

    _run(core, body)
