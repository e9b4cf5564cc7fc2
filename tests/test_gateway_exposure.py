"""A gateway never leaves auth off by accident: a mistyped setting stops it, auth off on a
non-loopback address needs --insecure, and keys that auth off ignores are pointed out.
Real processes and a real gateway (Redis, loopback)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from gateway.server import create_gateway
from headway.server.auth import UnsafeConfig
from headway.server.keys import create_key
from tests.stack import REDIS_URL, GatewayNode, free_port, redis_prefix

REPO = Path(__file__).resolve().parents[1]


def _gateway_process(
    tmp_path: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess:
    """`python -m gateway` on loopback, HTTP off; a hang (it started) fails the test."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HEADWAY_")}
    command = [sys.executable, "-m", "gateway", "--store", str(tmp_path / "store"),
               "--redis", REDIS_URL, "--redis-prefix", redis_prefix(), "--http", "",
               "--trainer", f"127.0.0.1:{free_port()}", *args]  # fmt: skip
    return subprocess.run(
        command, cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow  # a gateway process per value
@pytest.mark.parametrize("value", ["true", "ON", "yes", "1", ""])
def test_a_mistyped_auth_setting_stops_the_gateway(tmp_path, value):
    result = _gateway_process(
        tmp_path, {"HEADWAY_AUTH": value}, "--listen", f"127.0.0.1:{free_port()}"
    )
    assert result.returncode == 2, result.stderr
    assert "'on' or 'off'" in result.stderr and repr(value) in result.stderr


def test_auth_off_on_a_public_address_stops_the_gateway_process(tmp_path):
    result = _gateway_process(
        tmp_path, {"HEADWAY_AUTH": "off"}, "--listen", f"0.0.0.0:{free_port()}"
    )
    assert result.returncode == 2, result.stderr
    assert "--insecure" in result.stderr and "auth" in result.stderr


def _start(config: GatewayConfig, address: str) -> None:
    """Create (and close) a gateway on its own event loop."""

    async def run() -> None:
        _server, _port, process = await create_gateway(config, address)
        await process.close(grace=0)

    asyncio.run(run())


def test_auth_off_on_a_public_address_needs_insecure(tmp_path):
    config = dict(store=tmp_path / "store", redis_url=REDIS_URL, redis_prefix=redis_prefix())
    with pytest.raises(UnsafeConfig, match="gRPC address 0.0.0.0:0"):
        _start(GatewayConfig(**config), "0.0.0.0:0")
    with pytest.raises(UnsafeConfig, match="HTTP address 0.0.0.0:0"):
        _start(GatewayConfig(**config, http_listen="0.0.0.0:0"), "127.0.0.1:0")
    # Allowed when asked for, or with auth on.
    _start(GatewayConfig(**config, insecure=True), "0.0.0.0:0")
    _start(GatewayConfig(**config, auth=True), "0.0.0.0:0")


def test_the_gateway_warns_when_keys_exist_but_auth_is_off(tmp_path, caplog):
    store = tmp_path / "store"
    create_key(store, "red")
    with caplog.at_level(logging.WARNING, logger="gateway.server"):
        node = GatewayNode(store, redis_prefix(), f"127.0.0.1:{free_port()}", http=False)
        node.stop()
    assert any("holds API keys but auth is OFF" in r.getMessage() for r in caplog.records)
