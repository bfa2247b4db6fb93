"""`sevlaunch-platform`: the platform service (one per SEV host).

    sevlaunch-platform --listen 0.0.0.0:50051 --tls-dir /etc/sevlaunch/tls \
        (--emulator STATE_DIR | --dev-sev /dev/sev) [--kds-url URL] [--cek-file F] [--cek-cache-dir DIR]
        [--vcek-cache-dir DIR] [--vcek-dir DIR | --vcek-file F] [--snp-cert-table PATH]
        [--metrics-listen :9101] [--health-listen 0.0.0.0:50061] [--kds-timeout 10]
        [--misc-cgroup-dir /sys/fs/cgroup]

Every flag is also an environment variable (`--tls-dir` ↔ SEVLAUNCH_TLS_DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from platform_svc.adapters.asids import (
    DEFAULT_MISC_CGROUP_DIR,
    AsidCollector,
    AsidPools,
    EmulatorAsids,
    MiscCgroupAsids,
)
from platform_svc.adapters.firmware import AsyncFirmware, EmulatorCertTable, FirmwareMetrics
from platform_svc.adapters.kds import (
    DEFAULT_KDS_URL,
    CEKDiskCache,
    EmulatorVekFetcher,
    KDSClient,
    KDSMetrics,
)
from platform_svc.adapters.metrics import PrometheusPlatformMetrics
from platform_svc.adapters.snp_store import FileCertTable, VekDiskCache, load_provisioned
from platform_svc.api.servicer import AUTHZ, SERVICE_NAME, PlatformServicer
from platform_svc.core.service import CEKSources, PlatformCore
from platform_svc.core.snp import CertTableStore, SnpCore, VekFetcher, VekSources
from sevlaunch.firmware import EmulatedFirmware, Firmware
from sevlaunch.firmware.devsev_snp import DevSevSnp
from sevlaunch.rpc import RpcServer
from sevlaunch.rpc.entry import (
    StartupError,
    add_server_flags,
    rpc_server_options,
    server_main,
    server_options,
)
from sevlaunch.rpc.server import DEFAULT_GRACE_SECONDS
from sevlaunch.rpc.v1 import platform_pb2_grpc
from sevlaunch.sev.chain import TrustedRoot, load_roots_file, pinned_roots
from sevlaunch.snp.certs import TrustedRoot as SnpTrustedRoot

DEFAULT_LISTEN = "0.0.0.0:50051"
DEFAULT_METRICS = ":9101"


@dataclass(frozen=True, kw_only=True)
class PlatformConfig:
    tls_dir: Path
    listen: str = DEFAULT_LISTEN
    identity: str = "platform"
    emulator: Path | None = None
    dev_sev: str | None = None
    kds_url: str | None = None
    cek_file: Path | None = None
    cek_cache_dir: Path | None = None
    vcek_cache_dir: Path | None = None
    vcek_dir: Path | None = None
    vcek_file: Path | None = None
    snp_cert_table: Path | None = None
    metrics_listen: str | None = DEFAULT_METRICS
    health_listen: str | None = None
    kds_timeout: float = 10.0
    kds_attempts: int = 3
    chain_max_age: float | None = 3600.0
    grace: float = DEFAULT_GRACE_SECONDS
    #: Where the root of the cgroup v2 hierarchy is (its misc.capacity/misc.current: the ASID gauges).
    misc_cgroup_dir: Path = DEFAULT_MISC_CGROUP_DIR


def _open_firmware(cfg: PlatformConfig) -> tuple[Firmware, EmulatedFirmware | None]:
    if (cfg.emulator is None) == (cfg.dev_sev is None):
        raise ValueError("exactly one of --emulator and --dev-sev is needed")
    if cfg.emulator is not None:
        emulator = EmulatedFirmware(cfg.emulator)
        return emulator, emulator
    assert cfg.dev_sev is not None
    return DevSevSnp(cfg.dev_sev), None


async def create_server(
    cfg: PlatformConfig, *, firmware: Firmware | None = None
) -> tuple[RpcServer, PlatformCore, AsyncFirmware]:
    """The server, not started. `firmware` overrides the backend (tests wrap the emulator)."""
    if firmware is None:
        firmware, emulator = _open_firmware(cfg)
    else:
        emulator = firmware if isinstance(firmware, EmulatedFirmware) else getattr(firmware, "emulator", None)
    server = RpcServer(service_name=SERVICE_NAME, authz=AUTHZ, **rpc_server_options(cfg))
    registry = server.metrics.registry
    fw = AsyncFirmware(firmware, FirmwareMetrics(registry), emulator=emulator)
    asids: AsidPools = (
        EmulatorAsids(emulator) if emulator is not None else MiscCgroupAsids(cfg.misc_cgroup_dir)
    )
    registry.register(AsidCollector(asids))

    roots: Sequence[TrustedRoot]
    if emulator is not None:
        # The emulated chip's ASK/ARK: trusted here only to name them in the chain; verifiers must be
        # told explicitly to trust this root.
        roots = [load_roots_file(emulator.ask_ark(), emulator.config.generation)]
    else:
        roots = pinned_roots()

    file_cek = cfg.cek_file.read_bytes() if cfg.cek_file is not None else None
    cache = CEKDiskCache(cfg.cek_cache_dir) if cfg.cek_cache_dir is not None else None
    kds_url = cfg.kds_url or (None if emulator is not None else DEFAULT_KDS_URL)
    if kds_url is not None:
        kds = KDSClient(kds_url, KDSMetrics(registry), timeout=cfg.kds_timeout, max_attempts=cfg.kds_attempts)
        sources = CEKSources(file_cek=file_cek, cache=cache, fetch=kds.fetch_cek, fetch_name="kds")
    elif emulator is not None:
        emu = emulator

        async def emulator_cek(chip_hex: str) -> bytes:
            return await asyncio.to_thread(emu.kds_cek)

        sources = CEKSources(file_cek=file_cek, cache=cache, fetch=emulator_cek, fetch_name="emulator")
    else:  # pragma: no cover - kds_url defaults to AMD's for real chips
        sources = CEKSources(file_cek=file_cek, cache=cache)

    metrics = PrometheusPlatformMetrics(registry)
    core = PlatformCore(fw, roots, sources, metrics, chain_max_age=cfg.chain_max_age)
    snp = _snp_core(cfg, fw, emulator, metrics, registry)
    platform_pb2_grpc.add_PlatformServiceServicer_to_server(PlatformServicer(core, snp), server.grpc_server)
    return server, core, fw


def _emulator_snp_roots(emulator: EmulatedFirmware) -> list[SnpTrustedRoot]:
    return [emulator.snp_trusted_root()]


def _snp_core(
    cfg: PlatformConfig,
    fw: AsyncFirmware,
    emulator: EmulatedFirmware | None,
    metrics: PrometheusPlatformMetrics,
    registry: CollectorRegistry,
) -> SnpCore:
    """The SEV-SNP side: AMD's pinned SNP roots, plus, for the emulator only, its own emulated root
    (configured explicitly by choosing the emulator backend, as for SEV)."""
    snp_roots: Sequence[SnpTrustedRoot] | Callable[[], Sequence[SnpTrustedRoot]] = []
    if emulator is not None:
        # Made on the first SNP call, not at every start: the emulator makes its SNP root on first use.
        snp_roots = functools.partial(_emulator_snp_roots, emulator)

    kds_url = cfg.kds_url or (None if emulator is not None else DEFAULT_KDS_URL)
    fetcher: VekFetcher | None = None
    if kds_url is not None:
        fetcher = KDSClient(
            kds_url, KDSMetrics(registry, snp=True),
            timeout=cfg.kds_timeout, max_attempts=cfg.kds_attempts,
        )  # fmt: skip
    elif emulator is not None:
        fetcher = EmulatorVekFetcher(emulator)
    provisioned = None
    if cfg.vcek_dir is not None or cfg.vcek_file is not None:
        provisioned = load_provisioned(cfg.vcek_dir, vcek_file=cfg.vcek_file)
    sources = VekSources(
        fetcher=fetcher,
        cache=VekDiskCache(cfg.vcek_cache_dir) if cfg.vcek_cache_dir is not None else None,
        provisioned=provisioned,
        kds_timeout=cfg.kds_timeout,
        fetch_name="emulator" if isinstance(fetcher, EmulatorVekFetcher) else "kds",
    )
    tables: CertTableStore | None = None
    if cfg.snp_cert_table is not None:
        tables = FileCertTable(cfg.snp_cert_table)
    elif emulator is not None:
        tables = EmulatorCertTable(emulator)
    return SnpCore(fw, snp_roots, sources, metrics, cert_tables=tables, clock=lambda: datetime.now(UTC))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sevlaunch-platform", description="sevlaunch platform service")
    add_server_flags(p, listen=DEFAULT_LISTEN, identity="platform", metrics_listen=DEFAULT_METRICS)
    backend = p.add_mutually_exclusive_group(required=True)
    backend.add_argument("--emulator", metavar="STATE_DIR", help="use the emulated firmware in STATE_DIR")
    backend.add_argument("--dev-sev", metavar="PATH", help="use the real firmware device (e.g. /dev/sev)")
    p.add_argument("--kds-url", help=f"AMD KDS base URL (default {DEFAULT_KDS_URL}; emulator: its own)")
    p.add_argument("--cek-file", help="a provisioned ASK-signed CEK (instead of the KDS)")
    p.add_argument("--cek-cache-dir", help="on-disk cache of ASK-signed CEKs, by chip id")
    p.add_argument("--vcek-cache-dir", help="on-disk cache of SNP VCEKs and cert chains, by chip and TCB")
    offline = p.add_mutually_exclusive_group()
    offline.add_argument(
        "--vcek-dir", help="provisioned SNP certificates (vcek/vlek/ask/asvk/ark .pem or .der), no KDS needed"
    )
    offline.add_argument("--vcek-file", help="a provisioned VCEK (PEM or DER) for the reported TCB")
    p.add_argument("--snp-cert-table", help="file of the certificate table for guests' extended reports")
    p.add_argument("--kds-timeout", type=float, default=10.0, help="deadline in seconds for one CEK fetch")
    p.add_argument("--kds-attempts", type=int, default=3, help="KDS attempts within the deadline")
    p.add_argument(
        "--misc-cgroup-dir",
        default=str(DEFAULT_MISC_CGROUP_DIR),
        help="the host's cgroup v2 root, whose misc.capacity and misc.current give the SEV ASID gauges "
        "(in a container: the host's /sys/fs/cgroup mounted read-only)",
    )
    p.add_argument(
        "--chain-max-age",
        type=float,
        default=3600.0,
        help="seconds before a cached chain is re-exported (also re-exported on PDH change)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> PlatformConfig:
    if args.emulator and args.dev_sev:
        raise StartupError("--emulator and --dev-sev exclude each other")
    return PlatformConfig(
        **server_options(args),
        emulator=Path(args.emulator) if args.emulator else None,
        dev_sev=args.dev_sev,
        kds_url=args.kds_url,
        cek_file=Path(args.cek_file) if args.cek_file else None,
        cek_cache_dir=Path(args.cek_cache_dir) if args.cek_cache_dir else None,
        vcek_cache_dir=Path(args.vcek_cache_dir) if args.vcek_cache_dir else None,
        vcek_dir=Path(args.vcek_dir) if args.vcek_dir else None,
        vcek_file=Path(args.vcek_file) if args.vcek_file else None,
        snp_cert_table=Path(args.snp_cert_table) if args.snp_cert_table else None,
        kds_timeout=args.kds_timeout,
        kds_attempts=args.kds_attempts,
        chain_max_age=args.chain_max_age if args.chain_max_age > 0 else None,
        misc_cgroup_dir=Path(args.misc_cgroup_dir),
    )


async def serve(cfg: PlatformConfig) -> None:
    server, _, _ = await create_server(cfg)
    await server.start()
    await server.serve_until_signal()


def main(argv: Sequence[str] | None = None) -> int:
    return server_main(build_parser(), argv, lambda args: serve(config_from_args(args)))


if __name__ == "__main__":
    raise SystemExit(main())
