"""The one server interceptor: request id, authorisation, decoding, error → status mapping, metrics, logs.

grpc.aio interceptors see only the method name before the call; the peer's certificate is on the
servicer context, so the interceptor wraps each handler's behaviour and does its work inside the call.

Authorise before parsing: the wrapped handlers are registered with no request deserializer, so gRPC
hands the raw bytes over untouched, and the shell decodes them with the servicer's deserializer only
after the caller passed authorisation. Bytes that do not decode are the caller's fault: INVALID_ARGUMENT
with an ErrorInfo (`undecodable_request`), counted, logged as one line without a traceback. (Left to
gRPC, a failing deserializer is UNKNOWN with the Python exception text and a logged traceback, for any
caller holding a certificate of the CA, before anyone asked who it is.)
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from sevlaunch.errors import InvalidArgument, PermissionDenied
from sevlaunch.rpc.authz import AuthzPolicy, identity_from_auth_context
from sevlaunch.rpc.errors import STATUS_DETAILS_KEY, MappedError, map_exception
from sevlaunch.rpc.launchid import launch_id_from_metadata, set_launch_id
from sevlaunch.rpc.metrics import RpcMetrics, grpc_type, split_method
from sevlaunch.rpc.tracing import RpcSpan, start_server_span

log = logging.getLogger("sevlaunch.rpc")

REQUEST_ID_KEY = "x-request-id"
# A caller-supplied request id is echoed into logs, so only a short, plain token is accepted.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class Caller:
    """Who is calling what, for servicers (audit records) and logs."""

    identity: str
    method: str
    request_id: str
    launch_id: str | None = None


#: Outcomes of `sevlaunch_rpc_outcomes_total`.
OK, REFUSED, ERROR = "ok", "refused", "error"
# Status codes that mean "the request was refused" (the caller's fault or choice), not a server error.
_REFUSAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass
class _CallState:
    """Mutable per-call facts a servicer may add (see `mark_outcome`)."""

    outcome: str | None = None


_state: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar(
    "sevlaunch_rpc_state", default=None
)


def mark_outcome(outcome: str) -> None:
    """Tells the shell how the current call ended when its status cannot: a streaming RPC that reports
    a refusal in a message (Launch's PHASE_FAILED event) ends with OK, but is counted as `refused` (or
    `error`) in `sevlaunch_rpc_outcomes_total`. Outside an RPC it does nothing."""
    if outcome not in (OK, REFUSED, ERROR):
        raise ValueError(f"outcome must be {OK}, {REFUSED} or {ERROR}")
    state = _state.get()
    if state is not None:
        state.outcome = outcome


def outcome_of(code: grpc.StatusCode) -> str:
    if code is grpc.StatusCode.OK:
        return OK
    return REFUSED if code in _REFUSAL_CODES else ERROR


_current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("sevlaunch_rpc_caller", default=None)


def current_caller() -> Caller:
    """The caller of the RPC being served; a RuntimeError outside an RPC (programmer misuse)."""
    caller = _current.get()
    if caller is None:
        raise RuntimeError("current_caller() called outside an RPC")
    return caller


class _RequestIds:
    """Request ids for calls that bring none: a random per-process prefix and a counter. As unique as a
    uuid4 in practice (64 random bits per process) without a system call per RPC (no getrandom, no
    getpid); the prefix is drawn again in a forked child."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_request_ids = _RequestIds()


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_RE.match(value):
            return value
    return _request_ids.next()


class UndecodableRequest(InvalidArgument):
    """The request bytes are not a message of the RPC's request type."""

    def __init__(self, method: str) -> None:
        super().__init__("undecodable_request", f"the request is not a valid message for {method}")


Deserializer = Callable[[bytes], Any] | None


class ServicerAbort(Exception):
    """A servicer aborted the call itself, without an ErrorInfo (the standard health service does)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"{code.name}: {details}")

    def mapped(self, request_id: str) -> MappedError:
        return MappedError(
            self.code, self.details or self.code.name, self.code.name.lower(), {"request_id": request_id}
        )


class _TypedContext:
    """The servicer context a behaviour sees: `abort` without an ErrorInfo becomes `ServicerAbort`, so
    that the shell sends that status typed, like every other refusal."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        if any(key == STATUS_DETAILS_KEY for key, _ in trailing_metadata or ()):
            await self._context.abort(code, details, trailing_metadata)
        raise ServicerAbort(code, details)


# grpc-stubs make ServerInterceptor generic; the runtime class is not subscriptable.
if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


_WRAPPED_CACHE_SIZE = 1024


class ShellInterceptor(_Interceptor):
    def __init__(self, authz: AuthzPolicy, metrics: RpcMetrics) -> None:
        self._authz = authz
        self._metrics = metrics
        self._wrapped: dict[tuple[str, Any], grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        # gRPC asks on every call; a method's handler is the same object for the server's life, so
        # its wrapped form is built once (bounded, in case some handler were made anew per call).
        key = (method, handler)
        try:
            wrapped = self._wrapped.get(key)
        except TypeError:  # a handler holding something unhashable: wrapped per call
            return self._wrap_handler(method, handler)
        if wrapped is None:
            wrapped = self._wrap_handler(method, handler)
            if len(self._wrapped) < _WRAPPED_CACHE_SIZE:
                self._wrapped[key] = wrapped
        return wrapped

    def _wrap_handler(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        decode = handler.request_deserializer
        kind = grpc_type(
            client_streaming=bool(handler.request_streaming),
            server_streaming=bool(handler.response_streaming),
        )
        # request_deserializer=None: gRPC passes the raw bytes; the wrapper decodes them after authz.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary, decode, kind=kind, streaming=False),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary, decode, kind=kind, streaming=True),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream, decode, kind=kind, streaming=False),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(method, handler.stream_stream, decode, kind=kind, streaming=True),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _decode(self, method: str, decode: Deserializer, raw: Any) -> Any:
        if decode is None:
            return raw
        try:
            return decode(raw)
        except Exception:
            # Whatever the parser raised (DecodeError, a recursion limit, ...) says only "not a message";
            # its text is not passed on and no traceback is logged: the caller controls these bytes.
            self._metrics.undecodable.labels(*split_method(method)).inc()
            raise UndecodableRequest(method) from None

    def _request(self, method: str, decode: Deserializer, raw: Any, *, streaming: bool) -> Any:
        """The request for the behaviour: one decoded message, or an async iterator decoding lazily."""
        if not streaming:
            return self._decode(method, decode, raw)
        if decode is None:
            return raw

        async def messages() -> AsyncIterator[Any]:
            async for item in raw:
                yield self._decode(method, decode, item)

        return messages()

    async def _enter(self, method: str, kind: str, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        request_id = _request_id(context)
        identity = identity_from_auth_context(context.auth_context())
        # The launch this call belongs to (x-sevlaunch-launch-id): every log line of the call names it.
        launch_id = launch_id_from_metadata(context.invocation_metadata())
        caller = Caller(identity or "", method, request_id, launch_id)
        _current.set(caller)
        _state.set(_CallState())
        set_launch_id(launch_id)
        service, name = split_method(method)
        self._metrics.started.labels(kind, service, name).inc()
        if not self._authz.allows(method, identity):
            self._metrics.denied.labels(service, name).inc()
            self._metrics.handled.labels(kind, service, name, grpc.StatusCode.PERMISSION_DENIED.name).inc()
            self._metrics.outcomes.labels(service, name, REFUSED).inc()
            log.warning(
                "rpc denied", extra={"method": method, "identity": identity, "request_id": request_id}
            )
            mapped_status = _denied_status(method, request_id, identity, self._authz.rules.get(method))
            await context.abort(mapped_status.code, mapped_status.details, mapped_status.trailing_metadata)
        return caller

    async def _fail(
        self, caller: Caller, exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if isinstance(exc, ServicerAbort):
            # A status the servicer chose (logged by _done like any other), now with its ErrorInfo.
            mapped = exc.mapped(caller.request_id)
        else:
            mapped = map_exception(exc, caller.request_id)
        if isinstance(exc, UndecodableRequest):
            log.warning(
                "rpc request undecodable",
                extra={"method": caller.method, "identity": caller.identity, "request_id": caller.request_id},
            )
        elif mapped.code is grpc.StatusCode.INTERNAL:
            # The one place the unknown error is recorded in full; the caller only gets the request id.
            log.error(
                "rpc failed",
                exc_info=exc,
                extra={"method": caller.method, "identity": caller.identity, "request_id": caller.request_id},
            )
        status = mapped.to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def _typed_set_status(self, caller: Caller, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """A servicer that ends a call with `context.set_code(...)` instead of raising (the standard
        health service answers an unknown service name NOT_FOUND that way) gets its status sent with an
        ErrorInfo too: same code and message, reason the code's name."""
        code = _status_code(context.code())
        if code is None or code is grpc.StatusCode.OK:
            return
        details = context.details()
        message = details.decode("utf-8", "replace") if isinstance(details, bytes) else str(details or "")
        mapped = MappedError(code, message or code.name, code.name.lower(), {"request_id": caller.request_id})
        status = mapped.to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _done(
        self, caller: Caller, kind: str, start: float, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        code = context.code()
        code_name = code.name if isinstance(code, grpc.StatusCode) else _code_name(code)
        elapsed = time.perf_counter() - start
        service, name = split_method(caller.method)
        self._metrics.handled.labels(kind, service, name, code_name).inc()
        self._metrics.latency.labels(kind, service, name).observe(elapsed)
        state = _state.get()
        status = _status_code(code) or grpc.StatusCode.OK
        # A status other than OK decides; with OK, a servicer may have said the call was refused.
        outcome = outcome_of(status) if status is not grpc.StatusCode.OK else (state and state.outcome) or OK
        self._metrics.outcomes.labels(service, name, outcome).inc()
        log.info(
            "rpc",
            extra={
                "method": caller.method,
                "identity": caller.identity,
                "request_id": caller.request_id,
                "code": code_name,
                "duration_ms": round(elapsed * 1000, 3),
            },
        )

    def _wrap_unary(
        self, method: str, behavior: Callable[..., Any], decode: Deserializer, *, kind: str, streaming: bool
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def wrapped(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            caller = await self._enter(method, kind, context)
            span = start_server_span(method, context.invocation_metadata())
            start = time.perf_counter()
            try:
                request = self._request(method, decode, raw, streaming=streaming)
                result = await behavior(request, _TypedContext(context))
                await self._typed_set_status(caller, context)
                return result
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._fail(caller, exc, context)
            finally:
                self._done(caller, kind, start, context)
                _end_span(span, context)

        return wrapped

    def _wrap_stream(
        self, method: str, behavior: Callable[..., Any], decode: Deserializer, *, kind: str, streaming: bool
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        async def wrapped(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            caller = await self._enter(method, kind, context)
            span = start_server_span(method, context.invocation_metadata())
            start = time.perf_counter()
            try:
                request = self._request(method, decode, raw, streaming=streaming)
                async for item in behavior(request, _TypedContext(context)):
                    yield item
                await self._typed_set_status(caller, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._fail(caller, exc, context)
            finally:
                self._done(caller, kind, start, context)
                _end_span(span, context)

        return wrapped


def _end_span(span: RpcSpan | None, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if span is not None:
        status = _status_code(context.code()) or grpc.StatusCode.OK
        span.end(status.name, int(status.value[0]))


def _status_code(code: object) -> grpc.StatusCode | None:
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return next((member for member in grpc.StatusCode if member.value[0] == code), None)


def _code_name(code: object) -> str:
    # context.code() is None while a call succeeds, or a raw int in some grpc versions.
    if code is None:
        return grpc.StatusCode.OK.name
    for member in grpc.StatusCode:
        if member.value[0] == code:
            return member.name
    return str(code)


def _denied_status(
    method: str, request_id: str, identity: str | None, allowed: frozenset[str] | None
) -> grpc.Status:
    """PERMISSION_DENIED naming what to change: the identity the caller presented ("" when its
    certificate has no usable CN) and the roles that may call the method (none: a method nobody may
    call). The roles are the proto's documented role tables, so naming them discloses nothing new."""
    who = repr(identity) if identity else "a certificate without exactly one usable CN"
    roles = sorted(allowed or ())
    refusal = PermissionDenied(
        "caller_not_authorized",
        f"{who} may not call {method}"
        + (f"; the roles allowed are {', '.join(roles)}" if roles else "; no role may call it"),
        metadata={"identity": identity or "", "allowed_roles": ",".join(roles)},
    )
    return map_exception(refusal, request_id).to_status()
