"""LauncherService through a real mTLS gRPC server on port 0, with the emulated hypervisor (libvirt's
test driver plus the firmware emulator). The client plays the owner of a two-phase launch with the SEV
library: GODH and session from the chip's PDH, the secret from the measurement."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from launcher_svc.core.launcher import LauncherConfig
from launcher_svc.core.spec import PathPolicy
from launcher_svc.server import LauncherServerConfig, create_server
from sevlaunch.firmware import ChipConfig, EmulatedFirmware, EmulatedRoot
from sevlaunch.rpc import error_info, secure_channel_sync
from sevlaunch.rpc.v1 import launcher_pb2, launcher_pb2_grpc
from sevlaunch.sev.cert import SEVCertificate
from sevlaunch.sev.measurement import LaunchMeasurement
from sevlaunch.sev.secret import SecretEntry, SecretTable, package_secret
from sevlaunch.sev.session import LaunchSession, create_session

# The last 4 KiB of an OvmfPkgX64 build: an SEV footer and, like Debian's image, no secret area (so the
# configured address is used). The emulated chip measures whatever image it is given.
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "measurement"
OVMF = str(VECTORS / "ovmf_OvmfX64_suffix.bin")
SECRET_GPA = 0x80C000


@pytest.fixture(scope="module")
def root(emulated_root: EmulatedRoot) -> EmulatedRoot:
    return emulated_root


class Env:
    def __init__(
        self, serve: Callable[..., Any], tls_dir: Path, tmp: Path, root: EmulatedRoot, **kw: Any
    ) -> None:
        chip = kw.pop("chip", ChipConfig())
        self.firmware = EmulatedFirmware(tmp / "chip", root=root, config=chip)
        cfg = LauncherServerConfig(
            tls_dir=tls_dir,
            listen="127.0.0.1:0",
            hypervisor="emulated",
            emulator=tmp / "chip",
            db=tmp / "launcher.db",
            metrics_listen="127.0.0.1:0",
            launcher=LauncherConfig(
                paths=PathPolicy((str(VECTORS),)),
                reconcile_interval=0,
                **{"secret_gpa": SECRET_GPA, **kw},
            ),
        )
        self.core: Any = None

        async def factory() -> Any:
            server, self.core = await create_server(cfg)
            return server

        self.running = serve(factory)
        self.tls_dir = tls_dir

    def stub(self, identity: str = "client") -> launcher_pb2_grpc.LauncherServiceStub:
        return launcher_pb2_grpc.LauncherServiceStub(
            secure_channel_sync(self.running.address, self.tls_dir, identity)
        )

    def session(self, policy: int = 0x3) -> LaunchSession:
        pdh, _ = self.firmware.pdh_cert_export()
        return create_session(SEVCertificate.from_bytes(pdh), policy)

    def prepare(
        self, name: str = "g", policy: int = 0x3, **spec: Any
    ) -> tuple[launcher_pb2.PrepareLaunchResponse, LaunchSession]:
        s = self.session(policy)
        guest = launcher_pb2.GuestSpec(
            name=name, memory_mib=256, vcpus=1, firmware_path=OVMF, policy=policy, **spec
        )
        reply = self.stub().PrepareLaunch(
            launcher_pb2.PrepareLaunchRequest(
                spec=guest, godh_cert=s.godh.to_bytes(), session=s.blob.to_bytes()
            )
        )
        return reply, s

    def metrics(self) -> str:
        with urllib.request.urlopen(self.running.metrics_url, timeout=5) as r:
            return r.read().decode()


@pytest.fixture
def env_factory(
    serve: Callable[..., Any], tls_dir: Path, tmp_path: Path, root: EmulatedRoot
) -> Callable[..., Env]:
    return lambda **kw: Env(serve, tls_dir, tmp_path, root, **kw)


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    info = error_info(err.value)
    return info.code, info.reason


def test_two_phase_through_the_server_and_metrics(env_factory: Callable[..., Env]) -> None:
    env = env_factory()
    prepared, session = env.prepare()
    measurement = LaunchMeasurement.from_bytes(prepared.measurement)
    table = SecretTable.of([SecretEntry.disk_passphrase(b"pw")]).to_bytes()
    header, payload = package_secret(session.keys, measurement.measure, table)
    info = env.stub().CompleteLaunch(
        launcher_pb2.CompleteLaunchRequest(
            launch_id=prepared.launch_id, secret_header=header.to_bytes(), secret_payload=payload
        )
    )
    assert info.state == launcher_pb2.PHASE_RUNNING
    handle = env.core.hv.guest_handle(info.domain_name)
    assert env.firmware.read_guest_memory(handle, SECRET_GPA, len(table)) == table
    listed = env.stub().ListLaunches(launcher_pb2.ListLaunchesRequest())
    assert [x.launch_id for x in listed.launches] == [prepared.launch_id]
    text = env.metrics()
    assert 'sevlaunch_launcher_launches_total{failed_phase="",mode="two-phase",outcome="running"} 1.0' in text
    assert 'sevlaunch_launcher_phase_duration_seconds_count{phase="MEASURED"} 1.0' in text
    assert "sevlaunch_launcher_launches_in_flight 0.0" in text
    # The launch commands the emulated hypervisor issued in QEMU's place, counted like platform_svc's.
    for command in ("LAUNCH_START", "LAUNCH_UPDATE_DATA", "LAUNCH_MEASURE", "LAUNCH_SECRET", "LAUNCH_FINISH"):
        assert (
            f'sevlaunch_launcher_firmware_commands_total{{command="{command}",status="SUCCESS"}} 1.0' in text
        )
        assert (
            f'sevlaunch_launcher_firmware_command_duration_seconds_count{{command="{command}"}} 1.0' in text
        )
    assert 'command="LAUNCH_UPDATE_VMSA"' not in text and 'command="DECOMMISSION"' not in text


def test_firmware_refusals_are_counted_by_status(env_factory: Callable[..., Env]) -> None:
    env = env_factory()
    prepared, _ = env.prepare()
    # A secret header made with other keys: LAUNCH_SECRET refuses it, the domain is decommissioned.
    other = env.session()
    measurement = LaunchMeasurement.from_bytes(prepared.measurement)
    header, payload = package_secret(other.keys, measurement.measure, b"\x00" * 64)
    code, reason = _code(
        lambda: env.stub().CompleteLaunch(
            launcher_pb2.CompleteLaunchRequest(
                launch_id=prepared.launch_id, secret_header=header.to_bytes(), secret_payload=payload
            )
        )
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION and reason.startswith("firmware_")
    status = reason.removeprefix("firmware_").upper()
    text = env.metrics()
    assert (
        f'sevlaunch_launcher_firmware_commands_total{{command="LAUNCH_SECRET",status="{status}"}} 1.0' in text
    )
    assert 'sevlaunch_launcher_firmware_commands_total{command="DECOMMISSION",status="SUCCESS"} 1.0' in text
    assert 'command="LAUNCH_FINISH"' not in text


def test_callers_without_the_client_role_are_denied(env_factory: Callable[..., Env]) -> None:
    env = env_factory()
    for identity in ("nobody", "launcher", "owner"):
        code, reason = _code(lambda i=identity: env.stub(i).ListLaunches(launcher_pb2.ListLaunchesRequest()))
        assert code is grpc.StatusCode.PERMISSION_DENIED and reason == "caller_not_authorized"


def test_invalid_requests_never_reach_libvirt(env_factory: Callable[..., Env]) -> None:
    env = env_factory()
    s = env.session()
    bad = [
        launcher_pb2.GuestSpec(name="x'><evil", memory_mib=256, vcpus=1, firmware_path=OVMF, policy=3),
        launcher_pb2.GuestSpec(name="g", memory_mib=256, vcpus=1, firmware_path="/etc/shadow", policy=3),
        launcher_pb2.GuestSpec(
            name="g",
            memory_mib=256,
            vcpus=1,
            firmware_path=OVMF,
            policy=3,
            kernel_path=str(VECTORS / "ovmf_AmdSev_suffix.bin"),  # any file: the OVMF has no hashes table
        ),
    ]
    for guest in bad:
        code, _ = _code(
            lambda g=guest: env.stub().PrepareLaunch(
                launcher_pb2.PrepareLaunchRequest(
                    spec=g, godh_cert=s.godh.to_bytes(), session=s.blob.to_bytes()
                )
            )
        )
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    code, reason = _code(
        lambda: env.stub().PrepareLaunch(
            launcher_pb2.PrepareLaunchRequest(
                spec=launcher_pb2.GuestSpec(name="g", memory_mib=256, vcpus=1, firmware_path=OVMF, policy=3),
                godh_cert=b"short",
                session=s.blob.to_bytes(),
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_godh")
    assert env.core.hv.list_domains() == [] and env.firmware.platform_status().guest_count == 0
    # Orchestrated launches need a platform endpoint.
    code, reason = _code(
        lambda: list(
            env.stub().Launch(
                launcher_pb2.LaunchRequest(
                    spec=launcher_pb2.GuestSpec(
                        name="g", memory_mib=256, vcpus=1, firmware_path=OVMF, policy=3
                    ),
                    owner=launcher_pb2.OwnerRef(endpoint="localhost:1", workload_id="w"),
                )
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "not_configured")


def test_no_secret_area_and_no_address_is_refused_up_front(env_factory: Callable[..., Env]) -> None:
    env = env_factory(secret_gpa=None)
    code, reason = _code(lambda: env.prepare())
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "no_secret_area")
    assert env.core.hv.list_domains() == []


def test_admission_bounds_concurrency_and_asids(env_factory: Callable[..., Env]) -> None:
    env = env_factory(max_concurrent=1)
    first, _ = env.prepare("a")
    code, reason = _code(lambda: env.prepare("b"))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_launches")
    aborted = env.stub().AbortLaunch(launcher_pb2.AbortLaunchRequest(launch_id=first.launch_id))
    assert (aborted.state, aborted.reason) == (launcher_pb2.PHASE_FAILED, "aborted")
    assert env.core.hv.list_domains() == [] and env.firmware.platform_status().guest_count == 0
    assert 'sevlaunch_launcher_domains_destroyed_total{path="fail_closed"} 1.0' in env.metrics()


def test_asid_limit_is_checked_before_defining(env_factory: Callable[..., Env]) -> None:
    env = env_factory(chip=ChipConfig(max_guests=1, max_es_guests=1))
    env.prepare("a")
    code, reason = _code(lambda: env.prepare("b"))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "no_free_asid")
    assert len(env.core.hv.list_domains()) == 1


def test_externally_resumed_guest_is_destroyed(env_factory: Callable[..., Env]) -> None:
    import time

    env = env_factory()
    prepared, _ = env.prepare()
    env.core.hv._conn.lookupByName(prepared.domain_name).resume()  # someone runs it without a secret
    deadline = time.monotonic() + 10
    while env.core.hv.list_domains() and time.monotonic() < deadline:
        time.sleep(0.05)
    info = env.stub().GetLaunch(launcher_pb2.GetLaunchRequest(launch_id=prepared.launch_id))
    assert (info.state, info.reason) == (launcher_pb2.PHASE_FAILED, "resumed_without_secret")
    assert env.firmware.platform_status().guest_count == 0


def _bad_godhs(good: SEVCertificate) -> dict[str, bytes]:
    """GODHs of the right length that are no usable GODH: each must be refused before anything is defined."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from sevlaunch.sev.cert import PUBKEY_OFFSET, Algorithm, Usage

    def cert(usage: Usage, algorithm: Algorithm, curve: ec.EllipticCurve) -> bytes:
        key = ec.generate_private_key(curve).public_key()
        return SEVCertificate.for_ec_key(
            usage=usage, algorithm=algorithm, public_key=key, api_major=0, api_minor=0
        ).to_bytes()

    raw = bytearray(good.to_bytes())
    raw[PUBKEY_OFFSET + 4] ^= 1  # qx changed: (almost surely) no longer a point on P-384
    return {
        "zeroed": bytes(0x824),
        "ones": b"\xff" * 0x824,
        "pek_usage": cert(Usage.PEK, Algorithm.ECDH_SHA256, ec.SECP384R1()),
        "ecdsa_algorithm": cert(Usage.PDH, Algorithm.ECDSA_SHA384, ec.SECP384R1()),
        "p256_key": cert(Usage.PDH, Algorithm.ECDH_SHA256, ec.SECP256R1()),
        "off_curve": bytes(raw),
    }


def test_unusable_godh_is_refused_before_anything_is_defined(env_factory: Callable[..., Env]) -> None:
    env = env_factory()
    s = env.session()
    guest = launcher_pb2.GuestSpec(name="g", memory_mib=256, vcpus=1, firmware_path=OVMF, policy=3)
    for label, godh in _bad_godhs(s.godh).items():
        code, reason = _code(
            lambda g=godh: env.stub().PrepareLaunch(
                launcher_pb2.PrepareLaunchRequest(spec=guest, godh_cert=g, session=s.blob.to_bytes())
            )
        )
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_godh"), label
        assert env.core.hv.list_domains() == [] and env.firmware.platform_status().guest_count == 0, label
        listed = env.stub().ListLaunches(launcher_pb2.ListLaunchesRequest())
        assert list(listed.launches) == [], label
    # The real GODH still works afterwards (the refusals left no admission or name behind).
    prepared, _ = env.prepare()
    assert prepared.launch_id


def test_snp_requests_through_the_server(env_factory: Callable[..., Env]) -> None:
    env = env_factory()
    s = env.session()

    def snp(**kw: Any) -> launcher_pb2.GuestSpec:
        base: dict[str, Any] = dict(
            name="g", memory_mib=256, vcpus=1, firmware_path=OVMF, mode=launcher_pb2.SEV_MODE_SEV_SNP,
            snp_policy=0x30000,
        )  # fmt: skip
        base.update(kw)
        return launcher_pb2.GuestSpec(**base)

    def prepare(guest: launcher_pb2.GuestSpec) -> tuple[grpc.StatusCode, str]:
        return _code(
            lambda: env.stub().PrepareLaunch(
                launcher_pb2.PrepareLaunchRequest(
                    spec=guest, godh_cert=s.godh.to_bytes(), session=s.blob.to_bytes()
                )
            )
        )

    assert prepare(snp()) == (grpc.StatusCode.INVALID_ARGUMENT, "snp_needs_orchestrated")
    assert prepare(snp(snp_policy=0x10000)) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_policy")
    assert prepare(snp(vmm_type="ec2")) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_vmm_type")
    assert prepare(snp(kernel_path=OVMF, kernel_hashes=False)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad_kernel",
    )
    sev_with_snp_field = launcher_pb2.GuestSpec(
        name="g", memory_mib=256, vcpus=1, firmware_path=OVMF, policy=3, guest_features=1
    )
    assert prepare(sev_with_snp_field) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_guest_features")
    code, reason = _code(
        lambda: list(
            env.stub().Launch(
                launcher_pb2.LaunchRequest(
                    spec=snp(), owner=launcher_pb2.OwnerRef(endpoint="localhost:1", workload_id="w")
                )
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "not_configured")
    assert env.core.hv.list_domains() == []
