"""`sevlaunch-launcher`: the launcher service (one per SEV host).

    sevlaunch-launcher --listen 0.0.0.0:50052 --tls-dir /etc/sevlaunch/tls --platform localhost:50051 \
        --hypervisor {emulated,libvirt} [--emulator STATE_DIR] [--libvirt-uri qemu:///system] \
        [--db /var/lib/sevlaunch/launcher.db] [--secret-gpa 0x80c000] \
        [--phase-timeout 30[,SECRET_RELEASED=60,...]] [--max-concurrent 8] [--metrics-listen :9102] \
        [--health-listen 0.0.0.0:50062] [--owner-identity owner] [--platform-identity platform] \
        [--image-dir /usr/share/OVMF:/var/lib/libvirt/images] \
        [--test-host-unlocked-memory] [--test-host-asids SEV:ES]      (test hosts without SEV only)

Every flag is also an environment variable (`--tls-dir` ↔ SEVLAUNCH_TLS_DIR).
On SIGTERM the server stops taking calls and every launch still in flight fails closed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from launcher_svc.adapters.grpc_clients import OwnerClient, PlatformClient
from launcher_svc.adapters.prometheus import LauncherMetrics
from launcher_svc.adapters.sqlite_store import open_launch_store
from launcher_svc.api.servicer import AUTHZ, SERVICE_NAME, LauncherServicer
from launcher_svc.core.launcher import Launcher, LauncherConfig
from launcher_svc.core.ports import Hypervisor
from launcher_svc.core.spec import PathPolicy, validate_vcpu_type
from launcher_svc.core.state import Phase
from sevlaunch.errors import InvalidArgument
from sevlaunch.rpc import ClientMetrics, RpcServer, aio_client_interceptors, launch_id_scope
from sevlaunch.rpc.entry import add_server_flags, rpc_server_options, server_main, server_options
from sevlaunch.rpc.server import DEFAULT_GRACE_SECONDS
from sevlaunch.rpc.v1 import launcher_pb2_grpc
from sevlaunch.tlsnames import server_name

DEFAULT_LISTEN = "0.0.0.0:50052"
DEFAULT_METRICS = ":9102"
DEFAULT_DB = "/var/lib/sevlaunch/launcher.db"
DEFAULT_IMAGE_DIRS = ("/usr/share/OVMF", "/var/lib/libvirt/images")
#: A host with this device is a real SEV host: there, guest memory always stays locked.
SEV_DEVICE = "/dev/sev"
TEST_HOST_UNLOCKED_MEMORY_HELP = (
    "TEST HOSTS ONLY: define libvirt domains without <memoryBacking><locked/>, for a host that cannot lock"
    " guest memory (no CAP_SYS_RESOURCE; libvirt refuses with locked_memory_refused). Encrypted guest memory"
    f" must never be swapped, so the launcher refuses this flag where {SEV_DEVICE} exists"
)
TEST_HOST_ASIDS_HELP = (
    "TEST HOSTS ONLY: SEV:SEV-ES guest ASID counts (e.g. 16:16) to use when libvirt reports none, as on a"
    " CPU without SEV whose QEMU is a stand-in (libvirt reads the counts from CPUID); refused where"
    f" {SEV_DEVICE} exists"
)


def parse_asids(text: str) -> tuple[int, int]:
    sev, sep, es = text.partition(":")
    if not sep:
        raise ValueError("--test-host-asids is SEV:SEV-ES, e.g. 16:16")
    counts = (int(sev), int(es))
    if min(counts) < 0 or sum(counts) == 0 or max(counts) > 1024:
        raise ValueError("--test-host-asids counts must be 0..1024 and not both 0")
    return counts


@dataclass(frozen=True, kw_only=True)
class LauncherServerConfig:
    tls_dir: Path
    listen: str = DEFAULT_LISTEN
    identity: str = "launcher"
    platform: str | None = None
    hypervisor: str = "libvirt"
    emulator: Path | None = None
    libvirt_uri: str = "qemu:///system"
    # Test hosts only: domains without <locked/> (see TEST_HOST_UNLOCKED_MEMORY_HELP).
    test_host_unlocked_memory: bool = False
    test_host_asids: tuple[int, int] | None = None  # (SEV, SEV-ES) when the host CPU reports none
    db: Path = Path(DEFAULT_DB)
    metrics_listen: str | None = DEFAULT_METRICS
    health_listen: str | None = None
    grace: float = DEFAULT_GRACE_SECONDS
    vcpu_type: str = "EPYC-v4"
    # The identity (→ NAME.sevlaunch.internal) or full DNS name every owner's certificate must be valid for,
    # and platform_svc's (`sevlaunch.tlsnames.server_name`).
    owner_identity: str = "owner"
    platform_identity: str = "platform"
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def parse_phase_timeouts(text: str) -> tuple[float, dict[Phase, float]]:
    """ "30" or "30,SECRET_RELEASED=60,SESSION_OPENED=10": a default and per-phase overrides."""
    default = LauncherConfig().phase_timeout
    overrides: dict[Phase, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        seconds = float(value if sep else name)
        if not 0 < seconds <= 3600:
            raise ValueError(f"phase timeout {seconds} out of range (0, 3600]")
        if sep:
            try:
                overrides[Phase(name.strip().upper())] = seconds
            except ValueError:
                raise ValueError(f"unknown phase {name!r}") from None
        else:
            default = seconds
    return default, overrides


def open_hypervisor(cfg: LauncherServerConfig, *, metrics: LauncherMetrics | None = None) -> Hypervisor:
    if cfg.hypervisor == "libvirt":
        from launcher_svc.adapters.libvirt_backend import LibvirtHypervisor

        return LibvirtHypervisor(
            cfg.libvirt_uri, lock_memory=not cfg.test_host_unlocked_memory, test_asids=cfg.test_host_asids
        )
    if cfg.hypervisor == "emulated":
        if cfg.emulator is None:
            raise ValueError("--hypervisor emulated needs --emulator STATE_DIR (the chip platform_svc uses)")
        from launcher_svc.adapters.emulated import EmulatedHypervisor
        from sevlaunch.firmware import EmulatedFirmware

        firmware = EmulatedFirmware(cfg.emulator)
        return EmulatedHypervisor(
            firmware,
            cfg.emulator / "hypervisor",
            vcpu_type=cfg.vcpu_type,
            firmware_observer=metrics.firmware_command if metrics is not None else None,
        )
    raise ValueError(f"unknown hypervisor {cfg.hypervisor!r}")


async def create_server(
    cfg: LauncherServerConfig, *, hypervisor: Hypervisor | None = None
) -> tuple[RpcServer, Launcher]:
    """The server (not started) and its started launcher core; the core's reconciler already ran."""
    server = RpcServer(service_name=SERVICE_NAME, authz=AUTHZ, **rpc_server_options(cfg))
    metrics = LauncherMetrics(server.metrics.registry)
    hv = hypervisor if hypervisor is not None else open_hypervisor(cfg, metrics=metrics)
    cfg.db.parent.mkdir(parents=True, exist_ok=True)
    store = open_launch_store(str(cfg.db))
    client_metrics = ClientMetrics(server.metrics.registry)
    platform = (
        PlatformClient(
            cfg.platform,
            cfg.tls_dir,
            cfg.identity,
            platform_identity=cfg.platform_identity,
            interceptors=aio_client_interceptors(client_metrics),
        )
        if cfg.platform
        else None
    )
    owners = OwnerClient(
        cfg.tls_dir,
        cfg.identity,
        owner_identity=cfg.owner_identity,
        interceptors=aio_client_interceptors(client_metrics),
    )
    core = Launcher(
        hypervisor=hv,
        store=store,
        platform=platform,
        owners=owners,
        # One vCPU model setting: the emulated backend's default is the model SEV-ES guests are pinned to.
        config=replace(cfg.launcher, vcpu_type=cfg.vcpu_type),
        metrics=metrics,
        launch_scope=launch_id_scope,
    )
    await core.start()
    launcher_pb2_grpc.add_LauncherServiceServicer_to_server(LauncherServicer(core), server.grpc_server)
    return server, core


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sevlaunch-launcher", description="sevlaunch launcher service")
    add_server_flags(p, listen=DEFAULT_LISTEN, identity="launcher", metrics_listen=DEFAULT_METRICS)
    p.add_argument("--platform", metavar="HOST:PORT", help="platform_svc endpoint (needed for Launch)")
    p.add_argument("--hypervisor", choices=["emulated", "libvirt"], default="libvirt", help="backend")
    p.add_argument("--emulator", metavar="STATE_DIR", help="emulated chip directory shared with platform_svc")
    p.add_argument("--libvirt-uri", default="qemu:///system", help="libvirt connection URI")
    p.add_argument("--test-host-unlocked-memory", action="store_true", help=TEST_HOST_UNLOCKED_MEMORY_HELP)
    p.add_argument("--test-host-asids", metavar="SEV:ES", help=TEST_HOST_ASIDS_HELP)
    p.add_argument("--db", default=DEFAULT_DB, help="SQLite file of the launch state machine")
    p.add_argument(
        "--secret-gpa",
        type=lambda v: int(v, 0),
        help="guest physical address for LAUNCH_SECRET when the OVMF declares no secret area",
    )
    p.add_argument(
        "--phase-timeout",
        default="30",
        help="seconds per phase, optionally with overrides: 30,SECRET_RELEASED=60",
    )
    p.add_argument("--max-concurrent", type=int, default=8, help="launches in flight at once")
    p.add_argument(
        "--image-dir",
        default=":".join(DEFAULT_IMAGE_DIRS),
        help="colon-separated directories firmware, kernels and disks may come from",
    )
    p.add_argument("--reconcile-interval", type=float, default=10.0, help="seconds between reconciler rounds")
    p.add_argument(
        "--reconcile-foreign",
        action="store_true",
        help="also destroy paused SEV domains the launcher did not create",
    )
    p.add_argument(
        "--vcpu-type",
        default="EPYC-v4",
        help="vCPU model pinned for SEV-ES guests whose spec names none (also the emulated VMSAs')",
    )
    p.add_argument(
        "--owner-identity",
        default="owner",
        help="identity NAME (its certificate carries NAME.sevlaunch.internal) or full DNS name an owner's"
        " server certificate must be valid for; any other server is refused",
    )
    p.add_argument(
        "--platform-identity",
        default="platform",
        help="identity NAME or full DNS name platform_svc's server certificate must be valid for",
    )
    return p


def config_from_args(args: argparse.Namespace) -> LauncherServerConfig:
    default_timeout, overrides = parse_phase_timeouts(args.phase_timeout)
    if args.max_concurrent < 1:
        raise ValueError("--max-concurrent must be at least 1")
    try:
        validate_vcpu_type(args.vcpu_type)
    except InvalidArgument as exc:
        raise ValueError(f"--vcpu-type: {exc.detail}") from None
    for flag, value in (
        ("--owner-identity", args.owner_identity),
        ("--platform-identity", args.platform_identity),
    ):
        try:
            server_name(value)
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None
    for flag, given in (
        ("--test-host-unlocked-memory", args.test_host_unlocked_memory),
        ("--test-host-asids", args.test_host_asids),
    ):
        if not given:
            continue
        if args.hypervisor != "libvirt":
            raise ValueError(f"{flag} applies to --hypervisor libvirt only")
        if os.path.exists(SEV_DEVICE):
            raise ValueError(f"{flag} refused: {SEV_DEVICE} exists, this is a real SEV host, not a test host")
    dirs = tuple(d for d in args.image_dir.split(":") if d)
    if not dirs or not all(d.startswith("/") for d in dirs):
        raise ValueError("--image-dir needs absolute directories")
    return LauncherServerConfig(
        **server_options(args),
        platform=args.platform,
        hypervisor=args.hypervisor,
        emulator=Path(args.emulator) if args.emulator else None,
        libvirt_uri=args.libvirt_uri,
        test_host_unlocked_memory=args.test_host_unlocked_memory,
        test_host_asids=parse_asids(args.test_host_asids) if args.test_host_asids else None,
        db=Path(args.db),
        vcpu_type=args.vcpu_type,
        owner_identity=args.owner_identity,
        platform_identity=args.platform_identity,
        launcher=LauncherConfig(
            paths=PathPolicy(dirs),
            phase_timeout=default_timeout,
            phase_timeouts=overrides,
            max_concurrent=args.max_concurrent,
            secret_gpa=args.secret_gpa,
            reconcile_interval=args.reconcile_interval,
            reconcile_foreign=args.reconcile_foreign,
        ),
    )


async def serve(cfg: LauncherServerConfig) -> None:
    server, core = await create_server(cfg)
    await server.start()
    try:
        await server.serve_until_signal()
    finally:
        await core.stop()


def main(argv: Sequence[str] | None = None) -> int:
    return server_main(build_parser(), argv, lambda args: serve(config_from_args(args)))


if __name__ == "__main__":
    raise SystemExit(main())
