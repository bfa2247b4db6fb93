"""The demo's world: a folder of keys, certificates, an emulated chip and a signed manifest, the three
services running on localhost with mTLS, and the calls a tenant and a cloud client make to them.

`DemoEnvironment` is what `sevlaunch demo` drives; tests use it too, to run the same launches and then
look at the services' metrics. It only uses the services' public faces: their command lines, gRPC (the
stubs of `sevlaunch.rpc.v1`) and `/metrics`; it imports none of the services (trust domains are code
boundaries).
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from sevlaunch.audit import AuditChainBroken, ChainEntry, canonical_record, verify_chain
from sevlaunch.cli.devcerts import write_dev_certs
from sevlaunch.demo.services import (
    ServiceProcess,
    signals_deferred,
    start_service,
    wait_serving,
    wait_started,
)
from sevlaunch.firmware.emulator import ASK_ARK_CERT, ChipConfig, EmulatedFirmware
from sevlaunch.firmware.kds import KDSServer
from sevlaunch.ownerdb import AuditDatabaseError, KEKFileError, load_kek, verify_audit_db
from sevlaunch.refvalues import (
    DigestConfig,
    KeyType,
    Manifest,
    ReferenceDigest,
    generate_private_key,
    make_manifest,
    manifest_id,
    public_key_pem,
    sign_envelope,
)
from sevlaunch.rpc import error_info, launch_id_scope, secure_channel_sync
from sevlaunch.rpc.v1 import (
    launcher_pb2,
    launcher_pb2_grpc,
    owner_pb2,
    owner_pb2_grpc,
    platform_pb2,
    platform_pb2_grpc,
)
from sevlaunch.sev.digest import launch_digest
from sevlaunch.sev.policy import PolicyFlags
from sevlaunch.sev.secret import SecretEntry
from sevlaunch.sev.technology import Technology

DEFAULT_FIRMWARE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
#: The name the owner gives the emulated AMD root; the workload allows launches on chips under it.
EMULATED_ROOT = "emulated"
WORKLOAD_ID = "demo-workload"
#: No debugging, no key sharing: what a tenant asks for.
GUEST_POLICY = int(PolicyFlags.NODBG | PolicyFlags.NOKS)
#: Debian's OVMF declares no secret area, so the launcher is told where LAUNCH_SECRET writes (the
#: address AmdSev builds of OVMF reserve for it).
SECRET_GPA = 0x80C000
_MS = timedelta(milliseconds=1)
#: The event fields of an owner audit record, as GetAuditLog carries them (the hashed event's keys).
_AUDIT_EVENT_FIELDS = (
    "actor",
    "action",
    "outcome",
    "workload_id",
    "session_id",
    "cek_fingerprint",
    "reason",
    "digest",
    "detail",
)

StepCallback = Callable[[str, float], None]
EventCallback = Callable[[str, "launcher_pb2.LaunchEvent"], None]


class DemoError(Exception):
    """A step of the demo failed; the message says which and why (never a secret)."""


def _phase_name(value: int) -> str:
    return launcher_pb2.Phase.Name(launcher_pb2.Phase.ValueType(value)).removeprefix("PHASE_")


@dataclass
class LaunchOutcome:
    """What one attested launch came to, as `sevlaunch demo --json` prints it."""

    name: str
    firmware: str
    launch_id: str = ""
    outcome: str = "refused"  # "running" | "refused"
    phase: str = ""  # RUNNING, or the phase that was being attempted when it failed
    reason: str = ""
    detail: str = ""
    measurement: str | None = None  # hex, 48 bytes: measure || mnonce
    matched_digest: str | None = None  # hex launch digest the owner matched, for a released secret
    manifest_id: str | None = None
    durations_ms: dict[str, float] = field(default_factory=dict)
    domain_name: str = ""
    launcher_state: str = ""  # the launcher's record after the launch (RUNNING or FAILED)
    guests_before: int = 0  # guest contexts on the chip before and after the launch
    guests_after: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "outcome": self.outcome,
            "phase": self.phase,
            "reason": self.reason,
            "measurement": self.measurement,
            "matched_digest": self.matched_digest,
            "durations_ms": self.durations_ms,
            "launch_id": self.launch_id,
            "firmware": self.firmware,
            "manifest_id": self.manifest_id,
            "launcher_state": self.launcher_state,
            "domain_destroyed": self.outcome == "refused" and self.guests_after == self.guests_before,
            "guests_before": self.guests_before,
            "guests_after": self.guests_after,
        }


@dataclass(frozen=True)
class AuditResult:
    """The owner's audit log as GetAuditLog returns it, and two independent checks of its chain: the
    records over gRPC (what a remote auditor sees), and the database file with the owner's KEK (record
    MACs and the stored head too, so a truncated tail shows)."""

    records: tuple[owner_pb2.AuditRecord, ...]
    chain_problem: str
    db_records: int
    db_problem: str

    @property
    def ok(self) -> bool:
        return bool(self.records) and not self.chain_problem and not self.db_problem

    @property
    def problem(self) -> str:
        return "; ".join(p for p in (self.chain_problem, self.db_problem) if p)


def verify_audit_chain(records: Sequence[owner_pb2.AuditRecord]) -> str:
    """Checks the hash chain of audit records as GetAuditLog returns them, from the first record.

    Returns "" when every record links to the one before and its hash covers its content, else what is
    wrong. Each record's hashed text is rebuilt from its fields with `sevlaunch.audit.canonical_record`
    and checked by `sevlaunch.audit.verify_chain`, the code `sevlaunch owner audit verify` runs (shared
    library code, not the owner service's). The last record stands in for the head, which GetAuditLog does
    not return; the records' MACs need the owner's KEK and are checked on the database (`audit()`).
    """
    entries = [
        ChainEntry(
            seq=rec.seq,
            canonical=canonical_record(
                rec.seq,
                rec.time_unix,
                {name: getattr(rec, name) for name in _AUDIT_EVENT_FIELDS}
                | ({"launch_id": rec.launch_id} if rec.launch_id else {}),
                rec.prev_hash,
            ),
            prev_hash=rec.prev_hash,
            hash=rec.hash,
            mac="",
        )
        for rec in records
    ]
    head = (entries[-1].seq, entries[-1].hash) if entries else None
    try:
        verify_chain(entries, head=head)
    except AuditChainBroken as exc:
        return str(exc)
    return ""


def tamper_firmware(source: Path, dest: Path) -> int:
    """Copies an OVMF image with one byte flipped; returns the offset.

    The byte is in the middle of the image (inside the compressed firmware volume): the image still
    parses as OVMF (its footer table at the end is intact), so the launch goes all the way to
    LAUNCH_MEASURE and it is the measurement that gives it away.
    """
    data = bytearray(source.read_bytes())
    offset = len(data) // 2
    data[offset] ^= 0x01
    dest.write_bytes(bytes(data))
    return offset


def firmware_version(path: Path) -> str:
    """The Debian package version of a firmware image shipped by `ovmf`, else "local"."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-S", str(path.resolve())], capture_output=True, text=True, timeout=5, check=False
        )
        package = out.stdout.split(":", 1)[0].strip() if out.returncode == 0 else ""
        if package:
            ver = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            if ver.returncode == 0 and ver.stdout.strip():
                return ver.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "local"


class DemoEnvironment:
    """Build with `DemoEnvironment(firmware=...)`, then `prepare()`, `start()`, `configure_owner()`,
    `launch(...)` as often as wanted, `audit()`, and `close()` (also a context manager).

    `workdir=None` makes a temporary folder that `close()` removes; `keep=True` leaves services and
    folder alone on close (for `--keep`). `hypervisor_args` replaces the launcher's default
    `--hypervisor emulated --emulator <chip>`. `on_step(name, seconds)` hears each set-up step as it ends.
    `otlp_endpoint` starts the three services with `--otlp-endpoint` (OpenTelemetry traces).
    """

    def __init__(
        self,
        *,
        firmware: Path = DEFAULT_FIRMWARE,
        workdir: Path | None = None,
        on_step: StepCallback | None = None,
        start_timeout: float = 30.0,
        call_timeout: float = 60.0,
        hypervisor_args: Sequence[str] | None = None,
        otlp_endpoint: str | None = None,
    ) -> None:
        self.firmware = Path(firmware)
        self.otlp_endpoint = otlp_endpoint
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="sevlaunch-demo-")) if workdir is None else Path(workdir)
        self.keep = False
        self.on_step = on_step
        self.start_timeout = start_timeout
        self.call_timeout = call_timeout
        # The launcher's hypervisor flags; by default the emulated one on the demo's chip. tests/realvirt
        # gives `--hypervisor libvirt --libvirt-uri ...` for a real libvirtd whose QEMU uses this chip.
        self.hypervisor_args = None if hypervisor_args is None else tuple(hypervisor_args)
        self.tls_dir = self.workdir / "tls"
        self.chip_dir = self.workdir / "chip"
        self.images_dir = self.workdir / "images"
        self.owner_dir = self.workdir / "owner"
        self.owner_db = self.owner_dir / "owner.db"
        self.owner_kek = self.owner_dir / "kek"
        self.publisher_key = self.workdir / "publisher" / "ovmf.key"
        self.manifest_path = self.workdir / "publisher" / "ovmf.dsse"
        self.logs_dir = self.workdir / "logs"
        self.tampered_firmware = self.images_dir / f"{self.firmware.stem}-tampered{self.firmware.suffix}"
        self.kds: KDSServer | None = None
        self.services: dict[str, ServiceProcess] = {}
        self.reference_digest: bytes = b""
        self.manifest_id = ""
        self.launches: list[LaunchOutcome] = []
        self._channels: dict[tuple[str, str], grpc.Channel] = {}

    # ------------------------------------------------------------------------------ set-up

    def _step(self, name: str, started: float) -> None:
        if self.on_step is not None:
            self.on_step(name, time.monotonic() - started)

    def prepare(self) -> None:
        """Writes everything the services need: certificates, the chip, keys, the signed manifest."""
        if not self.firmware.is_file():
            raise DemoError(f"no firmware image at {self.firmware} (Debian package `ovmf`)")
        self._prepare_folders_and_certificates()

        t = time.monotonic()
        # RSA-4096 ARK and ASK: the slowest step of the set-up (a few seconds on a small machine).
        chip = EmulatedFirmware(self.chip_dir, config=ChipConfig(generation=EMULATED_ROOT))
        self._step(f"emulated SEV chip {chip.chip_id_hex()[:16]}… with its own AMD root", t)

        t = time.monotonic()
        self.kds = KDSServer([chip], host="127.0.0.1", port=0).start()
        self._step(f"emulated AMD KDS at {self.kds.url}", t)

        t = time.monotonic()
        image = self.firmware.read_bytes()
        self.reference_digest = bytes(launch_digest(image, mode="sev"))
        self._publish(
            make_manifest(
                publisher="sevlaunch-demo",
                firmware_name="OVMF",
                firmware_version=firmware_version(self.firmware),
                digests=[ReferenceDigest(self.reference_digest, DigestConfig(Technology.SEV))],
                valid_days=1,
                firmware_sha256=hashlib.sha256(image).hexdigest(),
            )
        )
        self._step(
            f"reference values for {self.firmware.name}: launch digest {self.reference_digest.hex()[:16]}…,"
            " signed by the demo publisher",
            t,
        )
        self._tamper()

    def _prepare_folders_and_certificates(self) -> None:
        for d in (self.images_dir, self.owner_dir, self.publisher_key.parent, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        write_dev_certs(self.tls_dir)
        self._step("dev certificates (CA; platform, launcher, owner, client, admins)", t)

    def _publish(self, manifest: Manifest) -> None:
        """Signs the demo's one manifest with a fresh publisher key. Only the public half is kept on
        disk: the demo signs nothing else."""
        key = generate_private_key(KeyType.ECDSA_P256)
        self.publisher_pub.write_bytes(public_key_pem(key.public_key()))
        payload = manifest.to_json()
        self.manifest_id = manifest_id(payload)
        self.manifest_path.write_bytes(sign_envelope(payload, key).to_json())

    def _tamper(self) -> None:
        t = time.monotonic()
        offset = tamper_firmware(self.firmware, self.tampered_firmware)
        self._step(f"tampered copy {self.tampered_firmware.name} (byte {offset:#x} flipped)", t)

    @property
    def publisher_pub(self) -> Path:
        return self.publisher_key.parent / (self.publisher_key.name + ".pub")

    def start(self) -> None:
        """Starts owner, platform and launcher (in that order of need) and waits until all are SERVING."""
        assert self.kds is not None, "prepare() first"
        t = time.monotonic()
        deadline = time.monotonic() + self.start_timeout
        common = self._common_service_args()
        self._spawn(
            "owner",
            [
                *common,
                "--db", str(self.owner_db),
                "--kek-file", str(self.owner_kek),
                "--create-kek",
                "--trust-root", f"{EMULATED_ROOT}={self.chip_dir / ASK_ARK_CERT}",
                "--publisher-key", str(self.publisher_pub),
            ],
        )  # fmt: skip
        self._spawn(
            "platform",
            [
                *common,
                "--emulator", str(self.chip_dir),
                "--kds-url", self.kds.url,
                # The KDS lives in this process: with --keep the platform must not need it after the
                # demo exits, so the CEK it fetched once stays cached on disk.
                "--cek-cache-dir", str(self.workdir / "platform" / "cek-cache"),
            ],
        )  # fmt: skip
        # The launcher needs the platform's port, known once the platform has bound it.
        wait_started(self.services["platform"], deadline=deadline)
        self._spawn(
            "launcher",
            [
                *common,
                "--platform", self.services["platform"].address,
                *(self.hypervisor_args or ("--hypervisor", "emulated", "--emulator", str(self.chip_dir))),
                "--db", str(self.workdir / "launcher" / "launcher.db"),
                "--secret-gpa", hex(SECRET_GPA),
                "--image-dir", self._image_dirs(),
            ],
        )  # fmt: skip
        self._wait_all_serving(deadline)
        self._step(f"services SERVING: {self._services_text()}", t)

    def _common_service_args(self) -> list[str]:
        """The flags every service of the demo starts with: its TLS folder, ports the OS picks, tracing."""
        return [
            "--tls-dir",
            str(self.tls_dir),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            *(["--otlp-endpoint", self.otlp_endpoint] if self.otlp_endpoint else []),
        ]

    def _image_dirs(self) -> str:
        """The launcher's --image-dir: the firmware's folder and the demo's own images."""
        return ":".join(dict.fromkeys([str(self.firmware.resolve().parent), str(self.images_dir.resolve())]))

    def _wait_all_serving(self, deadline: float) -> None:
        for name in ("owner", "launcher"):
            wait_started(self.services[name], deadline=deadline)
        for service in self.services.values():
            wait_serving(service, tls_dir=self.tls_dir, deadline=deadline)

    def _services_text(self) -> str:
        return ", ".join(f"{s.name} {s.address} (pid {s.pid})" for s in self.services.values())

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        with signals_deferred():  # the child is recorded before any interrupt can unwind past it
            self.services[name] = start_service(name, args, log_path=self.logs_dir / f"{name}.log")

    # ------------------------------------------------------------------------------ clients

    def channel(self, service: str, identity: str) -> grpc.Channel:
        key = (service, identity)
        if key not in self._channels:
            self._channels[key] = secure_channel_sync(self.services[service].address, self.tls_dir, identity)
        return self._channels[key]

    def owner_admin(self) -> owner_pb2_grpc.OwnerServiceStub:
        return owner_pb2_grpc.OwnerServiceStub(self.channel("owner", "owner-admin"))

    def launcher(self) -> launcher_pb2_grpc.LauncherServiceStub:
        return launcher_pb2_grpc.LauncherServiceStub(self.channel("launcher", "client"))

    def platform(self) -> platform_pb2_grpc.PlatformServiceStub:
        return platform_pb2_grpc.PlatformServiceStub(self.channel("platform", "client"))

    def guest_count(self) -> int:
        reply = self.platform().GetPlatformStatus(
            platform_pb2.GetPlatformStatusRequest(), timeout=self.call_timeout
        )
        return int(reply.guest_count)

    def configure_owner(self) -> None:
        """As the tenant's admin: trust the manifest, describe the workload, store its secret."""
        admin = self.owner_admin()
        t = time.monotonic()
        imported = admin.ImportReferenceValues(
            owner_pb2.ImportReferenceValuesRequest(envelope=self.manifest_path.read_bytes()),
            timeout=self.call_timeout,
        )
        self._step(
            f"owner imported reference values {imported.manifest_id[:16]}… "
            f"({imported.manifest.firmware_name} {imported.manifest.firmware_version})",
            t,
        )
        t = time.monotonic()
        workload = owner_pb2.Workload(
            workload_id=WORKLOAD_ID,
            allowed_policies=[GUEST_POLICY],
            generations=[EMULATED_ROOT],
            selectors=[
                owner_pb2.ReferenceSelector(firmware_name="OVMF", modes=[owner_pb2.REFERENCE_MODE_SEV])
            ],
        )
        admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload), timeout=self.call_timeout)
        # A fresh random LUKS passphrase: it exists only in the owner's store (encrypted under its KEK)
        # and, after a release, inside the guest; the demo never prints or keeps it.
        entry = SecretEntry.disk_passphrase(secrets.token_urlsafe(24).encode())
        put = admin.PutSecret(
            owner_pb2.PutSecretRequest(
                workload_id=WORKLOAD_ID,
                entries=[owner_pb2.SecretEntry(guid=str(entry.guid), data=entry.data)],
            ),
            timeout=self.call_timeout,
        )
        self._step(
            f"owner workload {WORKLOAD_ID!r}: policy {GUEST_POLICY:#06x}, root {EMULATED_ROOT!r}, "
            f"OVMF (SEV); secret table {put.table_size} bytes (LUKS passphrase entry)",
            t,
        )

    # ------------------------------------------------------------------------------ launches

    def _session_ids(self) -> set[str]:
        reply = self.owner_admin().ListSessions(
            owner_pb2.ListSessionsRequest(workload_id=WORKLOAD_ID, limit=1000), timeout=self.call_timeout
        )
        return {s.session_id for s in reply.sessions}

    def launch(self, name: str, firmware: Path, on_event: EventCallback | None = None) -> LaunchOutcome:
        """An orchestrated attested launch (LauncherService.Launch), its events streamed as they come."""
        result = LaunchOutcome(name=name, firmware=str(firmware))
        result.guests_before = self.guest_count()
        sessions_before = self._session_ids()
        spec = launcher_pb2.GuestSpec(
            name=name,
            memory_mib=256,
            vcpus=1,
            firmware_path=str(firmware),
            mode=launcher_pb2.SEV_MODE_SEV,
            policy=GUEST_POLICY,
        )
        request = launcher_pb2.LaunchRequest(
            spec=spec,
            owner=launcher_pb2.OwnerRef(endpoint=self.services["owner"].address, workload_id=WORKLOAD_ID),
        )
        last: launcher_pb2.LaunchEvent | None = None
        try:
            for event in self.launcher().Launch(request, timeout=self.call_timeout):
                last = event
                result.launch_id = event.launch_id or result.launch_id
                result.domain_name = event.domain_name or result.domain_name
                phase = event.phase
                key = _phase_name(event.failed_phase if phase == launcher_pb2.PHASE_FAILED else phase)
                result.durations_ms[key.lower()] = round(event.duration.ToTimedelta() / _MS, 3)
                if on_event is not None:
                    on_event(name, event)
        except grpc.RpcError as exc:
            # The launcher refused the request itself (bad spec, overloaded): no launch happened.
            refusal = error_info(exc)
            result.phase = "ACCEPTED"
            result.reason = refusal.reason or refusal.code.name.lower()
            result.detail = refusal.message
        if last is not None:
            if last.phase == launcher_pb2.PHASE_RUNNING:
                result.outcome, result.phase = "running", "RUNNING"
            else:
                result.phase = (
                    _phase_name(last.failed_phase) if last.failed_phase else _phase_name(last.phase)
                )
                result.reason = last.reason or "stream_ended"
                result.detail = last.detail
        if result.launch_id:
            # In the launch's scope: the launcher's log line of this read names the launch it is about.
            with launch_id_scope(result.launch_id):
                info = self.launcher().GetLaunch(
                    launcher_pb2.GetLaunchRequest(launch_id=result.launch_id), timeout=self.call_timeout
                )
            result.launcher_state = _phase_name(info.state)
            result.measurement = info.measurement.hex() if info.measurement else None
        for session in (
            self.owner_admin()
            .ListSessions(
                owner_pb2.ListSessionsRequest(workload_id=WORKLOAD_ID, limit=1000), timeout=self.call_timeout
            )
            .sessions
        ):
            if session.session_id not in sessions_before and session.matched_digest:
                result.matched_digest = session.matched_digest
        if result.matched_digest and result.matched_digest == self.reference_digest.hex():
            result.manifest_id = self.manifest_id
        result.guests_after = self.guest_count()
        self.launches.append(result)
        return result

    def destroy(self, launch_id: str) -> None:
        self.launcher().DestroyGuest(
            launcher_pb2.DestroyGuestRequest(launch_id=launch_id), timeout=self.call_timeout
        )

    def owner_audit_events(self) -> list[owner_pb2.AuditRecord]:
        """The owner's audit records over GetAuditLog (the first page, 1000 records: enough for a demo)."""
        return list(
            self.owner_admin()
            .GetAuditLog(owner_pb2.GetAuditLogRequest(after_seq=0, limit=1000), timeout=self.call_timeout)
            .records
        )

    def audit(self) -> AuditResult:
        records: list[owner_pb2.AuditRecord] = []
        after = 0
        while True:
            page = (
                self.owner_admin()
                .GetAuditLog(
                    owner_pb2.GetAuditLogRequest(after_seq=after, limit=1000), timeout=self.call_timeout
                )
                .records
            )
            records.extend(page)
            if len(page) < 1000:
                break
            after = page[-1].seq
        chain_problem = verify_audit_chain(records)
        if not chain_problem and not records:
            chain_problem = "the audit log is empty"
        db_records, db_problem = 0, ""
        try:
            db_records = verify_audit_db(self.owner_db, load_kek(self.owner_kek))
            if db_records != len(records):
                db_problem = f"the database holds {db_records} records, GetAuditLog returned {len(records)}"
        except (AuditDatabaseError, KEKFileError) as exc:
            db_problem = str(exc)
        return AuditResult(tuple(records), chain_problem, db_records, db_problem)

    def metrics_urls(self) -> dict[str, str]:
        return {n: s.metrics_url for n, s in self.services.items() if s.metrics_url is not None}

    # ------------------------------------------------------------------------------ tear-down

    def close(self) -> None:
        """Stops the services (launcher first, so nothing is mid-launch when the others go) and removes
        the folder it made. With `keep`, leaves everything running and in place."""
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        if self.keep:
            return
        for name in ("launcher", "platform", "owner"):
            service = self.services.get(name)
            if service is not None:
                service.stop()
        if self.kds is not None:
            self.kds.stop()
            self.kds = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DemoEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
