"""The transport's floor under the owner: what a bare grpc.aio server costs per call on this machine.

    python -m bench.grpc_floor [--calls 3000] [--clients 64]

A server process with the owner's mTLS (the same dev certificates, client certificates required) and one
generic unary method that answers fixed bytes: no interceptor, no logging, no metrics, no thread hop, no
protobuf. The client is the owner benchmark's own (sevlaunch's channels with their interceptors), and
each "pair" is two calls with the byte sizes of an OpenSession and a ReleaseSecret exchange. The server's
CPU per pair (/proc utime + stime) is what gRPC and TLS alone cost; with the physical floor (the pair's
cryptography), it bounds what any owner written on grpc.aio can reach on these cores.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from bench._world import proc_cpu_seconds

_METHOD = "/sevlaunch.bench.Floor/Call"


@dataclass(frozen=True)
class PairSizes:
    """Serialized request and response sizes of the two calls of a pair."""

    open_request: int
    open_response: int
    release_request: int
    release_response: int


@dataclass(frozen=True)
class GrpcFloor:
    pairs: int
    seconds: float
    server_cpu_s: float
    client_cpu_s: float

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    @property
    def server_cpu_ms_per_pair(self) -> float:
        return self.server_cpu_s / self.pairs * 1000

    @property
    def client_cpu_ms_per_pair(self) -> float:
        return self.client_cpu_s / self.pairs * 1000


async def _serve(port: int, tls_dir: Path, answer_sizes: tuple[int, int]) -> None:
    from sevlaunch.rpc.tls import server_credentials

    async def call(request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        # The first byte says which answer: 0 an OpenSession-sized one, 1 a ReleaseSecret-sized one.
        return answers[request[0]] if request else b""

    answers = [b"\x5a" * size for size in answer_sizes]
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "sevlaunch.bench.Floor", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_secure_port(f"127.0.0.1:{port}", server_credentials(tls_dir, "owner"))
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _load(
    address: str, tls_dir: Path, sizes: PairSizes, pairs: int, clients: int
) -> tuple[float, float]:
    from sevlaunch.rpc import secure_channel

    channels = [secure_channel(address, tls_dir, "client") for _ in range(clients)]
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 30)
        calls = [ch.unary_unary(_METHOD, None, None) for ch in channels]
        open_request = b"\x00" + bytes(sizes.open_request - 1)
        release_request = b"\x01" + bytes(sizes.release_request - 1)
        work = iter(range(pairs))

        async def client(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> None:
            for _ in work:
                await call(open_request, timeout=60)
                await call(release_request, timeout=60)

        cpu, t = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client(c) for c in calls))
        return time.perf_counter() - t, time.process_time() - cpu
    finally:
        for ch in channels:
            await ch.close(None)


def grpc_floor(tls_dir: Path, sizes: PairSizes, *, pairs: int, clients: int) -> GrpcFloor:
    """Starts the bare server, warms every connection, then times `pairs` pairs from `clients` clients."""
    from bench._world import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_floor", "--serve", str(port), str(tls_dir),
         f"{sizes.open_response},{sizes.release_response}"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the gRPC floor server did not start")
        address = f"127.0.0.1:{port}"
        asyncio.run(_load(address, tls_dir, sizes, min(200, pairs), clients))
        before = proc_cpu_seconds(proc.pid)
        seconds, client_cpu = asyncio.run(_load(address, tls_dir, sizes, pairs, clients))
        return GrpcFloor(pairs, seconds, proc_cpu_seconds(proc.pid) - before, client_cpu)
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        open_size, release_size = (int(x) for x in sys.argv[4].split(","))
        asyncio.run(_serve(int(sys.argv[2]), Path(sys.argv[3]), (open_size, release_size)))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=3000)
    p.add_argument("--clients", type=int, default=64)
    args = p.parse_args()
    import tempfile

    from sevlaunch.cli.devcerts import write_dev_certs

    with tempfile.TemporaryDirectory() as tmp:
        tls = Path(tmp)
        write_dev_certs(tls)
        floor = grpc_floor(tls, PairSizes(10_600, 2_300, 120, 600), pairs=args.pairs, clients=args.clients)
    print(
        f"{floor.pairs_per_s:.0f} pairs/s at {args.clients} clients; server CPU "
        f"{floor.server_cpu_ms_per_pair:.3f} ms a pair, "
        f"client CPU {floor.client_cpu_ms_per_pair:.3f} ms a pair"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
