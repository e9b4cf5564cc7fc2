"""Guards of the gateway's HTTP API against web pages: an ASGI middleware.

A browser lets any web page send requests to 127.0.0.1. A "simple" cross-origin POST
(Content-Type text/plain, no CORS preflight) reaches the API with a JSON body, and a
DNS-rebinding page (its own host name re-pointed at 127.0.0.1) is even same-origin and
reads the replies. In local mode (auth off: every caller is the local admin) either would
let a page sample, record traces and list models. So:

- a POST must declare `Content-Type: application/json` (415 otherwise), or, on the Tinker
  API (/api/v1/, whose SDK sends forward_backward as protobuf), `application/x-protobuf`.
  A page can send neither without a preflight, which this API never grants; the `openai`
  and `tinker` clients and every HTTP library sending JSON declare them anyway.
- with auth off, the Host header must name this machine (localhost and its subdomains, a
  loopback address, the listen host) or one of the configured allowed hosts, else 403,
  as Vite, webpack-dev-server and Jupyter answer: a rebound page's requests carry its own
  host name. With auth on, a page has no key, so any Host is answered.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from gateway.http import error_response

JSON = "application/json"
PROTOBUF = "application/x-protobuf"
TINKER_PATHS = "/api/v1/"
ANY_HOST = "*"


def _host_name(value: str) -> str:
    """The host of a Host header value ("name:port", "[v6]:port"), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_local_name(host: str) -> bool:
    """localhost (and *.localhost, RFC 6761) or a loopback IP literal; no DNS lookup: the
    answer of an attacker's DNS is exactly what must not decide."""
    host = host.rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpGuard:
    """Refuse POSTs that are not JSON (415) and, when `check_host`, requests whose Host is
    not this machine or an allowed host (403), before anything reads the body."""

    def __init__(
        self, app: Any, *, check_host: bool, listen_host: str, allowed_hosts: Iterable[str]
    ) -> None:
        self.app, self.check_host = app, check_host
        allowed = {h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()}
        listen_host = _host_name(listen_host) if listen_host else ""
        if listen_host and listen_host not in ("0.0.0.0", "::"):
            allowed.add(listen_host)
        self.any_host = ANY_HOST in allowed
        self.allowed = allowed - {ANY_HOST}

    def host_allowed(self, host: str) -> bool:
        host = _host_name(host).rstrip(".")
        return self.any_host or _is_local_name(host) or host in self.allowed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.check_host:
            host = headers.get(b"host", b"").decode("latin-1")
            if not self.host_allowed(host):
                refused = error_response(
                    403,
                    f"requests for host {host!r} are not answered in local mode (auth off): "
                    "use localhost or 127.0.0.1, or start the gateway with "
                    f"--allowed-hosts {_host_name(host) or 'NAME'} (or --auth on)",
                    "host_not_allowed",
                    grpc_status="PERMISSION_DENIED",
                )
                return await refused(scope, receive, send)
        if scope["method"] == "POST":
            media = headers.get(b"content-type", b"").decode("latin-1")
            media_type = media.split(";", 1)[0].strip().lower()
            tinker = scope["path"].startswith(TINKER_PATHS) and media_type == PROTOBUF
            if media_type != JSON and not tinker:
                refused = error_response(
                    415,
                    f"Content-Type must be {JSON}, not {media or 'missing'}: send the body "
                    f"as JSON with 'Content-Type: {JSON}'",
                    "unsupported_media_type",
                    grpc_status="INVALID_ARGUMENT",
                )
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)
