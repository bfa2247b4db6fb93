"""Two `sevlaunch-owner` processes over mTLS on one PostgreSQL database (owner_replicas.py).

Reference values imported or revoked on A count on B without a restart; open on A and release on B;
50 concurrent releases across both yield one secret; the audit chain verifies after concurrent activity;
SIGKILL of one replica mid-way leaves the other serving and the chain intact; `sevlaunch owner audit
verify --db postgresql://...`. And issue 12 item 12, PostgreSQL faults: the server stopped mid-release,
a replica killed mid-release; nothing is released without its audit record, calls are UNAVAILABLE
(`store_unavailable`) while the database is gone, and the service resumes by itself.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import owner_support
import pg_fixture
import psycopg
import pytest
from owner_replicas import OUTAGE_DB_WAIT, Replica, audit_of, open_launch
from owner_support import SEV_POLICY, Publisher, emulator_chain, secret_area

from owner_svc.adapters.postgres import PostgresStore
from sevlaunch.cli import main as cli_main
from sevlaunch.ownerdb import load_kek, verify_audit_db
from sevlaunch.rpc import error_info
from sevlaunch.rpc.v1 import owner_pb2

# The owner fixtures, PostgreSQL, and the `replicas` fixture (two owner processes on one database).
pytest_plugins = ["owner_support", "pg_fixture", "owner_replicas"]


def test_open_on_one_replica_release_on_the_other(
    replicas: tuple[Replica, Replica], emu: Any, pg_dsn: str, tmp_path: Path
) -> None:
    a, b = replicas
    opened, run = open_launch(a, emu)
    released = b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    # B opened TEK/TIK sealed by A (one KEK): the firmware accepts the packaged secret.
    base, _ = secret_area()
    emu.launch_secret(run.handle, released.secret_header, released.secret_payload, base)
    emu.decommission(run.handle)
    with pytest.raises(grpc.RpcError) as info:
        a.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(info.value).reason == "session_already_used"
    sessions = b.admin.ListSessions(owner_pb2.ListSessionsRequest(workload_id="web"))
    assert [s.session_id for s in sessions.sessions] == [opened.session_id]
    audit_of(pg_dsn, tmp_path)


def test_reference_values_imported_or_revoked_on_one_replica_count_on_the_other(
    replicas: tuple[Replica, Replica], emu: Any, publisher: Publisher, pg_dsn: str, tmp_path: Path
) -> None:
    a, b = replicas
    first = a.admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests
    assert [
        m.manifest_id for m in b.admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests
    ] == [m.manifest_id for m in first]
    # Imported on A (by the fixture, after B started): B opens and releases without a restart.
    opened, run = open_launch(b, emu)
    released = b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    assert released.manifest_id == first[0].manifest_id
    emu.decommission(run.handle)

    # A revocation imported on A stops B at once: a session B opened before is refused (and spent), and
    # B opens no new one.
    opened, run = open_launch(b, emu)
    revoking = publisher.envelope(
        digests=owner_support.reference_digests(b"\0" * 4096 + owner_support.OVMF_IMAGE),
        version="2023.01",
        revokes=(first[0].manifest_id,),
    )
    a.admin.ImportReferenceValues(owner_pb2.ImportReferenceValuesRequest(envelope=revoking))
    err = owner_support.rpc_error(
        lambda: b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "no_reference_values")
    emu.decommission(run.handle)
    err = owner_support.rpc_error(
        lambda: b.stub().OpenSession(
            owner_pb2.OpenSessionRequest(workload_id="web", chain=emulator_chain(emu), policy=SEV_POLICY)
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "no_reference_values")
    in_force_b = b.admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests
    assert first[0].manifest_id not in {m.manifest_id for m in in_force_b}

    # New reference values imported on B serve a session opened on A.
    b.admin.ImportReferenceValues(
        owner_pb2.ImportReferenceValuesRequest(
            envelope=publisher.envelope(digests=owner_support.reference_digests(), version="2024.06")
        )
    )
    opened, run = open_launch(a, emu)
    b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    emu.decommission(run.handle)
    records = audit_of(pg_dsn, tmp_path)
    imports = [r.event for r in records if r.event.action == "import_reference_values"]
    assert [e.outcome for e in imports] == ["allowed"] * 3  # each manifest stored once, by one replica


def test_audit_verify_command_reads_postgresql(
    replicas: tuple[Replica, Replica],
    emu: Any,
    pg_dsn: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    postgres_server: pg_fixture.PostgresServer,
) -> None:
    """`sevlaunch owner audit verify --db postgresql://...`: the same verifier as for a SQLite file, the
    MACs checked with the replicas' KEK, in one read-only snapshot."""
    a, b = replicas
    opened, run = open_launch(a, emu)
    b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    emu.decommission(run.handle)
    count = len(audit_of(pg_dsn, tmp_path))
    assert verify_audit_db(pg_dsn) == count
    capsys.readouterr()
    kek_args = ["--kek-file", str(tmp_path / "kek")]
    assert cli_main(["owner", "audit", "verify", "--db", pg_dsn, *kek_args]) == 0
    assert capsys.readouterr().out.strip() == f"audit log intact: {count} records, MACs verified"

    # Another KEK: the MACs do not verify.
    (tmp_path / "other.kek").write_bytes(b"o" * 32)
    (tmp_path / "other.kek").chmod(0o600)
    assert (
        cli_main(["owner", "audit", "verify", "--db", pg_dsn, "--kek-file", str(tmp_path / "other.kek")]) == 1
    )
    assert "MAC does not verify" in capsys.readouterr().err
    # A superuser edits a record (triggers off): the hash shows it; then a cut tail shows against the head.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit DISABLE TRIGGER USER")
        original = conn.execute("SELECT canonical FROM audit WHERE seq = 2").fetchone()
        assert original is not None
        conn.execute("UPDATE audit SET canonical = replace(canonical, 'allowed', 'refused') WHERE seq = 2")
        assert cli_main(["owner", "audit", "verify", "--db", pg_dsn]) == 1
        assert "audit record 2: content does not match its hash" in capsys.readouterr().err
        conn.execute("UPDATE audit SET canonical = %s WHERE seq = 2", (original[0],))
        assert cli_main(["owner", "audit", "verify", "--db", pg_dsn, *kek_args]) == 0
        conn.execute("DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)")
        capsys.readouterr()
        assert cli_main(["owner", "audit", "verify", "--db", pg_dsn]) == 1
        assert "truncated or edited" in capsys.readouterr().err
    # The command only reads: the rows it verified are still there, nothing was added.
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM audit").fetchone() == (count - 1,)

    # An empty database on the PostgreSQL store (head at seq 0) verifies as 0 records; an unreachable
    # server is one line naming it without the password.
    fresh = postgres_server.new_database()
    PostgresStore(fresh, audit_mac_key=None).close()
    assert verify_audit_db(fresh) == 0
    capsys.readouterr()
    nowhere = f"postgresql://u:s3cret@/db?host={tmp_path}/none&connect_timeout=2&sslpassword=k3ypass"
    assert cli_main(["owner", "audit", "verify", "--db", nowhere]) == 1
    err_text = capsys.readouterr().err
    assert "PostgreSQL (" in err_text and "s3cret" not in err_text and "k3ypass" not in err_text
    assert "dbname=db" in err_text and "user=u" in err_text


def test_concurrent_releases_across_replicas_yield_one_secret(
    replicas: tuple[Replica, Replica], emu: Any, pg_dsn: str, tmp_path: Path
) -> None:
    a, b = replicas
    opened, run = open_launch(b, emu)
    request = run.release_request(opened.session_id, SEV_POLICY)
    stubs = [a.stub(), b.stub()]
    barrier = threading.Barrier(50)

    def release(i: int) -> Any:
        barrier.wait()
        try:
            return stubs[i % 2].ReleaseSecret(request, timeout=60)
        except grpc.RpcError as exc:
            return exc

    # Meanwhile, other sessions open on both replicas: more audit appends racing the releases.
    with ThreadPoolExecutor(max_workers=60) as pool:
        results = list(pool.map(release, range(50)))
        others = list(pool.map(lambda r: open_launch(r, emu), [a, b] * 4))
    wins = [r for r in results if isinstance(r, owner_pb2.ReleaseSecretResponse)]
    losses = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(wins) == 1 and len(losses) == 49
    assert {(e.code(), error_info(e).reason) for e in losses} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "session_already_used")
    }
    base, _ = secret_area()
    emu.launch_secret(run.handle, wins[0].secret_header, wins[0].secret_payload, base)
    emu.decommission(run.handle)

    records = audit_of(pg_dsn, tmp_path)
    releases = [r.event for r in records if r.event.action == "release_secret"]
    assert [e.outcome for e in releases].count("allowed") == 1
    assert [e.reason for e in releases if e.outcome == "refused"] == ["session_already_used"] * 49
    opens = [r for r in records if r.event.action == "open_session" and r.event.outcome == "allowed"]
    assert len(opens) == 1 + len(others)
    for _, other in others:
        emu.decommission(other.handle)


def test_sigkill_of_one_replica_leaves_the_other_serving(
    replicas: tuple[Replica, Replica], emu: Any, pg_dsn: str, tmp_path: Path
) -> None:
    a, b = replicas
    before = [open_launch(a, emu) for _ in range(3)]  # opened on A, to be released on B after A dies
    stop = threading.Event()
    outcomes: dict[str, list[str]] = {"a": [], "b": []}

    def hammer(replica: Replica) -> None:
        # Audited refusals on both replicas (unknown sessions), racing the kill.
        stub = replica.stub()
        n = 0
        while not stop.is_set():
            n += 1
            try:
                stub.ReleaseSecret(before[0][1].release_request(f"{n % 10:032x}", SEV_POLICY), timeout=5)
            except grpc.RpcError as exc:
                outcomes[replica.name].append(exc.code().name)

    threads = [threading.Thread(target=hammer, args=(r,)) for r in (a, b, a, b)]
    for t in threads:
        t.start()
    # The kill races calls in flight on both replicas: it comes once each has answered some.
    owner_support.wait_for(
        lambda: "NOT_FOUND" in outcomes["a"] and "NOT_FOUND" in outcomes["b"], timeout=30, interval=0.01
    )
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(timeout=10)
    count_b = len(outcomes["b"])
    owner_support.wait_for(lambda: len(outcomes["b"]) > count_b + 5, timeout=30, interval=0.01)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert "NOT_FOUND" in outcomes["a"] and set(outcomes["a"]) <= {"NOT_FOUND", "UNAVAILABLE", "CANCELLED"}
    assert set(outcomes["b"]) == {"NOT_FOUND"} and len(outcomes["b"]) > count_b  # B kept going

    # B serves A's sessions (the store is shared) and opens new ones.
    base, _ = secret_area()
    for opened, run in before:
        released = b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
        emu.launch_secret(run.handle, released.secret_header, released.secret_payload, base)
        emu.decommission(run.handle)
    opened, run = open_launch(b, emu)
    b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    emu.decommission(run.handle)
    # Whatever A was writing when it died was rolled back whole: the chain has no gap and no fork.
    records = audit_of(pg_dsn, tmp_path)
    assert sum(1 for r in records if r.event.action == "release_secret" and r.event.outcome == "allowed") == 4


# ------------------------------------------------------------------ PostgreSQL faults (issue 12 item 12)


def _allowed_releases(dsn: str, kek_file: Path, session_id: str) -> list[str]:
    """The outcomes of the session's release records, after the whole chain verified with the KEK."""
    assert verify_audit_db(dsn, load_kek(kek_file)) > 0
    store = PostgresStore(dsn, audit_mac_key=None)
    try:
        return [
            r.event.outcome
            for r in store.iter_audit()
            if r.event.action == "release_secret" and r.event.session_id == session_id
        ]
    finally:
        store.close()


def _until_served(call: Any, limit: float = 30.0) -> tuple[Any, float]:
    """Retries `call` while it is UNAVAILABLE; returns its reply and how long the wait was."""
    started = time.monotonic()
    while True:
        try:
            return call(), time.monotonic() - started
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() - started > limit:
                raise


def test_postgres_stopped_mid_release_releases_nothing_unaudited_and_the_owner_resumes(
    make_owner: Any,
    publisher: Publisher,
    emu: Any,
    pg_dsn: str,
    postgres_server: pg_fixture.PostgresServer,
) -> None:
    h = make_owner(db=pg_dsn, db_wait=OUTAGE_DB_WAIT)
    owner_support.provision(h, publisher)
    opened = h.stub().OpenSession(
        owner_pb2.OpenSessionRequest(workload_id="web", chain=emulator_chain(emu), policy=SEV_POLICY)
    )
    run = owner_support.launch(emu, opened)
    request = run.release_request(opened.session_id, SEV_POLICY)

    # The server goes down inside the release's transaction: the session moved to RELEASED and its
    # audit record written, not yet committed.
    db = h.app.store.db

    def outage() -> None:
        db.before_commit = None
        postgres_server.halt()

    db.before_commit = outage
    try:
        err = owner_support.rpc_error(lambda: h.stub().ReleaseSecret(request))
        assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "store_unavailable")
        # While the database is gone every call that needs it is typed UNAVAILABLE.
        for call in (
            lambda: h.stub().ReleaseSecret(request),
            lambda: h.stub().OpenSession(
                owner_pb2.OpenSessionRequest(workload_id="web", chain=emulator_chain(emu), policy=SEV_POLICY)
            ),
            lambda: h.admin.ListSessions(owner_pb2.ListSessionsRequest()),
        ):
            err = owner_support.rpc_error(call)
            assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "store_unavailable")
    finally:
        if db.before_commit is not None:
            db.before_commit = None
        else:
            postgres_server.resume()

    # Nothing was released: the session is still open, with no release record. The owner was not
    # restarted: it serves again by itself, and the launch gets its secret once.
    assert _allowed_releases(pg_dsn, h.config.kek_file, opened.session_id) == []
    released, waited = _until_served(lambda: h.stub().ReleaseSecret(request))
    assert waited < 15
    base, _ = secret_area()
    emu.launch_secret(run.handle, released.secret_header, released.secret_payload, base)
    emu.decommission(run.handle)
    assert _allowed_releases(pg_dsn, h.config.kek_file, opened.session_id) == ["allowed"]
    err = owner_support.rpc_error(lambda: h.stub().ReleaseSecret(request))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "session_already_used")


def test_replica_killed_mid_release_leaves_one_release_with_its_audit_record(
    replicas: tuple[Replica, Replica], emu: Any, pg_dsn: str, tmp_path: Path
) -> None:
    """A is killed inside its release transaction (deterministically: the test holds the audit head's
    row lock, so A waits there after moving the session); B then releases the same session, once."""
    a, b = replicas
    opened, run = open_launch(a, emu)
    request = run.release_request(opened.session_id, SEV_POLICY)
    outcome: dict[str, Any] = {}

    def release_on_a() -> None:
        try:
            outcome["a"] = a.stub().ReleaseSecret(request, timeout=60)
        except grpc.RpcError as exc:
            outcome["a"] = exc

    with psycopg.connect(pg_dsn) as holder, psycopg.connect(pg_dsn, autocommit=True) as watcher:
        holder.execute("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")
        thread = threading.Thread(target=release_on_a)
        thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sevlaunch-owner' "
                "AND wait_event_type = 'Lock' AND query LIKE 'SELECT seq, hash, mac FROM audit_head%'"
            ).fetchone()
            if waiting is not None and waiting[0] == 1:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("replica A never reached the audit head inside its release")
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)
        thread.join(timeout=30)
        holder.rollback()
    assert isinstance(outcome["a"], grpc.RpcError) and outcome["a"].code() == grpc.StatusCode.UNAVAILABLE

    released = b.stub().ReleaseSecret(request, timeout=60)
    base, _ = secret_area()
    emu.launch_secret(run.handle, released.secret_header, released.secret_payload, base)
    emu.decommission(run.handle)
    assert _allowed_releases(pg_dsn, tmp_path / "kek", opened.session_id) == ["allowed"]
    err = owner_support.rpc_error(lambda: b.stub().ReleaseSecret(request))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "session_already_used")


def test_replicas_are_unavailable_while_postgres_is_down_and_resume_by_themselves(
    outage_replicas: tuple[Replica, Replica],
    emu: Any,
    pg_dsn: str,
    tmp_path: Path,
    postgres_server: pg_fixture.PostgresServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = outage_replicas
    pending = open_launch(a, emu)
    request = owner_pb2.OpenSessionRequest(workload_id="web", chain=emulator_chain(emu), policy=SEV_POLICY)
    postgres_server.halt()
    try:
        for replica in (a, b):
            err = owner_support.rpc_error(lambda replica=replica: replica.stub().OpenSession(request))
            assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "store_unavailable")
        opened, run = pending
        err = owner_support.rpc_error(
            lambda: b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
        )
        assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "store_unavailable")
    finally:
        postgres_server.resume()
    for replica in (a, b):
        _, waited = _until_served(lambda replica=replica: replica.stub().OpenSession(request))
        assert waited < 15
    opened, run = pending
    b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    emu.decommission(run.handle)
    assert _allowed_releases(pg_dsn, tmp_path / "kek", opened.session_id) == ["allowed"]

    # On shutdown B logs its last checkpoint (JSON): the log still holds it.
    b.proc.send_signal(signal.SIGTERM)
    b.proc.wait(timeout=30)
    lines = [json.loads(line) for line in b.log.read_text().splitlines()]
    checkpoint = [line for line in lines if line["message"] == "audit checkpoint"][-1]["checkpoint"]
    capsys.readouterr()
    kek = ["--kek-file", str(tmp_path / "kek")]
    assert cli_main(["owner", "audit", "verify", "--db", pg_dsn, *kek, "--checkpoint", checkpoint]) == 0
