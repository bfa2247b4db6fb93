"""Typed errors → gRPC status with a `google.rpc.ErrorInfo` detail, and back for clients.

The mapping is docs/CONTRACTS.md's, in one place. Only the classes below reach the caller with their
reason and detail; any other exception becomes INTERNAL with a request id and nothing else, because its
message may hold anything (paths, key material in a repr, ...).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from sevlaunch.errors import ServiceError
from sevlaunch.sev.errors import MalformedInput, SevError, Unsupported, VerificationFailed

DOMAIN = "sevlaunch"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Firmware status names (AMD SEV API) grouped by whose fault they are.
_FIRMWARE_INVALID_ARGUMENT = frozenset(
    {"INVALID_LENGTH", "INVALID_PARAM", "INVALID_CERTIFICATE", "INVALID_ADDRESS"}
)
_FIRMWARE_PERMISSION_DENIED = frozenset({"BAD_SIGNATURE", "BAD_MEASUREMENT", "POLICY_FAILURE"})


@dataclass(frozen=True)
class MappedError:
    code: grpc.StatusCode
    message: str
    reason: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=dict(self.metadata))
        detail = any_pb2.Any()
        detail.Pack(info)
        proto = status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        status: grpc.Status = rpc_status.to_status(proto)
        return status


def _reason_text(reason: object) -> str:
    return str(reason.value) if isinstance(reason, enum.Enum) else str(reason)


def _firmware_fields(exc: SevError) -> tuple[str, int] | None:
    """(status name, status code) when `exc` is a FirmwareError; duck-typed so that the shell does not
    depend on the firmware package (a FirmwareError is a SevError with a `.status` IntEnum or int)."""
    status = getattr(exc, "status", None)
    if isinstance(status, enum.IntEnum):
        return status.name, int(status)
    if isinstance(status, int) and not isinstance(status, bool):
        return f"UNKNOWN_0x{status:02X}", status
    return None


def map_exception(exc: BaseException, request_id: str) -> MappedError:
    """The status for `exc`. Unknown exceptions leak nothing but the request id."""
    if isinstance(exc, ServiceError):
        code = getattr(grpc.StatusCode, exc.code_name, grpc.StatusCode.INTERNAL)
        meta = {**exc.metadata, "request_id": request_id}
        return MappedError(code, str(exc), exc.reason, meta)
    if isinstance(exc, SevError):
        reason = _reason_text(exc.reason)
        meta = {"request_id": request_id}
        firmware = _firmware_fields(exc)
        if firmware is not None:
            name, value = firmware
            meta.update(firmware_status=name, firmware_status_code=str(value))
            command = getattr(exc, "command", None)
            if command:
                meta["command"] = _reason_text(command)
            if name == "RESOURCE_LIMIT":
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
            elif name in _FIRMWARE_INVALID_ARGUMENT:
                code = grpc.StatusCode.INVALID_ARGUMENT
            elif name in _FIRMWARE_PERMISSION_DENIED:
                code = grpc.StatusCode.PERMISSION_DENIED
            else:
                code = grpc.StatusCode.FAILED_PRECONDITION
            return MappedError(code, str(exc), reason, meta)
        if isinstance(exc, VerificationFailed):
            if exc.link:
                meta["link"] = exc.link
            return MappedError(grpc.StatusCode.PERMISSION_DENIED, str(exc), reason, meta)
        if isinstance(exc, MalformedInput):
            return MappedError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), reason, meta)
        if isinstance(exc, Unsupported):
            return MappedError(grpc.StatusCode.FAILED_PRECONDITION, str(exc), reason, meta)
    return MappedError(
        grpc.StatusCode.INTERNAL,
        f"internal error (request id {request_id})",
        "internal",
        {"request_id": request_id},
    )


@dataclass(frozen=True)
class RpcErrorInfo:
    """What a client learns from a failed call: code, message and the ErrorInfo (if any)."""

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: Mapping[str, str]


def _trailing(err: grpc.RpcError) -> list[tuple[str, str | bytes]]:
    getter = getattr(err, "trailing_metadata", None)
    md = getter() if callable(getter) else None
    return [(str(k), v) for k, v in (md or ())]


def error_info(err: grpc.RpcError) -> RpcErrorInfo:
    """Decodes a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code: grpc.StatusCode = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    message = (details_fn() if callable(details_fn) else "") or ""
    reason, domain, meta = "", "", {}
    for key, value in _trailing(err):
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        proto = status_pb2.Status.FromString(value)
        for detail in proto.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, meta = info.reason, info.domain, dict(info.metadata)
                break
    return RpcErrorInfo(code, message, reason, domain, meta)
