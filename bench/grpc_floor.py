"""The transport's floor under the owner: what a bare grpc.aio server costs per call on this machine.

    python -m bench.grpc_floor [--pairs 3000] [--clients 64] [--processes N] [--crypto]

A server process with the owner's mTLS (the same dev certificates, client certificates required) and one
generic unary method that answers fixed bytes: no interceptor, no logging, no metrics, no thread hop, no
protobuf. The client is the owner benchmark's own (sevlaunch's channels with their interceptors), and
each "pair" is two calls with the byte sizes of an OpenSession and a ReleaseSecret exchange. The server's
CPU per pair (/proc utime + stime) is what gRPC and TLS alone cost; with the physical floor (the pair's
cryptography), it bounds what any owner written on grpc.aio can reach on these cores.

With `--crypto` the server also does the pair's cryptography (`bench.floor_bench.PairWork`: OpenSession's
half in the first call, ReleaseSecret's in the second), in `--processes` processes on one port like the
owner's `--workers`: an owner that does nothing but what the protocol needs. Its pairs/s is the
**ceiling**: measured, not added up, so it includes what the two halves cost together on shared cores.
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
from bench.floor_bench import DEFAULT_TABLE

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

    def to_json(self) -> dict[str, float]:
        """The figures `python -m bench` records (its --details file, RESULTS.md)."""
        return {
            "pairs_per_s": self.pairs_per_s,
            "server_cpu_ms_per_pair": self.server_cpu_ms_per_pair,
            "client_cpu_ms_per_pair": self.client_cpu_ms_per_pair,
        }


async def _serve(port: int, tls_dir: Path, answer_sizes: tuple[int, int], crypto_table: int) -> None:
    from bench.floor_bench import PairWork
    from sevlaunch.rpc.tls import server_credentials

    work = PairWork(crypto_table) if crypto_table else None
    halves = (work.open, work.release) if work is not None else None

    async def call(request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        # The first byte says which answer: 0 an OpenSession-sized one, 1 a ReleaseSecret-sized one.
        if not request:
            return b""
        if halves is not None:
            halves[request[0]]()
        return answers[request[0]]

    answers = [b"\x5a" * size for size in answer_sizes]
    # SO_REUSEPORT: with --processes N, N servers share the port as the owner's workers do.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
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


def grpc_floor(
    tls_dir: Path, sizes: PairSizes, *, pairs: int, clients: int, processes: int = 1, crypto_table: int = 0
) -> GrpcFloor:
    """Starts the bare server (`processes` of them on one port; with `crypto_table` > 0 each doing the
    pair's cryptography for a secret table of that size), warms every connection, then times `pairs`
    pairs from `clients` clients."""
    from bench._world import free_port

    port = free_port()
    command = [
        sys.executable, "-m", "bench.grpc_floor", "--serve", str(port), str(tls_dir),
        f"{sizes.open_response},{sizes.release_response}", str(crypto_table),
    ]  # fmt: skip
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE) for _ in range(processes)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError("the gRPC floor server did not start")
        address = f"127.0.0.1:{port}"
        asyncio.run(_load(address, tls_dir, sizes, min(200, pairs), clients))
        before = sum(proc_cpu_seconds(proc.pid) for proc in procs)
        seconds, client_cpu = asyncio.run(_load(address, tls_dir, sizes, pairs, clients))
        server_cpu = sum(proc_cpu_seconds(proc.pid) for proc in procs) - before
        return GrpcFloor(pairs, seconds, server_cpu, client_cpu)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        open_size, release_size = (int(x) for x in sys.argv[4].split(","))
        asyncio.run(_serve(int(sys.argv[2]), Path(sys.argv[3]), (open_size, release_size), int(sys.argv[5])))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=3000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--processes", type=int, default=1, help="servers on the one port (like --workers)")
    p.add_argument("--crypto", action="store_true", help="each pair also does the pair's cryptography")
    args = p.parse_args()
    import tempfile

    from sevlaunch.cli.devcerts import write_dev_certs

    with tempfile.TemporaryDirectory() as tmp:
        tls = Path(tmp)
        write_dev_certs(tls)
        floor = grpc_floor(
            tls,
            PairSizes(10_600, 2_300, 120, 600),
            pairs=args.pairs,
            clients=args.clients,
            processes=args.processes,
            crypto_table=DEFAULT_TABLE if args.crypto else 0,
        )
    print(
        f"{floor.pairs_per_s:.0f} pairs/s at {args.clients} clients; server CPU "
        f"{floor.server_cpu_ms_per_pair:.3f} ms a pair, "
        f"client CPU {floor.client_cpu_ms_per_pair:.3f} ms a pair"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
