"""The launch core against a fake hypervisor, platform and owner (tests/fakes: they keep state the way
libvirt and the firmware would) on a fake clock, so that deadlines pass when the test says so. What these
pin down is the fail-closed contract: whatever path a launch takes that does not end in RUNNING, no
domain and no firmware guest context is left behind, and a guest runs without a secret only with both
the spec's request and the owner's explicit consent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fakes.clock import FakeClock
from fakes.hypervisor import FakeHypervisor
from fakes.peers import GODH, FakeOwner, FakePlatform

from launcher_svc.adapters.sqlite_store import LaunchStore
from launcher_svc.core.launcher import Launcher, LauncherConfig
from launcher_svc.core.ports import DomainState, PlatformChain, PlatformPort, ReleasedSecret
from launcher_svc.core.spec import GuestSpec
from launcher_svc.core.state import Phase
from sevlaunch.errors import DeadlineExceeded
from sevlaunch.sev.technology import Technology

T = TypeVar("T")

# The last 4 KiB of an OvmfPkgX64 build: an SEV footer, and (like Debian's image) no secret area, so
# the configured secret address is the one used.
OVMF = Path(__file__).resolve().parents[1] / "vectors" / "measurement" / "ovmf_OvmfX64_suffix.bin"
SECRET_GPA = 0x80C000
HEADER = b"\x11" * 52
PAYLOAD = b"\x22" * 64
SESSION = b"\x02" * 128


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
    platform: PlatformPort | None = None,
    phase_timeouts: dict[Phase, float] | None = None,
    secret_gpa: int | None = SECRET_GPA,
    cleanup_grace: float = 5.0,
    clock: FakeClock | None = None,
) -> Launcher:
    return Launcher(
        hypervisor=hv,
        store=LaunchStore(str(tmp_path / "launcher.db")),
        platform=platform or FakePlatform(),
        owners=owner or FakeOwner(ReleasedSecret(header=HEADER, payload=PAYLOAD)),
        config=LauncherConfig(
            secret_gpa=secret_gpa,
            reconcile_interval=0,
            phase_timeouts=phase_timeouts or {},
            cleanup_grace=cleanup_grace,
        ),
        clock=clock or FakeClock(),
    )


def _clock(core: Launcher) -> FakeClock:
    clock = core.machine.clock
    assert isinstance(clock, FakeClock)
    return clock


def _run(core: Launcher, body: Callable[[Launcher], Awaitable[T]]) -> T:
    async def main() -> T:
        await core.start()
        try:
            return await body(core)
        finally:
            await core.stop()

    return asyncio.run(main())


async def until(condition: Callable[[], bool], what: str = "condition") -> None:
    """Waits (in real time, briefly: worker threads run outside the fake clock) for `condition`."""
    limit = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < limit, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


async def _orchestrated(core: Launcher, spec: GuestSpec) -> list[Any]:
    _rec, events = await core.launch(
        spec, owner_endpoint="owner:50053", workload_id="w", requested_by="client"
    )
    return [e async for e in events]


def _assert_nothing_left(hv: FakeHypervisor) -> None:
    assert hv.domains == {}
    assert hv.contexts == set()


async def tick_until(clock: FakeClock, condition: Callable[[], bool], step: float = 0.05) -> float:
    """Lets time flow on `clock` in small steps until `condition`; returns the clock time it took."""
    began = clock.monotonic()
    limit = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < limit, "timed out letting the clock run"
        clock.advance(step)
        await asyncio.sleep(0.005)
    return clock.monotonic() - began


async def _still_waiting(task: asyncio.Future[Any]) -> None:
    """`task` is blocked (on a hypervisor call the test holds), not done."""
    for _ in range(20):
        await asyncio.sleep(0.001)
    assert not task.done()


# ---------------------------------------------------------------------------------------------------
# a hypervisor call still running when its phase gives up


def test_start_slower_than_its_deadline_leaves_no_paused_domain(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    hv.hold("start_paused")
    core = _core(tmp_path, hv, phase_timeouts={Phase.STARTED_PAUSED: 0.2})

    async def body(core: Launcher) -> None:
        call = asyncio.ensure_future(core.prepare(_spec(), godh_cert=GODH, session=SESSION, requested_by="c"))
        await until(lambda: "start_paused" in hv.calls)
        _clock(core).advance(0.2)  # the phase's deadline passes while the start runs on in its thread
        await _still_waiting(call)  # fail-closed waits for the start before it destroys
        hv.let_go("start_paused")
        with pytest.raises(DeadlineExceeded) as err:
            await call
        assert err.value.reason == "phase_deadline"
        (rec,) = core.store.records(include_terminal=True)
        assert (rec.state, rec.failed_phase) == (Phase.FAILED, Phase.STARTED_PAUSED)
        assert "start_paused" in hv.ended  # the start has finished in its thread
        _assert_nothing_left(hv)

    _run(core, body)


def test_orchestrated_start_slower_than_its_deadline_leaves_no_paused_domain(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    hv.hold("start_paused")
    core = _core(tmp_path, hv, phase_timeouts={Phase.STARTED_PAUSED: 0.2})

    async def body(core: Launcher) -> None:
        collect = asyncio.ensure_future(_orchestrated(core, _spec()))
        await until(lambda: "start_paused" in hv.calls)
        _clock(core).advance(0.2)
        await _still_waiting(collect)
        hv.let_go("start_paused")
        events = await collect
        assert (events[-1].phase, events[-1].failed_phase, events[-1].reason) == (
            Phase.FAILED,
            Phase.STARTED_PAUSED,
            "phase_deadline",
        )
        assert "start_paused" in hv.ended
        _assert_nothing_left(hv)

    _run(core, body)


def test_abort_during_a_slow_start_leaves_no_paused_domain(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    hv.hold("start_paused")
    core = _core(tmp_path, hv)

    async def body(core: Launcher) -> None:
        rec, events = await core.launch(
            _spec(), owner_endpoint="owner:50053", workload_id="w", requested_by="client"
        )
        await until(lambda: "start_paused" in hv.calls)
        aborting = asyncio.ensure_future(core.abort(rec.launch_id))
        await _still_waiting(aborting)
        hv.let_go("start_paused")
        aborted = await aborting
        assert (aborted.state, aborted.failed_phase, aborted.reason) == (
            Phase.FAILED,
            Phase.STARTED_PAUSED,
            "aborted",
        )
        assert [e.phase for e in [e async for e in events]][-1] is Phase.FAILED
        assert "start_paused" in hv.ended
        _assert_nothing_left(hv)

    _run(core, body)


def test_stop_during_a_slow_start_leaves_no_paused_domain(tmp_path: Path) -> None:
    # SIGTERM: the server stops the core, which aborts every launch in flight.
    hv = FakeHypervisor()
    hv.hold("start_paused")
    core = _core(tmp_path, hv)

    async def main() -> None:
        await core.start()
        rec, _events = await core.launch(
            _spec(), owner_endpoint="owner:50053", workload_id="w", requested_by="client"
        )
        await until(lambda: "start_paused" in hv.calls)
        stopping = asyncio.ensure_future(core.stop())
        await _still_waiting(stopping)
        hv.let_go("start_paused")
        await stopping
        assert core.store.get(rec.launch_id).reason == "launcher_stopping"
        assert "start_paused" in hv.ended
        _assert_nothing_left(hv)

    asyncio.run(main())


def test_a_call_outliving_the_cleanup_grace_is_destroyed_when_it_ends(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    hv.hold("start_paused")
    core = _core(tmp_path, hv, phase_timeouts={Phase.STARTED_PAUSED: 0.1}, cleanup_grace=0.2)

    async def body(core: Launcher) -> None:
        call = asyncio.ensure_future(core.prepare(_spec(), godh_cert=GODH, session=SESSION, requested_by="c"))
        await until(lambda: "start_paused" in hv.calls)
        # The phase deadline, then the cleanup grace, pass with the start still in its thread.
        await tick_until(_clock(core), call.done)
        with pytest.raises(DeadlineExceeded):
            await call
        assert "start_paused" not in hv.ended
        hv.let_go("start_paused")  # the start ends, after fail-closed gave up waiting for it
        await until(lambda: "start_paused" in hv.ended)
        await core.settle()
        _assert_nothing_left(hv)

    _run(core, body)


# ---------------------------------------------------------------------------------------------------
# two-phase deadline


def test_complete_launch_after_the_deadline_is_refused_even_before_the_timer_runs(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    core = _core(tmp_path, hv, phase_timeouts={Phase.SECRET_INJECTED: 0.2})

    async def body(core: Launcher) -> None:
        rec, _ = await core.prepare(_spec(), godh_cert=GODH, session=SESSION, requested_by="c")
        # A busy event loop: the deadline passes and the expiry timer has not had its turn yet, so
        # CompleteLaunch takes the launch's lock first.
        _clock(core).jump(0.3)
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


def test_the_expiry_timer_fails_a_waiting_launch_closed(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    core = _core(tmp_path, hv, phase_timeouts={Phase.SECRET_INJECTED: 0.2})

    async def body(core: Launcher) -> None:
        rec, _ = await core.prepare(_spec(), godh_cert=GODH, session=SESSION, requested_by="c")
        _clock(core).advance(0.15)
        await core.settle()
        assert core.store.get(rec.launch_id).state is Phase.MEASURED
        _clock(core).advance(0.1)
        await core.settle()
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
        rec, _ = await core.prepare(_spec(), godh_cert=GODH, session=SESSION, requested_by="c")
        done = await core.complete(rec.launch_id, header=HEADER, payload=PAYLOAD, requested_by="c")
        assert done.state is Phase.RUNNING
        assert hv.injected == [(rec.domain_name, HEADER, PAYLOAD, SECRET_GPA)]
        # The hypervisor got the image preflight read, not a path to read again.
        (image,) = hv.firmware_seen
        assert image.path == str(OVMF) and image.data == OVMF.read_bytes()

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
        rec, _ = await core.prepare(_spec(), godh_cert=GODH, session=SESSION, requested_by="c")
        hv.hold("inject_secret")
        call = asyncio.create_task(
            core.complete(rec.launch_id, header=HEADER, payload=PAYLOAD, requested_by="c")
        )
        await until(lambda: "inject_secret" in hv.calls)
        call.cancel()
        await _still_waiting(call)  # fail-closed waits for the inject in its thread
        hv.let_go("inject_secret")
        with pytest.raises(asyncio.CancelledError):
            await call
        # Fail-closed ran before the cancellation reached the caller: no waiting for the deadline.
        failed = core.store.get(rec.launch_id)
        assert (failed.state, failed.failed_phase) == (Phase.FAILED, Phase.SECRET_INJECTED)
        assert rec.launch_id not in core.active
        assert "resume" not in hv.calls
        _assert_nothing_left(hv)
        await core.settle()  # past the inject's end in its thread
        assert "inject_secret" in hv.ended
        _assert_nothing_left(hv)

    _run(core, body)


def test_complete_launch_cancelled_during_resume_leaves_no_paused_domain(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    core = _core(tmp_path, hv, phase_timeouts={Phase.SECRET_INJECTED: 5})

    async def body(core: Launcher) -> None:
        rec, _ = await core.prepare(_spec(), godh_cert=GODH, session=SESSION, requested_by="c")
        hv.hold("resume")
        call = asyncio.create_task(
            core.complete(rec.launch_id, header=HEADER, payload=PAYLOAD, requested_by="c")
        )
        await until(lambda: "resume" in hv.calls)
        call.cancel()
        await _still_waiting(call)
        hv.let_go("resume")
        with pytest.raises(asyncio.CancelledError):
            await call
        # The resume ran to its end in its thread; fail-closed waited for it, then destroyed.
        failed = core.store.get(rec.launch_id)
        assert (failed.state, failed.failed_phase) == (Phase.FAILED, Phase.RUNNING)
        assert rec.launch_id not in core.active
        assert "resume" in hv.ended
        _assert_nothing_left(hv)

    _run(core, body)


def test_complete_launch_cancelled_in_the_deadline_path_still_fails_closed(tmp_path: Path) -> None:
    # Past the deadline, CompleteLaunch fails the launch closed itself; a cancellation arriving while
    # that destroy runs must not stop it half-way.
    hv = FakeHypervisor()
    core = _core(tmp_path, hv, phase_timeouts={Phase.SECRET_INJECTED: 0.2})

    async def body(core: Launcher) -> None:
        rec, _ = await core.prepare(_spec(), godh_cert=GODH, session=SESSION, requested_by="c")
        _clock(core).jump(0.3)  # deadline passed, the expiry timer has not run yet
        hv.hold("destroy")
        call = asyncio.create_task(
            core.complete(rec.launch_id, header=HEADER, payload=PAYLOAD, requested_by="c")
        )
        await until(lambda: "destroy" in hv.calls)
        call.cancel()
        with pytest.raises((asyncio.CancelledError, DeadlineExceeded)):
            await call
        hv.let_go("destroy")
        await core.settle()
        failed = core.store.get(rec.launch_id)
        assert (failed.state, failed.failed_phase, failed.reason) == (
            Phase.FAILED,
            Phase.SECRET_INJECTED,
            "deadline_exceeded",
        )
        assert rec.launch_id not in core.active
        assert hv.injected == []
        _assert_nothing_left(hv)

    _run(core, body)


@pytest.mark.parametrize("then", ["running", "refused"])
def test_launch_stream_cancelled_mid_launch_never_leaves_a_paused_domain(tmp_path: Path, then: str) -> None:
    # The stream only reads the launch's events: a client that goes away does not stop the launch,
    # which ends RUNNING or fails closed, never paused.
    hv = FakeHypervisor()
    hv.hold("launch_security_info")
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
        await until(lambda: "launch_security_info" in hv.calls)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        hv.let_go("launch_security_info")
        await until(lambda: core.store.get(rec.launch_id).state in (Phase.RUNNING, Phase.FAILED))
        final = core.store.get(rec.launch_id)
        assert rec.launch_id not in core.active
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
        done, _ = await core.prepare(_spec(), godh_cert=GODH, session=SESSION, requested_by="c")
        hv.hold("inject_secret")
        completing = asyncio.create_task(
            core.complete(done.launch_id, header=HEADER, payload=PAYLOAD, requested_by="c")
        )
        await until(lambda: "inject_secret" in hv.calls)
        # Then two orchestrated launches stuck in a slow start.
        hv.hold("start_paused")
        recs = []
        for _ in range(2):
            rec, _events = await core.launch(
                _spec(), owner_endpoint="owner:50053", workload_id="w", requested_by="client"
            )
            recs.append(rec)
        await until(lambda: hv.calls.count("start_paused") >= 3)  # the two-phase launch started once too
        stopping = asyncio.ensure_future(core.stop())  # must not raise launch_running
        await _still_waiting(stopping)
        hv.let_go("inject_secret")
        hv.let_go("start_paused")
        await stopping
        assert (await completing).state is Phase.RUNNING
        assert core.store.get(done.launch_id).state is Phase.RUNNING
        for rec in recs:
            stopped = core.store.get(rec.launch_id)
            assert (stopped.state, stopped.reason) == (Phase.FAILED, "launcher_stopping")
        assert core.active == {}
        await until(lambda: hv.ended.count("start_paused") >= 3)
        await core.settle()
        assert hv.domains == {done.domain_name: DomainState.RUNNING}
        assert hv.contexts == {done.domain_name}

    asyncio.run(main())


def test_stop_aborts_launches_concurrently_within_one_budget(tmp_path: Path) -> None:
    # Each launch is stuck in a start that outlives the cleanup grace: one abort takes about a grace,
    # so aborting them one after another would take about n graces. (Four: the starts and the
    # destroys share the default executor, six workers on a two-CPU machine.)
    hv = FakeHypervisor()
    hv.hold("start_paused")
    core = _core(tmp_path, hv, cleanup_grace=0.5)

    async def main() -> None:
        await core.start()
        recs = []
        for _ in range(4):
            rec, _events = await core.launch(
                _spec(), owner_endpoint="owner:50053", workload_id="w", requested_by="client"
            )
            recs.append(rec)
        await until(lambda: hv.calls.count("start_paused") >= 4)
        stopping = asyncio.ensure_future(core.stop())
        took = await tick_until(_clock(core), stopping.done, step=0.02)
        await stopping
        assert took <= core.config.shutdown_budget + 0.5
        assert took < 1.5  # four sequential aborts: about 2 s
        for rec in recs:
            assert core.store.get(rec.launch_id).reason == "launcher_stopping"
        hv.let_go("start_paused")  # the starts end; the late destroys (or the reconciler) clean up
        await until(lambda: hv.ended.count("start_paused") >= 4)
        await core.settle()
        _assert_nothing_left(hv)

    asyncio.run(main())


class _CancellingPlatform:
    """Cancels the launch's task (an abort, a SIGTERM) in the very step its chain fetch ends: the
    phase's work and the cancellation land together."""

    def __init__(self) -> None:
        self.victim: asyncio.Task[None] | None = None

    async def certificate_chain(self) -> PlatformChain:
        assert self.victim is not None
        self.victim.cancel()
        return PlatformChain(b"", b"", b"", b"", b"", b"")


def test_a_cancellation_landing_as_a_phase_ends_is_not_lost(tmp_path: Path) -> None:
    # asyncio.wait_for (before Python 3.12) returns the result instead of raising when the awaited work
    # is done by the time the cancellation is delivered: the abort must still stop the launch.
    hv = FakeHypervisor()
    platform = _CancellingPlatform()
    core = _core(tmp_path, hv, platform=platform)

    async def body(core: Launcher) -> None:
        rec, events = await core.launch(
            _spec(), owner_endpoint="owner:50053", workload_id="w", requested_by="client"
        )
        platform.victim = core.active[rec.launch_id].task
        last = [e async for e in events][-1]
        assert (last.phase, last.failed_phase, last.reason) == (Phase.FAILED, Phase.CHAIN_FETCHED, "aborted")
        assert "define" not in hv.calls and "resume" not in hv.calls
        _assert_nothing_left(hv)

    _run(core, body)
