"""The SEV-SNP demo's world: the SEV demo's folder and services, with the owner's guest port on, an
emulated Genoa chip, SNP reference values for Debian's 2 MiB OVMF, and a workload with SNP rules.

What differs from SEV (`DemoEnvironment`):
* the chip speaks SNP (Genoa) and its emulated SNP root (ARK, ASK, ASVK) is handed to the owner with
  `--snp-trust-root genoa=FILE`: trusted because the demo says so, never implicitly;
* the owner serves its guest port (server-authenticated TLS, the dev CA's `owner` certificate) and names
  it in every launch's init data;
* the launcher's emulated hypervisor runs each SNP guest's agent (`--emulated-guests attest`): the guest
  asks the owner for a challenge, gets a report from the emulated firmware and receives its secret;
* the reference values are SNP launch digests (per vCPU count) with the ID block's family and image id,
  guest SVN and the publisher's minimum TCB; they name no image hash, so that a tampered image is the
  firmware's to refuse (SNP_LAUNCH_FINISH compares the digest with the owner's ID block).

Like the SEV demo, this module only uses the services' public faces (command lines, gRPC, files the
emulated guest writes); it imports none of the services.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from sevlaunch.demo.env import (
    EMULATED_ROOT,
    DemoEnvironment,
    DemoError,
    EventCallback,
    LaunchOutcome,
    firmware_version,
)
from sevlaunch.demo.services import wait_started
from sevlaunch.firmware.emulator import ChipConfig, EmulatedFirmware
from sevlaunch.firmware.emulator.snp_keys import SNP_ROOT_PEM
from sevlaunch.refvalues import (
    DigestConfig,
    ReferenceDigest,
    make_manifest,
)
from sevlaunch.rpc import error_info
from sevlaunch.rpc.v1 import (
    guest_pb2,
    guest_pb2_grpc,
    launcher_pb2,
    owner_pb2,
    platform_pb2,
)
from sevlaunch.sev.secret import SecretEntry, SecretTable
from sevlaunch.sev.technology import Technology
from sevlaunch.sev.vmsa import vcpu_signature
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.launch_digest import launch_digest as snp_launch_digest
from sevlaunch.snp.reference import SnpReference
from sevlaunch.snp.tcb import Product, TcbVersion
from sevlaunch.snp.vmsa import DEFAULT_GUEST_FEATURES

#: Debian's 2 MiB OVMF carries the SEV metadata an SNP launch needs (the 4 MiB one does not).
SNP_FIRMWARE = Path("/usr/share/OVMF/OVMF_CODE.fd")
SNP_WORKLOAD_ID = "demo-snp-workload"
SNP_PRODUCT = Product.GENOA
SNP_VCPUS = 1
SNP_VCPU_TYPE = "EPYC-v4"
#: ABI 0.0, SMT allowed, the reserved bit 17 set; no debug, no migration agent.
SNP_POLICY = 0x30000
#: The ID block's family and image id the demo publisher vouches for (16 bytes each).
FAMILY_ID = b"sevlaunch-demo".ljust(16, b"\0")
IMAGE_ID = b"OVMF".ljust(16, b"\0")
GUEST_SVN = 1
#: How long an emulated SNP guest "boots" before its agent attests: the window in which the tenant's
#: admin may still change the workload (the demo's TCB case raises its floor then).
BOOT_SECONDS = 1.0
#: How often the launcher asks the owner whether a started guest has attested.
ATTESTATION_POLL = 0.25
#: Where the emulated hypervisor keeps its guests' folders (their "memory"), under the chip folder.
GUESTS_SUBDIR = Path("hypervisor") / "guests"


def snp_spec(
    name: str, firmware: Path, *, vcpus: int = SNP_VCPUS, policy: int = SNP_POLICY
) -> launcher_pb2.GuestSpec:
    return launcher_pb2.GuestSpec(
        name=name,
        memory_mib=256,
        vcpus=vcpus,
        firmware_path=str(firmware),
        mode=launcher_pb2.SEV_MODE_SEV_SNP,
        snp_policy=policy,
        vcpu_type=SNP_VCPU_TYPE,
    )


def snp_rules(floor: TcbVersion, **overrides: Any) -> owner_pb2.SnpRules:
    fields: dict[str, Any] = dict(
        products=[SNP_PRODUCT.value],
        policies=[SNP_POLICY],
        vcpu_counts=[1, 2],
        guest_features=[int(DEFAULT_GUEST_FEATURES)],
        vmm_types=["QEMU"],
        vcpu_types=[SNP_VCPU_TYPE],
        min_tcb=[
            owner_pb2.SnpTcbMinimum(
                product=SNP_PRODUCT.value, reported=floor.raw, committed=floor.raw, launch=floor.raw
            )
        ],
        family_id=FAMILY_ID,
        image_id=IMAGE_ID,
        min_guest_svn=GUEST_SVN,
    )
    fields.update(overrides)
    return owner_pb2.SnpRules(**fields)


@dataclass
class ReplayOutcome:
    """A report replayed on the owner's guest port, and what the owner made of it."""

    name: str
    authorization_id: str
    refused: bool = False
    code: str = ""
    reason: str = ""
    detail: str = ""
    released_after: bool = False  # whether the targeted authorisation was RELEASED afterwards

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "outcome": "refused" if self.refused else "accepted",
            "code": self.code,
            "reason": self.reason,
            "authorization_id": self.authorization_id,
            "released_after": self.released_after,
        }


@dataclass
class SnpLaunchOutcome(LaunchOutcome):
    technology: str = "sev-snp"
    authorization_id: str = ""
    authorization_state: str = ""
    guest_outcome: str = ""  # what the emulated guest's agent recorded: released, refused, ...
    guest_reason: str = ""
    secret_matches: bool | None = None  # the guest's secret is the workload's (SHA-256 compared)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc = super().to_json()
        doc.update(
            technology=self.technology,
            authorization_id=self.authorization_id,
            authorization_state=self.authorization_state,
            guest_outcome=self.guest_outcome,
            guest_reason=self.guest_reason,
            secret_received=bool(self.secret_matches),
        )
        return doc


class SnpDemoEnvironment(DemoEnvironment):
    """`prepare()`, `start()`, `configure_owner()`, then `launch_snp(...)`, `replay(...)`, `audit()`."""

    def __init__(
        self,
        *,
        firmware: Path = SNP_FIRMWARE,
        boot_seconds: float = BOOT_SECONDS,
        attestation_poll: float = ATTESTATION_POLL,
        snp_guest_slots: int = 16,
        owner_args: tuple[str, ...] = (),
        platform_args: tuple[str, ...] = (),
        **kw: Any,
    ) -> None:
        super().__init__(firmware=firmware, **kw)
        self.boot_seconds = boot_seconds
        self.attestation_poll = attestation_poll
        self.snp_guest_slots = snp_guest_slots  # the chip's SEV-ES ASIDs, which SNP guests take
        self.owner_args = owner_args  # extra owner flags (the benchmarks lift the guest port's limits)
        self.platform_args = platform_args  # extra platform flags (e.g. provisioned VLEK certificates)
        self.snp_root_file = self.chip_dir / SNP_ROOT_PEM
        self.chip_tcb: TcbVersion | None = None
        self.guest_port = 0
        self._secret_sha256 = b""  # of the workload's secret table: the guest's copy is checked by it

    @property
    def guests_dir(self) -> Path:
        return self.chip_dir / GUESTS_SUBDIR

    # ------------------------------------------------------------------------------ set-up

    def prepare(self) -> None:
        if not self.firmware.is_file():
            raise DemoError(f"no firmware image at {self.firmware} (Debian package `ovmf`, the 2 MiB image)")
        self._prepare_folders_and_certificates()

        t = time.monotonic()
        chip = EmulatedFirmware(
            self.chip_dir,
            config=ChipConfig(
                generation=EMULATED_ROOT, product=SNP_PRODUCT.value, max_es_guests=self.snp_guest_slots
            ),
        )
        chip.snp_root_pem()  # the emulated SNP root is made on first use: now, so the owner can be told
        self.chip_tcb = TcbVersion.from_raw(chip.snp_platform_status().current_tcb, SNP_PRODUCT)
        self._step(
            f"emulated {SNP_PRODUCT.value} chip {chip.chip_id_hex()[:16]}… (TCB {self.chip_tcb}) with its own"
            f" emulated AMD SNP root {self.snp_root_file.name}",
            t,
        )

        t = time.monotonic()
        image = self.firmware.read_bytes()
        sig = vcpu_signature(SNP_VCPU_TYPE)
        digests = [
            ReferenceDigest(
                bytes(snp_launch_digest(image, vcpus=n, vcpu_sig=sig)),
                DigestConfig(
                    Technology.SEV_SNP,
                    vcpus=n,
                    vcpu_type=SNP_VCPU_TYPE,
                    guest_features=int(DEFAULT_GUEST_FEATURES),
                    vmm_type="QEMU",
                ),
            )
            for n in (1, 2)
        ]
        self.reference_digest = digests[0].launch_digest
        self._publish(
            make_manifest(
                publisher="sevlaunch-demo",
                firmware_name="OVMF",
                firmware_version=firmware_version(self.firmware),
                digests=digests,
                valid_days=1,
                snp=SnpReference(FAMILY_ID, IMAGE_ID, GUEST_SVN, (self.chip_tcb,)),
            )
        )
        self._step(
            f"SNP reference values for {self.firmware.name}: launch digests for 1 and 2 vCPUs of "
            f"{SNP_VCPU_TYPE} (1 vCPU: {self.reference_digest.hex()[:16]}…), signed by the demo publisher",
            t,
        )
        self._tamper()

    def start(self) -> None:
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
                "--publisher-key", str(self.publisher_pub),
                "--guest-listen", "127.0.0.1:0",
                "--guest-tls-cert", str(self.tls_dir / "owner.pem"),
                "--guest-tls-key", str(self.tls_dir / "owner.key"),
                "--guest-tls-ca", str(self.tls_dir / "ca.pem"),
                "--snp-trust-root", f"{SNP_PRODUCT.value}={self.snp_root_file}",
                *self.owner_args,
            ],
        )  # fmt: skip
        self._spawn("platform", [*common, "--emulator", str(self.chip_dir), *self.platform_args])
        wait_started(self.services["platform"], deadline=deadline)
        self._spawn(
            "launcher",
            [
                *common,
                "--platform", self.services["platform"].address,
                "--hypervisor", "emulated",
                "--emulator", str(self.chip_dir.resolve()),
                "--emulated-guests", "attest",
                "--emulated-boot-seconds", str(self.boot_seconds),
                "--attestation-poll", str(self.attestation_poll),
                "--vcpu-type", SNP_VCPU_TYPE,
                "--db", str(self.workdir / "launcher" / "launcher.db"),
                "--image-dir", self._image_dirs(),
                "--phase-timeout", "30",
            ],
        )  # fmt: skip
        self._wait_all_serving(deadline)
        self.guest_port = _guest_port(self.services["owner"].log_path)
        guest = f"owner guest port 127.0.0.1:{self.guest_port}"
        self._step(f"services SERVING: {self._services_text()}; {guest}", t)

    def configure_owner(self) -> None:
        assert self.chip_tcb is not None, "prepare() first"
        admin = self.owner_admin()
        t = time.monotonic()
        imported = admin.ImportReferenceValues(
            owner_pb2.ImportReferenceValuesRequest(envelope=self.manifest_path.read_bytes()),
            timeout=self.call_timeout,
        )
        self._step(f"owner imported SNP reference values {imported.manifest_id[:16]}…", t)
        t = time.monotonic()
        self.put_workload()
        entry = SecretEntry.disk_passphrase(secrets.token_urlsafe(24).encode())
        table = SecretTable.of([entry]).to_bytes()
        # Only a digest stays here: the demo checks the guest's copy against it and never shows either.
        self._secret_sha256 = hashlib.sha256(table).digest()
        admin.PutSecret(
            owner_pb2.PutSecretRequest(
                workload_id=SNP_WORKLOAD_ID,
                entries=[owner_pb2.SecretEntry(guid=str(entry.guid), data=entry.data)],
            ),
            timeout=self.call_timeout,
        )
        self._step(
            f"owner workload {SNP_WORKLOAD_ID!r}: {SNP_PRODUCT.value} only, policy {SNP_POLICY:#x}, "
            f"TCB floor {self.chip_tcb}; ID and author keys generated; secret: a LUKS passphrase",
            t,
        )

    def put_workload(self, floor: TcbVersion | None = None, **rules: Any) -> None:
        """(Re)writes the SNP workload, with `floor` as its minimum TCB (default: the chip's)."""
        assert self.chip_tcb is not None
        workload = owner_pb2.Workload(
            workload_id=SNP_WORKLOAD_ID,
            allowed_policies=[0x3],
            generations=[EMULATED_ROOT],
            selectors=[
                owner_pb2.ReferenceSelector(firmware_name="OVMF", modes=[owner_pb2.REFERENCE_MODE_SEV_SNP])
            ],
            snp=snp_rules(floor or self.chip_tcb, **rules),
        )
        self.owner_admin().PutWorkload(
            owner_pb2.PutWorkloadRequest(workload=workload), timeout=self.call_timeout
        )

    # ------------------------------------------------------------------------------ launches

    def snp_guest_count(self) -> int:
        reply = self.platform().GetSnpStatus(platform_pb2.GetSnpStatusRequest(), timeout=self.call_timeout)
        return int(reply.guest_count)

    def authorization(self, authorization_id: str) -> owner_pb2.SnpAuthorizationInfo | None:
        listed = (
            self.owner_admin()
            .ListSnpAuthorizations(
                owner_pb2.ListSnpAuthorizationsRequest(workload_id=SNP_WORKLOAD_ID, limit=1000),
                timeout=self.call_timeout,
            )
            .authorizations
        )
        return next((a for a in listed if a.authorization_id == authorization_id), None)

    def guest_record(self, domain_name: str) -> dict[str, Any]:
        """What the emulated guest's agent recorded (public values only), {} if nothing yet."""
        try:
            data = json.loads((self.guests_dir / domain_name / "attestation.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def guest_secret_matches(self, domain_name: str) -> bool:
        """Whether the guest holds the workload's secret table (compared by SHA-256; never shown)."""
        try:
            held = (self.guests_dir / domain_name / "secret").read_bytes()
        except OSError:
            return False
        return bool(self._secret_sha256) and hashlib.sha256(held).digest() == self._secret_sha256

    def launch_snp(
        self,
        name: str,
        firmware: Path,
        on_event: EventCallback | None = None,
        *,
        on_authorized: Any = None,
        spec: launcher_pb2.GuestSpec | None = None,
    ) -> SnpLaunchOutcome:
        """An orchestrated SNP launch; `on_authorized()` runs when the AUTHORIZED event arrives (while
        the guest is being defined, started and booted)."""
        result = SnpLaunchOutcome(name=name, firmware=str(firmware))
        result.guests_before = self.snp_guest_count()
        request = launcher_pb2.LaunchRequest(
            spec=spec or snp_spec(name, firmware),
            owner=launcher_pb2.OwnerRef(endpoint=self.services["owner"].address, workload_id=SNP_WORKLOAD_ID),
        )
        last: launcher_pb2.LaunchEvent | None = None
        try:
            for event in self.launcher().Launch(request, timeout=self.call_timeout):
                last = event
                result.launch_id = event.launch_id or result.launch_id
                result.domain_name = event.domain_name or result.domain_name
                failed = event.phase == launcher_pb2.PHASE_FAILED
                key = launcher_pb2.Phase.Name(event.failed_phase if failed else event.phase).removeprefix(
                    "PHASE_"
                )
                result.durations_ms[key.lower()] = round(
                    event.duration.ToTimedelta().total_seconds() * 1000, 3
                )
                if on_event is not None:
                    on_event(name, event)
                if event.phase == launcher_pb2.PHASE_AUTHORIZED and on_authorized is not None:
                    on_authorized()
        except grpc.RpcError as exc:
            refusal = error_info(exc)
            result.phase = "ACCEPTED"
            result.reason = refusal.reason or refusal.code.name.lower()
            result.detail = refusal.message
        if last is not None:
            if last.phase == launcher_pb2.PHASE_RUNNING:
                result.outcome, result.phase = "running", "RUNNING"
            else:
                phase = last.failed_phase if last.failed_phase else last.phase
                result.phase = launcher_pb2.Phase.Name(phase).removeprefix("PHASE_")
                result.reason = last.reason or "stream_ended"
                result.detail = last.detail
        if result.launch_id:
            info = self.launcher().GetLaunch(
                launcher_pb2.GetLaunchRequest(launch_id=result.launch_id), timeout=self.call_timeout
            )
            result.launcher_state = launcher_pb2.Phase.Name(info.state).removeprefix("PHASE_")
            result.authorization_id = info.authorization_id
        if result.authorization_id:
            auth = self.authorization(result.authorization_id)
            if auth is not None:
                result.authorization_state = owner_pb2.SnpAuthorizationState.Name(auth.state).removeprefix(
                    "SNP_AUTHORIZATION_STATE_"
                )
                result.matched_digest = auth.launch_digest or None
                result.manifest_id = auth.manifest_id or None
                result.measurement = result.matched_digest if result.outcome == "running" else None
        if result.domain_name:
            record = self.guest_record(result.domain_name)
            result.guest_outcome = str(record.get("outcome", ""))
            result.guest_reason = str(record.get("reason", ""))
            if result.outcome == "running":
                result.secret_matches = self.guest_secret_matches(result.domain_name)
                result.measurement = str(record.get("measurement", "")) or result.measurement
        result.guests_after = self.snp_guest_count()
        self.launches.append(result)
        return result

    # ------------------------------------------------------------------------------ replays

    def _guest_stub(self, init: InitData) -> tuple[grpc.Channel, guest_pb2_grpc.OwnerGuestStub]:
        """A guest's view of the owner: server-only TLS, trusting the init data's CA, no client cert."""
        channel = grpc.secure_channel(
            init.endpoint.grpc_target,
            grpc.ssl_channel_credentials(root_certificates=init.ca_pem.encode("ascii")),
            options=[("grpc.ssl_target_name_override", init.endpoint.server_name)],
        )
        return channel, guest_pb2_grpc.OwnerGuestStub(channel)

    def fresh_authorization(self) -> owner_pb2.AuthorizeSnpLaunchResponse:
        """An authorisation nobody launches (the `client` identity asks, with the platform's evidence)."""
        platform = self.platform()
        status = platform.GetSnpStatus(platform_pb2.GetSnpStatusRequest(), timeout=self.call_timeout)
        chain = platform.GetVekChain(
            platform_pb2.GetVekChainRequest(kind=platform_pb2.VEK_KIND_AUTO), timeout=self.call_timeout
        )
        request = owner_pb2.AuthorizeSnpLaunchRequest(
            workload_id=SNP_WORKLOAD_ID,
            platform=owner_pb2.SnpPlatform(
                vek_cert=chain.vek_cert,
                chain=[chain.ask_cert, chain.ark_cert],
                committed_tcb=status.committed_tcb.raw,
                current_tcb=status.current_tcb.raw,
            ),
            config=owner_pb2.SnpLaunchConfig(
                vcpus=SNP_VCPUS,
                vcpu_type=SNP_VCPU_TYPE,
                guest_features=int(DEFAULT_GUEST_FEATURES),
                vmm_type="QEMU",
                policy=SNP_POLICY,
            ),
        )
        from sevlaunch.rpc.v1 import owner_pb2_grpc

        client = owner_pb2_grpc.OwnerServiceStub(self.channel("owner", "client"))
        return client.AuthorizeSnpLaunch(request, timeout=self.call_timeout)

    def replay(self, name: str, recorded: dict[str, Any], *, target: str | None = None) -> ReplayOutcome:
        """Sends a report the guest sent before, as someone on the guest network who captured it would:
        to its own authorisation with its own challenge (`target` None), or to another authorisation
        with a fresh challenge of that one."""
        own = str(recorded["authorization_id"])
        aid = target or own
        init = InitData.new(
            endpoint=f"https://127.0.0.1:{self.guest_port}",
            ca_pem=(self.tls_dir / "ca.pem").read_text("ascii"),
            authorization_id=aid,
        )
        out = ReplayOutcome(name=name, authorization_id=aid)
        channel, stub = self._guest_stub(init)
        try:
            challenge = bytes.fromhex(str(recorded["challenge"]))
            if target is not None:
                challenge = stub.GetChallenge(
                    guest_pb2.GetChallengeRequest(authorization_id=aid), timeout=self.call_timeout
                ).challenge
            stub.Attest(
                guest_pb2.AttestRequest(
                    authorization_id=aid,
                    challenge=challenge,
                    report=bytes.fromhex(str(recorded["report"])),
                    guest_public_key=bytes.fromhex(str(recorded["guest_public_key"])),
                ),
                timeout=self.call_timeout,
            )
        except grpc.RpcError as exc:
            info = error_info(exc)
            out.refused, out.code, out.reason, out.detail = True, info.code.name, info.reason, info.message
        finally:
            channel.close()
        auth = self.authorization(aid)
        out.released_after = auth is not None and auth.state == owner_pb2.SNP_AUTHORIZATION_STATE_RELEASED
        return out

    def revoke(self, authorization_id: str) -> None:
        self.owner_admin().RevokeSnpAuthorization(
            owner_pb2.RevokeSnpAuthorizationRequest(authorization_id=authorization_id),
            timeout=self.call_timeout,
        )


def _guest_port(log_path: Path) -> int:
    """The owner's guest port, from its "guest port started" log line."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if '"guest port started"' not in line:
            continue
        try:
            port = json.loads(line).get("port")
        except ValueError:
            continue
        if isinstance(port, int) and port > 0:
            return port
    raise DemoError("the owner did not log its guest port")
