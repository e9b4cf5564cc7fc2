"""One home per error rule: each `HeadwayError` class carries its gRPC status, its HTTP
status and whether it is the caller's fault; every status → error table is derived.

The surfaces that apply the rule (SDK over gRPC, agents over HTTP, the CLI) are checked
where they live (tests/test_sdk_errors.py, tests/test_cli.py); this file checks the rule itself.
"""

from __future__ import annotations

import pytest

from headway import errors
from headway.errors import (
    HeadwayError,
    Internal,
    InvalidArgument,
    Overloaded,
    ResourceExhausted,
    from_http,
    from_status,
    http_status,
)

CLASSES = sorted(
    {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, HeadwayError)}
    - {HeadwayError},
    key=lambda c: c.__name__,
)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_error_round_trips_over_grpc_and_http(cls):
    """The error a service raises is the error the client gets, over either surface."""
    error = cls("what to fix")
    retry = error.retry_after_ms if isinstance(error, Overloaded) else None
    over_grpc = from_status(error.code, "m", retry)
    assert type(over_grpc) is cls
    assert type(from_http(over_grpc.http_status, "m", error.code, retry)) is cls
    if cls is not Overloaded:  # told from ResourceExhausted by the pushback, not the code
        assert http_status(error.code) == error.http_status


def test_over_a_limit_is_one_error_on_both_surfaces():
    """The bug this rule fixed: an over-long prompt was ResourceExhausted over gRPC but
    InvalidArgument over HTTP (both are HTTP 400; the body's status tells them apart)."""
    over = ResourceExhausted("prompt over the context")
    assert over.http_status == InvalidArgument.http_status == 400
    assert type(from_http(400, "m", over.code)) is ResourceExhausted
    assert type(from_http(400, "m", None)) is InvalidArgument  # a foreign server: by status
    assert type(from_http(413, "m", None)) is ResourceExhausted  # a body over the limit


def test_statuses_no_class_owns_keep_their_name():
    unknown = from_status("UNKNOWN", "boom")
    assert isinstance(unknown, Internal) and unknown.code == "UNKNOWN"
    assert from_status("OUT_OF_RANGE", "m").code == "OUT_OF_RANGE"
    assert isinstance(from_status("OUT_OF_RANGE", "m"), InvalidArgument)
    assert http_status("DATA_LOSS") == 500


def test_a_pushback_marks_overloaded_and_only_then():
    assert type(from_status("RESOURCE_EXHAUSTED", "m", 250)) is Overloaded
    assert from_status("RESOURCE_EXHAUSTED", "m", 250).retry_after_ms == 250
    assert type(from_status("RESOURCE_EXHAUSTED", "m")) is ResourceExhausted
    assert from_http(429, "m", None, 40).retry_after_ms == 40


def test_user_errors_are_the_requests_fault_only():
    faults = {c.__name__ for c in CLASSES if c.user_error}
    assert faults == {
        "AlreadyExists",
        "FailedPrecondition",
        "InvalidArgument",
        "NotFound",
        "PermissionDenied",
        "ResourceExhausted",
        "Unauthenticated",
    }
    assert not Overloaded.user_error  # at capacity: retry, do not change the request
