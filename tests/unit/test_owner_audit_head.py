"""Issue 12 item 1: the audit head is MACed, checked at owner start, on every append and by
`sevlaunch owner audit verify`; checkpoints kept outside the database catch a rollback of the whole log.
Workload rows carry a MAC too.

The attacker here can write the owner's database (drop triggers, delete rows, move the head) but does
not hold the KEK.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from owner_svc.adapters.kek import KeyEncryptionKey
from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.adapters.sqlstore import AuditLogDamaged
from owner_svc.core.model import AuditEvent
from owner_svc.core.ports import StoreCorrupt
from owner_svc.server import ConfigError, OwnerConfig, build_app
from sevlaunch.audit import GENESIS, Checkpoint
from sevlaunch.cli import main as cli_main
from sevlaunch.ownerdb import AuditDatabaseError, load_kek, verify_audit_db


def _event(i: int) -> AuditEvent:
    return AuditEvent(actor="launcher", action="open_session", outcome="refused", workload_id=f"w{i}")


def _owner_db(tmp_path: Path, records: int = 5) -> tuple[SQLiteStore, Path, Path]:
    kek_file = tmp_path / "kek"
    kek = KeyEncryptionKey.from_file(kek_file, create=True)
    db = tmp_path / "owner.db"
    store = SQLiteStore(db, audit_mac_key=kek.audit_key)
    for i in range(records):
        store.append_audit(_event(i))
    return store, db, kek_file


def _attacker(db: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for sql, params in statements:
            conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def _record_hash(db: Path, seq: int) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()[0])
    finally:
        conn.close()


def _verify(db: Path, kek_file: Path, *extra: str) -> int:
    return cli_main(["owner", "audit", "verify", "--db", str(db), "--kek-file", str(kek_file), *extra])


def test_audit_tail_truncated_and_head_moved_back_without_the_kek_is_caught(
    tmp_path: Path, tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The attack of issue 12 item 1: drop the trigger, delete the newest records, move the head back to
    the last record kept. The plain chain is consistent again, but the head's MAC is not the owner's."""
    running, db, kek_file = _owner_db(tmp_path)
    assert _verify(db, kek_file) == 0
    _attacker(
        db,
        ("DELETE FROM audit WHERE seq > 3", ()),
        ("UPDATE audit_head SET seq = 3, hash = ? WHERE id = 1", (_record_hash(db, 3),)),
    )
    capsys.readouterr()

    # `audit verify` with the KEK: the head's MAC does not verify.
    assert _verify(db, kek_file) == 1
    assert "the audit head's MAC does not verify" in capsys.readouterr().err

    # The owner that was running appends nothing more to it.
    with pytest.raises(AuditLogDamaged, match="no valid MAC"):
        running.append_audit(_event(9))
    running.close()
    assert verify_audit_db(db) == 3  # (without the KEK the plain chain is consistent: nothing appended)

    # An owner starting on it refuses to serve, in one line that says how to recover.
    config = OwnerConfig(tls_dir=tls_dir, db=db, kek_file=kek_file, listen="127.0.0.1:0")
    with pytest.raises(ConfigError) as info:
        build_app(config)
    message = str(info.value)
    assert "\n" not in message and str(db) in message
    assert "audit log is damaged" in message and "restore" in message and "--checkpoint" in message


def test_audit_head_replaced_by_one_the_owner_wrote_earlier_is_caught_by_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rollback: the attacker kept the head row (with its genuine MAC) from when the log had three
    records, and later cuts the log back to it. The database alone cannot show this; the checkpoint the
    owner logged, and the running owner's memory of the highest head, do."""
    running, db, kek_file = _owner_db(tmp_path, records=3)
    conn = sqlite3.connect(db)
    saved = conn.execute("SELECT seq, hash, mac FROM audit_head").fetchone()
    conn.close()
    running.append_audit(_event(3))
    running.append_audit(_event(4))
    checkpoint = running.audit_checkpoint()
    assert checkpoint.seq == 5 and checkpoint.mac
    _attacker(
        db,
        ("DELETE FROM audit WHERE seq > 3", ()),
        ("UPDATE audit_head SET seq = ?, hash = ?, mac = ? WHERE id = 1", tuple(saved)),
    )
    capsys.readouterr()
    assert _verify(db, kek_file) == 0  # the MAC alone cannot tell an old head from the current one
    for given in (str(checkpoint), f"{checkpoint}:{checkpoint.mac}"):
        assert _verify(db, kek_file, "--checkpoint", given) == 1
        assert "the log holds 3 records (cut back or rolled back)" in capsys.readouterr().err
    with pytest.raises(AuditLogDamaged, match="moved back from record 5 to 3"):
        running.append_audit(_event(9))
    running.close()


def test_checkpoints_that_hold_pass_and_forged_ones_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, db, kek_file = _owner_db(tmp_path)
    at3 = Checkpoint(3, _record_hash(db, 3))
    head = store.audit_checkpoint()
    store.close()
    capsys.readouterr()
    args = ["--checkpoint", str(at3), "--checkpoint", f"{head}:{head.mac}", "--checkpoint", f"0:{GENESIS}"]
    assert _verify(db, kek_file, *args) == 0
    assert (
        capsys.readouterr().out.strip() == "audit log intact: 5 records, MACs verified, 3 checkpoint(s) held"
    )
    # A checkpoint naming a hash the log never had, a MAC the KEK did not make, or malformed text.
    # Exit 1: the log does not hold it; exit 2: not a checkpoint at all (a usage error).
    for bad, words, status in (
        (f"3:{'ab' * 32}", "record 3 has another hash", 1),
        (f"{head}:{'00' * 32}", "its MAC does not verify", 1),
        ("3:xyz", "a checkpoint is SEQ:HASH", 2),
        (f"0:{'ab' * 32}", "seq 0 is the empty log", 1),
    ):
        assert _verify(db, kek_file, "--checkpoint", bad) == status
        assert words in capsys.readouterr().err
    with pytest.raises(AuditDatabaseError, match="cut back or rolled back"):
        verify_audit_db(db, checkpoints=[Checkpoint(6, head.hash)])


def test_an_empty_log_has_a_maced_head_and_blanking_it_is_caught(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cutting everything and resetting the head to "no record yet" is a rollback too: the empty head the
    owner wrote at creation carries a MAC, a blank one does not."""
    store, db, kek_file = _owner_db(tmp_path, records=0)
    assert store.audit_checkpoint() == store.check_integrity()
    store.append_audit(_event(0))
    store.close()
    _attacker(
        db, ("DELETE FROM audit", ()), (f"UPDATE audit_head SET seq = 0, hash = '{GENESIS}', mac = ''", ())
    )
    capsys.readouterr()
    assert _verify(db, kek_file) == 1
    assert "MAC does not verify" in capsys.readouterr().err
    with pytest.raises(AuditLogDamaged):
        SQLiteStore(db, audit_mac_key=KeyEncryptionKey.from_file(kek_file).audit_key).check_integrity()


def test_a_database_from_before_maced_heads_and_workloads_is_upgraded(tmp_path: Path) -> None:
    """Schema 4 had no head or workload MACs: the migrations MAC them as they stand (nothing older can
    be checked), and from then on they are checked like any other."""
    store, db, kek_file = _owner_db(tmp_path, records=3)
    store.put_workload("web", '{"v": 1}', _event(3))
    store.close()
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE audit_head DROP COLUMN mac")
    conn.execute("ALTER TABLE workloads DROP COLUMN mac")
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()
    assert verify_audit_db(db, load_kek(kek_file)) == 4  # no head MAC to check in schema 4
    upgraded = SQLiteStore(db, audit_mac_key=KeyEncryptionKey.from_file(kek_file).audit_key)
    assert upgraded.check_integrity().seq == 4
    assert upgraded.get_workload("web") == '{"v": 1}'
    upgraded.append_audit(_event(4))
    upgraded.close()
    assert _verify(db, kek_file) == 0


def test_workload_widened_in_the_database_without_the_kek_is_refused(tmp_path: Path) -> None:
    """Editing a workload row to allow a debug policy (the guest's memory open to the host) would make the
    owner release the secret to such a launch: the row's MAC shows the edit, and nothing is decided on it."""
    store, db, _ = _owner_db(tmp_path, records=0)
    store.put_workload("web", '{"allowed_policies": [3]}', _event(0))
    conn = sqlite3.connect(db)
    conn.execute("""UPDATE workloads SET config_json = '{"allowed_policies": [3, 2], "allow_debug": true}'""")
    conn.commit()
    conn.close()
    with pytest.raises(StoreCorrupt, match="'web' was changed outside the owner"):
        store.get_workload("web")
    store.put_workload("web", '{"allowed_policies": [3]}', _event(1))  # the owner's own write heals it
    assert store.get_workload("web") == '{"allowed_policies": [3]}'
    store.close()


def test_an_edited_record_in_the_tail_stops_the_owner_at_start(tmp_path: Path, tls_dir: Path) -> None:
    """A corrupt audit table (issue 12 item 5): the owner checks the chain's tail against the MACed head
    at start and refuses to serve, instead of appending to it."""
    store, db, kek_file = _owner_db(tmp_path)
    store.close()
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET canonical = replace(canonical, 'refused', 'allowed') WHERE seq = 4")
    conn.commit()
    conn.close()
    config = OwnerConfig(tls_dir=tls_dir, db=db, kek_file=kek_file, listen="127.0.0.1:0")
    with pytest.raises(ConfigError, match=r"audit record 4: content does not match its hash.*restore"):
        build_app(config)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM audit").fetchone() == (5,)  # nothing appended
    conn.close()
