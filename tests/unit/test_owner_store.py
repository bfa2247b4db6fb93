"""The owner's store, key-encryption key and audit chain, without gRPC."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from owner_svc.adapters.kek import KEKFileError, KeyEncryptionKey
from owner_svc.adapters.sqlite import SCHEMA_VERSION, SQLiteStore
from owner_svc.core.audit import verify_records
from owner_svc.core.model import (
    AuditEvent,
    FirmwareMinimum,
    RefSelector,
    SessionRecord,
    SessionState,
    Workload,
)
from owner_svc.core.ports import SealError, StoreUnavailable
from sevlaunch.audit import AuditChainBroken
from sevlaunch.cli import main as cli_main
from sevlaunch.errors import InvalidArgument
from sevlaunch.sev.technology import Technology


def _store(tmp_path: Path) -> tuple[SQLiteStore, KeyEncryptionKey, Path]:
    kek_file = tmp_path / "kek"
    kek = KeyEncryptionKey.from_file(kek_file, create=True)
    return SQLiteStore(tmp_path / "owner.db", audit_mac_key=kek.audit_key), kek, kek_file


def _session(sid: str, expires_at: float = 1e12) -> SessionRecord:
    return SessionRecord(
        session_id=sid,
        workload_id="w",
        caller="launcher",
        policy=3,
        generation="milan",
        cek_fingerprint="ab",
        godh_cert=b"g",
        session_blob=b"b",
        sealed_keys=b"sealed",
        created_at=0.0,
        expires_at=expires_at,
    )


def test_kek_file_creation_permissions_and_aad(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    with pytest.raises(KEKFileError):
        KeyEncryptionKey.from_file(path)  # absent and not asked to create: refused
    kek = KeyEncryptionKey.from_file(path, create=True)
    assert path.stat().st_mode & 0o777 == 0o600
    sealed = kek.seal(b"TEK and TIK", b"row-1")
    assert KeyEncryptionKey.from_file(path).open(sealed, b"row-1") == b"TEK and TIK"
    with pytest.raises(SealError):
        kek.open(sealed, b"row-2")  # moved to another row
    with pytest.raises(SealError):
        KeyEncryptionKey(os.urandom(32)).open(sealed, b"row-1")  # another KEK
    os.chmod(path, 0o644)
    with pytest.raises(KEKFileError, match="group or others"):
        KeyEncryptionKey.from_file(path)
    assert "TEK" not in repr(kek) and repr(kek) == "KeyEncryptionKey(<hidden>)"


def test_migrations_are_versioned_and_idempotent(tmp_path: Path) -> None:
    store, _, _ = _store(tmp_path)
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    again = SQLiteStore(tmp_path / "owner.db", audit_mac_key=None)
    assert again.schema_version() == SCHEMA_VERSION
    assert again.db.connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_conditional_finish_lets_exactly_one_thread_win(tmp_path: Path) -> None:
    store, _, _ = _store(tmp_path)
    store.insert_session(_session("a" * 32), AuditEvent("t", "open_session", "allowed"))
    wins: list[bool] = []
    barrier = threading.Barrier(20)

    def claim() -> None:
        barrier.wait()
        wins.append(
            store.finish_session(
                "a" * 32,
                to_state=SessionState.RELEASED,
                now=1.0,
                require_unexpired=True,
                matched_digest="d",
                reason="",
                event=AuditEvent("t", "release_secret", "allowed"),
            )
        )

    threads = [threading.Thread(target=claim) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    session = store.get_session("a" * 32)
    assert session is not None and session.state is SessionState.RELEASED
    # Expired sessions cannot be released, but can still be retired.
    store.insert_session(_session("b" * 32, expires_at=5.0), AuditEvent("t", "open_session", "allowed"))
    assert not store.finish_session(
        "b" * 32,
        to_state=SessionState.RELEASED,
        now=6.0,
        require_unexpired=True,
        matched_digest="",
        reason="",
        event=AuditEvent("t", "x", "refused"),
    )
    assert store.finish_session(
        "b" * 32,
        to_state=SessionState.REFUSED,
        now=6.0,
        require_unexpired=False,
        matched_digest="",
        reason="session_expired",
        event=AuditEvent("t", "x", "refused"),
    )


def _fill(store: SQLiteStore, n: int = 5) -> None:
    for i in range(n):
        store.append_audit(
            AuditEvent(
                actor="launcher",
                action="open_session",
                outcome="refused",
                workload_id=f"w{i}",
                reason="untrusted_root",
            )
        )


def test_audit_chain_detects_edits_deletions_and_truncation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, kek, kek_file = _store(tmp_path)
    _fill(store)
    db = tmp_path / "owner.db"
    assert verify_records(store.iter_audit(), head=store.audit_head(), mac_key=kek.audit_key) == 5
    assert cli_main(["owner", "audit", "verify", "--db", str(db), "--kek-file", str(kek_file)]) == 0
    store.close()

    # The log is append-only through SQL too.
    conn = sqlite3.connect(db)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit WHERE seq = 2")
    # An attacker with the file drops the triggers and edits a record.
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.commit()
    original = conn.execute("SELECT canonical FROM audit WHERE seq = 3").fetchone()[0]
    conn.execute("UPDATE audit SET canonical = replace(canonical, 'untrusted_root', 'allowed') WHERE seq = 3")
    conn.commit()
    capsys.readouterr()
    assert cli_main(["owner", "audit", "verify", "--db", str(db)]) == 1
    assert "audit record 3" in capsys.readouterr().err
    conn.execute("UPDATE audit SET canonical = ? WHERE seq = 3", (original,))
    # Deleting a record in the middle.
    conn.execute("DELETE FROM audit WHERE seq = 2")
    conn.commit()
    assert cli_main(["owner", "audit", "verify", "--db", str(db)]) == 1
    assert "audit record 2 is missing" in capsys.readouterr().err
    conn.close()

    # Truncating the tail shows against the head.
    other = tmp_path / "other"
    other.mkdir()
    store2, _, _ = _store(other)
    _fill(store2)
    store2.close()
    conn = sqlite3.connect(other / "owner.db")
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq = 5")
    conn.commit()
    conn.close()
    assert cli_main(["owner", "audit", "verify", "--db", str(other / "owner.db")]) == 1
    store3 = SQLiteStore(other / "owner.db", audit_mac_key=None)
    with pytest.raises(AuditChainBroken):
        verify_records(store3.iter_audit(), head=store3.audit_head())


def test_recomputed_chain_fails_the_mac(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Whoever can write the file can recompute every hash, but not the MACs (they need the KEK)."""
    import hashlib

    store, _, kek_file = _store(tmp_path)
    _fill(store, 2)
    store.close()
    db = tmp_path / "owner.db"
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER audit_no_update")
    rows = conn.execute("SELECT seq, canonical FROM audit ORDER BY seq").fetchall()
    prev = "0" * 64
    for seq, canonical in rows:
        edited = canonical.replace("untrusted_root", "forged").replace(
            canonical[canonical.index('"prev":"') + 8 : canonical.index('"prev":"') + 72], prev
        )
        digest = hashlib.sha256(edited.encode()).hexdigest()
        conn.execute(
            "UPDATE audit SET canonical = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (edited, prev, digest, seq),
        )
        prev = digest
    conn.execute("UPDATE audit_head SET hash = ?", (prev,))
    conn.commit()
    conn.close()
    assert cli_main(["owner", "audit", "verify", "--db", str(db)]) == 0  # the plain chain is consistent...
    assert cli_main(["owner", "audit", "verify", "--db", str(db), "--kek-file", str(kek_file)]) == 1
    assert "MAC does not verify" in capsys.readouterr().err  # ...but the owner did not write it


def test_workload_validation_refuses_empty_allow_lists() -> None:
    sel = (RefSelector("OVMF", (Technology.SEV,)),)
    Workload("w", (3,), ("milan",), sel)
    for kwargs in (
        dict(allowed_policies=()),
        dict(generations=()),
        dict(selectors=()),
        dict(allowed_policies=(0x1,)),  # key sharing without allow_key_sharing
        dict(allowed_policies=(0x2,)),  # debugging without allow_debug
        dict(generations=("Milan!",)),
        dict(secret_area_size=0),
    ):
        args: dict[str, object] = dict(
            workload_id="w", allowed_policies=(3,), generations=("milan",), selectors=sel
        )
        args.update(kwargs)
        with pytest.raises(InvalidArgument):
            Workload(**args)  # type: ignore[arg-type]
    Workload("w", (0x2,), ("milan",), sel, allow_debug=True)
    with pytest.raises(InvalidArgument):
        RefSelector("OVMF", (Technology.SEV_ES,))  # SEV-ES needs its vCPU counts
    with pytest.raises(InvalidArgument):
        FirmwareMinimum(256, 0, 0)
    w = Workload(
        "w",
        (3, 7),
        ("milan", "emulated"),
        (RefSelector("OVMF", (Technology.SEV, Technology.SEV_ES), sev_es_vcpus=(1, 4)),),
    )
    assert Workload.from_json(w.to_json()) == w


def test_close_waits_for_a_write_under_way_and_later_calls_are_unavailable(tmp_path: Path) -> None:
    """A release finishing while the owner shuts down once closed the thread's SQLite connection under it
    (a segfault in the sqlite3 module); close() now waits for it, and a call after close is typed."""
    store, _, _ = _store(tmp_path)
    store.insert_session(_session("s1"), AuditEvent("launcher", "open_session", "allowed"))
    inside, finish = threading.Event(), threading.Event()
    done: list[str] = []

    def slow_writer() -> None:
        with store.db.write() as tx:
            inside.set()
            finish.wait(10)
            tx.execute("SELECT count(*) FROM sessions")
        done.append("written")

    writer = threading.Thread(target=slow_writer)
    writer.start()
    assert inside.wait(10)
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "close() must wait for the write under way"
    finish.set()
    writer.join(10)
    closer.join(10)
    assert done == ["written"] and not closer.is_alive()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.get_session("s1")
