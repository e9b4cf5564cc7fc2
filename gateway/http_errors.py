"""Errors of the OpenAI-compatible HTTP API, in OpenAI's JSON shape.

`HTTPError` is raised for a request the HTTP layer itself refuses (a malformed body, a
wrong parameter); domain errors (`headway.errors`) answer at the status their class names;
`Overloaded` is 429 with when to retry. Every answer also carries `error.status`, the gRPC
status name of the same error, so a client maps HTTP and gRPC failures alike.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from headway.errors import HeadwayError, Overloaded, from_http

_TYPES = {
    401: "authentication_error",
    429: "rate_limit_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_error",
    504: "server_error",
}


class HTTPError(Exception):
    """An error with an HTTP status and an OpenAI error code."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    grpc_status: str | None = None,
) -> JSONResponse:
    """An error in OpenAI's JSON shape, plus `status`: the gRPC status name of the same
    error, so a client (our agents) maps HTTP and gRPC failures to the same exception."""
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
            "status": grpc_status or from_http(status, message).code,
        }
    }
    return JSONResponse(body, status_code=status)


def domain_error_response(e: HeadwayError) -> JSONResponse:
    """The HTTP answer for a domain or upstream error, at the status its class names."""
    code = "model_not_found" if e.http_status == 404 else None
    if isinstance(e, Overloaded):
        code = "overloaded"
    response = error_response(e.http_status, e.message, code, grpc_status=e.code)
    if isinstance(e, Overloaded):
        # At capacity right now: 429 with when to retry, which the openai client (and
        # most HTTP clients) honour with a backoff.
        ms = e.retry_after_ms
        response.headers["retry-after-ms"] = str(ms)
        response.headers["retry-after"] = str(max(1, -(-ms // 1000)))
    return response
