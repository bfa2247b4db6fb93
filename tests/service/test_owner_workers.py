"""`sevlaunch-owner --workers N`: several owner processes on one port and one database.

The kernel spreads connections over the workers (SO_REUSEPORT); every worker's writes go through its
own group commit, and SQLite's writers of several processes take turns on a file lock. What must hold
across processes as within one: exactly one release per session under a race, an audit chain that
verifies, and a clean stop of every worker on SIGTERM.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from owner_proc import ProcessHarness, free_port, start_owner, wait_serving
from owner_support import SEV_POLICY, Publisher, emulator_chain, launch, provision

from owner_svc.server import main as owner_main
from sevlaunch.cli import main as cli_main
from sevlaunch.rpc import secure_channel_sync
from sevlaunch.rpc.v1 import owner_pb2, owner_pb2_grpc

pytest_plugins = ["owner_support"]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def _two_free_ports() -> int:
    """A port P with P + 1 free too (worker 1 serves its metrics on P + 1)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            base = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
                return base
    raise AssertionError("no two consecutive free ports")


def _wait_metrics(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _opened_total(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    line = next(x for x in text.splitlines() if x.startswith("sevlaunch_owner_sessions_opened_total "))
    return float(line.split()[1])


def test_two_workers_share_the_port_release_once_and_stop_cleanly(
    tmp_path: Path,
    tls_dir: Path,
    emu: Any,
    emu_root_file: Path,
    publisher: Publisher,
    capsys: Any,
) -> None:
    port, metrics = free_port(), _two_free_ports()
    address = f"localhost:{port}"
    proc = start_owner(
        tmp_path,
        tls_dir,
        emu_root_file,
        publisher,
        port,
        extra=("--workers", "2", "--metrics-listen", f"127.0.0.1:{metrics}"),
    )
    try:
        wait_serving(address, tls_dir, proc)
        workers = _children(proc.pid)
        assert len(workers) == 2
        # One worker serving says nothing of the other: connections made before it binds all go to the
        # first. A worker serves its metrics only after its gRPC port is bound, so wait for both.
        for worker_metrics in (metrics, metrics + 1):
            _wait_metrics(worker_metrics)
        h = ProcessHarness(address, tls_dir)
        provision(h, publisher)  # type: ignore[arg-type]
        chain = emulator_chain(emu)
        # Connections of their own (no shared subchannel): the kernel hashes each to a worker. The
        # second worker may bind a moment after the first answers, so keep connecting, in rounds of
        # 32, until both have served (bounded: a worker that never serves fails the test).
        def own_stub() -> Any:
            channel = secure_channel_sync(
                address, tls_dir, "launcher", options=(("grpc.use_local_subchannel_pool", 1),)
            )
            return owner_pb2_grpc.OwnerServiceStub(channel)

        def open_session(stub: Any) -> Any:
            request = owner_pb2.OpenSessionRequest(workload_id="web", chain=chain, policy=SEV_POLICY)
            return stub.OpenSession(request, timeout=60)

        stubs: list[Any] = []
        replies: list[Any] = []
        deadline = time.monotonic() + 60
        while True:
            batch = [own_stub() for _ in range(32)]
            with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
                replies += list(pool.map(open_session, batch))
            stubs += batch
            served = [_opened_total(m) for m in (metrics, metrics + 1)]  # worker i: metrics port + i
            if min(served) >= 1 or time.monotonic() > deadline:
                break
        assert min(served) >= 1, f"sessions opened per worker: {served}"
        assert sum(served) == len(replies) == len({r.session_id for r in replies})

        # The 50-way race on one session, over connections spread across both workers.
        run = launch(emu, replies[0])
        request = run.release_request(replies[0].session_id, SEV_POLICY)
        barrier = threading.Barrier(50)

        def attempt(i: int) -> Any:
            barrier.wait()
            try:
                return stubs[i % 32].ReleaseSecret(request, timeout=60)
            except grpc.RpcError as err:
                return err

        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            results = list(pool.map(attempt, range(50)))
        wins = [r for r in results if isinstance(r, owner_pb2.ReleaseSecretResponse)]
        losses = [r for r in results if isinstance(r, grpc.RpcError)]
        assert len(wins) == 1 and len(losses) == 49
        assert {e.code() for e in losses} == {grpc.StatusCode.FAILED_PRECONDITION}
        emu.decommission(run.handle)
        records = h.admin.GetAuditLog(owner_pb2.GetAuditLogRequest()).records
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
        released = [r for r in records if r.action == "release_secret" and r.outcome == "allowed"]
        assert len(released) == 1

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=15)
    assert (
        cli_main(
            [
                "owner",
                "audit",
                "verify",
                "--db",
                str(tmp_path / "owner.db"),
                "--kek-file",
                str(tmp_path / "kek"),
            ]
        )
        == 0
    )
    assert "MACs verified" in capsys.readouterr().out


def test_workers_need_a_fixed_port(tmp_path: Path, tls_dir: Path, capsys: Any) -> None:
    argv = ["--tls-dir", str(tls_dir), "--db", str(tmp_path / "owner.db"), "--kek-file",
            str(tmp_path / "kek"), "--create-kek", "--listen", "127.0.0.1:0", "--metrics-listen", "",
            "--workers", "2"]  # fmt: skip
    assert owner_main(argv) == 1
    assert "--workers needs a fixed --listen port" in capsys.readouterr().err
    assert owner_main([*argv[:-1], "0"]) == 1
    assert "--workers must be 1..64" in capsys.readouterr().err
