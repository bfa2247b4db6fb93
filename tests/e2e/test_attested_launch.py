"""End to end: platform_svc, owner_svc and launcher_svc as real mTLS gRPC servers on port 0, the
emulated hypervisor (libvirt's test driver plus the firmware emulator, one chip shared with platform_svc)
and Debian's OVMF. Every refusal must end with the launch's domain gone and the chip's guest count back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from launcher_svc.adapters.emulated import EmulatedHypervisor
from launcher_svc.core.domain_xml import parse_domain_xml
from launcher_svc.core.launcher import Launcher, LauncherConfig
from launcher_svc.core.spec import PathPolicy
from launcher_svc.core.state import Phase
from launcher_svc.server import LauncherServerConfig
from launcher_svc.server import create_server as create_launcher
from owner_svc.server import OwnerApp, OwnerConfig, build_app
from platform_svc.server import PlatformConfig
from platform_svc.server import create_server as create_platform
from sevlaunch.firmware import EmulatedFirmware, EmulatedRoot
from sevlaunch.refvalues import (
    DigestConfig,
    KeyType,
    ReferenceDigest,
    generate_private_key,
    make_manifest,
    public_key_pem,
    sign_envelope,
)
from sevlaunch.rpc import RpcServer, secure_channel_sync
from sevlaunch.rpc.v1 import common_pb2, launcher_pb2, launcher_pb2_grpc, owner_pb2, owner_pb2_grpc
from sevlaunch.sev.digest import launch_digest
from sevlaunch.sev.secret import DISK_PASSPHRASE_GUID, SecretTable
from sevlaunch.sev.technology import Technology
from sevlaunch.sev.vmsa import VMSALayout, vcpu_signature

T = TypeVar("T")

OVMF = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
SECRET_GPA = 0x80C000
PASSPHRASE = b"correct horse battery staple"
WORKLOAD = "web-1"
VCPU_TYPE = "EPYC-v4"
ORCHESTRATED_ORDER = [
    launcher_pb2.PHASE_CHAIN_FETCHED,
    launcher_pb2.PHASE_SESSION_OPENED,
    launcher_pb2.PHASE_DEFINED,
    launcher_pb2.PHASE_STARTED_PAUSED,
    launcher_pb2.PHASE_MEASURED,
    launcher_pb2.PHASE_SECRET_RELEASED,
    launcher_pb2.PHASE_SECRET_INJECTED,
    launcher_pb2.PHASE_RUNNING,
]

pytestmark = pytest.mark.skipif(not OVMF.is_file(), reason="Debian's ovmf package is a test dependency")


@pytest.fixture(scope="session")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    key = generate_private_key(KeyType.ED25519)
    path = tmp_path_factory.mktemp("publisher") / "distro.pub"
    path.write_bytes(public_key_pem(key.public_key()))
    return key, path


@pytest.fixture(scope="session")
def manifest_envelope(publisher: tuple[Any, Path]) -> bytes:
    """Debian's OVMF as a distro would publish it: SEV, and SEV-ES with 4 vCPUs of EPYC-v4."""
    key, _ = publisher
    image = OVMF.read_bytes()
    digests = [
        ReferenceDigest(bytes(launch_digest(image, mode="sev")), DigestConfig(Technology.SEV)),
        ReferenceDigest(
            bytes(launch_digest(image, mode="sev-es", vcpus=4, vcpu_sig=vcpu_signature(VCPU_TYPE))),
            DigestConfig(Technology.SEV_ES, vcpus=4, vcpu_type=VCPU_TYPE, vmsa_layout=VMSALayout.init2.value),
        ),
    ]
    manifest = make_manifest(
        publisher="debian", firmware_name="OVMF", firmware_version="2022.11-6", digests=digests, valid_days=30
    )
    return sign_envelope(manifest.to_json(), key).to_json()


class Loop:
    """One event loop in a thread for the in-process servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class World:
    tmp: Path
    tls_dir: Path
    loop: Loop
    chip_dir: Path
    firmware: EmulatedFirmware
    platform: RpcServer
    owner: OwnerApp
    launcher: RpcServer | None = None
    core: Launcher | None = None

    @property
    def platform_addr(self) -> str:
        return f"localhost:{self.platform.port}"

    @property
    def owner_addr(self) -> str:
        return f"localhost:{self.owner.rpc.port}"

    @property
    def launcher_addr(self) -> str:
        assert self.launcher is not None
        return f"localhost:{self.launcher.port}"

    @property
    def hv(self) -> EmulatedHypervisor:
        assert self.core is not None and isinstance(self.core.hv, EmulatedHypervisor)
        return self.core.hv

    def start_launcher(self, *, server: dict[str, Any] | None = None, **overrides: Any) -> None:
        cfg = LauncherConfig(
            paths=PathPolicy((str(OVMF.parent), str(self.tmp / "images"))),
            secret_gpa=SECRET_GPA,
            phase_timeout=overrides.pop("phase_timeout", 20.0),
            reconcile_interval=overrides.pop("reconcile_interval", 0.0),
            **overrides,
        )
        server_cfg = LauncherServerConfig(
            tls_dir=self.tls_dir,
            listen="127.0.0.1:0",
            platform=self.platform_addr,
            hypervisor="emulated",
            emulator=self.chip_dir,
            db=self.tmp / "launcher.db",
            metrics_listen="127.0.0.1:0",
            vcpu_type=VCPU_TYPE,
            launcher=cfg,
            **(server or {}),
        )

        async def boot() -> tuple[RpcServer, Launcher]:
            server, core = await create_launcher(server_cfg)
            await server.start()
            return server, core

        self.launcher, self.core = self.loop.run(boot())

    def launcher_stub(self, identity: str = "client") -> launcher_pb2_grpc.LauncherServiceStub:
        channel = secure_channel_sync(self.launcher_addr, self.tls_dir, identity)
        return launcher_pb2_grpc.LauncherServiceStub(channel)

    def owner_stub(self, identity: str) -> owner_pb2_grpc.OwnerServiceStub:
        return owner_pb2_grpc.OwnerServiceStub(secure_channel_sync(self.owner_addr, self.tls_dir, identity))

    def guest_count(self) -> int:
        return self.firmware.platform_status().guest_count

    def domains_of(self, launch_id: str) -> list[str]:
        return [d.name for d in self.hv.list_domains() if d.launch_id == launch_id]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def world(
    tmp_path: Path,
    tls_dir: Path,
    emulated_root: EmulatedRoot,
    publisher: tuple[Any, Path],
    manifest_envelope: bytes,
) -> Iterator[World]:
    (tmp_path / "images").mkdir()
    chip_dir = tmp_path / "chip"
    firmware = EmulatedFirmware(chip_dir, root=emulated_root)
    loop = Loop()

    async def boot() -> tuple[RpcServer, OwnerApp]:
        platform, _, _ = await create_platform(
            PlatformConfig(tls_dir=tls_dir, listen="127.0.0.1:0", emulator=chip_dir, metrics_listen=None)
        )
        await platform.start()
        owner = await _start_owner(tmp_path / "owner", tls_dir, chip_dir, publisher[1])
        return platform, owner

    platform, owner = loop.run(boot())
    w = World(tmp_path, tls_dir, loop, chip_dir, firmware, platform, owner)
    _configure_owner(w.owner_stub("owner-admin"), manifest_envelope)
    try:
        yield w
    finally:

        async def shutdown() -> None:
            if w.core is not None:
                await w.core.stop()
            if w.launcher is not None:
                await w.launcher.stop(0.5)
            await owner.stop(0.5)
            await platform.stop(0.5)

        with contextlib.suppress(Exception):
            loop.run(shutdown())
        if w.core is not None:
            w.hv.close()
        loop.close()


async def _start_owner(
    state: Path, tls_dir: Path, chip_dir: Path, publisher_key: Path, **kw: Any
) -> OwnerApp:
    state.mkdir(exist_ok=True)
    owner = build_app(
        OwnerConfig(
            tls_dir=tls_dir,
            db=state / "owner.db",
            kek_file=state / "owner.kek",
            create_kek=True,
            trust_roots=[f"emulated={chip_dir / 'ask_ark.cert'}"],
            publisher_keys=[str(publisher_key)],
            **kw,
        )
    )
    await owner.start()
    return owner


def _put_workload(admin: owner_pb2_grpc.OwnerServiceStub, workload_id: str, **extra: Any) -> None:
    admin.PutWorkload(
        owner_pb2.PutWorkloadRequest(
            workload=owner_pb2.Workload(
                workload_id=workload_id,
                allowed_policies=[0x3, 0x7],
                generations=["emulated"],
                firmware_minimum=common_pb2.FirmwareVersion(api_major=0, api_minor=0, build_id=0),
                selectors=[
                    owner_pb2.ReferenceSelector(
                        firmware_name="OVMF",
                        modes=[owner_pb2.REFERENCE_MODE_SEV, owner_pb2.REFERENCE_MODE_SEV_ES],
                        sev_es_vcpus=[4],
                    )
                ],
                **extra,
            )
        )
    )


def _configure_owner(admin: owner_pb2_grpc.OwnerServiceStub, manifest_envelope: bytes) -> None:
    _put_workload(admin, WORKLOAD)
    admin.PutSecret(
        owner_pb2.PutSecretRequest(
            workload_id=WORKLOAD,
            entries=[owner_pb2.SecretEntry(guid=str(DISK_PASSPHRASE_GUID), data=PASSPHRASE + b"\x00")],
        )
    )
    admin.ImportReferenceValues(owner_pb2.ImportReferenceValuesRequest(envelope=manifest_envelope))


def spec(
    name: str = "guest",
    *,
    es: bool = False,
    vcpus: int = 1,
    policy: int | None = None,
    firmware: Path = OVMF,
    **extra: Any,
) -> launcher_pb2.GuestSpec:
    return launcher_pb2.GuestSpec(
        name=name,
        memory_mib=512,
        vcpus=vcpus,
        firmware_path=str(firmware),
        mode=launcher_pb2.SEV_MODE_SEV_ES if es else launcher_pb2.SEV_MODE_SEV,
        policy=policy if policy is not None else (0x7 if es else 0x3),
        **extra,
    )


def launch(
    w: World, guest: launcher_pb2.GuestSpec, workload: str = WORKLOAD, owner: str | None = None
) -> list[Any]:
    stub = w.launcher_stub()
    request = launcher_pb2.LaunchRequest(
        spec=guest, owner=launcher_pb2.OwnerRef(endpoint=owner or w.owner_addr, workload_id=workload)
    )
    return list(stub.Launch(request, timeout=60))


def secret_table(w: World, launch_id: str) -> SecretTable:
    (domain,) = w.domains_of(launch_id)
    handle = w.hv.guest_handle(domain)
    assert handle is not None
    header = w.firmware.read_guest_memory(handle, SECRET_GPA, 20)
    total = int.from_bytes(header[16:20], "little")
    padded = (total + 15) // 16 * 16
    return SecretTable.from_bytes(w.firmware.read_guest_memory(handle, SECRET_GPA, padded))


def assert_gone(w: World, launch_id: str) -> None:
    assert w.domains_of(launch_id) == []
    assert w.guest_count() == 0
    assert not list((w.chip_dir / "hypervisor").glob("sl-*.json"))
    info = w.launcher_stub().GetLaunch(launcher_pb2.GetLaunchRequest(launch_id=launch_id))
    assert info.state == launcher_pb2.PHASE_FAILED


# ---------------------------------------------------------------------------------------------------
# successful launches


@pytest.mark.parametrize(("es", "vcpus"), [(False, 1), (True, 4)], ids=["sev", "sev-es-4vcpus"])
def test_orchestrated_launch_reaches_running_with_the_owners_secret(
    world: World, es: bool, vcpus: int
) -> None:
    world.start_launcher()
    events = launch(world, spec(es=es, vcpus=vcpus))
    assert [e.phase for e in events] == ORCHESTRATED_ORDER
    assert all(e.duration.ToNanoseconds() >= 0 for e in events)
    launch_id = events[0].launch_id
    assert world.guest_count() == 1
    table = secret_table(world, launch_id)
    assert table.get(DISK_PASSPHRASE_GUID) == PASSPHRASE + b"\x00"
    (domain,) = world.hv.list_domains()
    assert domain.state.value == "running" and domain.sev_es is es

    stub = world.launcher_stub()
    info = stub.GetLaunch(launcher_pb2.GetLaunchRequest(launch_id=launch_id))
    assert info.state == launcher_pb2.PHASE_RUNNING and len(info.measurement) == 48
    # Another identity does not even learn that the launch exists.
    with pytest.raises(grpc.RpcError) as err:
        world.launcher_stub("platform-admin").GetLaunch(launcher_pb2.GetLaunchRequest(launch_id=launch_id))
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED

    destroyed = stub.DestroyGuest(launcher_pb2.DestroyGuestRequest(launch_id=launch_id))
    assert destroyed.state == launcher_pb2.PHASE_DESTROYED
    assert world.hv.list_domains() == [] and world.guest_count() == 0


# ---------------------------------------------------------------------------------------------------
# running without a secret: the spec's launch_without_secret AND the owner's no_secret

BARE = "bare-1"  # a workload with no secret that consents to launching without one


def _bare_workload(w: World) -> None:
    _put_workload(w.owner_stub("owner-admin"), BARE, allow_launch_without_secret=True)


def test_launch_without_secret_when_spec_and_owner_agree(world: World) -> None:
    _bare_workload(world)
    world.start_launcher()
    events = launch(world, spec(launch_without_secret=True), workload=BARE)
    assert [e.phase for e in events] == [
        p for p in ORCHESTRATED_ORDER if p != launcher_pb2.PHASE_SECRET_INJECTED
    ]
    (domain,) = world.hv.list_domains()
    assert domain.state.value == "running" and world.guest_count() == 1
    assert world.firmware.guest_info(world.hv.guest_handle(domain.name))["state"] == "RUNNING"


def test_owners_no_secret_without_the_specs_request_fails_closed(world: World) -> None:
    _bare_workload(world)
    world.start_launcher()
    failed = _failed(launch(world, spec(), workload=BARE))
    assert (failed.failed_phase, failed.reason) == (
        launcher_pb2.PHASE_SECRET_RELEASED,
        "no_secret_not_requested",
    )
    assert_gone(world, failed.launch_id)


def test_spec_allowing_no_secret_still_gets_the_owners_secret(world: World) -> None:
    world.start_launcher()
    events = launch(world, spec(launch_without_secret=True))
    assert [e.phase for e in events] == ORCHESTRATED_ORDER
    table = secret_table(world, events[0].launch_id)
    assert table.get(DISK_PASSPHRASE_GUID) == PASSPHRASE + b"\x00"


# ---------------------------------------------------------------------------------------------------
# the vCPU model is pinned, and it is what SEV-ES measures


def test_the_pinned_vcpu_model_is_what_the_measurement_covers(world: World) -> None:
    # The manifest lists SEV-ES with 4 vCPUs of EPYC-v4 only.
    world.start_launcher()
    ok = launch(world, spec("ok", es=True, vcpus=4, vcpu_type="EPYC-v4"))
    assert ok[-1].phase == launcher_pb2.PHASE_RUNNING
    info = world.launcher_stub().GetLaunch(launcher_pb2.GetLaunchRequest(launch_id=ok[0].launch_id))
    assert info.vcpu_type == "EPYC-v4"
    assert parse_domain_xml(world.hv.domain_xml(ok[-1].domain_name)).cpu_model == "EPYC"  # libvirt's name
    # Another model: other VMSAs, another measurement, refused by the owner.
    failed = _failed(launch(world, spec("milan", es=True, vcpus=4, vcpu_type="EPYC-Milan")))
    assert (failed.failed_phase, failed.reason) == (
        launcher_pb2.PHASE_SECRET_RELEASED,
        "measurement_mismatch",
    )
    assert world.domains_of(failed.launch_id) == [] and world.guest_count() == 1


def test_unknown_vcpu_type_is_refused_before_anything_is_defined(world: World) -> None:
    world.start_launcher()
    with pytest.raises(grpc.RpcError) as err:
        launch(world, spec(es=True, vcpus=4, vcpu_type="Skylake-Server"))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert world.hv.list_domains() == [] and world.guest_count() == 0


def _client_side_secret(
    w: World, prepared: launcher_pb2.PrepareLaunchResponse, session_id: str
) -> owner_pb2.ReleaseSecretResponse:
    return w.owner_stub("client").ReleaseSecret(
        owner_pb2.ReleaseSecretRequest(
            session_id=session_id,
            launch_measurement=prepared.measurement,
            firmware=common_pb2.FirmwareVersion(
                api_major=prepared.api_major, api_minor=prepared.api_minor, build_id=prepared.build_id
            ),
            policy=prepared.policy,
        )
    )


def _client_session(w: World, policy: int) -> owner_pb2.OpenSessionResponse:
    from sevlaunch.rpc.v1 import platform_pb2, platform_pb2_grpc

    platform = platform_pb2_grpc.PlatformServiceStub(
        secure_channel_sync(w.platform_addr, w.tls_dir, "client")
    )
    chain = platform.GetCertificateChain(platform_pb2.GetCertificateChainRequest()).platform.chain
    return w.owner_stub("client").OpenSession(
        owner_pb2.OpenSessionRequest(workload_id=WORKLOAD, chain=chain, policy=policy)
    )


def test_two_phase_launch_gives_the_same_result(world: World) -> None:
    world.start_launcher()
    session = _client_session(world, 0x3)
    stub = world.launcher_stub()
    prepared = stub.PrepareLaunch(
        launcher_pb2.PrepareLaunchRequest(
            spec=spec(), godh_cert=session.godh_cert, session=session.session_blob
        )
    )
    assert len(prepared.measurement) == 48 and prepared.policy == 0x3
    assert world.guest_count() == 1
    assert (
        stub.GetLaunch(launcher_pb2.GetLaunchRequest(launch_id=prepared.launch_id)).state
        == launcher_pb2.PHASE_MEASURED
    )
    released = _client_side_secret(world, prepared, session.session_id)
    info = stub.CompleteLaunch(
        launcher_pb2.CompleteLaunchRequest(
            launch_id=prepared.launch_id,
            secret_header=released.secret_header,
            secret_payload=released.secret_payload,
        )
    )
    assert info.state == launcher_pb2.PHASE_RUNNING and info.mode == launcher_pb2.LAUNCH_MODE_TWO_PHASE
    assert secret_table(world, prepared.launch_id).get(DISK_PASSPHRASE_GUID) == PASSPHRASE + b"\x00"


# ---------------------------------------------------------------------------------------------------
# refusals: the domain is gone afterwards


def _failed(events: list[Any]) -> Any:
    assert events[-1].phase == launcher_pb2.PHASE_FAILED
    assert all(e.phase != launcher_pb2.PHASE_RUNNING for e in events)
    return events[-1]


def test_tampered_firmware_is_refused_and_destroyed(world: World) -> None:
    tampered = world.tmp / "images" / "OVMF_CODE_4M.fd"
    image = bytearray(OVMF.read_bytes())
    image[len(image) // 2] ^= 0x01  # one bit in the middle; the footer table stays intact
    tampered.write_bytes(bytes(image))
    world.start_launcher()
    events = launch(world, spec(firmware=tampered))
    failed = _failed(events)
    assert failed.failed_phase == launcher_pb2.PHASE_SECRET_RELEASED
    assert failed.reason == "measurement_mismatch"
    assert launcher_pb2.PHASE_MEASURED in [e.phase for e in events]  # the domain existed, paused
    assert_gone(world, failed.launch_id)


def test_owner_refusal_after_measurement_destroys_the_domain(world: World) -> None:
    # The owner accepts SEV-ES only with 4 vCPUs: a 2-vCPU launch measures to an unlisted digest.
    world.start_launcher()
    failed = _failed(launch(world, spec(es=True, vcpus=2)))
    assert (failed.failed_phase, failed.reason) == (
        launcher_pb2.PHASE_SECRET_RELEASED,
        "measurement_mismatch",
    )
    assert_gone(world, failed.launch_id)


def test_owner_unreachable(world: World) -> None:
    world.start_launcher()
    failed = _failed(launch(world, spec(), owner=f"localhost:{_free_port()}"))
    assert failed.failed_phase == launcher_pb2.PHASE_SESSION_OPENED
    assert failed.reason == "owner_unavailable"
    assert_gone(world, failed.launch_id)


@pytest.mark.parametrize("impostor", ["client", "launcher"])
def test_owner_serving_another_identitys_certificate_is_refused(
    world: World, impostor: str, publisher: tuple[Any, Path], manifest_envelope: bytes
) -> None:
    # A caller holding a certificate of the deployment's CA runs its own owner, configured like the
    # real one (it would release a secret of its choosing), and names it in the launch request.
    # The fake is configured (and inspected) over its admin API while it serves the `owner` certificate,
    # and serves the impostor's on the same database in between: the `client` certificate is good for
    # client auth only, so no ordinary TLS client (this test's admin channel included) accepts it.
    state = world.tmp / f"fake-{impostor}"

    def start_fake(identity: str) -> tuple[OwnerApp, str]:
        app = world.loop.run(
            _start_owner(state, world.tls_dir, world.chip_dir, publisher[1], identity=identity)
        )
        return app, f"localhost:{app.rpc.port}"

    fake, addr = start_fake("owner")
    try:
        _configure_owner(
            owner_pb2_grpc.OwnerServiceStub(secure_channel_sync(addr, world.tls_dir, "owner-admin")),
            manifest_envelope,
        )
    finally:
        world.loop.run(fake.stop(0.5))
    fake, fake_addr = start_fake(impostor)
    try:
        world.start_launcher()
        failed = _failed(launch(world, spec(), owner=fake_addr))
        assert (failed.failed_phase, failed.reason) == (
            launcher_pb2.PHASE_SESSION_OPENED,
            "owner_not_authenticated",
        )
        assert repr(impostor) in failed.detail
        assert_gone(world, failed.launch_id)
    finally:
        world.loop.run(fake.stop(0.5))
    fake, addr = start_fake("owner")
    try:
        # The launcher never got as far as a call: the impostor saw no session request.
        admin = owner_pb2_grpc.OwnerServiceStub(secure_channel_sync(addr, world.tls_dir, "owner-admin"))
        assert list(admin.ListSessions(owner_pb2.ListSessionsRequest()).sessions) == []
        # The real owner, at its own endpoint, is still accepted by the same launcher.
        assert launch(world, spec("real"))[-1].phase == launcher_pb2.PHASE_RUNNING
    finally:
        world.loop.run(fake.stop(0.5))


def test_platform_with_an_unexpected_identity_is_refused(world: World) -> None:
    world.start_launcher(server={"platform_identity": "platform-admin"})
    failed = _failed(launch(world, spec()))
    assert (failed.failed_phase, failed.reason) == (
        launcher_pb2.PHASE_CHAIN_FETCHED,
        "platform_not_authenticated",
    )
    assert_gone(world, failed.launch_id)


def test_a_launcher_expecting_another_owner_identity_refuses_the_real_owner(world: World) -> None:
    world.start_launcher(server={"owner_identity": "tenant-owner"})
    failed = _failed(launch(world, spec()))
    assert failed.reason == "owner_not_authenticated"


def test_owner_too_slow_hits_the_phase_deadline(world: World) -> None:
    release = threading.Event()
    real = world.owner.core.release_secret

    def slow(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        return real(*args, **kwargs)

    world.owner.core.release_secret = slow  # type: ignore[method-assign]
    world.start_launcher(phase_timeouts={Phase.SECRET_RELEASED: 0.5})
    try:
        failed = _failed(launch(world, spec()))
    finally:
        release.set()
    assert (failed.failed_phase, failed.reason) == (launcher_pb2.PHASE_SECRET_RELEASED, "phase_deadline")
    assert_gone(world, failed.launch_id)


def test_secret_for_another_launch_is_refused_by_the_firmware(world: World) -> None:
    world.start_launcher()
    stub = world.launcher_stub()
    prepared = []
    sessions = []
    for name in ("a", "b"):
        s = _client_session(world, 0x3)
        sessions.append(s)
        prepared.append(
            stub.PrepareLaunch(
                launcher_pb2.PrepareLaunchRequest(
                    spec=spec(name), godh_cert=s.godh_cert, session=s.session_blob
                )
            )
        )
    assert world.guest_count() == 2
    secret_a = _client_side_secret(world, prepared[0], sessions[0].session_id)
    with pytest.raises(grpc.RpcError) as err:
        stub.CompleteLaunch(
            launcher_pb2.CompleteLaunchRequest(
                launch_id=prepared[1].launch_id,
                secret_header=secret_a.secret_header,
                secret_payload=secret_a.secret_payload,
            )
        )
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "firmware_bad_measurement" in str(err.value.trailing_metadata())
    assert world.domains_of(prepared[1].launch_id) == [] and world.guest_count() == 1
    info_b = stub.GetLaunch(launcher_pb2.GetLaunchRequest(launch_id=prepared[1].launch_id))
    assert (info_b.state, info_b.failed_phase) == (
        launcher_pb2.PHASE_FAILED,
        launcher_pb2.PHASE_SECRET_INJECTED,
    )
    # The launch the secret was made for still completes.
    done = stub.CompleteLaunch(
        launcher_pb2.CompleteLaunchRequest(
            launch_id=prepared[0].launch_id,
            secret_header=secret_a.secret_header,
            secret_payload=secret_a.secret_payload,
        )
    )
    assert done.state == launcher_pb2.PHASE_RUNNING


def test_policy_not_allowed_by_the_owner(world: World) -> None:
    world.start_launcher()
    failed = _failed(launch(world, spec(policy=0x1)))  # debugging allowed: the workload forbids it
    assert failed.failed_phase == launcher_pb2.PHASE_SESSION_OPENED
    assert failed.reason in ("policy_not_allowed", "policy_mismatch")
    assert_gone(world, failed.launch_id)


def test_policy_mismatch_between_session_and_domain_fails_at_launch_start(world: World) -> None:
    world.start_launcher()
    session = _client_session(world, 0x3)
    stub = world.launcher_stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.PrepareLaunch(
            launcher_pb2.PrepareLaunchRequest(
                spec=spec(policy=0x1), godh_cert=session.godh_cert, session=session.session_blob
            )
        )
    assert "firmware_policy_failure" in str(err.value.trailing_metadata())
    (rec,) = world.core.store.records() if world.core else []
    assert (rec.state, rec.failed_phase) == (Phase.FAILED, Phase.STARTED_PAUSED)
    assert_gone(world, rec.launch_id)


def test_two_phase_deadline_destroys_the_waiting_domain(world: World) -> None:
    world.start_launcher(phase_timeouts={Phase.SECRET_INJECTED: 0.5})
    session = _client_session(world, 0x3)
    prepared = world.launcher_stub().PrepareLaunch(
        launcher_pb2.PrepareLaunchRequest(
            spec=spec(), godh_cert=session.godh_cert, session=session.session_blob
        )
    )
    assert world.guest_count() == 1
    deadline = time.monotonic() + 10
    while world.guest_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_gone(world, prepared.launch_id)


# ---------------------------------------------------------------------------------------------------
# a launcher killed while the domain waits for the owner


def _launcher_process(w: World, db: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SEVLAUNCH_TLS_DIR": str(w.tls_dir)}  # flags through the environment too
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher_svc.server",
            "--listen",
            f"127.0.0.1:{port}",
            "--platform",
            w.platform_addr,
            "--hypervisor",
            "emulated",
            "--emulator",
            str(w.chip_dir),
            "--db",
            str(db),
            "--secret-gpa",
            hex(SECRET_GPA),
            "--phase-timeout",
            "30",
            "--metrics-listen",
            "off",
            "--vcpu-type",
            VCPU_TYPE,
            "--image-dir",
            str(OVMF.parent),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


# The launcher process is still starting when the wait begins: a refused connection must be retried in
# milliseconds, not after gRPC's default reconnect backoff (1 s, then 1.6 s ...).
_QUICK_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 20), ("grpc.max_reconnect_backoff_ms", 100))


def _wait_serving(addr: str, tls_dir: Path, timeout: float = 20) -> None:
    channel = secure_channel_sync(addr, tls_dir, "client", options=_QUICK_RECONNECT)
    grpc.channel_ready_future(channel).result(timeout=timeout)
    channel.close()


def test_sigkill_while_paused_then_restart_reconciles(world: World) -> None:
    release = threading.Event()
    real = world.owner.core.release_secret
    reached = threading.Event()

    def stalled(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        release.wait(60)
        return real(*args, **kwargs)

    world.owner.core.release_secret = stalled  # type: ignore[method-assign]
    db = world.tmp / "killed.db"
    port = _free_port()
    proc = _launcher_process(world, db, port)
    addr = f"127.0.0.1:{port}"
    try:
        _wait_serving(addr, world.tls_dir)
        stub = launcher_pb2_grpc.LauncherServiceStub(secure_channel_sync(addr, world.tls_dir, "client"))
        stream = stub.Launch(
            launcher_pb2.LaunchRequest(
                spec=spec(), owner=launcher_pb2.OwnerRef(endpoint=world.owner_addr, workload_id=WORKLOAD)
            ),
            timeout=60,
        )
        seen = []
        for event in stream:
            seen.append(event.phase)
            if event.phase == launcher_pb2.PHASE_MEASURED:
                break
        assert reached.wait(20)
        launch_id = event.launch_id
        assert world.guest_count() == 1  # paused, waiting for the owner
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stream.cancel()
        assert world.guest_count() == 1  # nobody cleaned up: the firmware context is still there
        persisted = list((world.chip_dir / "hypervisor").glob("sl-*.json"))
        assert len(persisted) == 1

        proc = _launcher_process(world, db, port)
        _wait_serving(addr, world.tls_dir)
        assert world.guest_count() == 0  # the reconciler ran before the server took calls
        assert not list((world.chip_dir / "hypervisor").glob("sl-*.json"))
        stub = launcher_pb2_grpc.LauncherServiceStub(secure_channel_sync(addr, world.tls_dir, "client"))
        info = stub.GetLaunch(launcher_pb2.GetLaunchRequest(launch_id=launch_id))
        assert (info.state, info.failed_phase, info.reason) == (
            launcher_pb2.PHASE_FAILED,
            launcher_pb2.PHASE_SECRET_RELEASED,
            "launcher_restarted",
        )
    finally:
        release.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(world.chip_dir / "hypervisor", ignore_errors=True)


def test_cli_prints_progress_and_exits_by_outcome(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from sevlaunch.cli import main

    world.start_launcher()
    common = ["--launcher", world.launcher_addr, "--owner", world.owner_addr, "--tls-dir", str(world.tls_dir)]
    ok = main(
        ["launch", *common, "--workload", WORKLOAD, "--firmware", str(OVMF), "--sev-es", "--vcpus", "4"]
    )
    out = capsys.readouterr().out
    assert ok == 0
    assert [line.split()[0] for line in out.splitlines()] == [
        _p.removeprefix("PHASE_") for _p in (launcher_pb2.Phase.Name(p) for p in ORCHESTRATED_ORDER)
    ]
    refused = main(["launch", *common, "--workload", "no-such-workload", "--firmware", str(OVMF)])
    out = capsys.readouterr().out
    assert refused == 1 and "FAILED in SESSION_OPENED: unknown_workload" in out
    assert world.guest_count() == 1  # only the first guest runs
