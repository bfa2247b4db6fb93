"""Fixtures and helpers for the owner's SEV-SNP service tests (imported by test_owner_snp*.py; no test).

An emulated AMD root for Genoa (trusted with --snp-trust-root, as an operator would), a chip's VCEK from
it, signed SNP reference values, and an owner on port 0 with its guest port (server-only TLS, the dev
CA's `owner` certificate). Reports are built and signed in the test with the chip's VCEK key, as the
emulated firmware would sign them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from owner_support import DISK_GUID, EXTRA_GUID, EXTRA_SECRET, PASSPHRASE, Publisher

from owner_svc.server import OwnerApp, OwnerConfig, build_app
from sevlaunch.refvalues import DigestConfig, ReferenceDigest, make_manifest, sign_envelope
from sevlaunch.rpc import secure_channel_sync
from sevlaunch.rpc.v1 import guest_pb2, guest_pb2_grpc, owner_pb2, owner_pb2_grpc
from sevlaunch.sev.technology import Technology
from sevlaunch.snp.challenge import report_data
from sevlaunch.snp.idblock import IdAuth, IdBlock
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.reference import SnpReference
from sevlaunch.snp.report import AttestationReport
from sevlaunch.snp.secret_wrap import GuestKeyPair
from sevlaunch.snp.tcb import Product, TcbVersion

DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM
START = datetime.now(UTC) - timedelta(days=2)
CHIP = bytes(range(1, 65))
TCB = TcbVersion(Product.GENOA, bootloader=9, tee=0, snp=23, microcode=72)
LOW_TCB = dataclasses.replace(TCB, snp=21)
HIGH_TCB = dataclasses.replace(TCB, snp=24)
DIGEST = bytes.fromhex("5a" * 48)
FAMILY = b"\x0f" * 16
IMAGE = b"\x1e" * 16
GUEST_SVN = 2
POLICY = 0x30000
VCPU_TYPE = "EPYC-v4"
VCPUS = 2


def tcb(**changes: int) -> TcbVersion:
    return dataclasses.replace(TCB, **changes)


@dataclass
class Chip:
    """One emulated Genoa chip: its VCEK key (the firmware's) and certificates from the test root."""

    root: EmulatedSnpRoot
    vcek_key: ec.EllipticCurvePrivateKey
    chip_id: bytes = CHIP

    def vcek(self, at: TcbVersion = TCB) -> bytes:
        return self.root.issue_vcek(
            self.vcek_key.public_key(), self.chip_id, at, not_before=START
        ).public_bytes(DER)

    def vlek(self, key: ec.EllipticCurvePrivateKey, at: TcbVersion = TCB) -> bytes:
        return self.root.issue_vlek(key.public_key(), at, "csp-test", not_before=START).public_bytes(DER)


def snp_manifest_envelope(
    publisher: Publisher,
    *,
    digest: bytes = DIGEST,
    vcpus: tuple[int, ...] = (VCPUS,),
    firmware_sha256: str | None = None,
) -> bytes:
    digests = [
        ReferenceDigest(
            digest,
            DigestConfig(Technology.SEV_SNP, vcpus=n, vcpu_type=VCPU_TYPE, guest_features=1, vmm_type="QEMU"),
        )
        for n in vcpus
    ]
    manifest = make_manifest(
        publisher="test-distro",
        firmware_name="OVMF-SNP",
        firmware_version="2025.02",
        digests=digests,
        valid_days=30,
        now=START,
        snp=SnpReference(FAMILY, IMAGE, GUEST_SVN, (tcb(snp=20),)),
        firmware_sha256=firmware_sha256,
    )
    return sign_envelope(manifest.to_json(), publisher.key).to_json()


def snp_rules(**overrides: Any) -> owner_pb2.SnpRules:
    fields: dict[str, Any] = dict(
        products=["genoa"],
        policies=[POLICY],
        vcpu_counts=[1, 2, 4],
        guest_features=[1],
        vmm_types=["QEMU"],
        vcpu_types=[VCPU_TYPE],
        min_tcb=[
            owner_pb2.SnpTcbMinimum(product="genoa", reported=TCB.raw, committed=TCB.raw, launch=TCB.raw)
        ],
    )
    fields.update(overrides)
    return owner_pb2.SnpRules(**fields)


def snp_workload(workload_id: str = "snp-web", **rules: Any) -> owner_pb2.Workload:
    return owner_pb2.Workload(
        workload_id=workload_id,
        allowed_policies=[0x3],
        generations=["milan"],
        selectors=[
            owner_pb2.ReferenceSelector(firmware_name="OVMF-SNP", modes=[owner_pb2.REFERENCE_MODE_SEV_SNP])
        ],
        snp=snp_rules(**rules),
    )


def launch_config(**overrides: Any) -> owner_pb2.SnpLaunchConfig:
    fields: dict[str, Any] = dict(vcpus=VCPUS, vcpu_type=VCPU_TYPE, guest_features=1, vmm_type="QEMU")
    fields.update(overrides)
    return owner_pb2.SnpLaunchConfig(**fields)


@dataclass
class Guest:
    """One authorised launch seen from inside the guest: the owner's answer, a key pair, and reports."""

    chip: Chip
    authorized: owner_pb2.AuthorizeSnpLaunchResponse
    key: GuestKeyPair = field(default_factory=GuestKeyPair.generate)

    @property
    def init_data(self) -> InitData:
        return InitData.parse(self.authorized.init_data)

    @property
    def id_auth(self) -> IdAuth:
        return IdAuth.from_bytes(self.authorized.id_auth)

    def report(self, challenge: bytes, **changes: Any) -> AttestationReport:
        block = IdBlock.from_bytes(self.authorized.id_block)
        auth = self.id_auth
        fields: dict[str, Any] = {
            "version": 3,
            "cpuid_fam_id": 0x19,
            "cpuid_mod_id": 0x11,
            "cpuid_step": 1,
            "policy": self.authorized.policy,
            "chip_id": self.chip.chip_id,
            "reported_tcb": TCB.raw,
            "committed_tcb": TCB.raw,
            "current_tcb": TCB.raw,
            "launch_tcb": TCB.raw,
            "current_major": 1,
            "current_minor": 55,
            "current_build": 40,
            "committed_major": 1,
            "committed_minor": 55,
            "committed_build": 40,
            "measurement": block.launch_digest,
            "host_data": self.authorized.host_data,
            "report_data": report_data(challenge, self.key.public_bytes),
            "family_id": block.family_id,
            "image_id": block.image_id,
            "guest_svn": block.guest_svn,
            "id_key_digest": auth.id_key_digest,
            "author_key_digest": auth.author_key_digest,
            "author_key_en": auth.author_key is not None,
        }
        fields.update(changes)
        return AttestationReport(**fields)

    def signed(
        self, challenge: bytes, key: ec.EllipticCurvePrivateKey | None = None, **changes: Any
    ) -> bytes:
        return self.report(challenge, **changes).signed(key or self.chip.vcek_key).to_bytes()

    def attest_request(self, challenge: bytes, report: bytes, **certs: bytes) -> guest_pb2.AttestRequest:
        request = guest_pb2.AttestRequest(
            authorization_id=self.authorized.authorization_id,
            challenge=challenge,
            report=report,
            guest_public_key=self.key.public_bytes,
        )
        if certs:
            request.certs.CopyFrom(guest_pb2.SnpCertificates(**certs))
        return request


@dataclass
class SnpOwner:
    config: OwnerConfig
    running: Any
    app: OwnerApp
    tls_dir: Path
    _channels: list[grpc.Channel] = field(default_factory=list)

    def stub(self, identity: str = "launcher") -> owner_pb2_grpc.OwnerServiceStub:
        channel = secure_channel_sync(self.running.address, self.tls_dir, identity)
        self._channels.append(channel)
        return owner_pb2_grpc.OwnerServiceStub(channel)

    @property
    def admin(self) -> owner_pb2_grpc.OwnerServiceStub:
        return self.stub("owner-admin")

    @property
    def guest_port(self) -> int:
        assert self.app.guest is not None
        return self.app.guest.port

    def guest_channel(self, *, ca: bytes | None = None) -> grpc.Channel:
        """A guest's channel: server-authenticated TLS trusting only the init data's CA, no client cert."""
        root = ca if ca is not None else (self.tls_dir / "ca.pem").read_bytes()
        channel = grpc.secure_channel(
            f"localhost:{self.guest_port}", grpc.ssl_channel_credentials(root_certificates=root)
        )
        self._channels.append(channel)
        return channel

    def guest_stub(self) -> guest_pb2_grpc.OwnerGuestStub:
        return guest_pb2_grpc.OwnerGuestStub(self.guest_channel())

    def audit(self) -> list[Any]:
        return list(self.admin.GetAuditLog(owner_pb2.GetAuditLogRequest()).records)

    def authorization_state(self, authorization_id: str) -> int:
        listed = self.admin.ListSnpAuthorizations(owner_pb2.ListSnpAuthorizationsRequest()).authorizations
        return next(a.state for a in listed if a.authorization_id == authorization_id)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def snp_root() -> EmulatedSnpRoot:
    return EmulatedSnpRoot.generate(Product.GENOA, key_size=2048, not_before=START)


@pytest.fixture(scope="session")
def snp_root_file(snp_root: EmulatedSnpRoot, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snp-roots") / "emulated-genoa.pem"
    path.write_bytes(b"".join(c.public_bytes(PEM) for c in (snp_root.ark, snp_root.ask, snp_root.asvk)))
    return path


@pytest.fixture(scope="session")
def other_snp_root() -> EmulatedSnpRoot:
    """A root nobody trusts: what a forger would sign with."""
    return EmulatedSnpRoot.generate(Product.GENOA, key_size=2048, not_before=START)


@pytest.fixture(scope="session")
def chip(snp_root: EmulatedSnpRoot) -> Chip:
    return Chip(snp_root, ec.generate_private_key(ec.SECP384R1()))


@pytest.fixture
def make_snp_owner(
    serve: Any, tls_dir: Path, tmp_path: Path, snp_root_file: Path, publisher: Publisher
) -> Iterator[Callable[..., SnpOwner]]:
    made: list[SnpOwner] = []

    def make(
        *, db: str | None = None, subdir: str = "owner", trust_snp_root: bool = True, **extra: Any
    ) -> SnpOwner:
        base = tmp_path / subdir
        base.mkdir(exist_ok=True)
        config = OwnerConfig(
            tls_dir=tls_dir,
            db=db if db is not None else base / "owner.db",
            kek_file=base / "kek",
            create_kek=True,
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            publisher_keys=[str(publisher.pub_file)],
            guest_listen="localhost:0",
            guest_tls_cert=tls_dir / "owner.pem",
            guest_tls_key=tls_dir / "owner.key",
            guest_tls_ca=tls_dir / "ca.pem",
            snp_trust_roots=[f"genoa={snp_root_file}"] if trust_snp_root else [],
            **extra,
        )
        holder: dict[str, OwnerApp] = {}

        async def factory() -> Any:
            app = build_app(config)
            holder["app"] = app
            await app.start_guest()
            return app.rpc

        running = serve(factory)
        owner = SnpOwner(config, running, holder["app"], tls_dir)
        made.append(owner)
        return owner

    yield make
    for owner in made:
        owner.close()
        guest = owner.app.guest
        if guest is not None and guest.port and not owner.running.loop.is_closed():
            owner.running.run(guest.stop(0))


def provision_snp(
    owner: SnpOwner, publisher: Publisher, *, workload: owner_pb2.Workload | None = None
) -> str:
    admin = owner.admin
    reply = admin.ImportReferenceValues(
        owner_pb2.ImportReferenceValuesRequest(envelope=snp_manifest_envelope(publisher))
    )
    w = workload or snp_workload()
    admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=w))
    admin.PutSecret(
        owner_pb2.PutSecretRequest(
            workload_id=w.workload_id,
            entries=[
                owner_pb2.SecretEntry(guid=DISK_GUID, data=PASSPHRASE + b"\0"),
                owner_pb2.SecretEntry(guid=EXTRA_GUID, data=EXTRA_SECRET),
            ],
        )
    )
    return str(reply.manifest_id)


def authorize_request(
    chip: Chip, *, workload_id: str = "snp-web", vek: bytes | None = None, **platform: Any
) -> owner_pb2.AuthorizeSnpLaunchRequest:
    fields: dict[str, Any] = dict(committed_tcb=TCB.raw, current_tcb=TCB.raw)
    fields.update(platform)
    config = fields.pop("config", launch_config())
    return owner_pb2.AuthorizeSnpLaunchRequest(
        workload_id=workload_id,
        platform=owner_pb2.SnpPlatform(vek_cert=vek if vek is not None else chip.vcek(), **fields),
        config=config,
    )
