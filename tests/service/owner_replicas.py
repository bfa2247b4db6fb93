"""Owner replicas as processes over one PostgreSQL database (imported by test_owner_replicas.py, loaded
there as a plugin for the `replicas` fixture; holds no test)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from owner_support import SEV_POLICY, Launch, Publisher, emulator_chain, launch, provision

from owner_svc.adapters.kek import KeyEncryptionKey
from owner_svc.adapters.postgres import PostgresStore
from owner_svc.core.audit import verify_records
from sevlaunch.rpc import secure_channel_sync
from sevlaunch.rpc.v1 import owner_pb2, owner_pb2_grpc


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


def start_replica(
    name: str,
    dsn: str,
    tmp_path: Path,
    tls_dir: Path,
    emu_root_file: Path,
    pub: Path,
    *extra: str,
) -> Replica:
    """`sevlaunch-owner` as a process on `dsn`, its JSON log in tmp_path/owner-NAME.log; waits until it
    serves."""
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
            *extra,
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
                wait_serving(replica)
                return replica
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"owner {name} did not start: {log.read_text()}")


def wait_serving(replica: Replica) -> None:
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
    yield from _replica_pair(pg_dsn, tmp_path, tls_dir, emu_root_file, publisher)


@pytest.fixture
def outage_replicas(
    pg_dsn: str, tmp_path: Path, tls_dir: Path, emu_root_file: Path, publisher: Publisher
) -> Iterator[tuple[Replica, Replica]]:
    """`replicas` for database outages: a call waits OUTAGE_DB_WAIT (not the 5 s default) for a
    connection before it is UNAVAILABLE, so a test making several calls while the server is down does not
    wait 5 s for each."""
    yield from _replica_pair(
        pg_dsn, tmp_path, tls_dir, emu_root_file, publisher, "--db-wait", str(OUTAGE_DB_WAIT)
    )


#: The owners' `--db-wait` in the PostgreSQL outage tests.
OUTAGE_DB_WAIT = 0.5


def _replica_pair(
    pg_dsn: str, tmp_path: Path, tls_dir: Path, emu_root_file: Path, publisher: Publisher, *extra: str
) -> Iterator[tuple[Replica, Replica]]:
    KeyEncryptionKey.from_file(tmp_path / "kek", create=True)
    started: list[Replica] = []
    try:
        for name in ("a", "b"):
            started.append(
                start_replica(name, pg_dsn, tmp_path, tls_dir, emu_root_file, publisher.pub_file, *extra)
            )
        a, b = started
        provision(a, publisher)  # type: ignore[arg-type]  # a Replica has the stubs provision uses
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


def audit_of(dsn: str, tmp_path: Path) -> list[Any]:
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


def open_launch(replica: Replica, emu: Any) -> tuple[owner_pb2.OpenSessionResponse, Launch]:
    """OpenSession on `replica` and the launch it is for, up to LAUNCH_MEASURE."""
    opened = replica.stub().OpenSession(
        owner_pb2.OpenSessionRequest(workload_id="web", chain=emulator_chain(emu), policy=SEV_POLICY)
    )
    return opened, launch(emu, opened)
