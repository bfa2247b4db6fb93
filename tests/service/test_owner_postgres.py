"""The owner's store on a real PostgreSQL server (pg_fixture.py); two owner replicas sharing it are
test_owner_replicas.py.

1. The store contract, run against both adapters (SQLite and PostgreSQL): migrations, rows, the
   one-release-per-session conditional update, manifests and the reference value generation, the
   append-only hash-chained audit log, and several store instances (replicas) appending concurrently;
   two owner cores over two store instances keeping their reference values in step with the store.
2. PostgreSQL specifics: replicas migrating together, `open_store` choosing the adapter, broken
   connections replaced.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import owner_support
import pg_fixture
import psycopg
import pytest
from owner_support import Publisher

from owner_svc.adapters import postgres as pg_adapter
from owner_svc.adapters import sqlite as sqlite_adapter
from owner_svc.adapters.kek import KeyEncryptionKey
from owner_svc.adapters.postgres import PostgresStore
from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.adapters.store import StoreConfigError, open_store
from owner_svc.core.audit import verify_records
from owner_svc.core.model import AuditEvent, SessionRecord, SessionState
from owner_svc.core.ports import SchemaError, StoreIntegrityError
from owner_svc.core.refset import ReferenceValueSet
from owner_svc.core.service import OwnerCore
from sevlaunch import dsn as sevlaunch_dsn
from sevlaunch.audit import AuditChainBroken
from sevlaunch.refvalues import KeyType, PublisherKey, generate_private_key
from sevlaunch.sev.errors import VerificationFailed

# The owner fixtures (an emulated chip and its root, a publisher, owners on port 0, PostgreSQL).
pytest_plugins = ["owner_support", "pg_fixture"]


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

    @property
    def driver_error(self) -> type[Exception]:
        """What raw SQL run outside the store raises (the driver's own exceptions, not the store's)."""
        return sqlite3.DatabaseError if self.name == "sqlite" else psycopg.Error

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
    with pytest.raises(SchemaError, match="newer than this code"):
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
    with pytest.raises(StoreIntegrityError):  # no driver exception crosses the store port
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
    with pytest.raises(StoreIntegrityError):  # a duplicate id
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
        "admin", publisher.envelope(digests=owner_support.reference_digests()), "t"
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
            digests=owner_support.reference_digests(b"\0" * 4096 + owner_support.OVMF_IMAGE),
            version="2024.06",
            revokes=(first.id,),
        ),
        "t",
    )
    assert [vm.id for vm in b.reference_values_in_force()] == [revoking.id]
    # And an import of the revoked manifest through B is refused as revoked.
    with pytest.raises(VerificationFailed, match="revoked"):
        b.import_reference_values("admin", first.envelope, "t")

    # A row written straight into the store (signed by a key this owner does not trust) is not trusted.
    rogue = owner_support.Publisher(generate_private_key(KeyType.ED25519), publisher.pub_file)
    forged = rogue.envelope(
        digests=owner_support.reference_digests(b"\1" * 4096 + owner_support.OVMF_IMAGE), version="2024.07"
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
        "admin", publisher.envelope(digests=owner_support.reference_digests()), "t"
    )
    revoking, _ = a.import_reference_values(
        "admin",
        publisher.envelope(
            digests=owner_support.reference_digests(b"\0" * 4096 + owner_support.OVMF_IMAGE),
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
        with pytest.raises(backend.driver_error, match="append-only"):
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
    with pytest.raises(VerificationFailed, match="revoked"):
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
        with pytest.raises(backend.driver_error, match="append-only"):
            backend.raw(sql)
    if backend.name == "postgres":
        with pytest.raises(backend.driver_error, match="append-only"):
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
