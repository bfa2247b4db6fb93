"""Hostile field values for every RPC of the three services, through real mTLS servers on port 0.

Every malformed request must get a typed status (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...):
never INTERNAL or UNKNOWN (an unclassified exception), never a hang, and a refused request changes
nothing. One stack of servers (platform, owner, launcher) serves the whole module; the property test
draws bounded examples from pools of hostile values per field type, so it stays cheap.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher_svc.core.launcher import LauncherConfig
from launcher_svc.core.spec import PathPolicy
from launcher_svc.server import LauncherServerConfig
from launcher_svc.server import create_server as create_launcher
from owner_svc.server import OwnerConfig, build_app
from platform_svc.server import PlatformConfig
from platform_svc.server import create_server as create_platform
from sevlaunch.firmware import EmulatedFirmware, EmulatedRoot
from sevlaunch.rpc import RpcServer, error_info, secure_channel_sync
from sevlaunch.rpc.v1 import (
    launcher_pb2,
    launcher_pb2_grpc,
    owner_pb2,
    owner_pb2_grpc,
    platform_pb2,
    platform_pb2_grpc,
)

T = TypeVar("T")

OVMF = "/usr/share/OVMF/OVMF_CODE_4M.fd"
#: A status that says "the server did not classify this": a bug, whatever the input.
UNTYPED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT = 30.0


class _Loop:
    """One event loop thread for the module's servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="malformed-rpc-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class Stack:
    tls_dir: Path
    platform: RpcServer
    owner: RpcServer
    launcher: RpcServer
    platform_chip: EmulatedFirmware
    launcher_chip: EmulatedFirmware
    owner_db: Path
    launcher_core: Any
    channels: list[grpc.Channel] = field(default_factory=list)

    def _channel(self, server: RpcServer, identity: str) -> grpc.Channel:
        ch = secure_channel_sync(f"localhost:{server.port}", self.tls_dir, identity)
        self.channels.append(ch)
        return ch

    def stubs(self) -> dict[str, Any]:
        """Service name → a stub with the identity allowed to call every RPC of interest."""
        return {
            "PlatformService": platform_pb2_grpc.PlatformServiceStub(
                self._channel(self.platform, "platform-admin")
            ),
            "OwnerService.admin": owner_pb2_grpc.OwnerServiceStub(self._channel(self.owner, "owner-admin")),
            "OwnerService.launcher": owner_pb2_grpc.OwnerServiceStub(self._channel(self.owner, "launcher")),
            "LauncherService": launcher_pb2_grpc.LauncherServiceStub(self._channel(self.launcher, "client")),
        }


@pytest.fixture(scope="module")
def stack(
    tls_dir: Path, tmp_path_factory: pytest.TempPathFactory, emulated_root: EmulatedRoot
) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("malformed")
    root = emulated_root
    platform_chip = EmulatedFirmware(base / "platform-chip", root=root)
    launcher_chip = EmulatedFirmware(base / "launcher-chip", root=root)
    roots_file = base / "emulated.cert"
    roots_file.write_bytes(platform_chip.ask_ark())
    loop = _Loop()
    holder: dict[str, Any] = {}

    async def boot() -> tuple[RpcServer, RpcServer, RpcServer]:
        platform, _, _ = await create_platform(
            PlatformConfig(
                tls_dir=tls_dir,
                listen="localhost:0",
                metrics_listen=None,
                emulator=platform_chip.state_dir,
                grace=1.0,
            ),
            firmware=platform_chip,
        )
        await platform.start()
        app = build_app(
            OwnerConfig(
                tls_dir=tls_dir,
                db=base / "owner.db",
                kek_file=base / "kek",
                create_kek=True,
                listen="127.0.0.1:0",
                trust_roots=[f"emulated={roots_file}"],
            )
        )
        holder["owner_app"] = app
        await app.rpc.start()
        launcher, core = await create_launcher(
            LauncherServerConfig(
                tls_dir=tls_dir,
                listen="127.0.0.1:0",
                hypervisor="emulated",
                emulator=base / "launcher-chip",
                db=base / "launcher.db",
                metrics_listen=None,
                platform=f"localhost:{platform.port}",
                launcher=LauncherConfig(
                    paths=PathPolicy(("/usr/share/OVMF",)),
                    reconcile_interval=0,
                    phase_timeout=10.0,
                    secret_gpa=0x80C000,
                ),
            )
        )
        holder["launcher_core"] = core
        await launcher.start()
        return platform, app.rpc, launcher

    platform, owner, launcher = loop.run(boot())
    s = Stack(
        tls_dir,
        platform,
        owner,
        launcher,
        platform_chip,
        launcher_chip,
        base / "owner.db",
        holder["launcher_core"],
    )
    yield s
    for ch in s.channels:
        ch.close()

    async def shutdown() -> None:
        await launcher.stop(1.0)
        await holder["launcher_core"].stop()
        await holder["owner_app"].stop(1.0)
        await platform.stop(1.0)

    loop.run(shutdown())
    loop.close()


def _call(stub: Any, method: str, request: pb_message.Message) -> grpc.StatusCode:
    """Calls (draining a stream) and returns the status code; fails on an untyped status."""
    rpc = getattr(stub, method)
    try:
        reply = rpc(request, timeout=CALL_TIMEOUT)
        if hasattr(reply, "__iter__") and not isinstance(reply, pb_message.Message):
            for _ in reply:
                pass
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        info = error_info(err)
        assert info.code not in UNTYPED, (
            f"{method}({_short(request)}) gave {info.code.name}: {info.message} {dict(info.metadata)}"
        )
        return info.code


def _short(msg: pb_message.Message) -> str:
    text = str(msg).replace("\n", " ")
    return text if len(text) < 600 else text[:600] + "..."


def _db_rows(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def _state(stack: Stack, *, audit: bool = True) -> tuple[Any, ...]:
    """What a refused request must not change: the owner's rows, both chips, the launcher's launches.

    A malformed request (INVALID_ARGUMENT) changes nothing at all; a refusal on the merits (NOT_FOUND,
    PERMISSION_DENIED, ...) is a decision, and the owner audits decisions (`audit=False` leaves the
    audit tables out)."""
    rows = _db_rows(stack.owner_db)
    if not audit:
        rows = [r for r in rows if not r.startswith(('INSERT INTO "audit"', 'INSERT INTO "audit_head"'))]
    # A launch refused after admission is recorded FAILED (failed closed): a decision too. What must
    # never stay behind is a domain or a guest context.
    launches = len(stack.launcher_core.list(requested_by="client", include_finished=True)) if audit else None
    return (
        rows,
        stack.platform_chip.pdh_cert_export(),
        stack.platform_chip.platform_status(),
        stack.launcher_chip.platform_status(),
        stack.launcher_core.hv.list_domains(),
        launches,
    )


# ------------------------------------------------------------------------------- targeted cases

BIG = b"\xa5" * (3 * 1024 * 1024)  # below the receive limit: the servicer, not gRPC, must refuse it
HOSTILE_STRINGS = [
    "",
    "a" * 100_000,
    "\x00",
    "../../../etc/passwd",
    "/usr/share/OVMF/../../../etc/shadow",
    "/usr/share/OVMF/" + "a" * 300,
    "/usr/share/OVMF/" + "a/" * 3000 + "x",
    "\u202eevil\nname\r\t",
    "naïve-ü-😀",
    "UPPER",
]
HOSTILE_BYTES = [b"", b"\x00", b"\x01" * 47, b"\x00" * 2083, b"\xff" * 2084, b"\x00" * 2085, BIG]
U32 = [1, 255, 256, 0xFFFF, 2**31, 2**32 - 1]
U64 = [*U32, 2**63 - 1, 2**63, 2**64 - 1]


def _enum(n: int) -> int:
    """An unknown value of an (int32) enum field."""
    return min(n, 2**31 - 1)


def _spec(**fields: Any) -> launcher_pb2.GuestSpec:
    base: dict[str, Any] = {"name": "g", "memory_mib": 256, "vcpus": 1, "firmware_path": OVMF, "policy": 3}
    base.update(fields)
    return launcher_pb2.GuestSpec(**base)


def _targeted() -> list[tuple[str, str, pb_message.Message]]:
    cases: list[tuple[str, str, pb_message.Message]] = []
    add = cases.append
    # platform_svc: the only RPC with fields.
    for pek in HOSTILE_BYTES:
        for oca in (b"", pek):
            add(
                (
                    "PlatformService",
                    "ImportPEKCertificate",
                    platform_pb2.ImportPEKCertificateRequest(pek_cert=pek, oca_cert=oca),
                )
            )
    add(("PlatformService", "FactoryReset", platform_pb2.FactoryResetRequest(confirm=False)))
    # owner_svc
    for s in HOSTILE_STRINGS:
        add(("OwnerService.launcher", "OpenSession", owner_pb2.OpenSessionRequest(workload_id=s, policy=3)))
        add(
            (
                "OwnerService.launcher",
                "ReleaseSecret",
                owner_pb2.ReleaseSecretRequest(
                    session_id=s, launch_measurement=b"\x00" * 48, firmware={"api_major": 0, "api_minor": 24}
                ),
            )
        )
        add(("OwnerService.admin", "GetWorkload", owner_pb2.GetWorkloadRequest(workload_id=s)))
        add(("OwnerService.admin", "ListSessions", owner_pb2.ListSessionsRequest(workload_id=s)))
        add(("OwnerService.admin", "RevokeSession", owner_pb2.RevokeSessionRequest(session_id=s)))
        add(
            (
                "OwnerService.admin",
                "PutSecret",
                owner_pb2.PutSecretRequest(
                    workload_id="w", entries=[owner_pb2.SecretEntry(guid=s, data=b"x")]
                ),
            )
        )
        add(
            (
                "OwnerService.admin",
                "PutWorkload",
                owner_pb2.PutWorkloadRequest(
                    workload=owner_pb2.Workload(
                        workload_id="w",
                        allowed_policies=[3],
                        generations=[s],
                        selectors=[owner_pb2.ReferenceSelector(firmware_name=s, modes=[1], version_min=s)],
                    )
                ),
            )
        )
    for b in HOSTILE_BYTES:
        add(
            (
                "OwnerService.launcher",
                "OpenSession",
                owner_pb2.OpenSessionRequest(
                    workload_id="w",
                    policy=3,
                    chain={
                        "pdh_cert": b,
                        "pek_cert": b,
                        "oca_cert": b,
                        "cek_cert": b,
                        "ask_cert": b,
                        "ark_cert": b,
                    },
                ),
            )
        )
        add(
            (
                "OwnerService.launcher",
                "ReleaseSecret",
                owner_pb2.ReleaseSecretRequest(
                    session_id="0" * 32, launch_measurement=b, firmware={"api_major": 0, "api_minor": 24}
                ),
            )
        )
        add(
            (
                "OwnerService.admin",
                "ImportReferenceValues",
                owner_pb2.ImportReferenceValuesRequest(envelope=b),
            )
        )
        add(
            (
                "OwnerService.admin",
                "PutSecret",
                owner_pb2.PutSecretRequest(
                    workload_id="w",
                    entries=[owner_pb2.SecretEntry(guid="736869e5-84f0-4973-92ec-06879ce3da0b", data=b)],
                ),
            )
        )
    for n in U32:
        add(("OwnerService.launcher", "OpenSession", owner_pb2.OpenSessionRequest(workload_id="w", policy=n)))
        add(
            (
                "OwnerService.launcher",
                "ReleaseSecret",
                owner_pb2.ReleaseSecretRequest(
                    session_id="0" * 32,
                    launch_measurement=b"\x00" * 48,
                    policy=n,
                    firmware={"api_major": n, "api_minor": n, "build_id": n},
                ),
            )
        )
        add(("OwnerService.admin", "ListSessions", owner_pb2.ListSessionsRequest(limit=n)))
        add(
            (
                "OwnerService.admin",
                "PutWorkload",
                owner_pb2.PutWorkloadRequest(
                    workload=owner_pb2.Workload(
                        workload_id="w",
                        allowed_policies=[n],
                        generations=["milan"],
                        secret_area_size=n,
                        firmware_minimum={"api_major": n, "api_minor": n, "build_id": n},
                        selectors=[
                            owner_pb2.ReferenceSelector(
                                firmware_name="OVMF",
                                modes=[2, _enum(n)],
                                sev_es_vcpus=[n],
                                kernel_hashes=_enum(n),
                            )
                        ],
                    )
                ),
            )
        )
    for n in U64:
        add(("OwnerService.admin", "GetAuditLog", owner_pb2.GetAuditLogRequest(after_seq=n)))
        add(("OwnerService.admin", "GetAuditLog", owner_pb2.GetAuditLogRequest(after_seq=n, limit=n % 2**32)))
    add(("OwnerService.admin", "PutWorkload", owner_pb2.PutWorkloadRequest()))
    add(("OwnerService.launcher", "ReleaseSecret", owner_pb2.ReleaseSecretRequest(session_id="0" * 32)))
    # launcher_svc
    for s in HOSTILE_STRINGS:
        add(("LauncherService", "GetLaunch", launcher_pb2.GetLaunchRequest(launch_id=s)))
        add(("LauncherService", "AbortLaunch", launcher_pb2.AbortLaunchRequest(launch_id=s)))
        add(("LauncherService", "DestroyGuest", launcher_pb2.DestroyGuestRequest(launch_id=s)))
        add(("LauncherService", "CompleteLaunch", launcher_pb2.CompleteLaunchRequest(launch_id=s)))
        for spec in (
            _spec(name=s),
            _spec(firmware_path=s),
            _spec(kernel_path=s),
            _spec(initrd_path=s),
            _spec(kernel_path=OVMF, cmdline=s),
            _spec(vcpu_type=s),
            _spec(disks=[launcher_pb2.Disk(path=s, target="vda")]),
            _spec(disks=[launcher_pb2.Disk(path="/usr/share/OVMF/OVMF_VARS_4M.fd", target=s)]),
            _spec(networks=[launcher_pb2.Network(network=s)]),
        ):
            add(("LauncherService", "PrepareLaunch", launcher_pb2.PrepareLaunchRequest(spec=spec)))
            add(
                (
                    "LauncherService",
                    "Launch",
                    launcher_pb2.LaunchRequest(
                        spec=spec, owner=launcher_pb2.OwnerRef(endpoint="localhost:1", workload_id="w")
                    ),
                )
            )
        add(
            (
                "LauncherService",
                "Launch",
                launcher_pb2.LaunchRequest(
                    spec=_spec(name="x"), owner=launcher_pb2.OwnerRef(endpoint=s, workload_id="w")
                ),
            )
        )
        add(
            (
                "LauncherService",
                "Launch",
                launcher_pb2.LaunchRequest(
                    spec=_spec(name="x"),
                    owner=launcher_pb2.OwnerRef(endpoint="localhost:1", workload_id=s or "\x00"),
                ),
            )
        )
    for n in U64:
        add(("LauncherService", "PrepareLaunch", launcher_pb2.PrepareLaunchRequest(spec=_spec(memory_mib=n))))
    for n in U32:
        for spec in (
            _spec(vcpus=n),
            _spec(policy=n),
            _spec(mode=_enum(n)),
            _spec(policy=7, mode=2, vcpus=n),
            _spec(disks=[launcher_pb2.Disk(path=OVMF, target="vda", format=_enum(n))]),
        ):
            add(("LauncherService", "PrepareLaunch", launcher_pb2.PrepareLaunchRequest(spec=spec)))
    for b in HOSTILE_BYTES:
        add(
            (
                "LauncherService",
                "PrepareLaunch",
                launcher_pb2.PrepareLaunchRequest(spec=_spec(), godh_cert=b, session=b"\x00" * 128),
            )
        )
        add(
            (
                "LauncherService",
                "PrepareLaunch",
                launcher_pb2.PrepareLaunchRequest(spec=_spec(), godh_cert=b"\x00" * 2084, session=b),
            )
        )
        add(
            (
                "LauncherService",
                "CompleteLaunch",
                launcher_pb2.CompleteLaunchRequest(launch_id="0" * 32, secret_header=b, secret_payload=b),
            )
        )
    return cases


TARGETED = _targeted()


@pytest.mark.parametrize(
    ("service", "method", "request_msg"), TARGETED, ids=[f"{i}-{m}" for i, (_, m, _) in enumerate(TARGETED)]
)
def test_hostile_field_values_get_a_typed_status_and_change_nothing(
    stack: Stack, service: str, method: str, request_msg: pb_message.Message
) -> None:
    before, before_decisions = _state(stack), _state(stack, audit=False)
    code = _call(stack.stubs()[service], method, request_msg)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        assert _state(stack) == before, f"{method} was refused ({code.name}) but changed state"
    elif code is not grpc.StatusCode.OK:
        assert _state(stack, audit=False) == before_decisions, (
            f"{method} refused ({code.name}), state changed"
        )


# ----------------------------------------------------------------------- property-based sweep


def _value(fd: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == fd.TYPE_MESSAGE:
        if depth > 3 or fd.message_type.full_name.startswith("google.protobuf."):
            return st.none()
        return _message(fd.message_type, depth + 1)
    if t == fd.TYPE_BYTES:
        return st.one_of(
            st.sampled_from([b for b in HOSTILE_BYTES if len(b) < 1_000_000]), st.binary(max_size=64)
        )
    if t == fd.TYPE_STRING:
        return st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=40))
    if t == fd.TYPE_BOOL:
        return st.booleans()
    if t == fd.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in fd.enum_type.values]), st.integers(-5, 2**31 - 1))
    if t in (fd.TYPE_UINT32, fd.TYPE_FIXED32):
        return st.one_of(st.sampled_from([0, *U32]), st.integers(0, 2**32 - 1))
    if t in (fd.TYPE_UINT64, fd.TYPE_FIXED64):
        return st.one_of(st.sampled_from([0, *U64]), st.integers(0, 2**64 - 1))
    if t in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32):
        return st.integers(-(2**31), 2**31 - 1)
    if t in (fd.TYPE_INT64, fd.TYPE_SINT64, fd.TYPE_SFIXED64):
        return st.integers(-(2**63), 2**63 - 1)
    if t in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        return st.floats(allow_nan=True)
    raise AssertionError(f"no strategy for field type {t}")


def _message(desc: pb_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for fd in desc.fields:
        value = _value(fd, depth)
        if fd.is_repeated:
            fields[fd.name] = st.lists(value.filter(lambda v: v is not None), max_size=3)
        else:
            fields[fd.name] = value
    return st.fixed_dictionaries({}, optional=fields)


def _build(cls: type[pb_message.Message], values: dict[str, Any]) -> pb_message.Message:
    msg = cls()
    _fill(msg, values)
    return msg


def _fill(msg: pb_message.Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        fd = msg.DESCRIPTOR.fields_by_name[name]
        if value is None:
            continue
        if fd.type == fd.TYPE_MESSAGE:
            if fd.is_repeated:
                for item in value:
                    _fill(getattr(msg, name).add(), item)
            else:
                _fill(getattr(msg, name), value)
                getattr(msg, name).SetInParent()
        elif fd.is_repeated:
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)


_SERVICES = [
    ("PlatformService", platform_pb2, "PlatformService"),
    ("OwnerService.admin", owner_pb2, "OwnerService"),
    ("OwnerService.launcher", owner_pb2, "OwnerService"),
    ("LauncherService", launcher_pb2, "LauncherService"),
]
# FactoryReset(confirm=true) is a valid request that wipes the chip; the targeted cases cover it.
_SKIP = {("PlatformService", "FactoryReset")}
RPCS = [
    (stub_key, m.name, getattr(module, m.input_type.name))
    for stub_key, module, svc in _SERVICES
    for m in module.DESCRIPTOR.services_by_name[svc].methods
    if (stub_key, m.name) not in _SKIP
    and (stub_key != "OwnerService.launcher" or m.name in ("OpenSession", "ReleaseSecret"))
]


@pytest.mark.parametrize(("service", "method", "request_cls"), RPCS, ids=[f"{s}.{m}" for s, m, _ in RPCS])
def test_generated_requests_never_get_an_untyped_status(
    stack: Stack, service: str, method: str, request_cls: type[pb_message.Message]
) -> None:
    stubs = stack.stubs()

    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )
    @given(_message(request_cls.DESCRIPTOR))
    def check(values: dict[str, Any]) -> None:
        _call(stubs[service], method, _build(request_cls, values))

    check()


# ------------------------------------------------------------------------------- message size


def test_a_request_over_the_receive_limit_is_refused_cleanly(stack: Stack) -> None:
    stubs = stack.stubs()
    huge = b"\x00" * (10 * 1024 * 1024)
    for service, method, req in (
        ("PlatformService", "ImportPEKCertificate", platform_pb2.ImportPEKCertificateRequest(pek_cert=huge)),
        (
            "OwnerService.admin",
            "ImportReferenceValues",
            owner_pb2.ImportReferenceValuesRequest(envelope=huge),
        ),
        (
            "LauncherService",
            "CompleteLaunch",
            launcher_pb2.CompleteLaunchRequest(launch_id="0" * 32, secret_payload=huge),
        ),
    ):
        before = _state(stack)
        assert _call(stubs[service], method, req) is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _state(stack) == before
    # ... and the servers keep serving.
    stubs["PlatformService"].GetPlatformStatus(platform_pb2.GetPlatformStatusRequest(), timeout=10)
    stubs["OwnerService.admin"].ListReferenceValues(owner_pb2.ListReferenceValuesRequest(), timeout=10)
    stubs["LauncherService"].ListLaunches(launcher_pb2.ListLaunchesRequest(), timeout=10)


def test_the_receive_limit_is_the_shells_deliberate_one(stack: Stack) -> None:
    """`MAX_MESSAGE_BYTES` is what the servers enforce: just below it the servicer decides (a bad
    length), just above it gRPC refuses before any handler runs."""
    from sevlaunch.rpc.server import MAX_MESSAGE_BYTES

    stub = stack.stubs()["PlatformService"]
    below = platform_pb2.ImportPEKCertificateRequest(pek_cert=b"\x00" * (MAX_MESSAGE_BYTES - 64))
    above = platform_pb2.ImportPEKCertificateRequest(pek_cert=b"\x00" * (MAX_MESSAGE_BYTES + 1))
    assert _call(stub, "ImportPEKCertificate", below) is grpc.StatusCode.INVALID_ARGUMENT
    assert _call(stub, "ImportPEKCertificate", above) is grpc.StatusCode.RESOURCE_EXHAUSTED
