"""The persisted launch state machine and the guest spec's validation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from launcher_svc.adapters.sqlite_store import LaunchStore
from launcher_svc.core.spec import DiskSpec, PathPolicy, create_spec, validate_endpoint
from launcher_svc.core.state import (
    TRANSITIONS,
    LaunchFlow,
    LaunchRecord,
    Phase,
    PhaseChange,
    may_resume,
)
from sevlaunch.errors import FailedPrecondition, InvalidArgument, NotFound
from sevlaunch.sev.technology import Technology

OVMF = Path(__file__).resolve().parents[1] / "vectors" / "measurement" / "ovmf_OvmfX64_suffix.bin"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    (d / "fw.fd").write_bytes(b"\x00" * 4096)
    return d


def _spec(images: Path, **kw: object) -> object:
    args: dict[str, object] = dict(
        name="g",
        memory_mib=512,
        vcpus=1,
        firmware_path=str(images / "fw.fd"),
        mode=Technology.SEV,
        policy=3,
        paths=PathPolicy((str(images),)),
    )
    args.update(kw)
    return create_spec(**args)  # type: ignore[arg-type]


def _record(images: Path, mode: LaunchFlow = LaunchFlow.ORCHESTRATED, **kw: object) -> LaunchRecord:
    now = time.time()
    return LaunchRecord(
        launch_id="a" * 32,
        mode=mode,
        state=Phase.ACCEPTED,
        spec=_spec(images, **kw),  # type: ignore[arg-type]
        domain_name="sl-aaaaaaaaaaaa-g",
        requested_by="client",
        incarnation="i1",
        created_at=now,
        updated_at=now,
    )


def test_store_walks_the_orchestrated_order_and_survives_reopen(images: Path, tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    store = LaunchStore(str(db))
    rec = _record(images)
    store.insert(rec)
    for phase in (Phase.CHAIN_FETCHED, Phase.SESSION_OPENED, Phase.DEFINED, Phase.STARTED_PAUSED):
        rec = store.advance(rec, PhaseChange(phase))
    rec = store.advance(rec, PhaseChange(Phase.MEASURED, measurement=b"\x01" * 48))
    store.close()
    again = LaunchStore(str(db))
    (back,) = again.in_flight()
    assert back.state is Phase.MEASURED and back.measurement == b"\x01" * 48 and back.spec == rec.spec
    assert again.by_domain("sl-aaaaaaaaaaaa-g") == back


def test_illegal_transitions_and_resume_without_secret_are_refused(images: Path, tmp_path: Path) -> None:
    store = LaunchStore(str(tmp_path / "l.db"))
    rec = _record(images)
    store.insert(rec)
    with pytest.raises(RuntimeError, match="illegal"):
        store.advance(rec, PhaseChange(Phase.RUNNING))
    with pytest.raises(RuntimeError, match="illegal"):
        store.advance(rec, PhaseChange(Phase.SECRET_INJECTED))
    for phase in (
        Phase.CHAIN_FETCHED,
        Phase.SESSION_OPENED,
        Phase.DEFINED,
        Phase.STARTED_PAUSED,
        Phase.MEASURED,
        Phase.SECRET_RELEASED,
    ):
        rec = store.advance(rec, PhaseChange(phase))
    assert not may_resume(rec)
    # The waived path needs both the spec's request and the owner's consent.
    with pytest.raises(RuntimeError, match="without an injected secret"):
        store.advance(rec, PhaseChange(Phase.RUNNING))
    with pytest.raises(RuntimeError, match="without an injected secret"):
        store.advance(rec, PhaseChange(Phase.RUNNING, secret_waived=True))  # the spec did not ask for it
    rec = store.advance(rec, PhaseChange(Phase.SECRET_INJECTED))
    assert may_resume(rec)
    assert store.advance(rec, PhaseChange(Phase.RUNNING)).state is Phase.RUNNING


def test_a_stale_copy_cannot_advance(images: Path, tmp_path: Path) -> None:
    store = LaunchStore(str(tmp_path / "l.db"))
    rec = _record(images)
    store.insert(rec)
    store.finish(rec, Phase.FAILED, failed_phase=Phase.CHAIN_FETCHED, reason="aborted", detail="")
    with pytest.raises(FailedPrecondition):
        store.advance(rec, PhaseChange(Phase.CHAIN_FETCHED))
    with pytest.raises(NotFound):
        store.get("b" * 32)


def test_two_phase_order_skips_the_owner_phases() -> None:
    two = TRANSITIONS[LaunchFlow.TWO_PHASE]
    assert (Phase.MEASURED, Phase.SECRET_INJECTED) in two
    assert (Phase.SECRET_RELEASED, Phase.RUNNING) not in two
    assert not any(b is Phase.RUNNING and a is not Phase.SECRET_INJECTED for a, b in two)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"name": "bad name"}, "bad_name"),
        ({"name": "x" * 49}, "bad_name"),
        ({"name": "<domain>"}, "bad_name"),
        ({"memory_mib": 1}, "bad_memory"),
        ({"vcpus": 0}, "bad_vcpus"),
        ({"policy": 0x7}, "policy_mode_mismatch"),
        ({"policy": 0x40}, "bad_policy"),
        ({"firmware_path": "/etc/passwd"}, "path_not_allowed"),
        ({"firmware_path": "relative.fd"}, "bad_path"),
        ({"firmware_path": "/tmp/../etc/passwd"}, "bad_path"),
        ({"cmdline": "x"}, "bad_kernel"),
        ({"disks": (DiskSpec("/nope", "sda"),)}, "bad_disk_target"),
        ({"networks": ("bad net",)}, "bad_network"),
    ],
)
def test_spec_validation(images: Path, changes: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _spec(images, **changes)
    assert err.value.reason == reason


def test_paths_are_resolved_before_the_directory_check(images: Path) -> None:
    (images / "link.fd").symlink_to("/etc/hostname")
    with pytest.raises(InvalidArgument) as err:
        _spec(images, firmware_path=str(images / "link.fd"))
    assert err.value.reason == "path_not_allowed"
    assert _spec(images, firmware_path=str(OVMF), paths=PathPolicy((str(OVMF.parent),)))


@pytest.mark.parametrize("endpoint", ["owner:50053", "10.0.0.1:1", "[::1]:50053"])
def test_endpoints(endpoint: str) -> None:
    assert validate_endpoint(endpoint) == endpoint


@pytest.mark.parametrize("endpoint", ["owner", "owner:0", "owner:99999", "http://owner:1", "a b:1"])
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_endpoint(endpoint)
