"""Errors that cross a service boundary, each bound to the statuses it travels as.

Domain code (store, trainer, sampler engine) raises these with a message that says what
to fix; a servicer turns them into `context.abort(code, message)` and nothing else. Each
class is the one home of its mapping: `code` (the gRPC status), `http_status` (the
OpenAI-compatible API's) and `user_error` (the request is at fault: the CLI exits 2).
Every table that maps a status back to an error (the SDK over gRPC, the agents over HTTP,
the CLI) is derived from these classes by `from_status` and `from_http`, so a status
means the same error on every surface. This module imports neither grpc nor torch, so the
SDK and gateway can use it too.
"""

from __future__ import annotations

from typing import Any


class HeadwayError(Exception):
    """Base class: `code` is the name of a `grpc.StatusCode` member, `http_status` the
    status of the same error on the HTTP API, `user_error` whether the caller must change
    the request (not retry it)."""

    code = "INTERNAL"
    http_status = 500
    user_error = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(HeadwayError):
    """The request itself is wrong; retrying it unchanged will fail again."""

    code = "INVALID_ARGUMENT"
    http_status = 400
    user_error = True


class NotFound(HeadwayError):
    """A model, checkpoint, trace or forward id that does not exist (for this caller)."""

    code = "NOT_FOUND"
    http_status = 404
    user_error = True


class AlreadyExists(HeadwayError):
    """A name that is taken."""

    code = "ALREADY_EXISTS"
    http_status = 409
    user_error = True


class FailedPrecondition(HeadwayError):
    """Well formed, but the current state forbids it (no gradient to apply, a base ...)."""

    code = "FAILED_PRECONDITION"
    http_status = 400
    user_error = True


class ResourceExhausted(HeadwayError):
    """Over a size limit: context, batch, token budget."""

    code = "RESOURCE_EXHAUSTED"
    http_status = 400
    user_error = True


class Overloaded(ResourceExhausted):
    """At capacity right now (a full queue): the same call may succeed shortly, or on
    another replica. Travels as RESOURCE_EXHAUSTED with gRPC's standard retry pushback
    (`grpc-retry-pushback-ms` trailing metadata), which tells it from a request that is
    too big (never retryable); over HTTP it is 429 with `retry-after-ms`."""

    http_status = 429
    user_error = False

    def __init__(self, message: str, retry_after_ms: int = 100) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


PUSHBACK_KEY = "grpc-retry-pushback-ms"


def pushback_ms(error: object) -> int | None:
    """The retry pushback of an RPC error (`grpc-retry-pushback-ms`), None if it has none."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == PUSHBACK_KEY:
            try:
                return max(0, int(value))
            except ValueError:
                return None
    return None


class Unauthenticated(HeadwayError):
    """A missing or unknown API key."""

    code = "UNAUTHENTICATED"
    http_status = 401
    user_error = True


class ModelError(ValueError):
    """A model directory or a model input that cannot be used; the message says why.

    Raised by the model core (config, weights, tokenizer) and mapped to INVALID_ARGUMENT
    at the service edge. A ValueError, so model code needs nothing of ours to catch it.
    """


# Statuses no domain code raises but that reach callers (transport, deadlines, faults):
# the gateway raises Unavailable when no replica runs; the SDK maps the rest.


class Unavailable(HeadwayError):
    """The service could not be reached (after the client's retries)."""

    code = "UNAVAILABLE"
    http_status = 503


class DeadlineExceeded(HeadwayError):
    """The call's deadline passed. A training call may or may not have been applied."""

    code = "DEADLINE_EXCEEDED"
    http_status = 504


class PermissionDenied(HeadwayError):
    """The caller may not do this."""

    code = "PERMISSION_DENIED"
    http_status = 403
    user_error = True


class Cancelled(HeadwayError):
    """The call was cancelled."""

    code = "CANCELLED"
    http_status = 499


class Aborted(HeadwayError):
    """The server aborted the call (a conflict); it may be retried."""

    code = "ABORTED"
    http_status = 409


class Unimplemented(HeadwayError):
    """The server does not implement this call (an older or different deployment)."""

    code = "UNIMPLEMENTED"
    http_status = 501


class Internal(HeadwayError):
    """A server fault (INTERNAL, UNKNOWN, DATA_LOSS): not the request's fault."""

    code = "INTERNAL"
    http_status = 500


# ------------------------------------------------------------------ derived tables
# Every status → error table is built here from the classes above, never written again.

_BY_CODE: dict[str, type[HeadwayError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
        PermissionDenied,
        Cancelled,
        Aborted,
        Unimplemented,
        Internal,
    )
}
_BY_CODE["OUT_OF_RANGE"] = InvalidArgument  # gRPC's other "bad value" status
# HTTP → error: each class's own status (the first class listed wins a shared one: 400 is
# InvalidArgument, 409 AlreadyExists), plus 413, a body over the size limit.
_BY_HTTP: dict[int, type[HeadwayError]] = {413: ResourceExhausted}
for _cls in (*_BY_CODE.values(), Overloaded):
    _BY_HTTP.setdefault(_cls.http_status, _cls)


def http_status(code: str) -> int:
    """The HTTP status of the error with gRPC status name `code` (500 if unknown)."""
    return _BY_CODE.get(code, Internal).http_status


def from_status(code: str, message: str, retry_after_ms: int | None = None) -> HeadwayError:
    """The error for a gRPC status name and message; a RESOURCE_EXHAUSTED that carries a
    retry pushback is `Overloaded`. A status no class owns (UNKNOWN, DATA_LOSS) becomes
    `Internal` with its exact `code` kept."""
    if code == "RESOURCE_EXHAUSTED" and retry_after_ms is not None:
        return Overloaded(message, retry_after_ms=retry_after_ms)
    error = _BY_CODE.get(code, Internal)(message)
    if error.code != code:
        error.code = code
    return error


def from_rpc_error(error: Any) -> HeadwayError:
    """The error of a failed gRPC call (anything with grpc's `code()`, `details()` and
    trailing metadata: a `grpc.RpcError`, an `AioRpcError`), the server's message and its
    retry pushback kept (at capacity is retryable, unlike a request over a limit)."""
    code = error.code() if hasattr(error, "code") else None
    name = getattr(code, "name", "UNKNOWN")
    details = (error.details() if hasattr(error, "details") else "") or name
    return from_status(name, details, pushback_ms(error))


def from_http(
    status: int, message: str, code: str | None = None, retry_after_ms: int | None = None
) -> HeadwayError:
    """The error for an HTTP answer of our gateway: by the gRPC status name its body
    carries (`error.status`) when present, so both surfaces give the same error, else by
    the HTTP status."""
    if status == 429:
        return Overloaded(message, retry_after_ms=retry_after_ms or 100)
    if code in _BY_CODE:
        return from_status(code, message)
    return _BY_HTTP.get(status, Internal)(message)
