"""Errors that cross a service boundary, each bound to the gRPC status it maps to.

Domain code (store, trainer, sampler engine) raises these with a message that says what
to fix; a servicer turns them into `context.abort(code, message)` and nothing else. This
module imports neither grpc nor torch, so the SDK and gateway can use it too.
"""

from __future__ import annotations


class HeadwayError(Exception):
    """Base class: `code` is the name of a `grpc.StatusCode` member."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(HeadwayError):
    """The request itself is wrong; retrying it unchanged will fail again."""

    code = "INVALID_ARGUMENT"


class NotFound(HeadwayError):
    """A model, checkpoint, trace or forward id that does not exist (for this caller)."""

    code = "NOT_FOUND"


class AlreadyExists(HeadwayError):
    """A name that is taken."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(HeadwayError):
    """Well formed, but the current state forbids it (no gradient to apply, a base ...)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(HeadwayError):
    """Over a size limit: context, batch, token budget."""

    code = "RESOURCE_EXHAUSTED"


class Overloaded(ResourceExhausted):
    """At capacity right now (a full queue): the same call may succeed shortly, or on
    another replica. Travels as RESOURCE_EXHAUSTED with gRPC's standard retry pushback
    (`grpc-retry-pushback-ms` trailing metadata), which tells it from a request that is
    too big (never retryable); over HTTP it is 429 with `retry-after-ms`."""

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


class DeadlineExceeded(HeadwayError):
    """The call's deadline passed. A training call may or may not have been applied."""

    code = "DEADLINE_EXCEEDED"


class PermissionDenied(HeadwayError):
    """The caller may not do this."""

    code = "PERMISSION_DENIED"


class Cancelled(HeadwayError):
    """The call was cancelled."""

    code = "CANCELLED"


class Aborted(HeadwayError):
    """The server aborted the call (a conflict); it may be retried."""

    code = "ABORTED"


class Unimplemented(HeadwayError):
    """The server does not implement this call (an older or different deployment)."""

    code = "UNIMPLEMENTED"


class Internal(HeadwayError):
    """A server fault (INTERNAL, UNKNOWN, DATA_LOSS): not the request's fault."""

    code = "INTERNAL"
