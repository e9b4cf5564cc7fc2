"""Trust between gateways and backends (trainer, samplers): who the caller is, and the
internal token that lets a backend believe it.

A gateway authenticates callers (API keys) and tells backends who called in metadata:
`x-headway-team` and `x-headway-admin`. A backend believes that metadata only from a
gateway: with an internal token configured (a secret shared by a deployment's gateways and
backends) every call to the contract's services must carry it in
`x-headway-internal-token`, compared in constant time, or it is refused UNAUTHENTICATED
before any servicer runs; only health checks and reflection stay open. A backend without
a token trusts whoever reaches it (local development), so it may listen only on a loopback
address. `headway serve` generates a token for its children, so they are protected too.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from headway.server import logs

TEAM_HEADER = "x-headway-team"
ADMIN_HEADER = "x-headway-admin"
TOKEN_HEADER = "x-headway-internal-token"
TOKEN_ENV = "HEADWAY_INTERNAL_TOKEN"
TOKEN_FILE_ENV = "HEADWAY_INTERNAL_TOKEN_FILE"
# A token is a shared secret: shorter than this is too easy to guess.
MIN_TOKEN_CHARS = 16
# Methods anyone may call without the token: they reveal no model, team or data (load
# balancers and `headway serve` health-check without credentials).
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class UnsafeConfig(ValueError):
    """Settings that would leave a service open to anyone who can reach it."""


@dataclass(frozen=True)
class Caller:
    """Who a request acts for: a team ("" = the local team of local mode) and whether
    its key is an admin key (registering bases)."""

    team: str = ""
    admin: bool = False


# Local mode (auth off): every caller is the local team, and an admin.
LOCAL = Caller("", True)


def caller_of(metadata: Iterable[tuple[str, str]] | None) -> Caller:
    """The caller a backend's request acts for, from the metadata the gateway set.

    Only meaningful behind `TokenCheck` (or on a loopback-only backend without a token):
    it believes what the metadata says. No team metadata at all is the local caller.
    """
    team, admin = None, None
    for key, value in metadata or ():
        if key == TEAM_HEADER:
            team = value
        elif key == ADMIN_HEADER:
            admin = value == "1"
    if team is None and admin is None:
        return LOCAL
    return Caller(team or "", bool(admin))


def backend_metadata(caller: Caller, token: str) -> list[tuple[str, str]]:
    """The metadata a gateway sends a backend for `caller` (with the token, if any)."""
    md = [(TEAM_HEADER, caller.team), (ADMIN_HEADER, "1" if caller.admin else "0")]
    if token:
        md.append((TOKEN_HEADER, token))
    request_id = logs.call_fields().get("request_id")
    if request_id:  # the backend's log lines of this call share the gateway's id
        md.append((logs.REQUEST_ID_HEADER, request_id))
    return md


def load_token(path: str = "") -> str:
    """The internal token: the first line of `path` (--internal-token-file, or
    $HEADWAY_INTERNAL_TOKEN_FILE) if given, else $HEADWAY_INTERNAL_TOKEN, else "" (none).

    A file is better than a flag: every user of the machine sees a process's argv.
    UnsafeConfig for an unreadable file or a token too short to be a secret.
    """
    path = path or os.environ.get(TOKEN_FILE_ENV, "")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise UnsafeConfig(f"cannot read the internal token file {path}: {e.strerror}") from e
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        where = f"the internal token file {path}"
    else:
        token, where = os.environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
        if not token:
            return ""
    if len(token) < MIN_TOKEN_CHARS:
        raise UnsafeConfig(
            f"{where} holds a token of {len(token)} characters: use at least "
            f"{MIN_TOKEN_CHARS} random ones, e.g. from {MAKE_TOKEN}"
        )
    return token


def is_loopback(host: str) -> bool:
    """Whether `host` (a listen or Host-header host) names only this machine's loopback.

    "" and wildcards ("0.0.0.0", "::") listen on every interface: not loopback. A name
    counts only if every address it resolves to is a loopback address.
    """
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_listen(address: str, token: str, what: str) -> None:
    """UnsafeConfig unless `address` is loopback or a token protects the backend `what`."""
    if token or is_loopback(address.rpartition(":")[0]):
        return
    raise UnsafeConfig(
        f"the {what} would listen on {address} without an internal token, trusting the team "
        f"any caller claims: set one shared with the gateways (--internal-token-file FILE, "
        f"or ${TOKEN_ENV}; make one with {MAKE_TOKEN}), or listen on 127.0.0.1"
    )


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuse (UNAUTHENTICATED) every call without the internal token, before any servicer
    runs, except the open health and reflection services. The one place backends check it."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def _valid(self, metadata: Iterable[Any] | None) -> bool:
        for key, value in metadata or ():
            if key == TOKEN_HEADER:
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._token)
        return False

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        if self._valid(details.invocation_metadata):
            return handler
        return _refusal(handler, details.invocation_metadata)


def _refusal(handler: grpc.RpcMethodHandler, metadata: Iterable[Any] | None) -> Any:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED."""
    sent = any(key == TOKEN_HEADER for key, _ in metadata or ())
    message = (
        "invalid internal token: this service trusts only gateways configured with the "
        "deployment's token (--internal-token-file)"
        if sent
        else "missing internal token: call the gateway, not this service; a gateway needs "
        "the deployment's token (--internal-token-file)"
    )

    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def interceptors(token: str) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors of a backend: the token check when a token is set."""
    return [TokenCheck(token)] if token else []
