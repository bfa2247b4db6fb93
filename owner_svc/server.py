"""`sevlaunch-owner`: the guest owner's gRPC service.

    sevlaunch-owner --listen 0.0.0.0:50053 --tls-dir certs --db owner.db --kek-file kek --create-kek \\
        --trust-root emulated=state/ask_ark.cert --publisher-key distro.pub \\
        --refvalues-url https://example.org/ovmf.dsse --metrics-listen :9103 --health-listen 0.0.0.0:50063 \\
        --guest-listen 0.0.0.0:50054 --guest-endpoint https://owner.example.org:50054 \\
        --guest-tls-cert guest.pem --guest-tls-key guest.key --guest-tls-ca guest-ca.pem

`--guest-listen` turns SEV-SNP on: the guest port (`owner_svc.api.guest`, server-authenticated TLS
only, rate-limited) and AuthorizeSnpLaunch, whose init data names `--guest-endpoint` (default: the
listen address, which must then not be a wildcard) and the CA in `--guest-tls-ca`.

Every flag is also an environment variable (`--kek-file` ↔ `SEVLAUNCH_KEK_FILE`); repeatable flags take
a comma-separated list there.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from owner_svc.adapters.kek import KEKFileError, KeyEncryptionKey
from owner_svc.adapters.metrics import PrometheusOwnerMetrics
from owner_svc.adapters.refvalues_http import RefValuesPoller
from owner_svc.adapters.sqlite import SQLiteStore
from owner_svc.adapters.store import DEFAULT_DB_WAIT, OwnerStore, open_store
from owner_svc.adapters.walflush import run_deferred
from owner_svc.api.guest import (
    DEFAULT_GLOBAL_BURST,
    DEFAULT_GLOBAL_RATE,
    DEFAULT_PEER_BURST,
    DEFAULT_PEER_RATE,
    GuestServer,
)
from owner_svc.api.ratelimit import GuestRateLimiter
from owner_svc.api.servicer import AUTHZ, SERVICE_NAME, CallRunner, OwnerServicer
from owner_svc.core.ports import StoreError
from owner_svc.core.refset import ReferenceValueSet
from owner_svc.core.service import AMD_GENERATIONS, DEFAULT_SESSION_TTL, OwnerCore
from owner_svc.core.snp import DEFAULT_AUTHORIZATION_TTL, SnpSettings
from owner_svc.workers import MAX_WORKERS, supervisor_argv, worker_argv
from sevlaunch.dsn import redact_dsn
from sevlaunch.errors import ServiceError
from sevlaunch.ownerdb import is_postgres_url
from sevlaunch.refvalues import PublisherKey
from sevlaunch.rpc import RpcServer, current_launch_id
from sevlaunch.rpc.entry import (
    StartupError,
    add_server_flags,
    rpc_server_options,
    server_main,
    server_options,
)
from sevlaunch.rpc.server import DEFAULT_GRACE_SECONDS
from sevlaunch.rpc.tls import TLSMaterialError
from sevlaunch.rpc.v1 import owner_pb2_grpc
from sevlaunch.sev.chain import TrustedRoot, load_roots_file
from sevlaunch.sev.errors import SevError
from sevlaunch.snp.certs import TrustedRoot as SnpTrustedRoot
from sevlaunch.snp.certs import root_from_pem
from sevlaunch.snp.tcb import Product

log = logging.getLogger("owner_svc")

DEFAULT_LISTEN = "0.0.0.0:50053"
DEFAULT_METRICS_LISTEN = "0.0.0.0:9103"
DEFAULT_REFVALUES_INTERVAL = 300.0
DEFAULT_CHECKPOINT_INTERVAL = 300.0
#: Threads running the core's calls (each blocks on its store's reads and the group commit): enough that
#: a commit's fsync finds the next batch already queued, few enough that they do not fight for the GIL.
DEFAULT_CORE_THREADS = 16


class ConfigError(StartupError):
    """A startup configuration problem, logged as one line ("cannot start")."""


@dataclass
class OwnerConfig:
    tls_dir: Path
    db: str | Path  # a SQLite file, or a postgresql:// URL (a str: Path() would mangle the URL)
    kek_file: Path
    db_wait: float = DEFAULT_DB_WAIT
    listen: str = "127.0.0.1:0"
    identity: str = "owner"
    create_kek: bool = False
    trust_roots: Sequence[str] = ()
    publisher_keys: Sequence[str] = ()
    refvalues_urls: Sequence[str] = ()
    refvalues_interval: float = DEFAULT_REFVALUES_INTERVAL
    session_ttl: float = DEFAULT_SESSION_TTL
    metrics_listen: str | None = None
    health_listen: str | None = None
    grace: float = DEFAULT_GRACE_SECONDS
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL
    #: This process's index among `--workers` (0 when there is one): only worker 0 polls reference values.
    worker_index: int = 0
    core_threads: int = DEFAULT_CORE_THREADS
    # SEV-SNP: the guest port and what the init data names.
    guest_listen: str | None = None
    guest_endpoint: str | None = None
    guest_tls_cert: Path | None = None
    guest_tls_key: Path | None = None
    guest_tls_ca: Path | None = None
    snp_trust_roots: Sequence[str] = ()
    snp_authorization_ttl: float = DEFAULT_AUTHORIZATION_TTL
    guest_peer_rate: float = DEFAULT_PEER_RATE
    guest_peer_burst: float = DEFAULT_PEER_BURST
    guest_global_rate: float = DEFAULT_GLOBAL_RATE
    guest_global_burst: float = DEFAULT_GLOBAL_BURST


@dataclass
class SnpSetup:
    """What the SNP settings are made of once the guest port is bound (its port may be 0 until then)."""

    endpoint: str | None
    ca_pem: str
    roots: tuple[SnpTrustedRoot, ...]
    authorization_ttl: float


@dataclass
class OwnerApp:
    rpc: RpcServer
    core: OwnerCore
    store: OwnerStore
    poller: RefValuesPoller | None
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL
    guest: GuestServer | None = None
    snp_setup: SnpSetup | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start_guest(self) -> None:
        """Binds and starts the guest port, then turns SNP on in the core with the endpoint it serves."""
        if self.guest is None or self.snp_setup is None or self.guest.port:
            return
        setup = self.snp_setup
        if setup.endpoint is None:
            _endpoint_of(self.guest.host, 1)  # a wildcard listen address needs --guest-endpoint: say so first
        await self.guest.start()
        endpoint = setup.endpoint or _endpoint_of(self.guest.host, self.guest.port)
        try:
            self.core.snp = SnpSettings(
                endpoint=endpoint,
                ca_pem=setup.ca_pem,
                extra_roots=setup.roots,
                authorization_ttl=setup.authorization_ttl,
            )
        except (SevError, ValueError) as exc:
            await self.guest.stop(0)
            raise ConfigError(f"--guest-endpoint/--guest-tls-ca: {exc}") from None

    async def start(self) -> None:
        await self.start_guest()
        await self.rpc.start()
        loop = asyncio.get_running_loop()
        if self.poller is not None:
            self._tasks.append(loop.create_task(self.poller.run()))
        # One checkpoint now: the log and the metrics name the head from the start, and the staleness
        # alert measures from a checkpoint this process made, not from an interval it has yet to wait.
        await self.checkpoint()
        self._tasks.append(loop.create_task(self._checkpoints()))

    async def _checkpoints(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_interval)
            await self.checkpoint()

    async def checkpoint(self) -> None:
        """Logs and exports the audit checkpoint; a store fault is logged, never fatal to the loop."""
        try:
            await asyncio.to_thread(self.core.audit_checkpoint)
        except StoreError as exc:
            log.error("audit checkpoint failed", extra={"error": str(exc)})

    async def stop(self, grace: float | None = None) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.rpc.stop(grace)
        if self.guest is not None and self.guest.port:
            await self.guest.stop(grace if grace is not None else self.rpc.grace)
        # The last head this owner wrote, outside the database, after the last call it served.
        await self.checkpoint()
        self.store.close()


def load_trust_root(spec: str) -> TrustedRoot:
    """`[NAME=]FILE`: an ASK‖ARK file trusted in addition to the pinned AMD roots."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = re.sub(r"[^a-z0-9._-]", "-", Path(spec).stem.lower()) or "extra"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read trust root {path}: {exc.strerror}") from None
    try:
        root = load_roots_file(data, name)
    except SevError as exc:
        raise ConfigError(f"trust root {path} is not a valid ASK||ARK file: {exc}") from None
    if root.generation is None and name in AMD_GENERATIONS:
        # `milan.cert` would otherwise be trusted as "milan", and a workload allowing AMD's Milan would
        # accept whatever this root signs. AMD's own ARK (byte-equal to the pinned one) keeps its name.
        raise ConfigError(
            f"trust root {path} would be named {name!r}, an AMD generation, but its ARK is not AMD's: "
            "give it another name (NAME=FILE)"
        )
    return root


def load_publisher_key(path: str) -> PublisherKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read publisher key {path}: {exc.strerror}") from None
    try:
        return PublisherKey.from_pem(data, name=Path(path).name)
    except SevError as exc:
        raise ConfigError(f"publisher key {path}: {exc}") from None


def _endpoint_of(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - parsing, not binding
        raise ConfigError("--guest-listen is a wildcard address: give --guest-endpoint (what guests dial)")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host.lower()}:{port}"


def load_snp_trust_root(spec: str) -> SnpTrustedRoot:
    """`PRODUCT=FILE`: a PEM bundle of an ARK and its ASK/ASVK (an emulated AMD root), trusted for SEV-SNP
    in addition to AMD's pinned roots, for that product only."""
    product_name, sep, path = spec.partition("=")
    if not sep:
        raise ConfigError(f"--snp-trust-root {spec!r}: PRODUCT=FILE (milan, genoa, turin)")
    try:
        product = Product.parse(product_name)
        data = Path(path).read_bytes()
        return root_from_pem(data, product, name=f"{Path(path).name} ({product.value})")
    except OSError as exc:
        raise ConfigError(f"cannot read SNP trust root {path}: {exc.strerror}") from None
    except SevError as exc:
        raise ConfigError(f"SNP trust root {path}: {exc}") from None


def _snp_setup(config: OwnerConfig) -> SnpSetup | None:
    if config.guest_listen is None:
        if config.guest_endpoint or config.snp_trust_roots:
            raise ConfigError("--guest-endpoint and --snp-trust-root need --guest-listen (the guest port)")
        return None
    if not (config.guest_tls_cert and config.guest_tls_key and config.guest_tls_ca):
        raise ConfigError("--guest-listen needs --guest-tls-cert, --guest-tls-key and --guest-tls-ca")
    try:
        ca_pem = config.guest_tls_ca.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --guest-tls-ca {config.guest_tls_ca}: {exc}") from None
    roots = tuple(load_snp_trust_root(s) for s in config.snp_trust_roots)
    setup = SnpSetup(config.guest_endpoint, ca_pem, roots, config.snp_authorization_ttl)
    # Checked now (with a stand-in port when it is only known once bound), so a bad endpoint or CA
    # stops the start in one line.
    try:
        SnpSettings(
            endpoint=config.guest_endpoint or "https://localhost:1",
            ca_pem=ca_pem,
            authorization_ttl=config.snp_authorization_ttl,
        )
    except (SevError, ValueError) as exc:
        raise ConfigError(f"--guest-endpoint/--guest-tls-ca: {exc}") from None
    return setup


def build_app(config: OwnerConfig) -> OwnerApp:
    try:
        kek = KeyEncryptionKey.from_file(config.kek_file, create=config.create_kek)
    except KEKFileError as exc:
        raise ConfigError(str(exc)) from None
    roots = [load_trust_root(spec) for spec in config.trust_roots]
    snp_setup = _snp_setup(config)
    publishers = [load_publisher_key(p) for p in config.publisher_keys]
    if not publishers:
        # Not fatal (reference values can come later with a restart), but nothing will be released.
        log.warning("no --publisher-key given: no reference value will be trusted, every release refused")
    store = open_store(config.db, audit_mac_key=kek.audit_key, db_wait=config.db_wait)
    try:
        # The database and the audit log's tail against its MACed head: on a damaged log the owner
        # would append to something that no longer proves anything, so it does not serve at all.
        head = store.check_integrity()
    except StoreError as exc:
        store.close()
        raise ConfigError(f"--db {_shown(config.db)}: {_message(exc)}") from None
    log.info(
        "audit log checked",
        extra={"seq": head.seq, "hash": head.hash, "mac": head.mac, "checkpoint": str(head)},
    )
    refset = ReferenceValueSet(publishers)
    try:
        rpc = RpcServer(service_name=SERVICE_NAME, authz=AUTHZ, **rpc_server_options(config))
    except TLSMaterialError as exc:
        store.close()
        raise ConfigError(str(exc)) from None
    core = OwnerCore(
        store,
        kek,
        refset,
        extra_roots=roots,
        session_ttl=config.session_ttl,
        metrics=PrometheusOwnerMetrics(rpc.metrics.registry),
        launch_id=current_launch_id,
    )
    # The stored manifests, each re-verified against the keys configured now; from then on every
    # decision reloads them when the store's generation moved (another replica imported or revoked).
    core.sync_reference_values()
    # Over SQLite the launch storm's calls run on the loop's thread and await their flush; PostgreSQL's
    # calls block on the network, so they keep their threads (and share COMMITs by group commit).
    hot_path: CallRunner = run_deferred if isinstance(store, SQLiteStore) else asyncio.to_thread
    owner_pb2_grpc.add_OwnerServiceServicer_to_server(OwnerServicer(core, hot_path=hot_path), rpc.grpc_server)
    guest = None
    if snp_setup is not None:
        assert config.guest_listen and config.guest_tls_cert and config.guest_tls_key
        try:
            guest = GuestServer(
                core,
                listen=config.guest_listen,
                cert_file=config.guest_tls_cert,
                key_file=config.guest_tls_key,
                metrics=rpc.metrics,
                limiter=GuestRateLimiter(
                    per_peer_rate=config.guest_peer_rate,
                    per_peer_burst=config.guest_peer_burst,
                    global_rate=config.guest_global_rate,
                    global_burst=config.guest_global_burst,
                ),
            )
        except (TLSMaterialError, ValueError) as exc:
            store.close()
            raise ConfigError(str(exc)) from None

    def import_polled(envelope: bytes, url: str) -> bool:
        return core.import_reference_values(f"poller:{url}", envelope, url)[1]

    poller = None
    if config.refvalues_urls and config.worker_index == 0:
        poller = RefValuesPoller(
            config.refvalues_urls, interval=config.refvalues_interval, importer=import_polled
        )
    return OwnerApp(
        rpc=rpc,
        core=core,
        store=store,
        poller=poller,
        checkpoint_interval=config.checkpoint_interval,
        guest=guest,
        snp_setup=snp_setup,
    )


def _shown(db: str | Path) -> str:
    """`--db` for a message: a file as given, a PostgreSQL URL without its secrets."""
    return redact_dsn(db) if isinstance(db, str) and is_postgres_url(db) else str(db)


def _message(exc: StoreError) -> str:
    return exc.detail if isinstance(exc, ServiceError) else str(exc)


def _list(value: object) -> list[str]:
    # A repeatable flag from the environment arrives as one comma-separated string.
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]  # type: ignore[attr-defined]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sevlaunch-owner", description="The guest owner's attestation service.")
    add_server_flags(p, listen=DEFAULT_LISTEN, identity="owner", metrics_listen=DEFAULT_METRICS_LISTEN)
    p.add_argument("--db", required=True, help="the store: a SQLite file, or a postgresql:// URL")
    p.add_argument(
        "--db-wait",
        type=float,
        default=DEFAULT_DB_WAIT,
        help="PostgreSQL: seconds a call waits for a database connection before it is UNAVAILABLE",
    )
    p.add_argument(
        "--kek-file", required=True, help="key-encryption key file (32 bytes, raw or base64; 0600)"
    )
    p.add_argument(
        "--create-kek", action="store_true", help="create the KEK file (0600) if it does not exist"
    )
    p.add_argument(
        "--trust-root",
        action="append",
        default=None,
        metavar="[NAME=]FILE",
        help="ASK||ARK file to trust besides AMD's pinned roots (repeatable)",
    )
    p.add_argument(
        "--publisher-key",
        action="append",
        default=None,
        metavar="FILE",
        help="PEM public key of a trusted reference value publisher (repeatable)",
    )
    p.add_argument(
        "--refvalues-url",
        action="append",
        default=None,
        metavar="URL",
        help="DSSE manifest to poll over HTTP(S) (repeatable)",
    )
    p.add_argument(
        "--refvalues-interval", type=float, default=DEFAULT_REFVALUES_INTERVAL, help="seconds between polls"
    )
    p.add_argument("--session-ttl", type=float, default=DEFAULT_SESSION_TTL, help="session lifetime, seconds")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="owner processes sharing the --listen port (SO_REUSEPORT); worker i serves metrics on the "
        "--metrics-listen port + i",
    )
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "--core-threads",
        type=int,
        default=DEFAULT_CORE_THREADS,
        help="threads running the core's calls in each process",
    )
    p.add_argument(
        "--audit-checkpoint-interval",
        type=float,
        default=DEFAULT_CHECKPOINT_INTERVAL,
        help="seconds between audit checkpoints (seq, head hash, MAC) in the log and metrics",
    )
    g = p.add_argument_group("SEV-SNP guests (the guest port)")
    g.add_argument("--guest-listen", default=None, help="HOST:PORT of the guest port; turns SEV-SNP on")
    g.add_argument(
        "--guest-endpoint", default=None, help="https://HOST:PORT guests dial (default: --guest-listen)"
    )
    g.add_argument("--guest-tls-cert", default=None, help="the guest port's server certificate (PEM)")
    g.add_argument("--guest-tls-key", default=None, help="its private key (PEM)")
    g.add_argument("--guest-tls-ca", default=None, help="the CA certificate guests check it against (PEM)")
    g.add_argument(
        "--snp-trust-root",
        action="append",
        default=None,
        metavar="PRODUCT=FILE",
        help="PEM ARK+ASK(+ASVK) to trust for SEV-SNP besides AMD's pinned roots (repeatable)",
    )
    g.add_argument(
        "--snp-authorization-ttl",
        type=float,
        default=DEFAULT_AUTHORIZATION_TTL,
        help="seconds an SNP launch authorisation stays valid",
    )
    g.add_argument(
        "--guest-peer-rate", type=float, default=DEFAULT_PEER_RATE, help="calls/s per guest address"
    )
    g.add_argument("--guest-peer-burst", type=float, default=DEFAULT_PEER_BURST)
    g.add_argument("--guest-global-rate", type=float, default=DEFAULT_GLOBAL_RATE, help="calls/s in all")
    g.add_argument("--guest-global-burst", type=float, default=DEFAULT_GLOBAL_BURST)
    return p


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def config_from_args(args: argparse.Namespace) -> OwnerConfig:
    config = OwnerConfig(
        **server_options(args),
        db=args.db,
        db_wait=args.db_wait,
        kek_file=Path(args.kek_file),
        create_kek=args.create_kek,
        trust_roots=_list(args.trust_root),
        publisher_keys=_list(args.publisher_key),
        refvalues_urls=_list(args.refvalues_url),
        refvalues_interval=args.refvalues_interval,
        session_ttl=args.session_ttl,
        checkpoint_interval=args.audit_checkpoint_interval,
        worker_index=args.worker_index,
        core_threads=args.core_threads,
        guest_listen=args.guest_listen,
        guest_endpoint=args.guest_endpoint,
        guest_tls_cert=_path(args.guest_tls_cert),
        guest_tls_key=_path(args.guest_tls_key),
        guest_tls_ca=_path(args.guest_tls_ca),
        snp_trust_roots=_list(args.snp_trust_root),
        snp_authorization_ttl=args.snp_authorization_ttl,
        guest_peer_rate=args.guest_peer_rate,
        guest_peer_burst=args.guest_peer_burst,
        guest_global_rate=args.guest_global_rate,
        guest_global_burst=args.guest_global_burst,
    )
    if not 1 <= config.core_threads <= 256:
        raise ConfigError("--core-threads must be 1..256")
    if not 1 <= args.workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be 1..{MAX_WORKERS}")
    if not 1 <= config.checkpoint_interval <= 86400:
        raise ConfigError("--audit-checkpoint-interval must be 1..86400 seconds")
    if not 1 <= config.session_ttl <= 86400:
        raise ConfigError("--session-ttl must be 1..86400 seconds")
    if config.refvalues_interval <= 0:
        raise ConfigError("--refvalues-interval must be positive")
    if not 0 < config.db_wait <= 600:
        raise ConfigError("--db-wait must be more than 0 and at most 600 seconds")
    return config


async def _serve(config: OwnerConfig) -> None:
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(config.core_threads, thread_name_prefix="owner-core")
    )
    app = build_app(config)
    await app.start()
    try:
        await app.rpc.serve_until_signal()
    finally:
        await app.stop()


def _prepare_workers(config: OwnerConfig) -> None:
    """What the workers must not race on, done once: the KEK file, the store's migration and its check."""
    _, _, port = config.listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        raise ConfigError("--workers needs a fixed --listen port, which every worker shares")
    if config.guest_listen is not None:
        _, _, guest_port = config.guest_listen.rpartition(":")
        if not guest_port.isdigit() or int(guest_port) == 0:
            raise ConfigError("--workers needs a fixed --guest-listen port, which every worker shares")
    try:
        kek = KeyEncryptionKey.from_file(config.kek_file, create=config.create_kek)
    except KEKFileError as exc:
        raise ConfigError(str(exc)) from None
    store = open_store(config.db, audit_mac_key=kek.audit_key, db_wait=config.db_wait)
    try:
        store.check_integrity()
    except StoreError as exc:
        raise ConfigError(f"--db {_shown(config.db)}: {_message(exc)}") from None
    finally:
        store.close()


async def _run(args: argparse.Namespace, argv: Sequence[str], supervisor: list[str]) -> None:
    config = config_from_args(args)
    if args.workers == 1:
        await _serve(config)
        return
    _prepare_workers(config)
    argvs = [worker_argv(argv, args, i) for i in range(args.workers)]
    supervisor[:] = supervisor_argv(argvs, config.grace)


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    supervisor: list[str] = []
    status = server_main(build_parser(), given, lambda args: _run(args, given, supervisor))
    if status or not supervisor:
        return status
    # --workers: prepared; stderr is the process's own again (server_main restored it). The supervisor
    # takes this pid, with nothing of the owner loaded.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(supervisor[0], supervisor)  # noqa: S606 - this interpreter and our module, no shell


if __name__ == "__main__":
    raise SystemExit(main())
