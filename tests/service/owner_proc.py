"""The owner as a real process, for the kill-and-restart tests (imported by test_owner_*.py; holds no test).

`start_owner` runs `sevlaunch-owner` on a fixed port with the emulated root trusted and the publisher's
key configured through the environment, as a Deployment would; its stderr goes to `owner.log` in the
given directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from owner_support import Publisher

from sevlaunch.rpc import secure_channel_sync
from sevlaunch.rpc.v1 import owner_pb2_grpc

OWNER = Path(sys.executable).with_name("sevlaunch-owner")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_owner(
    workdir: Path,
    tls_dir: Path,
    emu_root_file: Path,
    publisher: Publisher,
    port: int,
    *,
    db: str = "",
    extra: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        # Through the environment, as a Deployment would configure it; flags take precedence.
        "SEVLAUNCH_KEK_FILE": str(workdir / "kek"),
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
            db or str(workdir / "owner.db"),
            "--create-kek",
            "--trust-root",
            f"emulated={emu_root_file}",
            "--metrics-listen",
            "",
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "owner.log", "ab"),
    )


def wait_serving(address: str, tls_dir: Path, proc: subprocess.Popen[bytes]) -> None:
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


class ProcessHarness:
    """Stubs for an owner process, as `owner_support.provision` expects of a harness."""

    def __init__(self, address: str, tls_dir: Path) -> None:
        self.address, self.tls_dir = address, tls_dir

    def stub(self, identity: str = "launcher") -> owner_pb2_grpc.OwnerServiceStub:
        return owner_pb2_grpc.OwnerServiceStub(secure_channel_sync(self.address, self.tls_dir, identity))

    @property
    def admin(self) -> owner_pb2_grpc.OwnerServiceStub:
        return self.stub("owner-admin")
