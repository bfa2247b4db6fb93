"""Owner throughput (OpenSession + ReleaseSecret pairs) through owner_svc over mTLS, against the owner
core called in-process, and the owner's RSS over many sessions.

Each run opens a batch of sessions (timed), lets the host side compute each session's measurement
(untimed: the emulated firmware's LAUNCH_START/UPDATE_DATA/MEASURE, or, for the long memory run, the
same math with the chip's PDH key), then releases the secrets (timed). pairs/s = pairs / (open time +
release time); a pair's latency = its OpenSession latency + its ReleaseSecret latency.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from bench._world import (
    POLICY,
    WORKLOAD_ID,
    World,
    measure_with_firmware,
    tree_cpu_seconds,
    tree_status_kb,
)
from bench.floor_bench import physical_floor
from bench.grpc_floor import GrpcFloor, PairSizes, grpc_floor
from owner_svc.adapters.kek import KeyEncryptionKey
from owner_svc.adapters.metrics import PrometheusOwnerMetrics
from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.api.servicer import workload_from_proto
from owner_svc.core.refset import ReferenceValueSet
from owner_svc.core.service import ChainInput, OwnerCore
from sevlaunch.firmware.emulator import EmulatedFirmware
from sevlaunch.refvalues import PublisherKey
from sevlaunch.rpc import secure_channel
from sevlaunch.rpc.v1 import common_pb2, owner_pb2, owner_pb2_grpc
from sevlaunch.sev.cert import SEVCertificate
from sevlaunch.sev.chain import load_roots_file
from sevlaunch.sev.measurement import compute_measure
from sevlaunch.sev.session import SessionBlob, unwrap_session

Measurer = Callable[[bytes, bytes], bytes]


@dataclass
class RunResult:
    pairs: int
    seconds: float  # open phase + release phase
    pair_latencies: list[float]
    #: CPU seconds over the timed phases: the owner's process tree (utime + stime) and this client process.
    owner_cpu_s: float | None = None
    client_cpu_s: float | None = None

    def cpu_ms_per_pair(self, which: str) -> float | None:
        cpu = self.owner_cpu_s if which == "owner" else self.client_cpu_s
        return None if cpu is None else cpu / self.pairs * 1000

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    def pct(self, q: float) -> float:
        data = sorted(self.pair_latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000


def firmware_measurer(fw: EmulatedFirmware) -> Measurer:
    return lambda godh, blob: measure_with_firmware(fw, godh, blob)


def direct_measurer(fw: EmulatedFirmware) -> Measurer:
    """The emulator's LAUNCH_START + LAUNCH_MEASURE math (unwrap with the PDH key, HMAC with the TIK)
    without its file-backed state: for the 10,000-session memory run only. Uses the emulator's private
    state to get the PDH key (bench code, not a supported API)."""
    with fw._command() as chip:
        assert chip.pdh is not None
        pdh_key = chip.pdh.private_key()
        api_major, api_minor, build = chip.config.api_major, chip.config.api_minor, chip.config.build
    import hashlib
    import os

    from bench._world import TINY_IMAGE

    digest = hashlib.sha256(TINY_IMAGE).digest()

    def measure(godh: bytes, blob: bytes) -> bytes:
        keys = unwrap_session(pdh_key, SEVCertificate.from_bytes(godh), SessionBlob.from_bytes(blob), POLICY)
        mnonce = os.urandom(16)
        m = compute_measure(
            keys.tik,
            api_major=api_major,
            api_minor=api_minor,
            build_id=build,
            policy=POLICY,
            launch_digest=digest,
            mnonce=mnonce,
        )
        return bytes(m) + mnonce

    return measure


# -- through gRPC ------------------------------------------------------------------------------------


async def grpc_run(
    world: World, address: str, chain: common_pb2.CertificateChain, measurer: Measurer, *, pairs: int,
    clients: int, batch: int = 1000, owner_pid: int | None = None,
) -> RunResult:  # fmt: skip
    channels = [secure_channel(address, world.tls_dir, "client") for _ in range(clients)]
    stubs = [owner_pb2_grpc.OwnerServiceStub(ch) for ch in channels]
    fw_version = common_pb2.FirmwareVersion(
        api_major=world.hosts[0].firmware.config.api_major,
        api_minor=world.hosts[0].firmware.config.api_minor,
        build_id=world.hosts[0].firmware.config.build,
    )
    total = 0.0
    client_cpu = owner_cpu = 0.0
    latencies: list[float] = []
    try:
        # Warm every connection (TLS handshake) outside the timed phases.
        await asyncio.gather(*(ch.channel_ready() for ch in channels))
        done = 0
        while done < pairs:
            n = min(batch, pairs - done)
            opened: list[owner_pb2.OpenSessionResponse | None] = [None] * n
            open_lat = [0.0] * n
            rel_lat = [0.0] * n
            next_i = iter(range(n))

            async def opener(stub: owner_pb2_grpc.OwnerServiceStub) -> None:
                for i in next_i:  # noqa: B023 - shared work queue
                    t = time.perf_counter()
                    opened[i] = await stub.OpenSession(  # noqa: B023
                        owner_pb2.OpenSessionRequest(workload_id=WORKLOAD_ID, chain=chain, policy=POLICY),
                        timeout=120,
                    )
                    open_lat[i] = time.perf_counter() - t  # noqa: B023

            cpu0, owner0, t0 = time.process_time(), _cpu(owner_pid), time.perf_counter()
            await asyncio.gather(*(opener(s) for s in stubs))
            t_open = time.perf_counter() - t0
            client_cpu += time.process_time() - cpu0
            owner_cpu += _cpu(owner_pid) - owner0
            measurements = [measurer(o.godh_cert, o.session_blob) for o in opened if o is not None]
            next_i = iter(range(n))

            async def releaser(stub: owner_pb2_grpc.OwnerServiceStub) -> None:
                for i in next_i:  # noqa: B023
                    o = opened[i]  # noqa: B023
                    assert o is not None
                    t = time.perf_counter()
                    reply = await stub.ReleaseSecret(
                        owner_pb2.ReleaseSecretRequest(
                            session_id=o.session_id,
                            launch_measurement=measurements[i],  # noqa: B023
                            firmware=fw_version,
                            policy=POLICY,
                        ),
                        timeout=120,
                    )
                    rel_lat[i] = time.perf_counter() - t  # noqa: B023
                    assert len(reply.secret_header) == 52

            cpu0, owner0, t0 = time.process_time(), _cpu(owner_pid), time.perf_counter()
            await asyncio.gather(*(releaser(s) for s in stubs))
            t_release = time.perf_counter() - t0
            client_cpu += time.process_time() - cpu0
            owner_cpu += _cpu(owner_pid) - owner0
            total += t_open + t_release
            latencies += [a + b for a, b in zip(open_lat, rel_lat, strict=True)]
            done += n
    finally:
        for ch in channels:
            await ch.close(None)
    return RunResult(pairs, total, latencies, owner_cpu if owner_pid else None, client_cpu)


def _cpu(pid: int | None) -> float:
    return 0.0 if pid is None else tree_cpu_seconds(pid)


# -- in-process floor ----------------------------------------------------------------------------------


def inprocess_core(world: World, db: Path) -> OwnerCore:
    """The owner core as owner_svc.server builds it (SQLite store, KEK, reference values, emulated root
    trusted, Prometheus metrics), configured like the service: same manifest, workload, secret."""
    kek = KeyEncryptionKey.from_file(world.workdir / "owner" / "kek-inproc", create=True)
    store = SQLiteStore(db, audit_mac_key=kek.audit_key)
    refset = ReferenceValueSet([PublisherKey.from_pem(world.publisher_pub.read_bytes(), name="bench")])
    core = OwnerCore(
        store,
        kek,
        refset,
        extra_roots=[load_roots_file(world.root_file.read_bytes(), "emulated")],
        metrics=PrometheusOwnerMetrics(CollectorRegistry()),
    )
    core.import_reference_values("owner-admin", world.envelope, "bench")
    core.put_workload("owner-admin", workload_from_proto(world.workload_proto()))
    core.put_secret("owner-admin", WORKLOAD_ID, [(str(world.secret.guid), world.secret.data)])
    return core


def inprocess_run(
    core: OwnerCore, chain: common_pb2.CertificateChain, measurer: Measurer, fw: EmulatedFirmware, *,
    pairs: int,
) -> RunResult:  # fmt: skip
    c = chain
    latencies: list[float] = []
    # The servicer builds a ChainInput from the request's bytes; so does the floor, per call.
    t0 = time.perf_counter()
    opened = []
    open_lat = []
    for _ in range(pairs):
        t = time.perf_counter()
        chain_in = ChainInput(c.pdh_cert, c.pek_cert, c.oca_cert, c.cek_cert, c.ask_cert, c.ark_cert)
        opened.append(core.open_session("client", WORKLOAD_ID, chain_in, POLICY))
        open_lat.append(time.perf_counter() - t)
    t_open = time.perf_counter() - t0
    measurements = [measurer(o.godh_cert, o.session_blob) for o in opened]
    cfg = fw.config
    t0 = time.perf_counter()
    for o, m, lat in zip(opened, measurements, open_lat, strict=True):
        t = time.perf_counter()
        core.release_secret(
            "client", o.session_id, m, api_major=cfg.api_major, api_minor=cfg.api_minor,
            build_id=cfg.build, policy=POLICY,
        )  # fmt: skip
        latencies.append(lat + time.perf_counter() - t)
    t_release = time.perf_counter() - t0
    return RunResult(pairs, t_open + t_release, latencies)


# -- the experiment ------------------------------------------------------------------------------------


@dataclass
class OwnerThroughput:
    by_clients: dict[int, tuple[RunResult, float]]  # clients -> (gRPC run, floor pairs/s beside it)
    floors: list[RunResult]
    pairs: int
    #: The raw cryptography of one pair (`floor_bench`), single-threaded: before and after the runs.
    physical: list[float]
    #: The same 64-client run against an owner of one process (when the owner under test has workers).
    single_process: RunResult | None = None
    #: A bare grpc.aio server with the owner's mTLS, the same clients and message sizes (`grpc_floor`).
    transport: GrpcFloor | None = None
    #: The same servers, as many processes as the owner has, doing the pair's cryptography as well: the
    #: most an owner on grpc.aio can reach here (`grpc_floor --crypto`).
    ceiling: GrpcFloor | None = None

    def ratio(self, clients: int) -> float:
        run, floor = self.by_clients[clients]
        return run.pairs_per_s / floor

    @property
    def physical_floor(self) -> float:
        return statistics.mean(self.physical)


def owner_throughput(
    world: World,
    *,
    pairs: int,
    clients: tuple[int, ...] = (1, 8, 64),
    compare_single: bool = False,
    floor_seconds: float = 1.0,
    owner_processes: int = 1,
) -> OwnerThroughput:
    assert world.owner is not None
    host = world.hosts[0]
    chain = world.chain_proto(host)
    measurer = firmware_measurer(host.firmware)
    core = inprocess_core(world, world.workdir / "owner" / "inproc.db")
    table = len(world.secret_table())
    # Warm-up: both sides once (imports, caches, SQLite pages).
    inprocess_run(core, chain, measurer, host.firmware, pairs=4)
    asyncio.run(grpc_run(world, world.owner.address, chain, measurer, pairs=4, clients=1))
    physical = [physical_floor(table, seconds=floor_seconds)]
    floors = [inprocess_run(core, chain, measurer, host.firmware, pairs=pairs)]
    results: dict[int, tuple[RunResult, float]] = {}
    for n in clients:  # floor, run, floor, run, ...: each run is compared with the floors around it
        run = asyncio.run(
            grpc_run(
                world, world.owner.address, chain, measurer, pairs=pairs, clients=n, owner_pid=world.owner.pid
            )
        )
        floors.append(inprocess_run(core, chain, measurer, host.firmware, pairs=pairs))
        results[n] = (run, statistics.mean([floors[-2].pairs_per_s, floors[-1].pairs_per_s]))
    sizes = pair_sizes(core, chain, measurer, host.firmware)
    core.store.close()  # type: ignore[attr-defined]
    transport = grpc_floor(world.tls_dir, sizes, pairs=pairs, clients=max(clients))
    ceiling = grpc_floor(
        world.tls_dir, sizes, pairs=pairs, clients=max(clients), processes=owner_processes, crypto_table=table
    )
    single = None
    if compare_single:
        one = world.spawn_owner("owner-single.db")
        try:
            world.configure_owner(one.address)
            asyncio.run(grpc_run(world, one.address, chain, measurer, pairs=4, clients=1))
            single = asyncio.run(
                grpc_run(
                    world, one.address, chain, measurer, pairs=pairs, clients=max(clients), owner_pid=one.pid
                )
            )
        finally:
            one.stop()
    physical.append(physical_floor(table, seconds=floor_seconds))
    return OwnerThroughput(results, floors, pairs, physical, single, transport, ceiling)


def pair_sizes(
    core: OwnerCore, chain: common_pb2.CertificateChain, measurer: Measurer, fw: EmulatedFirmware
) -> PairSizes:
    """The serialized sizes of one pair's requests and responses, as the servicer builds them."""
    c = chain
    chain_in = ChainInput(c.pdh_cert, c.pek_cert, c.oca_cert, c.cek_cert, c.ask_cert, c.ark_cert)
    opened = core.open_session("client", WORKLOAD_ID, chain_in, POLICY)
    measurement = measurer(opened.godh_cert, opened.session_blob)
    cfg = fw.config
    released = core.release_secret(
        "client", opened.session_id, measurement, api_major=cfg.api_major, api_minor=cfg.api_minor,
        build_id=cfg.build, policy=POLICY,
    )  # fmt: skip
    version = common_pb2.FirmwareVersion(api_major=cfg.api_major, api_minor=cfg.api_minor, build_id=cfg.build)
    return PairSizes(
        owner_pb2.OpenSessionRequest(workload_id=WORKLOAD_ID, chain=chain, policy=POLICY).ByteSize(),
        owner_pb2.OpenSessionResponse(
            session_id=opened.session_id, godh_cert=opened.godh_cert, session_blob=opened.session_blob,
            policy=opened.policy, expires_at_unix=int(opened.expires_at), generation=opened.generation,
        ).ByteSize(),
        owner_pb2.ReleaseSecretRequest(
            session_id=opened.session_id, launch_measurement=measurement, firmware=version, policy=POLICY
        ).ByteSize(),
        owner_pb2.ReleaseSecretResponse(
            secret_header=released.header, secret_payload=released.payload,
            matched_launch_digest=released.matched_digest, manifest_id=released.manifest_id,
        ).ByteSize(),
    )  # fmt: skip


@dataclass
class OwnerMemory:
    sessions: int
    rss_before_mb: float
    rss_after_mb: float
    hwm_mb: float
    seconds: float

    @property
    def growth_mb(self) -> float:
        return self.rss_after_mb - self.rss_before_mb


def owner_memory(world: World, *, sessions: int, clients: int = 8, settle: int = 200) -> OwnerMemory:
    """RSS of the owner process before and after `sessions` more open+release pairs (8 clients)."""
    assert world.owner is not None
    host = world.hosts[0]
    chain = world.chain_proto(host)
    measurer = direct_measurer(host.firmware)
    pid = world.owner.pid
    # Settle the allocator first: a few hundred pairs so that caches and pools exist before "before".
    asyncio.run(grpc_run(world, world.owner.address, chain, measurer, pairs=settle, clients=clients))
    before = tree_status_kb(pid, "VmRSS") / 1024
    t = time.perf_counter()
    asyncio.run(grpc_run(world, world.owner.address, chain, measurer, pairs=sessions, clients=clients))
    seconds = time.perf_counter() - t
    after = tree_status_kb(pid, "VmRSS") / 1024
    return OwnerMemory(sessions, before, after, tree_status_kb(pid, "VmHWM") / 1024, seconds)


def _main() -> int:
    """`python -m bench.owner_bench [--pairs N] [--clients 1,8,64]`: the owner throughput runs alone
    (one emulated chip, the owner process, no platform or launcher), with the physical floor."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.owner_bench")
    p.add_argument("--pairs", type=int, default=320)
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    clients = tuple(int(c) for c in args.clients.split(","))
    with World(hosts=1) as world:
        world.prepare()
        owner = world.start_owner(workers=args.workers)
        world.configure_owner(owner.address)
        ot = owner_throughput(world, pairs=args.pairs, clients=clients, owner_processes=args.workers)
        physical = ot.physical_floor
    print(f"physical floor {physical:.0f} pairs/s")
    for n, (run, floor) in ot.by_clients.items():
        print(
            f"{n:3d} clients: {run.pairs_per_s:7.1f} pairs/s (core in-process {floor:.1f}), "
            f"p50 {run.pct(0.5):.1f} ms, p99 {run.pct(0.99):.1f} ms, "
            f"floor ratio {run.pairs_per_s / physical:.3f}, owner CPU {run.cpu_ms_per_pair('owner'):.2f} "
            f"ms a pair, client CPU {run.cpu_ms_per_pair('client'):.2f} ms a pair"
        )
    if ot.transport is not None:
        t = ot.transport
        print(
            f"bare grpc.aio server, same clients and sizes: {t.pairs_per_s:.0f} pairs/s, server CPU "
            f"{t.server_cpu_ms_per_pair:.3f} ms a pair, client CPU {t.client_cpu_ms_per_pair:.3f} ms a pair"
        )
    if ot.ceiling is not None:
        c = ot.ceiling
        print(
            f"ceiling (the same server doing the pair's cryptography, {args.workers} process(es)): "
            f"{c.pairs_per_s:.0f} pairs/s = {c.pairs_per_s / physical:.3f} x the physical floor, server "
            f"CPU {c.server_cpu_ms_per_pair:.3f} ms a pair, "
            f"client CPU {c.client_cpu_ms_per_pair:.3f} ms a pair"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
