"""The owner's store on a real PostgreSQL server (pg_fixture.py), and two owner replicas sharing it.

1. The store contract, run against both adapters (SQLite and PostgreSQL): migrations, rows, the
   one-release-per-session conditional update, manifests and the reference value generation, the
   append-only hash-chained audit log, and several store instances (replicas) appending concurrently;
   two owner cores over two store instances keeping their reference values in step with the store.
2. PostgreSQL specifics: replicas migrating together, `open_store` choosing the adapter, broken
   connections replaced.
3. Two `sevlaunch-owner` processes over mTLS on one database: reference values imported or revoked on
   A count on B without a restart; open on A and release on B; 50 concurrent releases across both yield
   one secret; the audit chain verifies after concurrent activity; SIGKILL of one replica mid-way leaves
   the other serving and the chain intact; `sevlaunch owner audit verify --db postgresql://...`.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pg_fixture
import psycopg
import pytest
import test_owner_support as support
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_owner_support import SEV_POLICY, Publisher, emulator_chain, launch, provision, secret_area

from owner_svc.adapters import postgres as pg_adapter
from owner_svc.adapters import sqlite as sqlite_adapter
from owner_svc.adapters.kek import KeyEncryptionKey
from owner_svc.adapters.postgres import PostgresStore
from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.adapters.store import StoreConfigError, open_store
from owner_svc.core.audit import verify_records
from owner_svc.core.model import AuditEvent, SessionRecord, SessionState
from owner_svc.core.refset import ReferenceValueSet
from owner_svc.core.service import OwnerCore
from sevlaunch import dsn as sevlaunch_dsn
from sevlaunch.audit import AuditChainBroken
from sevlaunch.cli import main as cli_main
from sevlaunch.cli.owner import verify_audit_db
from sevlaunch.refvalues import KeyType, PublisherKey, generate_private_key
from sevlaunch.rpc import error_info, secure_channel_sync
from sevlaunch.rpc.v1 import owner_pb2, owner_pb2_grpc

# Shared fixtures, registered in this module by name.
postgres_server = pg_fixture.postgres_server
pg_dsn = pg_fixture.pg_dsn
emu = support.emu
emu_root = support.emu_root
emu_root_file = support.emu_root_file
publisher = support.publisher

MAC_KEY = b"m" * 32

# ------------------------------------------------------------------------------ store contract


@dataclass
class Backend:
    """Opens stores at one location (a SQLite file or a PostgreSQL database) and pokes it with raw SQL."""

    name: str
    location: str
    opened: list[Any] = field(default_factory=list)

    def open(self, mac_key: bytes | None = MAC_KEY, clock: Callable[[], float] = time.time) -> Any:
        if self.name == "sqlite":
            store: Any = SQLiteStore(self.location, audit_mac_key=mac_key, clock=clock)
        else:
            store = PostgresStore(self.location, audit_mac_key=mac_key, clock=clock)
        self.opened.append(store)
        return store

    @property
    def schema_version(self) -> int:
        return sqlite_adapter.SCHEMA_VERSION if self.name == "sqlite" else pg_adapter.SCHEMA_VERSION

    def raw(self, sql: str) -> None:
        """Runs `sql` in its own transaction, outside the store (an operator or an attacker with access)."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.location)
            try:
                conn.execute(sql)
                conn.commit()
            finally:
                conn.close()
        else:
            with psycopg.connect(self.location, autocommit=True) as pconn:
                pconn.execute(sql.encode())

    def close(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        b = Backend("sqlite", str(tmp_path / "owner.db"))
    else:
        b = Backend("postgres", request.getfixturevalue("pg_dsn"))
    yield b
    b.close()


def _session(
    sid: str, *, workload: str = "w", created: float = 0.0, expires_at: float = 1e12
) -> SessionRecord:
    return SessionRecord(
        session_id=sid,
        workload_id=workload,
        caller="launcher",
        policy=3,
        generation="milan",
        cek_fingerprint="ab",
        godh_cert=b"godh\x00\xff",
        session_blob=b"blob\x00",
        sealed_keys=b"sealed\x01\x02",
        created_at=created,
        expires_at=expires_at,
    )


def _event(action: str = "x", outcome: str = "allowed", **kw: str) -> AuditEvent:
    return AuditEvent(actor="tester", action=action, outcome=outcome, **kw)


def _finish(store: Any, sid: str, *, to: SessionState = SessionState.RELEASED, now: float = 1.0) -> bool:
    return bool(
        store.finish_session(
            sid,
            to_state=to,
            now=now,
            require_unexpired=to is SessionState.RELEASED,
            matched_digest="d" if to is SessionState.RELEASED else "",
            reason="" if to is SessionState.RELEASED else "session_expired",
            event=_event("release_secret"),
        )
    )


def _verify(store: Any, mac_key: bytes | None = MAC_KEY) -> int:
    return verify_records(store.iter_audit(), head=store.audit_head(), mac_key=mac_key)


def test_migrations_are_versioned_and_idempotent(backend: Backend) -> None:
    store = backend.open()
    assert store.schema_version() == backend.schema_version >= 1
    assert store.audit_head() is None and list(store.iter_audit()) == []
    store.close()
    again = backend.open()  # migrating again is a no-op
    assert again.schema_version() == backend.schema_version
    assert _verify(again) == 0
    again.close()
    table = "sevlaunch_owner_schema SET version = 99" if backend.name == "postgres" else None
    if table:
        backend.raw(f"UPDATE {table}")
    else:
        backend.raw("PRAGMA user_version = 99")
    with pytest.raises(Exception, match="newer than this code"):
        backend.open()


def test_workloads_and_sealed_secrets(backend: Backend) -> None:
    store = backend.open()
    assert store.get_workload("w") is None and store.get_secret("w") is None
    store.put_workload("w", '{"v": 1}', _event("put_workload"))
    store.put_workload("w", '{"v": 2}', _event("put_workload"))
    assert store.get_workload("w") == '{"v": 2}'
    store.put_secret("w", b"\x00ciphertext\xff", _event("put_secret"))
    store.put_secret("w", b"\x00other\xff", _event("put_secret"))
    assert store.get_secret("w") == b"\x00other\xff"
    # A secret needs its workload; the failed write leaves no audit record either (one transaction).
    with pytest.raises(Exception):  # noqa: B017 - sqlite3.IntegrityError / psycopg ForeignKeyViolation
        store.put_secret("nope", b"x", _event("put_secret"))
    assert store.get_secret("nope") is None
    assert _verify(store) == 4


def test_sessions_round_trip_and_listing(backend: Backend) -> None:
    store = backend.open()
    records = [
        _session("a" * 32, workload="w1", created=1.5),
        _session("b" * 32, workload="w2", created=2.5),
        _session("c" * 32, workload="w1", created=3.5),
    ]
    for r in records:
        store.insert_session(r, _event("open_session"))
    assert store.get_session("a" * 32) == records[0]
    assert store.get_session("f" * 32) is None
    assert [s.session_id for s in store.list_sessions("", 10)] == ["c" * 32, "b" * 32, "a" * 32]
    assert [s.session_id for s in store.list_sessions("w1", 10)] == ["c" * 32, "a" * 32]
    assert [s.session_id for s in store.list_sessions("", 1)] == ["c" * 32]
    with pytest.raises(Exception):  # noqa: B017 - a duplicate id: IntegrityError / UniqueViolation
        store.insert_session(records[0], _event("open_session"))
    assert _verify(store) == 3


def test_finish_session_lets_exactly_one_caller_win(backend: Backend) -> None:
    stores = [backend.open(), backend.open()]  # two replicas of the store, 20 threads across them
    stores[0].insert_session(_session("a" * 32), _event("open_session"))
    wins: list[bool] = []
    barrier = threading.Barrier(20)

    def claim(i: int) -> None:
        barrier.wait()
        wins.append(_finish(stores[i % 2], "a" * 32))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    done = stores[1].get_session("a" * 32)
    assert done is not None and done.state is SessionState.RELEASED and done.finished_at == 1.0
    assert done.matched_digest == "d"
    assert _verify(stores[0]) == 2  # the open, and the one winning release: losers wrote nothing

    # Expired: cannot be released, can still be retired; a finished session moves no more.
    stores[0].insert_session(_session("b" * 32, expires_at=5.0), _event("open_session"))
    assert not _finish(stores[0], "b" * 32, now=6.0)
    assert not _finish(stores[0], "b" * 32, now=5.0)  # expires_at > now is strict
    assert _finish(stores[1], "b" * 32, to=SessionState.REFUSED, now=6.0)
    assert not _finish(stores[0], "b" * 32, to=SessionState.REVOKED, now=7.0)
    refused = stores[0].get_session("b" * 32)
    assert refused is not None and refused.state is SessionState.REFUSED
    assert refused.reason == "session_expired"
    assert not _finish(stores[0], "f" * 32)  # unknown session


def test_manifests_and_revocations(backend: Backend) -> None:
    store = backend.open()
    store.put_manifest("m1", b"envelope-1", "admin", _event("import_reference_values"))
    store.put_manifest("m2", b"envelope-2", "poller:https://x", _event("import_reference_values"))
    store.put_manifest("m1", b"ignored", "again", _event("import_reference_values"))
    assert store.list_manifests() == [
        ("m1", b"envelope-1", "admin"),
        ("m2", b"envelope-2", "poller:https://x"),
    ]
    store.add_revocations(["m1", "m0"], "m2")
    store.add_revocations(["m1"], "m3")
    assert store.revoked_manifests() == {"m1", "m0"}
    assert _verify(store) == 3


def test_refvalues_generation_moves_with_every_manifest_and_revocation(backend: Backend) -> None:
    a, b = backend.open(), backend.open()  # two replicas
    g0 = b.refvalues_generation()
    assert b.load_refvalues() == (g0, [], set())
    a.put_manifest("m1", b"envelope-1", "admin", _event("import_reference_values"))
    g1 = b.refvalues_generation()
    assert g1 > g0
    a.put_manifest("m2", b"envelope-2", "admin", _event("import_reference_values"), revokes=["m1", "m0"])
    g2 = b.refvalues_generation()
    assert g2 > g1
    # The manifest, its revocations and the generation move in one transaction.
    assert b.load_refvalues() == (g2, [("m1", b"envelope-1"), ("m2", b"envelope-2")], {"m0", "m1"})
    assert b.revoked_manifests() == {"m0", "m1"}
    b.add_revocations(["m9"], "admin")
    assert a.refvalues_generation() > g2 and a.load_refvalues()[2] == {"m0", "m1", "m9"}
    # Reads move nothing; the audit records the two imports only.
    assert a.refvalues_generation() == b.refvalues_generation()
    assert _verify(a) == 2


def _core(store: Any, publishers: list[PublisherKey]) -> OwnerCore:
    return OwnerCore(store, KeyEncryptionKey(b"k" * 32), ReferenceValueSet(publishers))


def test_reference_values_follow_the_store_across_replicas(
    backend: Backend, publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    """Two owner cores over two store instances (two replicas): what one imports or revokes counts on the
    other at its next call; what the store holds is re-verified by each, never trusted for being there."""
    keys = [PublisherKey.from_pem(publisher.pub_file.read_bytes())]
    a, b = _core(backend.open(), keys), _core(backend.open(), keys)
    a.sync_reference_values()
    b.sync_reference_values()
    assert a.reference_values_in_force() == b.reference_values_in_force() == []

    first, new = a.import_reference_values(
        "admin", publisher.envelope(digests=support.reference_digests()), "t"
    )
    assert new
    assert [vm.id for vm in b.reference_values_in_force()] == [first.id]
    # Reloaded only when the generation moved: a call that finds it unchanged reads nothing else.
    loads: list[int] = []
    real_load = b.store.load_refvalues
    b.store.load_refvalues = lambda: loads.append(1) or real_load()  # type: ignore[method-assign]
    for _ in range(3):
        b.sync_reference_values()
    assert loads == []
    # Importing it again through B: already in force there (from the store), so no second row or record.
    assert b.import_reference_values("admin", first.envelope, "t")[1] is False

    # A revocation imported through A takes the first manifest out of force on B.
    revoking, _ = a.import_reference_values(
        "admin",
        publisher.envelope(
            digests=support.reference_digests(b"\0" * 4096 + support.OVMF_IMAGE),
            version="2024.06",
            revokes=(first.id,),
        ),
        "t",
    )
    assert [vm.id for vm in b.reference_values_in_force()] == [revoking.id]
    # And an import of the revoked manifest through B is refused as revoked.
    with pytest.raises(Exception, match="revoked"):
        b.import_reference_values("admin", first.envelope, "t")

    # A row written straight into the store (signed by a key this owner does not trust) is not trusted.
    rogue = support.Publisher(generate_private_key(KeyType.ED25519), publisher.pub_file)
    forged = rogue.envelope(
        digests=support.reference_digests(b"\1" * 4096 + support.OVMF_IMAGE), version="2024.07"
    )
    hex_env = forged.hex()
    backend.raw(
        f"INSERT INTO manifests (manifest_id, envelope, source, imported_at) VALUES "
        f"('{'f' * 64}', {_blob(backend, hex_env)}, 'sql', 1e10)"
    )
    backend.raw("UPDATE refvalues_generation SET generation = generation + 1")
    with caplog.at_level("WARNING", logger="owner_svc.core"):
        assert [vm.id for vm in b.reference_values_in_force()] == [revoking.id]
    assert any(r.getMessage() == "stored reference values do not verify" for r in caplog.records)
    # A replica configured with another key holds none of them (re-verified on load, per replica).
    other_key = PublisherKey(generate_private_key(KeyType.ED25519).public_key())
    c = _core(backend.open(), [other_key])
    assert c.reference_values_in_force() == []
    # A revocation row written straight into the store only ever takes reference values out of force.
    backend.raw(
        "INSERT INTO revoked_manifests (manifest_id, revoked_by, revoked_at) "
        f"VALUES ('{revoking.id}', 'sql', 1)"
    )
    backend.raw("UPDATE refvalues_generation SET generation = generation + 1")
    assert a.reference_values_in_force() == b.reference_values_in_force() == []


_REFVALUE_TRIGGERS = {
    "sqlite": [
        "DROP TRIGGER manifests_no_update",
        "DROP TRIGGER manifests_no_delete",
        "DROP TRIGGER revoked_manifests_no_update",
        "DROP TRIGGER revoked_manifests_no_delete",
    ],
    "postgres": [
        "DROP TRIGGER manifests_no_update ON manifests",
        "DROP TRIGGER manifests_no_truncate ON manifests",
        "DROP TRIGGER revoked_manifests_no_update ON revoked_manifests",
        "DROP TRIGGER revoked_manifests_no_truncate ON revoked_manifests",
    ],
}


def test_revocations_cannot_be_undone_through_the_database(backend: Backend, publisher: Publisher) -> None:
    """Deleting the revoking manifest and the revocation rows (and bumping the generation) would put a
    revoked, validly signed manifest back in force on every replica: the tables refuse UPDATE and DELETE
    (and TRUNCATE), and even with the triggers dropped a running replica never forgets a revocation."""
    keys = [PublisherKey.from_pem(publisher.pub_file.read_bytes())]
    a, b = _core(backend.open(), keys), _core(backend.open(), keys)
    first, _ = a.import_reference_values(
        "admin", publisher.envelope(digests=support.reference_digests()), "t"
    )
    revoking, _ = a.import_reference_values(
        "admin",
        publisher.envelope(
            digests=support.reference_digests(b"\0" * 4096 + support.OVMF_IMAGE),
            version="2024.06",
            revokes=(first.id,),
        ),
        "t",
    )
    assert [vm.id for vm in b.reference_values_in_force()] == [revoking.id]

    undo = [
        f"DELETE FROM revoked_manifests WHERE manifest_id = '{first.id}'",
        f"UPDATE revoked_manifests SET manifest_id = 'x' WHERE manifest_id = '{first.id}'",
        f"DELETE FROM manifests WHERE manifest_id = '{revoking.id}'",
        f"UPDATE manifests SET envelope = {_blob(backend, '00')} WHERE manifest_id = '{revoking.id}'",
    ]
    if backend.name == "postgres":
        undo += ["TRUNCATE revoked_manifests", "TRUNCATE manifests CASCADE"]
    for sql in undo:
        with pytest.raises(Exception, match="append-only"):
            backend.raw(sql)
    backend.raw("UPDATE refvalues_generation SET generation = generation + 1")
    assert [vm.id for vm in b.reference_values_in_force()] == [revoking.id]

    # Someone with the rights to drop the triggers: the running replicas keep what they revoked.
    for sql in _REFVALUE_TRIGGERS[backend.name]:
        backend.raw(sql)
    backend.raw(f"DELETE FROM manifests WHERE manifest_id = '{revoking.id}'")
    backend.raw("DELETE FROM revoked_manifests")
    backend.raw("UPDATE refvalues_generation SET generation = generation + 1")
    assert a.reference_values_in_force() == b.reference_values_in_force() == []
    with pytest.raises(Exception, match="revoked"):
        b.import_reference_values("admin", first.envelope, "t")


def _blob(backend: Backend, hex_text: str) -> str:
    return f"X'{hex_text}'" if backend.name == "sqlite" else f"'\\x{hex_text}'::bytea"


def test_audit_chain_is_append_only_and_verifies(backend: Backend) -> None:
    store = backend.open()
    for i in range(5):
        store.append_audit(_event("open_session", "refused", workload_id=f"w{i}", reason="untrusted_root"))
    assert _verify(store) == 5
    records = list(store.audit_records(2, 2))
    assert [r.seq for r in records] == [3, 4] and records[0].event.workload_id == "w2"
    assert store.audit_head() == (5, list(store.iter_audit())[-1].hash)
    with pytest.raises(AuditChainBroken, match="MAC"):
        _verify(store, mac_key=b"another key" * 3)
    for sql in ("UPDATE audit SET mac = '' WHERE seq = 2", "DELETE FROM audit WHERE seq = 5"):
        with pytest.raises(Exception, match="append-only"):
            backend.raw(sql)
    if backend.name == "postgres":
        with pytest.raises(Exception, match="append-only"):
            backend.raw("TRUNCATE audit")
    assert _verify(store) == 5


def test_replicas_append_concurrently_without_forking_the_chain(backend: Backend) -> None:
    """Three store instances (as three owner replicas), eight threads each: every decision's write and
    its audit record in one transaction, the chain serialised across all of them."""
    stores = [backend.open() for _ in range(3)]
    per_thread = 12 if backend.name == "postgres" else 8

    def work(t: int) -> None:
        store = stores[t % len(stores)]
        for i in range(per_thread):
            sid = f"{t:02x}{i:02x}".ljust(32, "0")
            store.insert_session(_session(sid, created=float(t * 100 + i)), _event("open_session"))
            store.append_audit(_event("release_secret", "refused", session_id=sid, reason="bad_measurement"))
            _finish(store, sid)

    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(work, range(24)))
    expected = 24 * per_thread * 3
    for store in stores:
        assert _verify(store) == expected
    seqs = [r.seq for r in stores[1].iter_audit(batch=50)]
    assert seqs == list(range(1, expected + 1))


# ------------------------------------------------------------------------- PostgreSQL specifics


def test_replicas_starting_together_migrate_once(postgres_server: pg_fixture.PostgresServer) -> None:
    dsn = postgres_server.new_database()
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []
    stores: list[PostgresStore] = []

    def start() -> None:
        barrier.wait()
        try:
            stores.append(PostgresStore(dsn, audit_mac_key=MAC_KEY))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [] and len(stores) == 6
        assert {s.schema_version() for s in stores} == {pg_adapter.SCHEMA_VERSION}
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM audit_head").fetchone() == (1,)
            assert conn.execute("SELECT count(*) FROM sevlaunch_owner_schema").fetchone() == (1,)
        stores[0].append_audit(_event())
        assert _verify(stores[5]) == 1
    finally:
        for s in stores:
            s.close()


def test_open_store_chooses_the_adapter(tmp_path: Path, postgres_server: pg_fixture.PostgresServer) -> None:
    for spec in (
        tmp_path / "a.db",
        str(tmp_path / "b.db"),
        f"sqlite:{tmp_path}/c.db",
        f"sqlite://{tmp_path}/d.db",
    ):
        store = open_store(spec, audit_mac_key=None)
        assert isinstance(store, SQLiteStore)
        store.close()
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["a.db", "b.db", "c.db", "d.db"]
    store = open_store(postgres_server.new_database(), audit_mac_key=None)
    assert isinstance(store, PostgresStore)
    store.close()
    for bad, message in (
        ("mysql://u:pw@h/db", "unsupported store URL scheme 'mysql'"),
        ("sqlite://host/x.db", "local file"),
        ("", "empty"),
        ("postgresql://u:s3cret@h/db?nosuchoption=1", "not a valid PostgreSQL URL"),
    ):
        with pytest.raises(StoreConfigError, match=message) as info:
            open_store(bad, audit_mac_key=None)
        assert "s3cret" not in str(info.value)
    # Nothing listening: a one-line startup error naming the server, never the password.
    nowhere = f"postgresql://u:s3cret@/db?host={tmp_path}/none&connect_timeout=2&sslpassword=k3ypass"
    started = time.monotonic()
    with pytest.raises(StoreConfigError, match="cannot connect to PostgreSQL") as info:
        open_store(nowhere, audit_mac_key=None)
    assert "s3cret" not in str(info.value) and time.monotonic() - started < 10
    assert "k3ypass" not in str(info.value) and "dbname=db" in str(info.value)


def test_dsns_are_shown_by_an_allow_list() -> None:
    """Only conninfo keys known to hold no secret are shown; any other (password, sslpassword, and keys
    libpq may add later) is masked, so it cannot reach a log line or an error."""
    dsn = (
        "postgresql://owner:pw-1@db.example:5433/sevlaunch?sslmode=verify-full"
        "&sslpassword=key-pw-2&sslkey=/k/client.key&target_session_attrs=read-write"
    )
    for shown in (pg_adapter.redact_dsn(dsn), sevlaunch_dsn.redact_dsn(dsn)):
        assert "pw-1" not in shown and "key-pw-2" not in shown and "/k/client.key" not in shown
        for part in ("host=db.example", "port=5433", "dbname=sevlaunch", "user=owner", "sslmode=verify-full"):
            assert part in shown
        assert "password=***" in shown and "sslpassword=***" in shown
    assert sevlaunch_dsn.redact_dsn("host=h nosuchoption=1") == "<unparsable DSN>"
    text = "FATAL: bad key-pw-2 for pw-1 at db.example"
    assert sevlaunch_dsn.scrub(text, dsn) == "FATAL: bad *** for *** at db.example"


def test_broken_connections_are_replaced(postgres_server: pg_fixture.PostgresServer) -> None:
    """A server restart or failover kills the pool's connections; the next call reconnects."""
    dsn = postgres_server.new_database()
    store = PostgresStore(dsn, audit_mac_key=MAC_KEY)
    try:
        store.put_workload("w", "{}", _event())
        with psycopg.connect(dsn, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        assert store.get_workload("w") == "{}"
        store.append_audit(_event())
        assert _verify(store) == 2
    finally:
        store.close()


# ---------------------------------------------------------------- two owner replicas, one database


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[bytes]
    address: str
    tls_dir: Path
    log: Path

    def stub(self, identity: str = "launcher") -> owner_pb2_grpc.OwnerServiceStub:
        return owner_pb2_grpc.OwnerServiceStub(secure_channel_sync(self.address, self.tls_dir, identity))

    @property
    def admin(self) -> owner_pb2_grpc.OwnerServiceStub:
        return self.stub("owner-admin")


def _start_replica(
    name: str, dsn: str, tmp_path: Path, tls_dir: Path, emu_root_file: Path, pub: Path
) -> Replica:
    log = tmp_path / f"owner-{name}.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "owner_svc.server",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            str(tls_dir),
            "--db",
            dsn,
            "--kek-file",
            str(tmp_path / "kek"),
            "--trust-root",
            f"emulated={emu_root_file}",
            "--publisher-key",
            str(pub),
            "--metrics-listen",
            "",
            "--health-listen",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"owner {name} exited: {log.read_text()}")
        for line in log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg", entry.get("message")) == "server started":
                replica = Replica(name, proc, f"localhost:{entry['port']}", tls_dir, log)
                _wait_serving(replica)
                return replica
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"owner {name} did not start: {log.read_text()}")


def _wait_serving(replica: Replica) -> None:
    with secure_channel_sync(replica.address, replica.tls_dir, "client") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def replicas(
    pg_dsn: str, tmp_path: Path, tls_dir: Path, emu_root_file: Path, publisher: Publisher
) -> Iterator[tuple[Replica, Replica]]:
    """Two owner processes on one database and one KEK (the replicas of a Deployment), both started, then
    provisioned through A only: reference values, workload and secret. B learns the reference values
    from the store (its generation moved), without a restart."""
    KeyEncryptionKey.from_file(tmp_path / "kek", create=True)
    started: list[Replica] = []
    try:
        for name in ("a", "b"):
            started.append(_start_replica(name, pg_dsn, tmp_path, tls_dir, emu_root_file, publisher.pub_file))
        a, b = started
        provision(a, publisher)  # type: ignore[arg-type]
        yield a, b
    finally:
        for r in started:
            if r.proc.poll() is None:
                r.proc.terminate()
                try:
                    r.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
                    r.proc.wait()


def _audit_of(dsn: str, tmp_path: Path) -> list[Any]:
    """Verifies the whole chain (links, head, MACs with the replicas' KEK); returns the records."""
    kek = KeyEncryptionKey.from_file(tmp_path / "kek")
    store = PostgresStore(dsn, audit_mac_key=None)
    try:
        count = verify_records(store.iter_audit(), head=store.audit_head(), mac_key=kek.audit_key)
        records = list(store.iter_audit())
        assert len(records) == count
        return records
    finally:
        store.close()


def _open(replica: Replica, emu: Any) -> tuple[owner_pb2.OpenSessionResponse, support.Launch]:
    opened = replica.stub().OpenSession(
        owner_pb2.OpenSessionRequest(workload_id="web", chain=emulator_chain(emu), policy=SEV_POLICY)
    )
    return opened, launch(emu, opened)


def test_open_on_one_replica_release_on_the_other(
    replicas: tuple[Replica, Replica], emu: Any, pg_dsn: str, tmp_path: Path
) -> None:
    a, b = replicas
    opened, run = _open(a, emu)
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
    _audit_of(pg_dsn, tmp_path)


def test_reference_values_imported_or_revoked_on_one_replica_count_on_the_other(
    replicas: tuple[Replica, Replica], emu: Any, publisher: Publisher, pg_dsn: str, tmp_path: Path
) -> None:
    a, b = replicas
    first = a.admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests
    assert [
        m.manifest_id for m in b.admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests
    ] == [m.manifest_id for m in first]
    # Imported on A (by the fixture, after B started): B opens and releases without a restart.
    opened, run = _open(b, emu)
    released = b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    assert released.manifest_id == first[0].manifest_id
    emu.decommission(run.handle)

    # A revocation imported on A stops B at once: a session B opened before is refused (and spent), and
    # B opens no new one.
    opened, run = _open(b, emu)
    revoking = publisher.envelope(
        digests=support.reference_digests(b"\0" * 4096 + support.OVMF_IMAGE),
        version="2023.01",
        revokes=(first[0].manifest_id,),
    )
    a.admin.ImportReferenceValues(owner_pb2.ImportReferenceValuesRequest(envelope=revoking))
    err = support.rpc_error(
        lambda: b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "no_reference_values")
    emu.decommission(run.handle)
    err = support.rpc_error(
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
            envelope=publisher.envelope(digests=support.reference_digests(), version="2024.06")
        )
    )
    opened, run = _open(a, emu)
    b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    emu.decommission(run.handle)
    records = _audit_of(pg_dsn, tmp_path)
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
    opened, run = _open(a, emu)
    b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    emu.decommission(run.handle)
    count = len(_audit_of(pg_dsn, tmp_path))
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
    opened, run = _open(b, emu)
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
        others = list(pool.map(lambda r: _open(r, emu), [a, b] * 4))
    wins = [r for r in results if isinstance(r, owner_pb2.ReleaseSecretResponse)]
    losses = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(wins) == 1 and len(losses) == 49
    assert {(e.code(), error_info(e).reason) for e in losses} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "session_already_used")
    }
    base, _ = secret_area()
    emu.launch_secret(run.handle, wins[0].secret_header, wins[0].secret_payload, base)
    emu.decommission(run.handle)

    records = _audit_of(pg_dsn, tmp_path)
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
    before = [_open(a, emu) for _ in range(3)]  # opened on A, to be released on B after A dies
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
    time.sleep(0.5)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(timeout=10)
    time.sleep(0.5)
    count_b = len(outcomes["b"])
    time.sleep(0.5)
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
    opened, run = _open(b, emu)
    b.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    emu.decommission(run.handle)
    # Whatever A was writing when it died was rolled back whole: the chain has no gap and no fork.
    records = _audit_of(pg_dsn, tmp_path)
    assert sum(1 for r in records if r.event.action == "release_secret" and r.event.outcome == "allowed") == 4
