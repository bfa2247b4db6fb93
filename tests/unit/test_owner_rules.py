"""Owner rules without a server: reference selectors (kernel hashes, SEV-ES pins), hostile manifest
JSON, the HTTP poller's per-URL failures, and private file modes (SQLite stores, key files)."""

from __future__ import annotations

import http.server
import json
import os
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from launcher_svc.adapters.sqlite_store import LaunchStore
from owner_svc.adapters.refvalues_http import RefValuesPoller
from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.api.servicer import workload_from_proto, workload_to_proto
from owner_svc.core.model import AuditEvent, KernelHashesRule, RefSelector, Workload
from owner_svc.core.refset import ReferenceValueSet
from sevlaunch.cli._common import write_private
from sevlaunch.errors import InvalidArgument
from sevlaunch.files import create_private_sqlite
from sevlaunch.refvalues import (
    DigestConfig,
    Envelope,
    KernelHashes,
    KeyType,
    Manifest,
    PublisherKey,
    ReferenceDigest,
    generate_private_key,
    make_manifest,
    sign_envelope,
    verify_manifest,
)
from sevlaunch.rpc.v1 import owner_pb2
from sevlaunch.sev.errors import MalformedInput
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.technology import Technology

SEV, SEV_ES = GuestPolicy(0x3), GuestPolicy(0x7)
KH = KernelHashes("11" * 32, "22" * 32, "33" * 32)


def _d(n: int) -> bytes:
    return bytes([n]) * 32


DIGESTS = [
    ReferenceDigest(_d(1), DigestConfig(Technology.SEV)),
    ReferenceDigest(_d(2), DigestConfig(Technology.SEV, kernel_hashes=KH)),
    ReferenceDigest(_d(3), DigestConfig(Technology.SEV_ES, 1, "EPYC-Milan", "init2")),
    ReferenceDigest(_d(4), DigestConfig(Technology.SEV_ES, 1, "EPYC-Rome", "init2")),
    ReferenceDigest(_d(5), DigestConfig(Technology.SEV_ES, 1, "EPYC-Milan", "legacy")),
    ReferenceDigest(_d(6), DigestConfig(Technology.SEV_ES, 1, "EPYC-Milan", "init2", kernel_hashes=KH)),
    ReferenceDigest(_d(7), DigestConfig(Technology.SEV_ES, 2, "EPYC-Milan", "init2")),
]


@pytest.fixture(scope="module")
def refset() -> ReferenceValueSet:
    key = generate_private_key(KeyType.ED25519)
    manifest = make_manifest(
        publisher="t", firmware_name="OVMF", firmware_version="2024.05", digests=DIGESTS, valid_days=1
    )
    envelope = sign_envelope(manifest.to_json(), key).to_json()
    rs = ReferenceValueSet([PublisherKey(key.public_key())])
    rs.admit(rs.verify(envelope, datetime.now(UTC)))
    return rs


def _workload(**selector: Any) -> Workload:
    sel = RefSelector(
        firmware_name="OVMF", modes=(Technology.SEV, Technology.SEV_ES), sev_es_vcpus=(1,), **selector
    )
    return Workload(workload_id="w", allowed_policies=(3, 7), generations=("milan",), selectors=(sel,))


def _accepted(rs: ReferenceValueSet, workload: Workload, policy: GuestPolicy) -> set[int]:
    return {a.launch_digest[0] for a in rs.accepted(workload, policy, datetime.now(UTC))}


# ------------------------------------------------------------------------------ reference selector


def test_kernel_hashes_forbidden_by_default_required_or_any_on_request(refset: ReferenceValueSet) -> None:
    assert _workload().selectors[0].kernel_hashes is KernelHashesRule.FORBIDDEN
    assert _accepted(refset, _workload(), SEV) == {1}
    assert _accepted(refset, _workload(), SEV_ES) == {3, 4, 5}
    required = _workload(kernel_hashes=KernelHashesRule.REQUIRED)
    assert _accepted(refset, required, SEV) == {2}
    assert _accepted(refset, required, SEV_ES) == {6}
    either = _workload(kernel_hashes=KernelHashesRule.ANY)
    assert _accepted(refset, either, SEV) == {1, 2}
    assert _accepted(refset, either, SEV_ES) == {3, 4, 5, 6}


def test_sev_es_vcpu_type_and_vmsa_layout_pins(refset: ReferenceValueSet) -> None:
    assert _accepted(refset, _workload(vcpu_type="EPYC-Milan"), SEV_ES) == {3, 5}
    assert _accepted(refset, _workload(vmsa_layout="legacy"), SEV_ES) == {5}
    assert _accepted(refset, _workload(vcpu_type="EPYC-Milan", vmsa_layout="init2"), SEV_ES) == {3}
    pinned = _workload(vcpu_type="EPYC-Milan", vmsa_layout="init2", kernel_hashes=KernelHashesRule.REQUIRED)
    assert _accepted(refset, pinned, SEV_ES) == {6}
    # The pins are SEV-ES only: plain SEV digests have no vCPU type and are unaffected.
    assert _accepted(refset, _workload(vcpu_type="EPYC-Milan"), SEV) == {1}


def test_selector_validation_and_stored_rows_without_the_new_fields() -> None:
    with pytest.raises(InvalidArgument, match="SEV-ES"):
        RefSelector(firmware_name="OVMF", modes=(Technology.SEV,), vcpu_type="EPYC-Milan")
    with pytest.raises(InvalidArgument, match="vmsa_layout"):
        RefSelector(firmware_name="OVMF", modes=(Technology.SEV_ES,), sev_es_vcpus=(1,), vmsa_layout="new")
    with pytest.raises(InvalidArgument):
        RefSelector(firmware_name="OVMF", modes=(Technology.SEV,), kernel_hashes="any")  # type: ignore[arg-type]
    # A workload row stored before these fields existed reads with the safe defaults.
    old = json.loads(_workload().to_json())
    for key in ("allow_launch_without_secret", "allow_pre_0_17"):
        del old[key]
    for key in ("kernel_hashes", "vcpu_type", "vmsa_layout"):
        del old["selectors"][0][key]
    w = Workload.from_json(json.dumps(old))
    assert w.selectors[0].kernel_hashes is KernelHashesRule.FORBIDDEN
    assert (w.selectors[0].vcpu_type, w.selectors[0].vmsa_layout) == ("", "")
    assert not w.allow_launch_without_secret and not w.allow_pre_0_17
    roundtrip = _workload(kernel_hashes=KernelHashesRule.ANY, vcpu_type="EPYC-Rome", vmsa_layout="init2")
    assert Workload.from_json(roundtrip.to_json()) == roundtrip


def test_workload_proto_mapping_defaults_to_forbidden() -> None:
    msg = owner_pb2.Workload(
        workload_id="w",
        allowed_policies=[3],
        generations=["milan"],
        selectors=[owner_pb2.ReferenceSelector(firmware_name="OVMF", modes=[owner_pb2.REFERENCE_MODE_SEV])],
    )
    w = workload_from_proto(msg)
    assert w.selectors[0].kernel_hashes is KernelHashesRule.FORBIDDEN
    assert workload_to_proto(w).selectors[0].kernel_hashes == owner_pb2.KERNEL_HASHES_FORBIDDEN
    msg.selectors[0].kernel_hashes = owner_pb2.KERNEL_HASHES_REQUIRED
    msg.allow_launch_without_secret = True
    msg.allow_pre_0_17 = True
    w = workload_from_proto(msg)
    assert w.selectors[0].kernel_hashes is KernelHashesRule.REQUIRED
    assert w.allow_launch_without_secret and w.allow_pre_0_17
    assert workload_from_proto(workload_to_proto(w)) == w
    msg.selectors[0].kernel_hashes = 99  # type: ignore[assignment]
    with pytest.raises(InvalidArgument):
        workload_from_proto(msg)


# ------------------------------------------------------------------------------- hostile JSON


def test_deeply_nested_json_is_malformed_input_not_recursion_error() -> None:
    deep = b"[" * 200000 + b"]" * 200000
    with pytest.raises(MalformedInput):
        Envelope.from_json(deep)
    with pytest.raises(MalformedInput):
        Manifest.from_json(deep)
    with pytest.raises(MalformedInput):
        verify_manifest(deep, [PublisherKey(generate_private_key(KeyType.ED25519).public_key())], now=None)
    # Nested inside an otherwise well-formed envelope object, too.
    with pytest.raises(MalformedInput):
        Envelope.from_json(b'{"payloadType": "x", "payload": "", "x": ' + deep + b"}")
    with pytest.raises(MalformedInput, match="larger"):
        Envelope.from_json(b" " * ((1 << 20) + 1))


@pytest.fixture
def http_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    bodies: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies.get(self.path)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", bodies
    finally:
        httpd.shutdown()


def test_poller_failures_are_per_url(http_server: tuple[str, dict[str, bytes]]) -> None:
    base, bodies = http_server
    bodies["/a"] = b"trips a bug in the importer"
    bodies["/b"] = b"fine"
    imported: list[str] = []

    def importer(body: bytes, url: str) -> bool:
        if url.endswith("/a"):
            raise RuntimeError("an importer bug")
        imported.append(url)
        return True

    poller = RefValuesPoller([f"{base}/a", f"{base}/missing", f"{base}/b"], interval=1, importer=importer)
    poller.poll_once()  # neither the bug behind /a nor the 404 stops /b from being polled
    assert imported == [f"{base}/b"]


# ------------------------------------------------------------------------------ private files


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def wide_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_owner_database_and_its_wal_and_shm_are_0600(tmp_path: Path, wide_umask: None) -> None:
    db = tmp_path / "owner.db"
    store = SQLiteStore(db, audit_mac_key=b"k" * 32)
    store.append_audit(AuditEvent(actor="t", action="a", outcome="allowed"))
    try:
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert path.exists() and _mode(path) == 0o600, path
    finally:
        store.close()
    # A database left with a wider mode (by an earlier version) is narrowed when opened.
    os.chmod(db, 0o644)
    store = SQLiteStore(db, audit_mac_key=None)
    try:
        assert _mode(db) == 0o600
    finally:
        store.close()


def test_launcher_database_is_0600(tmp_path: Path, wide_umask: None) -> None:
    db = tmp_path / "launcher.db"
    store = LaunchStore(str(db))
    try:
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert path.exists() and _mode(path) == 0o600, path
    finally:
        store.close()


def test_private_sqlite_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    os.chmod(target, 0o644)
    link = tmp_path / "owner.db"
    link.symlink_to(target)
    with pytest.raises(OSError):
        create_private_sqlite(link)
    assert _mode(target) == 0o644
    create_private_sqlite(":memory:")  # SQLite's special name: nothing to create


def test_write_private_never_reuses_a_wider_file_or_follows_a_symlink(
    tmp_path: Path, wide_umask: None
) -> None:
    key = tmp_path / "ca.key"
    key.write_bytes(b"old")
    os.chmod(key, 0o644)
    before = os.stat(key).st_ino
    write_private(key, b"new key bytes")
    assert key.read_bytes() == b"new key bytes" and _mode(key) == 0o600
    assert os.stat(key).st_ino != before  # a new file: the 0644 one never held the new bytes

    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    link = tmp_path / "tik.bin"
    link.symlink_to(victim)
    write_private(link, b"secret")
    assert victim.read_bytes() == b"untouched"
    assert not link.is_symlink() and link.read_bytes() == b"secret" and _mode(link) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "tik.bin", "victim"]  # no temp left
