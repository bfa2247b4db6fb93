"""Issue 12, the owner's own store faults (item 5) and its audit checkpoints (item 1), through a real
owner: a full disk is UNAVAILABLE (`store_unavailable`) with nothing released without its audit record;
a corrupt or unreadable database, or a damaged audit log, stops the start with one line; checkpoints
go to the log and the metrics at the start, at an interval and on shutdown, with the time of the newest one
for the staleness alert."""

from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from owner_support import (
    EXTRA_SECRET,
    PASSPHRASE,
    SEV_POLICY,
    Publisher,
    emulator_chain,
    launch,
    provision,
    secret_area,
    workload_msg,
)

from owner_svc.adapters.kek import KeyEncryptionKey
from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.core.model import AuditEvent, SessionState
from owner_svc.core.ports import StoreError
from sevlaunch.audit import Checkpoint
from sevlaunch.ownerdb import load_kek, verify_audit_db
from sevlaunch.rpc import error_info
from sevlaunch.rpc.v1 import owner_pb2

# The owner fixtures (an emulated chip and its root, a publisher, owners on port 0).
pytest_plugins = ["owner_support"]


def _open(h: Any, emu: Any) -> tuple[owner_pb2.OpenSessionResponse, Any]:
    opened = h.stub().OpenSession(
        owner_pb2.OpenSessionRequest(workload_id="web", chain=emulator_chain(emu), policy=SEV_POLICY)
    )
    return opened, launch(emu, opened)


def _releases(db: Path) -> dict[str, list[str]]:
    """session id -> outcomes of its release_secret audit records."""
    store = SQLiteStore(db, audit_mac_key=None)
    try:
        out: dict[str, list[str]] = {}
        for r in store.iter_audit():
            if r.event.action == "release_secret":
                out.setdefault(r.event.session_id, []).append(r.event.outcome)
        return out
    finally:
        store.close()


def test_full_disk_is_store_unavailable_and_releases_nothing_without_its_audit_record(
    make_owner: Any, publisher: Publisher, emu: Any
) -> None:
    h = make_owner()
    provision(h, publisher)
    pending = [_open(h, emu) for _ in range(24)]
    # The disk fills up: the file may not grow by a page more (SQLite's max_page_count, as a full
    # disk or a quota would leave it; deterministic, unlike filling a real file system).
    h.app.store.db.limit_pages()

    # Each session row holds the GODH certificate and the session blob: the disk is soon full.
    request = owner_pb2.OpenSessionRequest(workload_id="web", chain=emulator_chain(emu), policy=SEV_POLICY)
    opens: list[tuple[grpc.StatusCode, str]] = []
    for _ in range(40):
        try:
            h.stub().OpenSession(request)
        except grpc.RpcError as exc:
            opens.append((exc.code(), error_info(exc).reason))
    assert opens and set(opens) == {(grpc.StatusCode.UNAVAILABLE, "store_unavailable")}

    released, refused = [], []
    for opened, run in pending:
        request = run.release_request(opened.session_id, SEV_POLICY)
        try:
            released.append((h.stub().ReleaseSecret(request), opened, run))
        except grpc.RpcError as exc:
            assert (exc.code(), error_info(exc).reason) == (grpc.StatusCode.UNAVAILABLE, "store_unavailable")
            refused.append((opened, run))
    assert refused, "the releases' audit records should have filled the last page"
    db = Path(h.config.db)
    audit = _releases(db)
    for _, opened, _ in released:
        assert audit[opened.session_id] == ["allowed"]
    for opened, _ in refused:
        session = h.app.store.get_session(opened.session_id)
        assert session is not None and session.state is SessionState.OPEN
        assert opened.session_id not in audit  # nothing written for it, not even a refusal

    # Space again: the refused releases go through, once each, each with its record.
    h.app.store.db.limit_pages(1 << 30)
    base, _ = secret_area()
    for opened, run in refused:
        reply = h.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
        emu.launch_secret(run.handle, reply.secret_header, reply.secret_payload, base)
    for _, _, run in released:
        emu.decommission(run.handle)
    for _, run in refused:
        emu.decommission(run.handle)
    audit = _releases(db)
    assert all(audit[o.session_id] == ["allowed"] for o, _ in pending)
    assert verify_audit_db(db, load_kek(h.config.kek_file)) > 0
    # Whatever the full disk cut short, no secret byte reached a file (the database and its WAL).
    written = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith("owner.db"))
    for needle in (PASSPHRASE, EXTRA_SECRET):
        assert needle not in written and needle.hex().encode() not in written.lower()
        assert base64.b64encode(needle) not in written


def test_audit_checkpoints_go_to_the_log_and_metrics_at_an_interval_and_on_shutdown(
    make_owner: Any, publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="owner_svc"):
        h = make_owner(start_poller=True, checkpoint_interval=0.2)
        provision(h, publisher)
        head = h.app.store.audit_checkpoint()
        assert head.seq == 3  # the import, the workload, the secret

        def logged() -> list[dict[str, Any]]:
            return [
                vars(r) for r in caplog.records if r.getMessage() in ("audit checkpoint", "audit log checked")
            ]

        deadline = time.monotonic() + 10
        while not any(c["seq"] == head.seq for c in logged()) and time.monotonic() < deadline:
            time.sleep(0.05)
        entry = next(c for c in logged() if c["seq"] == head.seq)
        assert (entry["hash"], entry["mac"], entry["checkpoint"]) == (head.hash, head.mac, str(head))
        assert logged()[0]["message"] == "audit log checked" and logged()[0]["seq"] == 0

        metrics = urllib.request.urlopen(h.running.metrics_url, timeout=5).read().decode()
        series = [
            line for line in metrics.splitlines() if line.startswith("sevlaunch_owner_audit_checkpoint{")
        ]
        assert series == [f'sevlaunch_owner_audit_checkpoint{{hash="{head.hash}",mac="{head.mac}"}} 3.0']

        # One more decision, then shutdown: the last checkpoint names it.
        h.admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload_msg()))
        caplog.clear()
        h.running.run(h.app.stop())
    final = [vars(r) for r in caplog.records if r.getMessage() == "audit checkpoint"]
    assert final and final[-1]["seq"] == 4
    kek = load_kek(h.config.kek_file)
    assert verify_audit_db(h.config.db, kek, checkpoints=[Checkpoint.parse(final[-1]["checkpoint"])]) == 4


def _checkpoint_time(h: Any) -> float:
    metrics = urllib.request.urlopen(h.running.metrics_url, timeout=5).read().decode()
    [value] = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("sevlaunch_owner_audit_checkpoint_timestamp_seconds ")
    ]
    return value


def test_the_checkpoint_time_is_exported_from_the_start_and_only_a_made_checkpoint_moves_it(
    make_owner: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SevlaunchOwnerAuditCheckpointStale fires on `time() - max(this) > 2h`: the owner checkpoints as it
    starts (not only after its first interval), and a checkpoint that fails leaves the time where it was,
    so an owner that can no longer checkpoint ages into the alert."""
    before = time.time()
    h = make_owner(start_poller=True)  # the 300 s interval: only the start's checkpoint falls in this test
    first = _checkpoint_time(h)
    assert before <= first <= time.time()

    time.sleep(0.05)
    h.running.run(h.app.checkpoint())
    second = _checkpoint_time(h)
    assert first < second <= time.time()

    def broken() -> Checkpoint:
        raise StoreError("database is locked")

    monkeypatch.setattr(h.app.store, "audit_checkpoint", broken)
    with caplog.at_level(logging.ERROR, logger="owner_svc"):
        time.sleep(0.05)
        h.running.run(h.app.checkpoint())
    assert any(r.getMessage() == "audit checkpoint failed" for r in caplog.records)
    assert _checkpoint_time(h) == second


def test_before_any_checkpoint_the_time_is_zero_so_the_alert_fires(make_owner: Any) -> None:
    h = make_owner()  # the server without app.start(): no checkpoint made
    assert _checkpoint_time(h) == 0.0


# -------------------------------------------------------------------------- refusing to start


def _start_owner(tmp_path: Path, tls_dir: Path, db: Path | str) -> subprocess.CompletedProcess[str]:
    kek = tmp_path / "kek"
    KeyEncryptionKey.from_file(kek, create=True)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "owner_svc.server",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            str(tls_dir),
            "--db",
            str(db),
            "--kek-file",
            str(kek),
            "--metrics-listen",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def _one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1 and errors[0]["message"] == "cannot start"
    text = str(errors[0]["error"])
    assert "\n" not in text
    for word in words:
        assert word in text
    return text


def test_owner_refuses_to_start_on_a_corrupt_or_unreadable_database_in_one_line(
    tmp_path: Path, tls_dir: Path
) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, " * 300)
    garbage.chmod(0o600)
    _one_line_refusal(_start_owner(tmp_path, tls_dir, garbage), str(garbage), "file is not a database")

    # A real owner database whose file was cut short (a crash of the disk, a bad copy).
    good = tmp_path / "cut.db"
    store = SQLiteStore(good, audit_mac_key=None)
    for i in range(200):
        store.put_workload(f"w{i}", "{}" * 200, AuditEvent("admin", "put_workload", "allowed"))
    store.close()
    conn = sqlite3.connect(good)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = good.stat().st_size
    with good.open("r+b") as f:
        f.truncate(size // 2)
    _one_line_refusal(_start_owner(tmp_path, tls_dir, good), str(good), "malformed")

    # Not a file at all, and a file that cannot be opened.
    folder = tmp_path / "folder.db"
    folder.mkdir()
    _one_line_refusal(_start_owner(tmp_path, tls_dir, folder), str(folder), "not a regular file")
    missing = tmp_path / "no" / "such" / "owner.db"
    _one_line_refusal(_start_owner(tmp_path, tls_dir, missing), str(missing), "No such file or directory")


def test_owner_refuses_to_serve_on_a_damaged_audit_log_and_says_how_to_recover(
    tmp_path: Path, tls_dir: Path
) -> None:
    kek_file = tmp_path / "kek"
    kek = KeyEncryptionKey.from_file(kek_file, create=True)
    db = tmp_path / "owner.db"
    store = SQLiteStore(db, audit_mac_key=kek.audit_key)
    for i in range(5):
        store.put_workload(f"w{i}", "{}", AuditEvent("admin", "put_workload", "allowed"))
    store.close()
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq = 5")  # the newest record gone, the head left as it was
    conn.commit()
    conn.close()
    text = _one_line_refusal(_start_owner(tmp_path, tls_dir, db), str(db), "audit log is damaged", "restore")
    assert "audit verify" in text
    # The owner wrote nothing: the database is as the attacker left it.
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*), max(seq) FROM audit").fetchone() == (4, 4)
    conn.close()
