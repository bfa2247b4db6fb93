"""The store side of the owner's ListWorkloads, DeleteWorkload, DeleteSecret and RevokeReferenceValues,
on both adapters (SQLite and a real PostgreSQL server, `pg_fixture.py`): what each finds, deletes,
revokes and audits, and that a refusal writes nothing."""

from __future__ import annotations

from typing import Any

import pytest
from test_owner_postgres import Backend, _event, _session, _verify
from test_owner_postgres import backend as backend  # the two-adapter fixture, re-exported for pytest

from owner_svc.core.model import AuditEvent, SessionState
from owner_svc.core.ports import Deletion, Revocation, WorkloadRow
from owner_svc.core.snp_model import AuthorizationState, SnpAuthorization

pytest_plugins = ["owner_support", "pg_fixture"]

NOW = 1000.0
MID_A, MID_B, MID_C = "a" * 64, "b" * 64, "c" * 64


def _delete(store: Any, workload: str, *, secret_only: bool = False, force: bool = False) -> Deletion:
    result: Deletion = store.delete_workload(
        workload,
        secret_only=secret_only,
        force=force,
        now=NOW,
        event=_event("delete_secret" if secret_only else "delete_workload", workload_id=workload),
        revoke_event=_event("revoke_session", workload_id=workload),
        revoke_snp_event=_event("revoke_snp_authorization", workload_id=workload),
    )
    return result


def _actions(store: Any) -> list[tuple[str, str]]:
    return [(r.event.action, r.event.session_id) for r in store.iter_audit()]


def _with_workloads(backend: Backend) -> Any:
    store = backend.open(clock=lambda: NOW)
    for wid in ("beta", "alpha", "gamma"):
        store.put_workload(wid, '{"v": 1}', _event("put_workload", workload_id=wid))
    store.put_secret("alpha", b"sealed", _event("put_secret", workload_id="alpha"))
    # alpha: one open session, one expired open one, one released; gamma: none open.
    store.insert_session(_session("1" * 32, workload="alpha", created=1, expires_at=NOW + 60), _event())
    store.insert_session(_session("2" * 32, workload="alpha", created=2, expires_at=NOW - 1), _event())
    store.insert_session(_session("3" * 32, workload="alpha", created=3, expires_at=NOW + 60), _event())
    assert store.finish_session(
        "3" * 32,
        to_state=SessionState.RELEASED,
        now=NOW,
        require_unexpired=True,
        matched_digest="d",
        reason="",
        event=_event("release_secret"),
    )
    return store


def test_list_workloads_pages_in_id_order_with_secret_and_open_sessions(backend: Backend) -> None:
    store = _with_workloads(backend)
    assert list(store.list_workloads("", 10, NOW)) == [
        WorkloadRow("alpha", True, 1, NOW),  # the expired and the released sessions do not count
        WorkloadRow("beta", False, 0, NOW),
        WorkloadRow("gamma", False, 0, NOW),
    ]
    assert [w.workload_id for w in store.list_workloads("", 2, NOW)] == ["alpha", "beta"]
    assert [w.workload_id for w in store.list_workloads("beta", 2, NOW)] == ["gamma"]
    assert list(store.list_workloads("gamma", 2, NOW)) == []
    # Past the open session's expiry it no longer counts.
    assert store.list_workloads("", 1, NOW + 61)[0].open_sessions == 0


def test_delete_refused_while_a_session_is_open_writes_nothing(backend: Backend) -> None:
    store = _with_workloads(backend)
    records = _verify(store)
    for secret_only in (False, True):
        done = _delete(store, "alpha", secret_only=secret_only)
        assert done == Deletion(found=True, had_secret=True, open_sessions=("1" * 32,))
    assert store.get_workload("alpha") is not None and store.get_secret("alpha") == b"sealed"
    assert store.get_session("1" * 32).state is SessionState.OPEN
    assert _verify(store) == records  # the core audits the refusal, the store wrote nothing


def test_forced_delete_revokes_open_sessions_and_deletes_in_one_transaction(backend: Backend) -> None:
    store = _with_workloads(backend)
    before = _verify(store)
    done = _delete(store, "alpha", force=True)
    assert done == Deletion(
        found=True, had_secret=True, open_sessions=("1" * 32,), deleted=True, revoked=("1" * 32,)
    )
    assert store.get_workload("alpha") is None and store.get_secret("alpha") is None
    revoked = store.get_session("1" * 32)
    assert revoked.state is SessionState.REVOKED and revoked.reason == "revoked"
    assert revoked.finished_at == NOW
    # The expired open session and the released one are left as they were.
    assert store.get_session("2" * 32).state is SessionState.OPEN
    assert store.get_session("3" * 32).state is SessionState.RELEASED
    assert _actions(store)[before:] == [("revoke_session", "1" * 32), ("delete_workload", "")]
    assert _verify(store) == before + 2
    assert [w.workload_id for w in store.list_workloads("", 10, NOW)] == ["beta", "gamma"]
    # Gone: a second delete finds nothing and writes nothing.
    assert _delete(store, "alpha") == Deletion(found=False, had_secret=False, open_sessions=())
    assert _verify(store) == before + 2


def test_delete_secret_keeps_the_workload(backend: Backend) -> None:
    store = _with_workloads(backend)
    before = _verify(store)
    # beta has no secret: nothing to delete, nothing written.
    nothing = Deletion(found=True, had_secret=False, open_sessions=())
    assert _delete(store, "beta", secret_only=True) == nothing
    assert _delete(store, "nope", secret_only=True).found is False
    assert _verify(store) == before
    done = _delete(store, "alpha", secret_only=True, force=True)
    assert done.deleted and done.revoked == ("1" * 32,)
    assert store.get_secret("alpha") is None and store.get_workload("alpha") == '{"v": 1}'
    assert store.list_workloads("", 1, NOW)[0] == WorkloadRow("alpha", False, 0, NOW)
    # A workload without open sessions is deleted without force.
    done = _delete(store, "gamma")
    assert done == Deletion(found=True, had_secret=False, open_sessions=(), deleted=True)
    assert _actions(store)[before:] == [
        ("revoke_session", "1" * 32),
        ("delete_secret", ""),
        ("delete_workload", ""),
    ]


def test_revoke_manifests_refuses_unknown_ids_and_reports_earlier_revocations(backend: Backend) -> None:
    store = backend.open(clock=lambda: NOW)
    store.put_manifest(MID_A, b"envelope-a", "test", _event("import_reference_values"))
    # MID_B: revoked by a manifest's `revokes` list without ever being imported here.
    store.put_manifest(MID_C, b"envelope-c", "test", _event("import_reference_values"), revokes=[MID_B])
    generation, records = store.refvalues_generation(), _verify(store)
    event = AuditEvent(actor="owner-admin", action="revoke_reference_values", outcome="allowed")

    # One unknown id refuses the whole call: nothing revoked, no generation bump, no record.
    assert store.revoke_manifests([MID_A, "d" * 64], "admin:x", event) == Revocation(unknown=("d" * 64,))
    assert store.revoked_manifests() == {MID_B}
    assert store.refvalues_generation() == generation and _verify(store) == records

    done = store.revoke_manifests([MID_B, MID_A, MID_A], "admin:x", event)
    assert done == Revocation(revoked=(MID_A,), already_revoked=(MID_B,))
    assert store.revoked_manifests() == {MID_A, MID_B}
    assert store.refvalues_generation() == generation + 1
    assert _verify(store) == records + 1
    _, _, revoked = store.load_refvalues()
    assert revoked == {MID_A, MID_B}

    # Again: nothing new, so the generation stays; the decision is still audited.
    assert store.revoke_manifests([MID_A], "admin:x", event) == Revocation(already_revoked=(MID_A,))
    assert store.refvalues_generation() == generation + 1
    assert _verify(store) == records + 2
    # Revocations stay append-only.
    with pytest.raises(backend.driver_error):
        backend.raw(f"DELETE FROM revoked_manifests WHERE manifest_id = '{MID_A}'")


def _snp_authorization(aid: str, workload: str, expires_at: float) -> SnpAuthorization:
    return SnpAuthorization(
        authorization_id=aid,
        workload_id=workload,
        caller="launcher",
        product="genoa",
        policy=0x30000,
        vcpus=1,
        launch_digest="ab" * 48,
        manifest_id=MID_A,
        host_data="cd" * 32,
        id_key_digest="ef" * 48,
        author_key_digest="",
        id_key_version=1,
        init_data=b"{}",
        vek_cert=b"\x30\x00",
        created_at=NOW - 10,
        expires_at=expires_at,
    )


def test_open_snp_authorizations_hold_a_delete_and_force_revokes_them(backend: Backend) -> None:
    store = _with_workloads(backend)
    store.insert_snp_authorization(_snp_authorization("a1" * 16, "gamma", NOW + 60), _event())
    store.insert_snp_authorization(_snp_authorization("a2" * 16, "gamma", NOW - 1), _event())  # expired
    assert [w.open_sessions for w in store.list_workloads("beta", 5, NOW)] == [1]  # gamma
    before = _verify(store)
    held = _delete(store, "gamma")
    assert held == Deletion(found=True, had_secret=False, open_sessions=(), open_authorizations=("a1" * 16,))
    assert held.in_use == ("a1" * 16,) and _verify(store) == before
    done = _delete(store, "gamma", force=True)
    assert done.deleted and done.revoked == () and done.revoked_authorizations == ("a1" * 16,)
    revoked = store.get_snp_authorization("a1" * 16)
    assert (revoked.state, revoked.reason, revoked.finished_at) == (
        AuthorizationState.REVOKED,
        "revoked",
        NOW,
    )
    assert store.get_snp_authorization("a2" * 16).state is AuthorizationState.AUTHORIZED  # expired, left
    assert _actions(store)[before:] == [("revoke_snp_authorization", "a1" * 16), ("delete_workload", "")]
