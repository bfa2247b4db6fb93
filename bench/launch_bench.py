"""Launches: through the three services vs the same launcher core in-process, the platform's chain
cache, and many launches across several emulated hosts."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from bench._world import (
    POLICY,
    SECRET_GPA,
    WORKLOAD_ID,
    Host,
    World,
    metric_sum,
    proc_status_kb,
    tree_cpu_seconds,
    tree_status_kb,
)
from bench.owner_bench import inprocess_core
from launcher_svc.adapters.emulated import EmulatedHypervisor
from launcher_svc.adapters.sqlite_store import LaunchStore
from launcher_svc.core.launcher import Launcher, LauncherConfig
from launcher_svc.core.ports import OwnerSession, PlatformChain, ReleasedSecret
from launcher_svc.core.spec import PathPolicy, create_spec
from launcher_svc.core.state import Phase
from owner_svc.core.service import ChainInput, OwnerCore
from sevlaunch.firmware.emulator import EmulatedFirmware, EmulatedRoot
from sevlaunch.rpc import secure_channel
from sevlaunch.rpc.v1 import common_pb2, launcher_pb2, launcher_pb2_grpc, platform_pb2, platform_pb2_grpc
from sevlaunch.sev.technology import Technology

PHASES = (
    "CHAIN_FETCHED",
    "SESSION_OPENED",
    "DEFINED",
    "STARTED_PAUSED",
    "MEASURED",
    "SECRET_RELEASED",
    "SECRET_INJECTED",
    "RUNNING",
)


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")


@dataclass
class LaunchTimes:
    total: list[float] = field(default_factory=list)  # seconds, client side, Launch call to RUNNING
    phases: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})

    def add(self, total: float, phases: dict[str, float]) -> None:
        self.total.append(total)
        for name, seconds in phases.items():
            self.phases.setdefault(name, []).append(seconds)


# -- through the services ---------------------------------------------------------------------------


class GrpcLauncher:
    def __init__(self, world: World, host: Host) -> None:
        assert host.launcher is not None and world.owner is not None
        self.world = world
        self.channel = secure_channel(host.launcher.address, world.tls_dir, "client")
        self.stub = launcher_pb2_grpc.LauncherServiceStub(self.channel)
        self.owner_address = world.owner.address
        self._names = itertools.count()

    async def launch(self) -> tuple[float, dict[str, float]]:
        """One orchestrated launch, timed by the client; the guest is destroyed afterwards (untimed)."""
        request = launcher_pb2.LaunchRequest(
            spec=launcher_pb2.GuestSpec(
                name=f"g{next(self._names)}",
                memory_mib=256,
                vcpus=1,
                firmware_path=str(self.world.firmware),
                mode=launcher_pb2.SEV_MODE_SEV,
                policy=POLICY,
            ),
            owner=launcher_pb2.OwnerRef(endpoint=self.owner_address, workload_id=WORKLOAD_ID),
        )
        phases: dict[str, float] = {}
        launch_id = ""
        t = time.perf_counter()
        last = None
        async for event in self.stub.Launch(request, timeout=300):
            last = event
            launch_id = event.launch_id or launch_id
            if event.phase != launcher_pb2.PHASE_FAILED:
                name = launcher_pb2.Phase.Name(event.phase).removeprefix("PHASE_")
                phases[name] = event.duration.ToNanoseconds() / 1e9
        total = time.perf_counter() - t
        if last is None or last.phase != launcher_pb2.PHASE_RUNNING:
            raise RuntimeError(f"launch failed: {last}")
        await self.stub.DestroyGuest(launcher_pb2.DestroyGuestRequest(launch_id=launch_id), timeout=60)
        return total, phases

    async def close(self) -> None:
        await self.channel.close(None)


# -- in-process: the same launcher core, platform cache hit and owner core, no gRPC --------------------


class InProcPlatform:
    """platform_svc's warm path: the chain it exported once and serves from its cache."""

    def __init__(self, chain: common_pb2.CertificateChain) -> None:
        c = chain
        self.chain = PlatformChain(c.pdh_cert, c.pek_cert, c.oca_cert, c.cek_cert, c.ask_cert, c.ark_cert)

    async def certificate_chain(self) -> PlatformChain:
        return self.chain


class InProcOwner:
    """owner_svc's servicer without gRPC: the owner core in a worker thread, as the servicer runs it."""

    def __init__(self, core: OwnerCore) -> None:
        self.core = core

    async def open_session(
        self, endpoint: str, *, workload_id: str, chain: PlatformChain, policy: int
    ) -> OwnerSession:
        c = chain
        chain_in = ChainInput(c.pdh_cert, c.pek_cert, c.oca_cert, c.cek_cert, c.ask_cert, c.ark_cert)
        s = await asyncio.to_thread(self.core.open_session, "launcher", workload_id, chain_in, policy)
        return OwnerSession(s.session_id, s.godh_cert, s.session_blob, s.policy)

    async def release_secret(
        self, endpoint: str, *, session_id: str, measurement: bytes, api_major: int, api_minor: int,
        build_id: int, policy: int,
    ) -> ReleasedSecret:  # fmt: skip
        r = await asyncio.to_thread(
            self.core.release_secret, "launcher", session_id, measurement,
            api_major=api_major, api_minor=api_minor, build_id=build_id, policy=policy,
        )  # fmt: skip
        return ReleasedSecret(header=r.header, payload=r.payload)

    async def close(self) -> None:
        pass


class InProcLauncher:
    def __init__(self, world: World, root: EmulatedRoot) -> None:
        d = world.workdir / "inproc"
        self.firmware = EmulatedFirmware(d / "chip", config=world.hosts[0].firmware.config, root=root)
        host = Host(-1, d / "chip", self.firmware)
        self.world = world
        self.core_owner = inprocess_core(world, world.workdir / "owner" / "inproc-launch.db")
        self.launcher = Launcher(
            hypervisor=EmulatedHypervisor(self.firmware, d / "chip" / "hypervisor"),
            store=LaunchStore(str(d / "launcher.db")),
            platform=InProcPlatform(world.chain_proto(host)),
            owners=InProcOwner(self.core_owner),
            config=LauncherConfig(
                paths=PathPolicy((str(world.firmware.resolve().parent),)), secret_gpa=SECRET_GPA
            ),
        )
        self._names = itertools.count()

    async def start(self) -> None:
        await self.launcher.start()

    async def launch(self) -> tuple[float, dict[str, float]]:
        spec = create_spec(
            name=f"p{next(self._names)}", memory_mib=256, vcpus=1, firmware_path=str(self.world.firmware),
            mode=Technology.SEV, policy=POLICY, paths=self.launcher.config.paths,
        )  # fmt: skip
        phases: dict[str, float] = {}
        t = time.perf_counter()
        rec, events = await self.launcher.launch(
            spec, owner_endpoint="owner.invalid:1", workload_id=WORKLOAD_ID, requested_by="client"
        )
        last = None
        async for event in events:
            last = event
            if event.phase is not Phase.FAILED:
                phases[str(event.phase)] = event.duration
        total = time.perf_counter() - t
        if last is None or last.phase is not Phase.RUNNING:
            raise RuntimeError(f"in-process launch failed: {last}")
        await self.launcher.destroy_guest(rec.launch_id, requested_by="client")
        return total, phases

    async def close(self) -> None:
        await self.launcher.stop()


@dataclass
class LaunchOverhead:
    grpc: LaunchTimes
    inproc: LaunchTimes

    @property
    def ratio(self) -> float:
        return pct(self.grpc.total, 0.5) / pct(self.inproc.total, 0.5)

    @property
    def overhead_ms(self) -> float:
        return (pct(self.grpc.total, 0.5) - pct(self.inproc.total, 0.5)) * 1000


async def _launch_overhead(world: World, root: EmulatedRoot, n: int) -> LaunchOverhead:
    remote = GrpcLauncher(world, world.hosts[0])
    local = InProcLauncher(world, root)
    await local.start()
    g, p = LaunchTimes(), LaunchTimes()
    try:
        await remote.launch()  # warm-up: platform chain cache, connections, page cache of the image
        await local.launch()
        for i in range(n):  # interleaved, alternating which goes first
            pair = (remote, g), (local, p)
            for who, times in pair if i % 2 == 0 else reversed(pair):
                times.add(*(await who.launch()))
    finally:
        await remote.close()
        await local.close()
    return LaunchOverhead(g, p)


def launch_overhead(world: World, root: EmulatedRoot, n: int) -> LaunchOverhead:
    return asyncio.run(_launch_overhead(world, root, n))


# -- the platform's chain cache ------------------------------------------------------------------------


@dataclass
class ChainCache:
    cold_ms: float
    warm_p50_ms: float
    concurrent_calls: int
    concurrent_exports: float
    concurrent_kds_fetches: float
    concurrent_wall_ms: float


async def _chain_calls(address: str, world: World, n: int) -> list[float]:
    channel = secure_channel(address, world.tls_dir, "launcher")
    stub = platform_pb2_grpc.PlatformServiceStub(channel)
    await channel.channel_ready()

    async def one() -> float:
        t = time.perf_counter()
        await stub.GetCertificateChain(platform_pb2.GetCertificateChainRequest(), timeout=120)
        return time.perf_counter() - t

    try:
        return list(await asyncio.gather(*(one() for _ in range(n))))
    finally:
        await channel.close(None)


def exports_of(url: str) -> float:
    return metric_sum(url, "sevlaunch_firmware_commands_total", command="PDH_CERT_EXPORT")


def chain_cache(world: World, concurrent: int, warm_calls: int = 50) -> ChainCache:
    host = world.hosts[0]
    # Cold then warm on a fresh platform process without the on-disk CEK cache (a cold call also
    # fetches the CEK from the KDS).
    fresh = world.start_platform(host, cek_cache=False, tag="-cold")
    assert fresh.metrics_url is not None
    cold = asyncio.run(_chain_calls(fresh.address, world, 1))[0]
    warm = [asyncio.run(_chain_calls(fresh.address, world, 1))[0] for _ in range(warm_calls)]
    fresh.stop()
    # `concurrent` calls at once on another fresh platform: how many firmware exports do they cost?
    burst = world.start_platform(host, cek_cache=False, tag="-burst")
    assert burst.metrics_url is not None
    t = time.perf_counter()
    asyncio.run(_chain_calls(burst.address, world, concurrent))
    wall = time.perf_counter() - t
    exports = exports_of(burst.metrics_url)
    kds = metric_sum(burst.metrics_url, "sevlaunch_kds_fetches_total", outcome="ok")
    burst.stop()
    return ChainCache(cold * 1000, pct(warm, 0.5) * 1000, concurrent, exports, kds, wall * 1000)


# -- scale: many launches across hosts --------------------------------------------------------------


@dataclass
class Scale:
    launches: int
    hosts: int
    seconds: float
    owner_cpu_s: float
    exports_per_host: list[float]
    peak_rss_mb: dict[str, float]
    failures: int

    @property
    def launches_per_s(self) -> float:
        return self.launches / self.seconds


async def _scale(world: World, launches: int, per_host_concurrency: int) -> tuple[float, int]:
    launchers = [GrpcLauncher(world, h) for h in world.hosts]
    queues = [iter(range(i, launches, len(launchers))) for i in range(len(launchers))]
    failures = 0

    async def worker(gl: GrpcLauncher, q: object) -> None:
        nonlocal failures
        for _ in q:  # type: ignore[attr-defined]
            try:
                await gl.launch()
            except Exception:
                failures += 1

    t = time.perf_counter()
    try:
        await asyncio.gather(
            *(
                worker(gl, q)
                for gl, q in zip(launchers, queues, strict=True)
                for _ in range(per_host_concurrency)
            )
        )
    finally:
        for gl in launchers:
            await gl.close()
    return time.perf_counter() - t, failures


def scale(world: World, launches: int, per_host_concurrency: int = 8) -> Scale:
    assert world.owner is not None
    # Share the per-host queue between that host's workers.
    owner_cpu = tree_cpu_seconds(world.owner.pid)
    seconds, failures = asyncio.run(_scale(world, launches, per_host_concurrency))
    owner_cpu = tree_cpu_seconds(world.owner.pid) - owner_cpu
    exports = []
    rss: dict[str, float] = {"owner": tree_status_kb(world.owner.pid, "VmHWM") / 1024}
    for h in world.hosts:
        assert h.platform is not None and h.launcher is not None and h.platform.metrics_url
        exports.append(exports_of(h.platform.metrics_url))
        rss[f"platform{h.index}"] = proc_status_kb(h.platform.pid, "VmHWM") / 1024
        rss[f"launcher{h.index}"] = proc_status_kb(h.launcher.pid, "VmHWM") / 1024
    return Scale(launches, len(world.hosts), seconds, owner_cpu, exports, rss, failures)
