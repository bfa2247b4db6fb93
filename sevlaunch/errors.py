"""Domain errors of the service cores, independent of gRPC.

A service's core raises these (or the protocol's `SevError`s, or `FirmwareError`); one interceptor in
`sevlaunch.rpc` maps each class to its gRPC status code, with `reason` as a `google.rpc.ErrorInfo`
reason. `detail` is shown to the caller: it must never hold key or secret material.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    #: The gRPC status code name this class maps to (grpc.StatusCode member name).
    code_name: ClassVar[str] = "INTERNAL"

    def __init__(self, reason: str, detail: str = "", *, metadata: dict[str, str] | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.metadata = dict(metadata or {})
        super().__init__(f"{reason}: {detail}" if detail else reason)


class InvalidArgument(ServiceError):
    code_name = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code_name = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code_name = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code_name = "FAILED_PRECONDITION"


class PermissionDenied(ServiceError):
    """A refusal on the merits (untrusted platform, measurement mismatch, policy not allowed)."""

    code_name = "PERMISSION_DENIED"


class Unauthenticated(ServiceError):
    code_name = "UNAUTHENTICATED"


class ResourceExhausted(ServiceError):
    code_name = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code_name = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code_name = "DEADLINE_EXCEEDED"


class Aborted(ServiceError):
    code_name = "ABORTED"
