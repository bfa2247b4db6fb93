"""Issue 12's matrix: every RPC of every service (from the service descriptors), called by every identity
`sevlaunch dev-certs` makes, by a no-role certificate, a two-CN certificate, a certificate from a foreign
CA and no certificate, each with a valid, an undecodable and a hostile body.

* Only the documented roles get through (`ROLES`, written from README/ARCHITECTURE, not from the code's
  tables); everyone else is refused `caller_not_authorized` before the body is even decoded.
* Every refusal a server sends is typed: a status other than INTERNAL/UNKNOWN, with an ErrorInfo of
  domain "sevlaunch". A foreign CA or no certificate never gets as far as a status (the handshake fails).
* No traceback and nothing at error level in any server log.

One stack of servers (platform, owner, launcher) serves the module (`test_malformed_requests.stack`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from hostile_certs import cn, issue_client
from test_malformed_requests import Stack
from test_malformed_requests import stack as stack  # the module-scoped fixture, re-exported for pytest

from sevlaunch.cli.devcerts import DEFAULT_IDENTITIES
from sevlaunch.rpc import RpcServer, error_info
from sevlaunch.rpc.v1 import launcher_pb2, owner_pb2, platform_pb2

CALL_TIMEOUT = 30.0
UNDECODABLE = b"\x0a\x64ab"  # field 1, length 100, two bytes follow
UNTYPED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}

# The documented role tables: README ("The admin RPCs ... need the platform-admin identity"; client
# commands use `client`; the launcher reads the platform), CONTRACTS.md (owner: "OpenSession /
# ReleaseSecret for launcher and client; everything else owner-admin"; the launcher serves `client`).
PLATFORM_READERS = frozenset({"launcher", "client", "platform-admin"})
PLATFORM_ADMINS = frozenset({"platform-admin"})
OWNER_LAUNCH = frozenset({"launcher", "client"})
OWNER_ADMINS = frozenset({"owner-admin"})
ROLES: dict[str, dict[str, frozenset[str]]] = {
    "sevlaunch.v1.PlatformService": {
        "GetPlatformStatus": PLATFORM_READERS,
        "GetIdentifier": PLATFORM_READERS,
        "GetCertificateChain": PLATFORM_READERS,
        "RotatePDH": PLATFORM_ADMINS,
        "GeneratePEK": PLATFORM_ADMINS,
        "GetPEKCSR": PLATFORM_ADMINS,
        "ImportPEKCertificate": PLATFORM_ADMINS,
        "FactoryReset": PLATFORM_ADMINS,
        # SEV-SNP (README, platform_svc): the readers' views; committing, configuring and installing the
        # guests' certificate table are admin calls.
        "GetSnpStatus": PLATFORM_READERS,
        "GetVekChain": PLATFORM_READERS,
        "GetSnpCertTable": PLATFORM_READERS,
        "InstallSnpCertTable": PLATFORM_ADMINS,
        "CommitSnp": PLATFORM_ADMINS,
        "SetSnpConfig": PLATFORM_ADMINS,
    },
    "sevlaunch.v1.OwnerService": {
        "OpenSession": OWNER_LAUNCH,
        "ReleaseSecret": OWNER_LAUNCH,
        "AuthorizeSnpLaunch": OWNER_LAUNCH,
        "GetSnpAttestation": OWNER_LAUNCH,
        # Admins revoke any authorisation; a launcher only its own (the owner's core checks, README
        # "SEV-SNP"): its launch failed before RUNNING, so the guest must not attest later.
        "RevokeSnpAuthorization": OWNER_ADMINS | OWNER_LAUNCH,
        **{
            m: OWNER_ADMINS
            for m in (
                "PutWorkload",
                "GetWorkload",
                "PutSecret",
                "ImportReferenceValues",
                "ListReferenceValues",
                "ListSessions",
                "GetAuditLog",
                "RevokeSession",
                "RotateSnpKey",
                "ListSnpKeys",
                "ListSnpAuthorizations",
                "ListWorkloads",
                "DeleteWorkload",
                "DeleteSecret",
                "RevokeReferenceValues",
            )
        },
    },
    "sevlaunch.v1.LauncherService": {
        m: frozenset({"client"})
        for m in (
            "Launch",
            "PrepareLaunch",
            "CompleteLaunch",
            "AbortLaunch",
            "GetLaunch",
            "ListLaunches",
            "DestroyGuest",
        )
    },
}
#: Every caller whose certificate the CA signed and whose subject is one CN.
AUTHENTICATED = frozenset({*DEFAULT_IDENTITIES, "nobody"})
STANDARD = {"/grpc.health.v1.Health/Check": AUTHENTICATED}

SERVICES = [
    (platform_pb2.DESCRIPTOR.services_by_name["PlatformService"], "platform"),
    (owner_pb2.DESCRIPTOR.services_by_name["OwnerService"], "owner"),
    (launcher_pb2.DESCRIPTOR.services_by_name["LauncherService"], "launcher"),
]


# (full method path, input descriptor, server-streaming, server key)
def _rpc_id(method: str) -> str:
    service, name = method.strip("/").split("/")
    return f"{service.rsplit('.', 1)[-1]}.{name}"


RPCS: list[tuple[str, pb_descriptor.Descriptor, bool, str]] = [
    (f"/{svc.full_name}/{m.name}", m.input_type, m.server_streaming, server)
    for svc, server in SERVICES
    for m in svc.methods
] + [("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest.DESCRIPTOR, False, "owner")]

# Callers: dev-certs' identities and `nobody` from the session TLS folder, then the hostile ones.
TWO_CN = "two-cn"
FOREIGN = "foreign-ca"
NO_CERT = "no-certificate"
CALLERS = [*DEFAULT_IDENTITIES, "nobody", TWO_CN, FOREIGN, NO_CERT]
BODIES = ("valid", "undecodable", "hostile")


def _allowed(method: str, caller: str) -> bool:
    if method in STANDARD:
        return caller in STANDARD[method]
    service, _, name = method.strip("/").partition("/")
    return caller in ROLES[service][name]


def test_the_role_table_covers_every_rpc_of_every_service() -> None:
    described = {(svc.full_name, m.name) for svc, _ in SERVICES for m in svc.methods}
    documented = {(svc, m) for svc, table in ROLES.items() for m in table}
    assert described == documented


# ------------------------------------------------------------------------------- bodies


def _hostile_value(fd: pb_descriptor.FieldDescriptor, depth: int) -> Any:
    if fd.type == fd.TYPE_MESSAGE:
        return None if depth >= 3 or fd.message_type.full_name.startswith("google.") else fd.message_type
    return {
        fd.TYPE_STRING: "\u202e../../../etc/passwd\x00\n" + "A" * 20_000,
        fd.TYPE_BYTES: b"\xff" * 70_000,
        fd.TYPE_BOOL: True,
        fd.TYPE_ENUM: 2**31 - 1,
        fd.TYPE_UINT32: 2**32 - 1,
        fd.TYPE_FIXED32: 2**32 - 1,
        fd.TYPE_UINT64: 2**64 - 1,
        fd.TYPE_FIXED64: 2**64 - 1,
        fd.TYPE_INT32: -(2**31),
        fd.TYPE_SINT32: -(2**31),
        fd.TYPE_SFIXED32: -(2**31),
        fd.TYPE_INT64: -(2**63),
        fd.TYPE_SINT64: -(2**63),
        fd.TYPE_SFIXED64: -(2**63),
        fd.TYPE_DOUBLE: float("nan"),
        fd.TYPE_FLOAT: float("inf"),
    }[fd.type]


def _fill(msg: pb_message.Message, depth: int = 0) -> None:
    """Every field at its most hostile value; repeated fields three times; nested messages likewise."""
    for fd in msg.DESCRIPTOR.fields:
        value = _hostile_value(fd, depth)
        if value is None:
            continue
        if fd.type == fd.TYPE_MESSAGE:
            for _ in range(3 if fd.is_repeated else 1):
                child = getattr(msg, fd.name).add() if fd.is_repeated else getattr(msg, fd.name)
                _fill(child, depth + 1)
                child.SetInParent()
        elif fd.is_repeated:
            getattr(msg, fd.name).extend([value] * 3)
        else:
            setattr(msg, fd.name, value)


def _body(kind: str, desc: pb_descriptor.Descriptor) -> bytes:
    cls = message_factory.GetMessageClass(desc)
    if kind == "undecodable":
        return UNDECODABLE
    msg = cls()
    if kind == "hostile":
        _fill(msg)
    body: bytes = msg.SerializeToString()
    assert len(body) < 4 * 1024 * 1024
    return body


# ------------------------------------------------------------------------------- callers


@pytest.fixture(scope="module")
def caller_dirs(
    tls_dir: Path, foreign_tls_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, str]]:
    two = issue_client(tls_dir, tmp_path_factory.mktemp("two-cn"), "two", cn("owner-admin", "platform-admin"))
    dirs = {name: (tls_dir, name) for name in (*DEFAULT_IDENTITIES, "nobody")}
    dirs[TWO_CN] = (two, "two")
    dirs[FOREIGN] = (foreign_tls_dir, "client")
    return dirs


@pytest.fixture(scope="module")
def channels(stack: Stack, caller_dirs: dict[str, tuple[Path, str]], tls_dir: Path) -> Iterator[Any]:
    servers: dict[str, RpcServer] = {
        "platform": stack.platform,
        "owner": stack.owner,
        "launcher": stack.launcher,
    }
    opened: dict[tuple[str, str], grpc.Channel] = {}
    ca = (tls_dir / "ca.pem").read_bytes()

    def channel(caller: str, server: str) -> grpc.Channel:
        key = (caller, server)
        if key not in opened:
            if caller == NO_CERT:
                creds = grpc.ssl_channel_credentials(ca)
            else:
                folder, name = caller_dirs[caller]
                # The server is checked against the real CA: only the caller's certificate may be wrong.
                creds = grpc.ssl_channel_credentials(
                    ca, (folder / f"{name}.key").read_bytes(), (folder / f"{name}.pem").read_bytes()
                )
            opened[key] = grpc.secure_channel(f"localhost:{servers[server].port}", creds)
        return opened[key]

    yield channel
    for ch in opened.values():
        ch.close()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_logs() -> Iterator[_Records]:
    handler = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _call(channel: grpc.Channel, method: str, body: bytes, streaming: bool) -> grpc.RpcError | None:
    try:
        if streaming:
            for _ in channel.unary_stream(method, None, None)(body, timeout=CALL_TIMEOUT):
                pass
        else:
            channel.unary_unary(method, None, None)(body, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        return err
    return None


# ------------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(
    ("method", "desc", "streaming", "server"),
    RPCS,
    ids=[_rpc_id(m) for m, *_ in RPCS],
)
def test_every_rpc_by_every_caller_with_every_body(
    channels: Any,
    server_logs: _Records,
    caller: str,
    method: str,
    desc: pb_descriptor.Descriptor,
    streaming: bool,
    server: str,
) -> None:
    problems: list[str] = []
    for kind in BODIES:
        err = _call(channels(caller, server), method, _body(kind, desc), streaming)
        where = f"{caller} {method} {kind}"
        if caller in (FOREIGN, NO_CERT):
            # Refused in the handshake: no status from the server, nothing reached a handler.
            if err is None or err.code() is not grpc.StatusCode.UNAVAILABLE:
                problems.append(f"{where}: {err.code() if err else 'OK'}, expected a failed handshake")
            continue
        if err is None:
            if not _allowed(method, caller):
                problems.append(f"{where}: OK for a caller without the role")
            continue
        info = error_info(err)
        denied = (info.code, info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "caller_not_authorized")
        if _allowed(method, caller) == denied:
            problems.append(f"{where}: {info.code.name} {info.reason}; allowed={_allowed(method, caller)}")
        if info.code in UNTYPED or info.domain != "sevlaunch" or not info.reason:
            problems.append(
                f"{where}: untyped {info.code.name} {info.domain!r} {info.reason!r} {info.message}"
            )
        if kind == "undecodable" and not denied and info.reason != "undecodable_request":
            problems.append(f"{where}: undecodable body gave {info.code.name} {info.reason}")
    bad = [
        r
        for r in server_logs.records
        if r.exc_info or r.levelno >= logging.ERROR or "Traceback" in r.getMessage()
    ]
    problems += [f"log: {r.name} {r.levelname} {r.getMessage()}" for r in bad]
    assert not problems, "\n".join(problems)
