"""The SEV-SNP launch flow on fakes and a fake clock: its phases in order, what it sends the owner, and
that every path that does not end in RUNNING leaves no domain and no guest context behind (before the
domain exists nothing is defined at all)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import hashlib
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakes.clock import FakeClock
from fakes.hypervisor import FakeHypervisor
from fakes.snp import EVIDENCE, SNP_POLICY, FakeSnpOwner, FakeSnpPlatform, authorization
from test_launcher_core import tick_until, until

from launcher_svc.adapters.sqlite_store import LaunchStore
from launcher_svc.core.domain_xml import SnpLaunchParams, build_domain_xml
from launcher_svc.core.launcher import Launcher, LauncherConfig
from launcher_svc.core.loader import LoaderType
from launcher_svc.core.ports import AttestationState, AttestationVerdict, SnpAuthorization
from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.spec import GuestSpec, PathPolicy, create_spec
from launcher_svc.core.state import LaunchFlow, LaunchRecord, Phase, PhaseChange, advanced, may_resume
from sevlaunch.errors import FailedPrecondition, InvalidArgument, ServiceError, Unavailable
from sevlaunch.sev.technology import Technology
from sevlaunch.snp.idblock import IdBlock

OVMF_2M = Path("/usr/share/OVMF/OVMF_CODE.fd")  # Debian's 2 MiB image: it has SEV (SNP) metadata
OVMF_4M = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")  # no SEV metadata
DIGEST = bytes(range(48))
SNP_PHASES = [Phase.CHAIN_FETCHED, Phase.AUTHORIZED, Phase.DEFINED, Phase.STARTED, Phase.RUNNING]


def _image(path: Path) -> str:
    if not path.is_file():
        pytest.fail(f"{path} is missing: install Debian's ovmf package (./run does)")
    return str(path)


def _spec(**kw: Any) -> GuestSpec:
    base: dict[str, Any] = dict(
        name="snp", memory_mib=512, vcpus=2, firmware_path=_image(OVMF_2M), mode=Technology.SEV_SNP,
        policy=SNP_POLICY,
    )  # fmt: skip
    base.update(kw)
    return GuestSpec(**base)


def _core(
    tmp_path: Path,
    hv: FakeHypervisor,
    owner: FakeSnpOwner,
    *,
    platform: FakeSnpPlatform | None = None,
    phase_timeouts: dict[Phase, float] | None = None,
    launch_scope: Any = None,
) -> Launcher:
    return Launcher(
        hypervisor=hv,
        store=LaunchStore(str(tmp_path / "launcher.db")),
        platform=platform or FakeSnpPlatform(),
        owners=owner,
        config=LauncherConfig(
            reconcile_interval=0, phase_timeouts=phase_timeouts or {}, attestation_poll=0.5
        ),
        clock=FakeClock(),
        launch_scope=launch_scope,
    )


async def _launch(core: Launcher, spec: GuestSpec) -> tuple[LaunchRecord, list[Any]]:
    rec, events = await core.launch(
        spec, owner_endpoint="owner:50053", workload_id="w", requested_by="client"
    )
    return rec, [e async for e in events]


def _run(core: Launcher, spec: GuestSpec) -> tuple[LaunchRecord, list[Any]]:
    async def main() -> tuple[LaunchRecord, list[Any]]:
        await core.start()
        try:
            rec, events = await _launch(core, spec)
            return core.store.get(rec.launch_id), events
        finally:
            await core.stop()

    return asyncio.run(main())


def _nothing_left(hv: FakeHypervisor) -> None:
    assert hv.domains == {} and hv.contexts == set()


def test_an_snp_launch_goes_through_its_phases_with_the_owners_authorisation(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    auth = authorization(DIGEST)
    owner = FakeSnpOwner(auth)
    rec, events = _run(_core(tmp_path, hv, owner), _spec())

    assert [e.phase for e in events] == SNP_PHASES
    assert rec.state is Phase.RUNNING and rec.mode is LaunchFlow.SNP
    assert rec.attested and rec.authorization_id == "auth-1"
    assert hv.domains == {rec.domain_name: "running"}
    assert owner.revoked == []  # a launch that reached RUNNING keeps its (released) authorisation
    assert "start_paused" not in hv.calls and "resume" not in hv.calls  # an SNP guest is never paused
    # The owner was asked about exactly this launch, with the platform's evidence as the platform sent it.
    assert owner.evidence == [EVIDENCE]
    (config,) = owner.configs
    assert (config.vcpus, config.vcpu_type, config.guest_features, config.vmm_type) == (
        2,
        "EPYC-v4",
        1,
        "QEMU",
    )
    assert config.policy == SNP_POLICY and config.kernel_hashes is None
    assert config.firmware_sha256 == hashlib.sha256(OVMF_2M.read_bytes()).hexdigest()
    # The domain carries the authorisation, byte for byte.
    ls = ET.fromstring(hv.xml[rec.domain_name]).find("launchSecurity")
    assert ls is not None and ls.get("type") == "sev-snp" and ls.get("authorKey") == "yes"
    assert base64.b64decode(ls.findtext("idBlock") or "") == auth.id_block
    assert base64.b64decode(ls.findtext("idAuth") or "") == auth.id_auth
    assert base64.b64decode(ls.findtext("hostData") or "") == auth.host_data
    assert int(ls.findtext("policy") or "", 16) == SNP_POLICY
    entry = ET.fromstring(hv.xml[rec.domain_name]).find("sysinfo/entry")
    assert entry is not None and (entry.text or "").encode() == auth.init_data


def test_the_launch_waits_in_started_until_the_owner_reports_the_attestation(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    pending = AttestationVerdict(AttestationState.PENDING)
    owner = FakeSnpOwner(
        authorization(DIGEST),
        verdicts=[
            pending,
            Unavailable("owner_unavailable", "down"),
            pending,
            AttestationVerdict(AttestationState.RELEASED),
        ],
    )
    core = _core(tmp_path, hv, owner, phase_timeouts={Phase.RUNNING: 30})

    async def main() -> None:
        await core.start()
        try:
            rec, events = await core.launch(_spec(), owner_endpoint="o:1", workload_id="w", requested_by="c")
            await until(lambda: core.store.get(rec.launch_id).state is Phase.STARTED, "STARTED")
            assert core.store.get(rec.launch_id).attested is False
            # A transient owner outage while the guest attests is asked again, not a failure.
            await tick_until(core.machine.clock, lambda: core.store.get(rec.launch_id).state is Phase.RUNNING)  # type: ignore[arg-type]
            assert [e.phase async for e in events][-1] is Phase.RUNNING
            assert owner.polls == 4
        finally:
            await core.stop()

    asyncio.run(main())


def _with(auth: SnpAuthorization, **changes: Any) -> SnpAuthorization:
    return replace(auth, **changes)


def _bad_authorizations() -> dict[str, tuple[SnpAuthorization, str]]:
    good = authorization(DIGEST)
    other_block = IdBlock(launch_digest=bytes(48), policy=SNP_POLICY).to_bytes()
    return {
        "host_data not the init data's digest": (_with(good, host_data=b"\x00" * 32), "bad_authorization"),
        "truncated ID block": (_with(good, id_block=good.id_block[:95]), "bad_authorization"),
        "ID block not the one signed": (_with(good, id_block=other_block), "bad_authorization"),
        "author key claimed, none in the ID auth": (
            _with(authorization(DIGEST, author=False), author_key=True),
            "bad_authorization",
        ),
        "no init data": (
            _with(good, init_data=b"", host_data=hashlib.sha256(b"").digest()),
            "bad_authorization",
        ),
        "bad authorisation id": (_with(good, authorization_id="../x"), "bad_authorization"),
        "another policy": (authorization(DIGEST, policy=SNP_POLICY | 1 << 19), "policy_mismatch"),
    }


@pytest.mark.parametrize("case", sorted(_bad_authorizations()))
def test_an_inconsistent_authorisation_is_refused_before_anything_is_defined(
    case: str, tmp_path: Path
) -> None:
    auth, reason = _bad_authorizations()[case]
    hv = FakeHypervisor()
    owner = FakeSnpOwner(auth)
    rec, events = _run(_core(tmp_path, hv, owner), _spec())
    assert events[-1].phase is Phase.FAILED and events[-1].failed_phase is Phase.AUTHORIZED
    assert (rec.state, rec.reason) == (Phase.FAILED, reason)
    assert "define" not in hv.calls
    _nothing_left(hv)
    # Open at the owner though never used: revoked, when its id is one the owner could have issued.
    assert owner.revoked == ([] if case == "bad authorisation id" else [auth.authorization_id])


def _failure(tmp_path: Path, hv: FakeHypervisor, owner: FakeSnpOwner, **kw: Any) -> tuple[LaunchRecord, Any]:
    rec, events = _run(_core(tmp_path, hv, owner, **kw), _spec())
    assert rec.state is Phase.FAILED and events[-1].phase is Phase.FAILED
    _nothing_left(hv)
    return rec, events[-1]


def test_a_platform_failure_fails_before_the_owner_is_asked(tmp_path: Path) -> None:
    hv, owner = FakeHypervisor(), FakeSnpOwner(authorization(DIGEST))
    rec, _ = _failure(
        tmp_path, hv, owner, platform=FakeSnpPlatform(error=Unavailable("platform_unavailable", "x"))
    )
    assert (rec.failed_phase, rec.reason) == (Phase.CHAIN_FETCHED, "platform_unavailable")
    assert owner.configs == [] and "define" not in hv.calls
    assert owner.revoked == []  # nothing was authorised


def test_the_owners_refusal_to_authorise_passes_through(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    owner = FakeSnpOwner(
        authorization(DIGEST), authorize_error=FailedPrecondition("tcb_below_minimum", "TCB")
    )
    rec, _ = _failure(tmp_path, hv, owner)
    assert (rec.failed_phase, rec.reason) == (Phase.AUTHORIZED, "tcb_below_minimum")
    assert "define" not in hv.calls
    assert owner.revoked == []  # nothing was authorised


def test_a_firmware_refusal_at_start_is_snp_launch_refused_and_the_domain_destroyed(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    hv.refuse_snp_finish = True
    owner = FakeSnpOwner(authorization(DIGEST))
    rec, event = _failure(tmp_path, hv, owner)
    assert (rec.failed_phase, rec.reason) == (Phase.STARTED, LaunchReason.SNP_LAUNCH_REFUSED)
    assert event.reason == "snp_launch_refused" and "SNP_LAUNCH_FINISH" in event.detail
    assert hv.calls.count("define") == 1 and hv.calls[-1] == "destroy"
    assert owner.polls == 0
    # The authorisation of the refused launch does not stay open until it expires.
    assert owner.revoked == ["auth-1"]


@pytest.mark.parametrize(
    ("verdict", "reason"),
    [
        (
            AttestationVerdict(AttestationState.REFUSED, "tcb_below_minimum", "reported TCB below"),
            "tcb_below_minimum",
        ),
        (AttestationVerdict(AttestationState.REFUSED), "attestation_refused"),
    ],
)
def test_a_refused_attestation_destroys_the_running_guest(
    verdict: AttestationVerdict, reason: str, tmp_path: Path
) -> None:
    hv = FakeHypervisor()
    owner = FakeSnpOwner(authorization(DIGEST), verdicts=[verdict])
    rec, _event = _failure(tmp_path, hv, owner)
    assert (rec.failed_phase, rec.reason) == (Phase.RUNNING, reason)
    assert owner.revoked == ["auth-1"]  # the real owner answers session_not_open: it closed it itself
    assert "start_snp" in hv.calls and hv.calls[-1] == "destroy"
    assert not rec.attested


def test_an_owner_error_other_than_an_outage_fails_the_attestation_wait(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    owner = FakeSnpOwner(authorization(DIGEST), verdicts=[FailedPrecondition("authorization_unknown", "?")])
    rec, _ = _failure(tmp_path, hv, owner)
    assert (rec.failed_phase, rec.reason) == (Phase.RUNNING, "authorization_unknown")


def test_a_guest_that_never_attests_is_destroyed_at_the_deadline(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    owner = FakeSnpOwner(authorization(DIGEST), verdicts=[AttestationVerdict(AttestationState.PENDING)])
    core = _core(tmp_path, hv, owner, phase_timeouts={Phase.RUNNING: 5})

    async def main() -> LaunchRecord:
        await core.start()
        try:
            rec, _events = await core.launch(_spec(), owner_endpoint="o:1", workload_id="w", requested_by="c")
            clock = core.machine.clock
            assert isinstance(clock, FakeClock)
            took = await tick_until(clock, lambda: core.store.get(rec.launch_id).terminal, step=0.25)
            assert 5 <= took < 6
            return core.store.get(rec.launch_id)
        finally:
            await core.stop()

    rec = asyncio.run(main())
    assert (rec.state, rec.failed_phase, rec.reason) == (Phase.FAILED, Phase.RUNNING, "phase_deadline")
    assert owner.polls >= 5
    _nothing_left(hv)
    assert owner.revoked == ["auth-1"]


def test_an_abort_while_the_guest_attests_destroys_it(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    owner = FakeSnpOwner(authorization(DIGEST), verdicts=[AttestationVerdict(AttestationState.PENDING)])
    core = _core(tmp_path, hv, owner)

    async def main() -> LaunchRecord:
        await core.start()
        try:
            rec, _ = await core.launch(_spec(), owner_endpoint="o:1", workload_id="w", requested_by="c")
            await until(lambda: core.store.get(rec.launch_id).state is Phase.STARTED, "STARTED")
            return await core.abort_owned(rec.launch_id, requested_by="c")
        finally:
            await core.stop()

    rec = asyncio.run(main())
    assert (rec.state, rec.failed_phase, rec.reason) == (Phase.FAILED, Phase.RUNNING, "aborted")
    _nothing_left(hv)
    assert owner.revoked == ["auth-1"]


@pytest.mark.parametrize(
    ("error", "level", "message"),
    [
        (Unavailable("owner_unavailable", "down"), "WARNING", "stays open until it expires"),
        (FailedPrecondition("session_not_open", "closed"), "INFO", "already closed"),
        (RuntimeError("a bug in a port"), "WARNING", "stays open until it expires"),
    ],
)
def test_a_revocation_that_fails_is_logged_and_the_launch_still_fails_closed(
    error: Exception, level: str, message: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hv = FakeHypervisor()
    hv.refuse_snp_finish = True
    owner = FakeSnpOwner(authorization(DIGEST), revoke_error=error)
    with caplog.at_level("INFO", logger="launcher_svc"):
        rec, event = _failure(tmp_path, hv, owner)
    assert (rec.failed_phase, rec.reason) == (Phase.STARTED, LaunchReason.SNP_LAUNCH_REFUSED)
    assert event.reason == "snp_launch_refused" and hv.calls[-1] == "destroy"
    assert owner.revoked == ["auth-1"]
    [logged] = [r for r in caplog.records if "SNP authorisation" in r.getMessage()]
    assert logged.levelname == level and message in logged.getMessage()
    assert getattr(logged, "authorization_id", None) == "auth-1"


# ---------------------------------------------------------------------------------------------------
# refused before the launch is accepted


def _refused(tmp_path: Path, hv: FakeHypervisor, spec: GuestSpec) -> ServiceError:
    owner = FakeSnpOwner(authorization(DIGEST))
    core = _core(tmp_path, hv, owner)

    async def main() -> ServiceError:
        with pytest.raises(ServiceError) as err:
            await _launch(core, spec)
        return err.value

    err = asyncio.run(main())
    assert owner.configs == [] and hv.domains == {} and "define" not in hv.calls
    assert core.store.records() == []
    return err


def test_a_host_that_cannot_launch_snp_refuses_before_anyone_is_called(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    hv.snp_unsupported = FailedPrecondition(LaunchReason.SNP_UNSUPPORTED_BY_LIBVIRT, "libvirt 9.0.0")
    assert _refused(tmp_path, hv, _spec()).reason == "snp_unsupported_by_libvirt"


def test_guest_features_other_than_the_hosts_are_refused(tmp_path: Path) -> None:
    err = _refused(tmp_path, FakeHypervisor(), _spec(guest_features=0x5))
    assert err.reason == "unsupported_guest_features"


def test_an_image_without_snp_metadata_is_refused(tmp_path: Path) -> None:
    err = _refused(tmp_path, FakeHypervisor(), _spec(firmware_path=_image(OVMF_4M)))
    assert err.reason == "no_snp_metadata"


def test_snp_has_no_two_phase_launch(tmp_path: Path) -> None:
    core = _core(tmp_path, FakeHypervisor(), FakeSnpOwner(authorization(DIGEST)))

    async def main() -> None:
        with pytest.raises(InvalidArgument) as err:
            await core.prepare(_spec(), godh_cert=b"", session=b"", requested_by="c")
        assert err.value.reason == "snp_needs_orchestrated"

    asyncio.run(main())


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"policy": 0x10000}, "bad_policy"),  # bit 17 clear
        ({"policy": 1 << 40 | SNP_POLICY}, "bad_policy"),  # a reserved bit
        ({"vmm_type": "ec2"}, "bad_vmm_type"),
        ({"guest_features": 1 << 64}, "bad_guest_features"),
        ({"kernel_path": "/usr/share/OVMF/OVMF_CODE.fd", "kernel_hashes": False}, "bad_kernel"),
        ({"launch_without_secret": True}, "bad_mode"),
        ({"mode": Technology.SEV, "policy": 0x3, "guest_features": 1}, "bad_guest_features"),
        ({"mode": Technology.SEV, "policy": 0x3, "vmm_type": "QEMU"}, "bad_vmm_type"),
    ],
)
def test_snp_request_fields_are_validated(kw: dict[str, Any], reason: str) -> None:
    args: dict[str, Any] = dict(
        name="g", memory_mib=512, vcpus=1, firmware_path=_image(OVMF_2M), mode=Technology.SEV_SNP,
        policy=SNP_POLICY, paths=PathPolicy(),
    )  # fmt: skip
    args.update(kw)
    with pytest.raises(InvalidArgument) as err:
        create_spec(**args)
    assert err.value.reason == reason


def test_a_valid_snp_request_keeps_its_fields() -> None:
    spec = create_spec(
        name="g", memory_mib=512, vcpus=4, firmware_path=_image(OVMF_2M), mode=Technology.SEV_SNP,
        policy=SNP_POLICY, paths=PathPolicy(), vcpu_type="EPYC-Genoa", guest_features=1, vmm_type="qemu",
    )  # fmt: skip
    assert (spec.snp, spec.policy, spec.guest_features, spec.vcpu_type) == (True, SNP_POLICY, 1, "EPYC-Genoa")
    assert GuestSpec.from_json_dict(spec.to_json_dict()) == spec


# ---------------------------------------------------------------------------------------------------
# the state machine's gate and the store


def _record(**kw: Any) -> LaunchRecord:
    base: dict[str, Any] = dict(
        launch_id="a" * 32, mode=LaunchFlow.SNP, state=Phase.STARTED, spec=_spec(), domain_name="d",
        requested_by="c", incarnation="i", created_at=0.0, updated_at=0.0,
    )  # fmt: skip
    base.update(kw)
    return LaunchRecord(**base)


def test_an_snp_guest_is_running_only_once_the_owner_reported_it_attested() -> None:
    rec = _record()
    assert not may_resume(rec)
    assert may_resume(replace(rec, attested=True))
    with pytest.raises(RuntimeError):
        advanced(rec, rec, PhaseChange(Phase.RUNNING), 1.0)
    assert advanced(rec, rec, PhaseChange(Phase.RUNNING, attested=True), 1.0).state is Phase.RUNNING
    # SNP's order only: no SEV phase in between, no skipping the owner's authorisation.
    for wrong in (Phase.SESSION_OPENED, Phase.STARTED_PAUSED):
        with pytest.raises(RuntimeError):
            advanced(
                _record(state=Phase.CHAIN_FETCHED), _record(state=Phase.CHAIN_FETCHED), PhaseChange(wrong), 1
            )
    with pytest.raises(RuntimeError):
        advanced(
            _record(state=Phase.CHAIN_FETCHED),
            _record(state=Phase.CHAIN_FETCHED),
            PhaseChange(Phase.DEFINED),
            1,
        )


_OLD_SCHEMA = """
CREATE TABLE launches (
    launch_id TEXT PRIMARY KEY, mode TEXT NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL,
    domain_name TEXT NOT NULL, requested_by TEXT NOT NULL, incarnation TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, deadline REAL, failed_phase TEXT,
    reason TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '', domain_uuid TEXT NOT NULL DEFAULT '',
    owner_endpoint TEXT NOT NULL DEFAULT '', workload_id TEXT NOT NULL DEFAULT '',
    session_id TEXT NOT NULL DEFAULT '', measurement BLOB NOT NULL DEFAULT x'',
    secret_waived INTEGER NOT NULL DEFAULT 0
);
"""


def test_a_database_of_an_earlier_launcher_gains_the_snp_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(_OLD_SCHEMA)
    db.execute(
        "INSERT INTO launches (launch_id, mode, state, spec, domain_name, requested_by, incarnation,"
        " created_at, updated_at) VALUES (?, 'orchestrated', 'RUNNING', ?, 'd', 'c', 'i', 1, 1)",
        ("b" * 32, '{"name":"g","memory_mib":512,"vcpus":1,"firmware_path":"/f","mode":"sev","policy":3}'),
    )
    db.commit()
    db.close()
    store = LaunchStore(str(path))
    old = store.get("b" * 32)
    assert (old.authorization_id, old.attested, old.spec.guest_features) == ("", False, None)
    store.insert(_record(launch_id="c" * 32, authorization_id="auth-9", attested=True, domain_name="e"))
    store.close()
    again = LaunchStore(str(path)).get("c" * 32)
    assert (again.authorization_id, again.attested, again.mode) == ("auth-9", True, LaunchFlow.SNP)


def test_a_restarted_launcher_destroys_the_snp_guest_it_was_waiting_for(tmp_path: Path) -> None:
    # A launcher killed while its guest attested: the next one cannot know whether the owner released
    # the secret, never marks it RUNNING by guessing, and fails it closed.
    hv = FakeHypervisor()
    first = _core(tmp_path, hv, FakeSnpOwner(authorization(DIGEST)))
    rec = replace(_record(), incarnation="an-earlier-launcher", domain_name="sl-aaaaaaaaaaaa-snp")
    first.store.insert(rec)
    hv.define(_snp_domain(rec))
    hv.start_snp(rec.domain_name, None)  # type: ignore[arg-type]
    assert hv.list_domains()[0].snp
    first.store.close()

    core = _core(tmp_path, hv, FakeSnpOwner(authorization(DIGEST)))

    async def main() -> None:
        await core.start()
        try:
            await core.reconcile()
        finally:
            await core.stop()

    asyncio.run(main())
    after = core.store.get(rec.launch_id)
    assert (after.state, after.failed_phase, after.reason) == (
        Phase.FAILED,
        Phase.RUNNING,
        "launcher_restarted",
    )
    _nothing_left(hv)


def _snp_domain(rec: LaunchRecord) -> str:
    return build_domain_xml(
        rec.spec,
        launch_id=rec.launch_id,
        domain_name=rec.domain_name,
        sev=SnpLaunchParams(51, 1, SNP_POLICY),
        loader=LoaderType.ROM,
    )


_LAUNCH_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("launch_id", default=None)


@contextlib.contextmanager
def _recording_scope(launch_id: str) -> Iterator[None]:
    token = _LAUNCH_ID.set(launch_id)
    try:
        yield
    finally:
        _LAUNCH_ID.reset(token)


class _ScopeSeeingOwner(FakeSnpOwner):
    """Records the launch id in force when the launcher asks the owner (the server's scope puts it in
    the calls' metadata; a launch driven outside its scope would send none)."""

    seen: list[str | None]

    async def authorize_snp_launch(self, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(_LAUNCH_ID.get())
        return await super().authorize_snp_launch(*args, **kwargs)


def test_an_snp_launch_runs_in_its_launch_scope(tmp_path: Path) -> None:
    owner = _ScopeSeeingOwner(authorization(DIGEST))
    owner.seen = []
    # The server passes sevlaunch.rpc.launch_id_scope; this one records the id the same way.
    core = _core(tmp_path, FakeHypervisor(), owner, launch_scope=_recording_scope)
    rec, events = _run(core, _spec())
    assert events[-1].phase is Phase.RUNNING
    assert owner.seen == [rec.launch_id]
