"""The owner as a real process: SIGKILL between OpenSession and ReleaseSecret, restart, release works.

Sessions (with their TEK/TIK sealed under the KEK) live in the SQLite file, so a crash loses nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from owner_support import (
    SEV_POLICY,
    Publisher,
    emulator_chain,
    launch,
    provision,
    secret_area,
)

from sevlaunch.cli import main as cli_main
from sevlaunch.rpc import secure_channel_sync
from sevlaunch.rpc.v1 import owner_pb2, owner_pb2_grpc

# The owner fixtures (an emulated chip and its root, a publisher, owners on port 0).
pytest_plugins = ["owner_support"]


OWNER = Path(sys.executable).with_name("sevlaunch-owner")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(
    tmp_path: Path, tls_dir: Path, emu_root_file: Path, publisher: Publisher, port: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        # Through the environment, as a Deployment would configure it; flags take precedence.
        "SEVLAUNCH_KEK_FILE": str(tmp_path / "kek"),
        "SEVLAUNCH_PUBLISHER_KEY": str(publisher.pub_file),
    }
    return subprocess.Popen(
        [
            str(OWNER),
            "--listen",
            f"127.0.0.1:{port}",
            "--tls-dir",
            str(tls_dir),
            "--db",
            str(tmp_path / "owner.db"),
            "--create-kek",
            "--trust-root",
            f"emulated={emu_root_file}",
            "--metrics-listen",
            "",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "owner.log", "ab"),
    )


def _wait_serving(address: str, tls_dir: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "owner exited"
        with secure_channel_sync(address, tls_dir, "client") as ch:
            try:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.1)
    raise AssertionError("owner did not start")


class _Harness:
    def __init__(self, address: str, tls_dir: Path) -> None:
        self.address, self.tls_dir = address, tls_dir

    def stub(self, identity: str = "launcher") -> owner_pb2_grpc.OwnerServiceStub:
        return owner_pb2_grpc.OwnerServiceStub(secure_channel_sync(self.address, self.tls_dir, identity))

    @property
    def admin(self) -> owner_pb2_grpc.OwnerServiceStub:
        return self.stub("owner-admin")


def test_sigkill_between_open_and_release(
    tmp_path: Path, tls_dir: Path, emu: Any, emu_root_file: Path, publisher: Publisher, capsys: Any
) -> None:
    port = _free_port()
    address = f"localhost:{port}"
    proc = _start(tmp_path, tls_dir, emu_root_file, publisher, port)
    try:
        _wait_serving(address, tls_dir, proc)
        assert (tmp_path / "kek").stat().st_mode & 0o777 == 0o600
        h = _Harness(address, tls_dir)
        provision(h, publisher)  # type: ignore[arg-type]
        opened = h.stub().OpenSession(
            owner_pb2.OpenSessionRequest(workload_id="web", chain=emulator_chain(emu), policy=SEV_POLICY)
        )
        run = launch(emu, opened)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        proc = _start(tmp_path, tls_dir, emu_root_file, publisher, port)
        _wait_serving(address, tls_dir, proc)
        released = h.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
        base, _ = secret_area()
        emu.launch_secret(run.handle, released.secret_header, released.secret_payload, base)
        emu.decommission(run.handle)

        # The admin CLI against the live service, and the offline audit check of its database.
        assert cli_main(["owner", "sessions", "--endpoint", address, "--tls-dir", str(tls_dir)]) == 0
        assert '"state": "OWNER_SESSION_STATE_RELEASED"' in capsys.readouterr().out
    finally:
        proc.terminate()
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
