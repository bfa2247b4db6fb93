"""Group commit of the owner's store: concurrent calls' writes share one transaction and one COMMIT (with
SQLite, one fsync behind them), and no call is answered before its write is durable.

* The owner as a process, SIGKILLed the moment it has answered part of a burst of concurrent
  OpenSession and ReleaseSecret calls (the rest still in flight), then restarted on the same database
  (SQLite, and PostgreSQL): every answered session and release is there with its audit record, and the
  audit chain verifies offline.
* The batch itself (the write path of callers on threads), on a real SQLite database: writes queued
  while a COMMIT runs go in the next batch together; a failing write is rolled back alone and its
  caller gets its error; a failed COMMIT fails every write of the batch; two releases of one session in
  one batch: exactly one wins.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from owner_proc import ProcessHarness, free_port, start_owner, wait_serving
from owner_support import SEV_POLICY, Publisher, emulator_chain, launch, provision

from owner_svc.adapters.groupcommit import GroupCommit
from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.core.model import AuditEvent, SessionRecord, SessionState
from owner_svc.core.ports import StoreIntegrityError, StoreUnavailable
from sevlaunch.cli import main as cli_main
from sevlaunch.rpc.v1 import owner_pb2

pytest_plugins = ["owner_support", "pg_fixture"]

OPENS = 48
RELEASES = 16
KILL_AFTER = 40  # answers received before the SIGKILL; the rest of the burst is still in flight


def _audit(h: ProcessHarness) -> list[Any]:
    records: list[Any] = []
    admin = h.admin
    while True:
        page = admin.GetAuditLog(owner_pb2.GetAuditLogRequest(after_seq=records[-1].seq if records else 0))
        records += page.records
        if not page.records:
            return records


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigkill_after_answers_loses_no_answered_write(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tls_dir: Path,
    emu: Any,
    emu_root_file: Path,
    publisher: Publisher,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = request.getfixturevalue("pg_dsn") if backend == "postgres" else str(tmp_path / "owner.db")
    port = free_port()
    address = f"localhost:{port}"
    proc = start_owner(tmp_path, tls_dir, emu_root_file, publisher, port, db=db)
    try:
        wait_serving(address, tls_dir, proc)
        h = ProcessHarness(address, tls_dir)
        provision(h, publisher)  # type: ignore[arg-type]
        chain = emulator_chain(emu)
        launcher = h.stub()
        # Sessions to release in the burst, launched on the emulated chip beforehand.
        ready = []
        for _ in range(RELEASES):
            opened = launcher.OpenSession(
                owner_pb2.OpenSessionRequest(workload_id="web", chain=chain, policy=SEV_POLICY)
            )
            run = launch(emu, opened)
            emu.decommission(run.handle)
            ready.append((opened.session_id, run.release_request(opened.session_id, SEV_POLICY)))

        # The burst: every call at once, each from its own channel; SIGKILL as soon as KILL_AFTER of
        # them were answered.
        answered_opens: list[str] = []
        answered_releases: list[str] = []
        lock = threading.Lock()
        killed = threading.Event()
        stubs = [h.stub() for _ in range(OPENS + RELEASES)]

        def record(kind: str, ident: str) -> None:
            with lock:
                if killed.is_set():
                    return  # answered after the kill: cannot happen, but never counted
                (answered_opens if kind == "open" else answered_releases).append(ident)
                if len(answered_opens) + len(answered_releases) == KILL_AFTER:
                    proc.send_signal(signal.SIGKILL)
                    killed.set()

        def do_open(i: int) -> None:
            try:
                reply = stubs[i].OpenSession(
                    owner_pb2.OpenSessionRequest(workload_id="web", chain=chain, policy=SEV_POLICY),
                    timeout=30,
                )
            except grpc.RpcError:
                return  # killed before it was answered
            record("open", reply.session_id)

        def do_release(i: int) -> None:
            session_id, req = ready[i]
            try:
                stubs[OPENS + i].ReleaseSecret(req, timeout=30)
            except grpc.RpcError:
                return
            record("release", session_id)

        with concurrent.futures.ThreadPoolExecutor(max_workers=OPENS + RELEASES) as pool:
            futures = [pool.submit(do_open, i) for i in range(OPENS)]
            futures += [pool.submit(do_release, i) for i in range(RELEASES)]
            for f in futures:
                f.result()
        proc.wait(timeout=10)
        assert killed.is_set() and proc.returncode == -signal.SIGKILL
        assert len(answered_opens) + len(answered_releases) == KILL_AFTER

        # Restarted on the same database: its start checks the database and the audit log's tail.
        proc = start_owner(tmp_path, tls_dir, emu_root_file, publisher, port, db=db)
        wait_serving(address, tls_dir, proc)
        sessions = {
            s.session_id: s.state
            for s in h.admin.ListSessions(owner_pb2.ListSessionsRequest(limit=1000)).sessions
        }
        for session_id in answered_opens:
            assert sessions.get(session_id) == owner_pb2.OWNER_SESSION_STATE_OPEN
        for session_id in answered_releases:
            assert sessions.get(session_id) == owner_pb2.OWNER_SESSION_STATE_RELEASED
        audit = _audit(h)
        allowed = {(r.action, r.session_id) for r in audit if r.outcome == "allowed"}
        for session_id in answered_opens:
            assert ("open_session", session_id) in allowed
        for session_id in answered_releases:
            assert ("release_secret", session_id) in allowed
        assert [r.seq for r in audit] == list(range(1, len(audit) + 1))
    finally:
        proc.kill()
        proc.wait(timeout=15)
    # The offline check of the whole chain, links, hashes and MACs, up to the MACed head.
    assert cli_main(["owner", "audit", "verify", "--db", db, "--kek-file", str(tmp_path / "kek")]) == 0
    assert "MACs verified" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ the batch


def _record(session_id: str) -> SessionRecord:
    now = time.time()
    return SessionRecord(
        session_id=session_id,
        workload_id="web",
        caller="launcher",
        policy=SEV_POLICY,
        generation="emulated",
        cek_fingerprint="00" * 32,
        godh_cert=b"g",
        session_blob=b"b",
        sealed_keys=b"k",
        created_at=now,
        expires_at=now + 300,
    )


def _event(session_id: str, action: str = "open_session") -> AuditEvent:
    return AuditEvent(
        actor="launcher", action=action, outcome="allowed", session_id=session_id, workload_id="web"
    )


@pytest.fixture
def store(tmp_path: Path) -> Any:
    # The batch mechanics on a real database (the server's hot path commits on the event loop instead
    # and shares the fsyncs: test_owner_walflush.py).
    s = SQLiteStore(tmp_path / "owner.db", audit_mac_key=b"k" * 32, group_commit=True)
    s.put_workload("web", "{}", AuditEvent(actor="admin", action="put_workload", outcome="allowed"))
    yield s
    s.close()


def _held(group: GroupCommit) -> threading.Event:
    """Holds the writer inside a batch until the returned event is set, so the next writes queue."""
    release = threading.Event()
    entered = threading.Event()

    def hold(tx: Any) -> None:
        entered.set()
        release.wait(10)

    threading.Thread(target=group.submit, args=(hold,), daemon=True).start()
    assert entered.wait(10)
    return release


def _wait_queued(group: GroupCommit, n: int) -> None:
    deadline = time.monotonic() + 10
    while group.queued() < n:  # the test waits for the calls to be queued
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_writes_queued_during_a_commit_share_the_next_one(store: Any) -> None:
    group = store.group_commit
    before_batches, before_jobs = group.batches, group.jobs
    release = _held(group)
    ids = [f"{i:032x}" for i in range(10)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        futures = [pool.submit(store.insert_session, _record(i), _event(i)) for i in ids]
        _wait_queued(group, 10)
        assert not any(f.done() for f in futures)  # nobody answered before the COMMIT
        release.set()
        for f in futures:
            f.result(timeout=10)
    assert (group.batches - before_batches, group.jobs - before_jobs) == (2, 11)  # the hold, then all ten
    assert {s.session_id for s in store.list_sessions("web", 100)} == set(ids)
    records = store.audit_records(0, 100)
    assert sorted(r.event.session_id for r in records[1:]) == ids
    assert store.check_integrity().seq == 11


def test_a_failing_write_is_rolled_back_alone(store: Any) -> None:
    store.insert_session(_record("a" * 32), _event("a" * 32))
    release = _held(store.group_commit)
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        ok1 = pool.submit(store.insert_session, _record("b" * 32), _event("b" * 32))
        _wait_queued(store.group_commit, 1)
        dup = pool.submit(store.insert_session, _record("a" * 32), _event("a" * 32))  # a duplicate key
        _wait_queued(store.group_commit, 2)
        ok2 = pool.submit(store.insert_session, _record("c" * 32), _event("c" * 32))
        _wait_queued(store.group_commit, 3)
        release.set()
        ok1.result(timeout=10)
        ok2.result(timeout=10)
        with pytest.raises(StoreIntegrityError):
            dup.result(timeout=10)
    # In the order they were queued, the refused duplicate leaving no record.
    assert [r.event.session_id for r in store.audit_records(0, 100)[1:]] == ["a" * 32, "b" * 32, "c" * 32]
    assert store.check_integrity().seq == 4


def test_two_releases_of_one_session_in_one_batch_one_wins(store: Any) -> None:
    sid = "d" * 32
    store.insert_session(_record(sid), _event(sid))
    release = _held(store.group_commit)

    def finish() -> bool:
        return bool(
            store.finish_session(
                sid,
                to_state=SessionState.RELEASED,
                now=time.time(),
                require_unexpired=True,
                matched_digest="ab",
                reason="",
                event=_event(sid, "release_secret"),
            )
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(finish) for _ in range(8)]
        _wait_queued(store.group_commit, 8)
        release.set()
        wins = [f.result(timeout=10) for f in futures]
    assert wins.count(True) == 1
    assert [r.event.action for r in store.audit_records(0, 100)[1:]] == ["open_session", "release_secret"]


def test_a_failed_commit_fails_every_write_of_the_batch(store: Any) -> None:
    store.insert_session(_record("e" * 32), _event("e" * 32))
    store.db.limit_pages()  # the disk is full: no new page can be written
    release = _held(store.group_commit)
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        futures = [
            pool.submit(store.insert_session, _record(f"{i:032x}"), _event(f"{i:032x}")) for i in range(20)
        ]
        _wait_queued(store.group_commit, 20)
        release.set()
        errors = [f.exception(timeout=10) for f in futures]
    assert all(isinstance(e, StoreUnavailable) for e in errors), errors
    assert [s.session_id for s in store.list_sessions("web", 100)] == ["e" * 32]
    store.db.limit_pages(1 << 30)
    assert store.check_integrity().seq == 2
    store.insert_session(_record("f" * 32), _event("f" * 32))  # the writer still serves
    assert store.check_integrity().seq == 3


def test_closed_store_refuses_writes(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "owner.db", audit_mac_key=b"k" * 32)
    s.close()
    with pytest.raises(StoreUnavailable):
        s.append_audit(AuditEvent(actor="admin", action="x", outcome="allowed"))
