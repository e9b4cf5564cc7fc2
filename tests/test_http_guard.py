"""The HTTP API cannot be driven by a web page: a POST must be JSON (a page cannot send
that without a preflight), and in local mode the Host must be this machine (DNS rebinding).
Real gateway, sampler and trainer; raw HTTP requests, as a browser would send them."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlparse

import redis

from headway.server.keys import create_key
from tests.stack import REDIS_URL, GatewayNode

CHAT = json.dumps(
    {
        "model": "tiny",
        "messages": [{"role": "user", "content": "what is 1 plus 2?"}],
        "max_tokens": 2,
        "return_token_ids": True,
    }
).encode()


def request(
    url: str, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict]:
    """A raw HTTP request with exactly these headers (Host included if given;
    Content_Type is Content-Type)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    conn.request(method, u.path + path, body=body, headers=sent)
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read() or b"{}")
    conn.close()
    return status, data


def traces(prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return list(client.scan_iter(match=f"{prefix}trace*"))
    finally:
        client.close()


def test_a_post_that_is_not_json_is_refused_and_nothing_is_sampled(gateway_stack):
    stack = gateway_stack
    steps = stack.sampler.sampler.steps
    for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        headers = {"Content_Type": media} if media else {}
        status, body = request(stack.gateway.http_url, "POST", "/chat/completions", CHAT, **headers)
        assert status == 415, (media, body)
        assert body["error"]["code"] == "unsupported_media_type"
        assert "application/json" in body["error"]["message"]
    assert traces(stack.prefix) == [] and stack.sampler.sampler.steps == steps
    # The same body as JSON is answered (and records its turn).
    json_type = {"Content_Type": "application/json; charset=utf-8"}
    status, body = request(stack.gateway.http_url, "POST", "/chat/completions", CHAT, **json_type)
    assert status == 200 and body["trace_id"] and traces(stack.prefix)


def test_a_foreign_host_is_refused_in_local_mode(gateway_stack):
    stack = gateway_stack
    url, port = stack.gateway.http_url, urlparse(stack.gateway.http_url).port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        status, body = request(url, "GET", "/models", Host=host)
        assert status == 403 and body["error"]["code"] == "host_not_allowed", host
        status, _ = request(
            url, "POST", "/chat/completions", CHAT, Host=host, Content_Type="application/json"
        )
        assert status == 403
    assert traces(stack.prefix) == []
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert request(url, "GET", "/models", Host=host)[0] == 200, host


def test_allowed_hosts_extend_local_mode_and_auth_on_answers_any_host(gateway_stack):
    stack = gateway_stack
    extended = GatewayNode(
        stack.config.store, stack.prefix, stack.server.address, allowed_hosts=["gw.internal"]
    )
    key = create_key(stack.config.store, "red")
    keyed = GatewayNode(stack.config.store, stack.prefix, stack.server.address, auth=True)
    try:
        assert request(extended.http_url, "GET", "/models", Host="gw.internal:80")[0] == 200
        assert request(extended.http_url, "GET", "/models", Host="evil.example")[0] == 403
        auth = {"Authorization": f"Bearer {key}", "Host": "gw.example.com"}
        assert request(keyed.http_url, "GET", "/models", **auth)[0] == 200
    finally:
        extended.stop()
        keyed.stop()
