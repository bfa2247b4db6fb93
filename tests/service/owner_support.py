"""Fixtures and helpers for the owner service tests (imported by test_owner_*.py; holds no test).

An emulated chip (its root trusted via --trust-root, as an operator would), a publisher key, signed
reference values for a small AmdSev OVMF (the 4 KiB vector: fast, and it declares a secret area), and an
owner server on port 0 behind real mTLS.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from owner_svc.adapters.store import DEFAULT_DB_WAIT
from owner_svc.server import OwnerApp, OwnerConfig, build_app
from sevlaunch.firmware.emulator import ChipConfig, EmulatedFirmware, EmulatedRoot
from sevlaunch.refvalues import (
    DigestConfig,
    KeyType,
    ReferenceDigest,
    generate_private_key,
    make_manifest,
    public_key_pem,
    sign_envelope,
)
from sevlaunch.rpc import error_info, secure_channel_sync
from sevlaunch.rpc.v1 import common_pb2, owner_pb2, owner_pb2_grpc
from sevlaunch.sev.cert import CERT_SIZE
from sevlaunch.sev.digest import launch_digest, launch_updates
from sevlaunch.sev.ovmf import OVMF
from sevlaunch.sev.technology import Technology
from sevlaunch.sev.vmsa import VMSALayout, vcpu_signature

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
OVMF_IMAGE = (VECTORS / "measurement" / "ovmf_AmdSev_suffix.bin").read_bytes()
VCPU_TYPE = "EPYC-Milan"
PASSPHRASE = b"correct horse battery staple, the LUKS passphrase"
DISK_GUID = "736869e5-84f0-4973-92ec-06879ce3da0b"
EXTRA_GUID = "a1b2c3d4-0000-4000-8000-000000000001"
EXTRA_SECRET = b"an API token the guest needs: 7f3a9c"
SEV_POLICY = 0x3
SEV_ES_POLICY = 0x7


def chain_from_dir(name: str) -> common_pb2.CertificateChain:
    d = VECTORS / "chains" / name
    return common_pb2.CertificateChain(
        **{f"{c}_cert": (d / f"{c}.cert").read_bytes() for c in ("pdh", "pek", "oca", "cek", "ask", "ark")}
    )


def emulator_chain(fw: EmulatedFirmware) -> common_pb2.CertificateChain:
    pdh, pek_oca_cek = fw.pdh_cert_export()
    ask_ark = fw.ask_ark()
    half = len(ask_ark) // 2
    return common_pb2.CertificateChain(
        pdh_cert=pdh,
        pek_cert=pek_oca_cek[:CERT_SIZE],
        oca_cert=pek_oca_cek[CERT_SIZE : 2 * CERT_SIZE],
        cek_cert=fw.kds_cek(),  # the ASK-signed CEK, as the platform service serves it
        ask_cert=ask_ark[:half],
        ark_cert=ask_ark[half:],
    )


@dataclass
class Publisher:
    key: Any
    pub_file: Path

    def envelope(
        self,
        *,
        digests: list[ReferenceDigest],
        version: str = "2024.05",
        valid_days: int = 30,
        name: str = "OVMF",
        revokes: tuple[str, ...] = (),
        now: Any = None,
    ) -> bytes:
        manifest = make_manifest(
            publisher="test-distro",
            firmware_name=name,
            firmware_version=version,
            digests=digests,
            valid_days=valid_days,
            revokes=revokes,
            now=now,
        )
        return sign_envelope(manifest.to_json(), self.key).to_json()


def reference_digests(image: bytes = OVMF_IMAGE) -> list[ReferenceDigest]:
    sig = vcpu_signature(VCPU_TYPE)
    out = [ReferenceDigest(bytes(launch_digest(image, mode="sev")), DigestConfig(Technology.SEV))]
    for n in (1, 2):
        ld = launch_digest(image, mode="sev-es", vcpus=n, vcpu_sig=sig, layout=VMSALayout.init2)
        out.append(
            ReferenceDigest(
                bytes(ld), DigestConfig(Technology.SEV_ES, vcpus=n, vcpu_type=VCPU_TYPE, vmsa_layout="init2")
            )
        )
    return out


def workload_msg(workload_id: str = "web", **overrides: Any) -> owner_pb2.Workload:
    fields: dict[str, Any] = dict(
        workload_id=workload_id,
        allowed_policies=[SEV_POLICY, SEV_ES_POLICY],
        generations=["emulated", "milan", "rome"],
        selectors=[
            owner_pb2.ReferenceSelector(
                firmware_name="OVMF",
                version_min="2024.01",
                modes=[owner_pb2.REFERENCE_MODE_SEV, owner_pb2.REFERENCE_MODE_SEV_ES],
                sev_es_vcpus=[1, 2],
            )
        ],
    )
    fields.update(overrides)
    return owner_pb2.Workload(**fields)


@dataclass
class Launch:
    handle: int
    measurement: bytes
    api_major: int
    api_minor: int
    build: int

    def release_request(self, session_id: str, policy: int) -> owner_pb2.ReleaseSecretRequest:
        return owner_pb2.ReleaseSecretRequest(
            session_id=session_id,
            launch_measurement=self.measurement,
            policy=policy,
            firmware=common_pb2.FirmwareVersion(
                api_major=self.api_major, api_minor=self.api_minor, build_id=self.build
            ),
        )


def launch(
    fw: EmulatedFirmware, opened: owner_pb2.OpenSessionResponse, *, image: bytes = OVMF_IMAGE, vcpus: int = 1
) -> Launch:
    """Plays QEMU's part: LAUNCH_START with the owner's blobs, the updates of the image, LAUNCH_MEASURE."""
    handle = fw.launch_start(opened.godh_cert, opened.session_blob, opened.policy)
    es = bool(opened.policy & 0x4)
    updates = launch_updates(
        image, mode="sev-es" if es else "sev", vcpus=vcpus, vcpu_sig=vcpu_signature(VCPU_TYPE) if es else None
    )
    for u in updates:
        if u.kind == "data":
            assert u.gpa is not None
            fw.launch_update_data(handle, u.gpa, u.data)
        else:
            fw.launch_update_vmsa(handle, u.data)
    measurement = fw.launch_measure(handle)
    st = fw.platform_status()
    return Launch(handle, measurement, st.api_major, st.api_minor, st.build)


def secret_area() -> tuple[int, int]:
    area = OVMF.from_bytes(OVMF_IMAGE).secret_area
    assert area is not None
    return area


def db_snapshot(path: Path) -> list[str]:
    """Every row of every table, for "the store did not change" assertions."""
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05) -> None:
    """Polls `condition` until it holds; an AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def rpc_error(call: Callable[[], Any]) -> Any:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return error_info(info.value)


@dataclass
class OwnerHarness:
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

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def emu_root(emulated_root: EmulatedRoot) -> EmulatedRoot:
    return emulated_root  # the session's one root (tests/conftest.py): RSA-4096 keys take seconds


@pytest.fixture(scope="session")
def emu(emu_root: EmulatedRoot, tmp_path_factory: pytest.TempPathFactory) -> EmulatedFirmware:
    return EmulatedFirmware(
        tmp_path_factory.mktemp("chip"), root=emu_root, config=ChipConfig(max_guests=200, max_es_guests=200)
    )


@pytest.fixture(scope="session")
def emu_root_file(emu: EmulatedFirmware, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("roots") / "ask_ark.cert"
    path.write_bytes(emu.ask_ark())
    return path


@pytest.fixture(scope="session")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> Publisher:
    key = generate_private_key(KeyType.ED25519)
    pub = tmp_path_factory.mktemp("publisher") / "distro.pub"
    pub.write_bytes(public_key_pem(key.public_key()))
    return Publisher(key, pub)


@pytest.fixture
def make_owner(
    serve: Any, tls_dir: Path, tmp_path: Path, emu_root_file: Path, publisher: Publisher
) -> Iterator[Callable[..., OwnerHarness]]:
    made: list[OwnerHarness] = []

    def make(
        *,
        trust_emulator: bool = True,
        session_ttl: float = 300.0,
        subdir: str = "owner",
        refvalues_urls: tuple[str, ...] = (),
        refvalues_interval: float = 3600,
        start_poller: bool = False,
        db: str | None = None,
        db_wait: float = DEFAULT_DB_WAIT,
        checkpoint_interval: float = 300.0,
    ) -> OwnerHarness:
        base = tmp_path / subdir
        base.mkdir(exist_ok=True)
        config = OwnerConfig(
            tls_dir=tls_dir,
            db=db if db is not None else base / "owner.db",
            db_wait=db_wait,
            kek_file=base / "kek",
            create_kek=True,
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            trust_roots=[f"emulated={emu_root_file}"] if trust_emulator else [],
            publisher_keys=[str(publisher.pub_file)],
            session_ttl=session_ttl,
            refvalues_urls=refvalues_urls,
            refvalues_interval=refvalues_interval,
            checkpoint_interval=checkpoint_interval,
        )
        holder: dict[str, OwnerApp] = {}

        async def factory() -> Any:
            app = build_app(config)
            holder["app"] = app
            if start_poller:
                await app.start()  # the server, the checkpoints and, with --refvalues-url, the poller
            return app.rpc

        running = serve(factory)
        harness = OwnerHarness(config, running, holder["app"], tls_dir)
        made.append(harness)
        return harness

    yield make
    for h in made:
        h.close()
        if h.app._tasks:
            h.running.run(_cancel_tasks(h.app))


async def _cancel_tasks(app: OwnerApp) -> None:
    for task in app._tasks:
        task.cancel()
    await asyncio.gather(*app._tasks, return_exceptions=True)
    app._tasks.clear()


def provision(h: OwnerHarness, publisher: Publisher, *, workload: owner_pb2.Workload | None = None) -> str:
    """Imports the reference values, stores the workload and its secret; returns the manifest id."""
    admin = h.admin
    reply = admin.ImportReferenceValues(
        owner_pb2.ImportReferenceValuesRequest(envelope=publisher.envelope(digests=reference_digests()))
    )
    admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload or workload_msg()))
    admin.PutSecret(
        owner_pb2.PutSecretRequest(
            workload_id=(workload or workload_msg()).workload_id,
            entries=[
                owner_pb2.SecretEntry(guid=DISK_GUID, data=PASSPHRASE + b"\0"),
                owner_pb2.SecretEntry(guid=EXTRA_GUID, data=EXTRA_SECRET),
            ],
        )
    )
    return str(reply.manifest_id)
