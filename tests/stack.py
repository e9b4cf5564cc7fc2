"""Real services for end-to-end tests: gRPC servers on loopback ports, a real Redis.

Servers run in a background thread with their own event loop, exactly as in production
(grpc.aio), and tests talk to them through ordinary channels. The parts benchmarks need
too (services as child processes, the shared Redis and its key prefixes, `wait_until`)
live in `headway.testing` and are imported here, so tests import everything from this
module. Redis is the one `shared_redis_url()` resolves (the `REDIS_URL` of this module):
$HEADWAY_TEST_REDIS_URL, else 127.0.0.1:6379 if it answers, else a redis-server the suite
starts for itself; every test run uses its own key prefix. Tests wait on conditions with
`wait_until`, never on time.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import torch

from headway.channels import CHANNEL_OPTIONS
from headway.modeling import ModelConfig, Tokenizer, Transformer, save_model
from headway.testing import (
    HANG_SECONDS,
    PrivateRedis,
    ServiceProcess,
    WaitTimeout,
    clear_prefix,
    free_port,
    redis_prefix,
    redis_server_binary,
    shared_redis_url,
    wait_until,
)
from tests.conftest import VOCAB, train_tokenizer

# Tests import all of it from here, the `headway.testing` parts included.
__all__ = [
    "HANG_SECONDS",
    "TINY_DIMS",
    "EngineGate",
    "GatewayNode",
    "PrivateRedis",
    "SamplerReplica",
    "ServerThread",
    "ServiceProcess",
    "TrainerStack",
    "WaitTimeout",
    "clear_prefix",
    "free_port",
    "http_call",
    "make_tiny_base",
    "redis_prefix",
    "redis_server_binary",
    "set_torch_threads",
    "shared_redis_url",
    "team_md",
    "wait_until",
]


def __getattr__(name: str) -> Any:
    # `REDIS_URL` resolves on first use (PEP 562), so `from tests.stack import REDIS_URL`
    # starts the embedded Redis only in a run that needs one and no Redis answers.
    if name == "REDIS_URL":
        return shared_redis_url()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        redis_url: str = "",  # "" = the shared test Redis
        **config: Any,
    ) -> None:
        from headway.v1 import model_pb2_grpc, training_pb2_grpc
        from trainer_svc.config import TrainerConfig
        from trainer_svc.server import create_server

        set_torch_threads()
        config.setdefault("device", "cpu")  # the suite's device (see tests/conftest.py)
        self.prefix = prefix or redis_prefix()
        self.config = TrainerConfig(
            store=store,
            redis_url=redis_url or shared_redis_url(),
            redis_prefix=self.prefix,
            **config,
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


def team_md(team: str) -> list[tuple[str, str]]:
    """Metadata the gateway sets for an authenticated caller of `team`."""
    return [("x-headway-team", team)] if team else []


class SamplerReplica:
    """A sampler replica server (engine thread, Redis watcher) plus a stub."""

    def __init__(self, store: Path, prefix: str, redis_url: str = "", **config: Any) -> None:
        from headway.v1 import sampling_pb2_grpc
        from sampler_svc.config import SamplerConfig
        from sampler_svc.server import create_replica

        set_torch_threads()
        config.setdefault("device", "cpu")  # the suite's device (see tests/conftest.py)
        # Eager decoding: compiling costs tens of seconds a start (tests/test_compiled_decode.py).
        config.setdefault("compile", os.environ["HEADWAY_COMPILE"])
        self.config = SamplerConfig(
            store=store, redis_url=redis_url or shared_redis_url(), redis_prefix=prefix, **config
        )
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


class EngineGate:
    """Holds every sampler engine of this process before one of its decode steps until the
    test releases it: a request is then still decoding at a point the test chooses, however
    fast the machine (a deadline that must pass mid-request, a cancellation, a reload under
    a sequence in flight). The engine lets `steps` decode steps through, then waits at the
    start of the next one (its rows admitted, their first tokens drawn and sent). This
    stall is injected into the real engine (patching `Engine.step` for the `with` block):
    nothing else can hold a decode step on demand. Released and removed on exit.
    """

    def __init__(self, steps: int = 0) -> None:
        self.steps_left = steps
        self.held = threading.Event()  # set once an engine waits at the gate
        self.engine: Any = None  # the engine that waits (its `.rows` are safe to read then)
        self._open = threading.Event()

    def __enter__(self) -> EngineGate:
        from sampler_svc.engine import Engine

        self._real_step = real_step = Engine.step

        def step(engine: Engine) -> None:
            if self.steps_left > 0:
                self.steps_left -= 1
            elif not self._open.is_set() and engine.rows:
                self.engine = engine
                self.held.set()
                self._open.wait(HANG_SECONDS)
            real_step(engine)

        Engine.step = step  # type: ignore[method-assign]
        return self

    def wait_held(self) -> Any:
        """Wait until an engine is held; return it."""
        wait_until(self.held.is_set, what="the sampler engine to reach the gate")
        return self.engine

    def release(self) -> None:
        self._open.set()

    def __exit__(self, *exc: object) -> None:
        from sampler_svc.engine import Engine

        self.release()
        Engine.step = self._real_step  # type: ignore[method-assign]


def http_call(
    url: str,
    body: bytes | list[bytes] | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], dict]:
    """A raw HTTP request (POST with a body, else GET; a list body is sent chunked, without
    Content-Length), JSON content type unless `headers` say otherwise: (status, reply
    headers, the reply's JSON, or {"raw": text} when it is not JSON, e.g. a bare 500)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if isinstance(body, list):
        sent["Transfer-Encoding"] = "chunked"
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=HANG_SECONDS)
    try:
        conn.request(
            method or ("GET" if body is None else "POST"),
            parts.path + (f"?{parts.query}" if parts.query else ""),
            body=iter(body) if isinstance(body, list) else body,
            headers=sent,
            encode_chunked=isinstance(body, list),
        )
        response = conn.getresponse()
        status, reply_headers, raw = response.status, dict(response.headers), response.read()
    finally:
        conn.close()
    try:
        return status, reply_headers, json.loads(raw or b"{}")
    except ValueError:
        return status, reply_headers, {"raw": raw.decode(errors="replace")}


class GatewayNode:
    """A gateway (gRPC + OpenAI HTTP) in front of a trainer, plus stubs of every service."""

    def __init__(
        self,
        store: Path,
        prefix: str,
        trainer: str,
        *,
        http: bool = True,
        redis_url: str = "",
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
            redis_url=redis_url or shared_redis_url(),
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
