"""Running the three services as child processes: start, find their ports, wait for health, stop.

Each service listens on port 0 (gRPC and metrics) and logs one JSON line "server started" with the ports
it bound (`sevlaunch.rpc.server`), so there is no window between choosing a free port and binding it in
which another process could take it. Every child gets its own process group (`start_new_session`), so a
Ctrl-C at the terminal reaches only the demo, which then stops the children in order, and so a child's
own children (none today) would go with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sevlaunch.rpc import secure_channel_sync

#: The services' Python entry points (`sevlaunch-platform` etc.). Started with `python -m`, so the
#: children run in the demo's own interpreter and environment whether or not the scripts are on PATH.
SERVICE_MODULES: Mapping[str, str] = {
    "platform": "platform_svc.server",
    "launcher": "launcher_svc.server",
    "owner": "owner_svc.server",
}
SERVICE_NAMES: Mapping[str, str] = {
    "platform": "sevlaunch.v1.PlatformService",
    "launcher": "sevlaunch.v1.LauncherService",
    "owner": "sevlaunch.v1.OwnerService",
}


class ServiceStartError(Exception):
    """A service exited or did not become healthy in time; the message names it and quotes its log."""


@dataclass
class ServiceProcess:
    """One running service. `address` is HOST:PORT to dial, `metrics_url` its /metrics (or None)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    dial_host: str
    port: int = 0
    metrics_port: int | None = None
    argv: Sequence[str] = field(default_factory=tuple)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        host = f"[{self.dial_host}]" if ":" in self.dial_host else self.dial_host
        return f"{host}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_port is None:
            return None
        host = f"[{self.dial_host}]" if ":" in self.dial_host else self.dial_host
        return f"http://{host}:{self.metrics_port}/metrics"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (the services drain in-flight calls), then SIGKILL after `timeout`. Idempotent."""
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The child leads its own process group (start_new_session), so its pid is the group id; signal
    # only that group, never anything found by name.
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Holds SIGINT, SIGTERM and SIGHUP until the block ends, then re-delivers the first one.

    Around starting a child and recording it: an interrupt raised inside `Popen` after the fork would
    lose the only handle on a running service, which would then outlive the demo. Handlers (not a
    blocked signal mask, which a child would inherit) are reset to their defaults by exec in the child.
    """
    pending: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, record) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if pending:
            signal.raise_signal(pending[0])


def start_service(
    name: str,
    args: Sequence[str],
    *,
    log_path: Path,
    dial_host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ServiceProcess:
    """Starts `python -m <service module> ARGS` (after `prefix`, e.g. `ip netns exec NS`), logging to
    `log_path`. Returns at once; call `wait_started` next."""
    argv = [*prefix, sys.executable, "-m", SERVICE_MODULES[name], *args]
    child_env = dict(os.environ if env is None else env)
    # Only the service's own SEVLAUNCH_ settings, never ones inherited from the caller's shell: every
    # flag also reads an environment variable, which would silently change what the demo starts.
    for key in [k for k in child_env if k.startswith("SEVLAUNCH_")]:
        del child_env[key]
    child_env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
    return ServiceProcess(name, process, log_path, dial_host, argv=tuple(argv))


def wait_started(service: ServiceProcess, *, deadline: float) -> None:
    """Waits for the "server started" log line (ports), raising ServiceStartError on exit or timeout."""
    while True:
        found = _started_line(service.log_path)
        if found is not None:
            service.port = int(str(found["port"]))
            metrics = found.get("metrics_port")
            service.metrics_port = int(str(metrics)) if metrics else None
            return
        if service.process.poll() is not None:
            raise ServiceStartError(
                f"{service.name} exited with status {service.process.returncode}:\n{service.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise ServiceStartError(f"{service.name} did not start in time:\n{service.log_tail()}")
        time.sleep(0.05)


def _started_line(log_path: Path) -> dict[str, object] | None:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if '"server started"' not in line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("message") == "server started" and "port" in obj:
            return obj
    return None


def wait_serving(
    service: ServiceProcess, *, tls_dir: Path, identity: str = "client", deadline: float
) -> None:
    """Polls the standard gRPC health service (over mTLS) until the service reports SERVING."""
    last = "no answer"
    with secure_channel_sync(service.address, tls_dir, identity) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if service.process.poll() is not None:
                raise ServiceStartError(
                    f"{service.name} exited with status {service.process.returncode}:\n{service.log_tail()}"
                )
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAMES[service.name]), timeout=2.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = exc.code().name if hasattr(exc, "code") else str(exc)
            if time.monotonic() > deadline:
                raise ServiceStartError(f"{service.name} not SERVING in time (last: {last})")
            time.sleep(0.1)
