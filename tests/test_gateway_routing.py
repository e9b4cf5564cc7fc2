"""The gateway's routing and health over real gRPC, with a real trainer, samplers and Redis:
health that follows the backends, a Redis outage, full and dead replicas, replica choice."""

from __future__ import annotations

import contextlib
import logging
import threading

import grpc
import openai
import pytest

from headway.v1 import model_pb2, sampling_pb2
from tests.helpers_gateway import sample_req
from tests.stack import GatewayNode, SamplerReplica, TrainerStack, redis_prefix, wait_until


@pytest.mark.slow
def test_health_follows_the_trainer_and_the_sampler_replicas(tmp_path, tiny_base):
    """SERVING per service only while what it needs answers: a load balancer can trust it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.stack import free_port

    trainer = TrainerStack(tmp_path / "store")
    trainer.add_base(tiny_base, "tiny")
    store, prefix = trainer.config.store, trainer.prefix
    names = ("", "headway.v1.TraceService", "headway.v1.ModelService")
    names += ("headway.v1.TrainingService", "headway.v1.SamplingService")

    def serving(node: GatewayNode) -> tuple[bool, ...]:
        health = health_pb2_grpc.HealthStub(node.channel)
        ok = health_pb2.HealthCheckResponse.SERVING
        return tuple(
            health.Check(health_pb2.HealthCheckRequest(service=n)).status == ok for n in names
        )

    def wait_for(node: GatewayNode, want: tuple[bool, ...]) -> None:
        wait_until(lambda: serving(node) == want, what=f"health {want}", interval=0.05)

    # No trainer at its address, no replica registered: Redis-backed services only.
    lonely = GatewayNode(  # its trainer address: a free port nobody listens on
        store, prefix, f"127.0.0.1:{free_port()}", http=False, health_interval_seconds=0.2
    )
    gateway = GatewayNode(
        store, prefix, trainer.server.address, http=False, health_interval_seconds=0.2
    )
    replica = None
    try:
        assert serving(lonely) == (True, True, False, False, False)
        assert serving(gateway) == (True, True, True, True, False)
        replica = SamplerReplica(store, prefix, max_seq_len=256)
        wait_for(gateway, (True, True, True, True, True))
        wait_for(lonely, (True, True, False, False, True))
        replica.stop()  # a clean stop leaves the registry at once
        replica = None
        wait_for(gateway, (True, True, True, True, False))
        trainer.stop()
        trainer = None
        wait_for(gateway, (True, True, False, False, False))
        # A trainer that comes up where the lonely gateway dials: its calls go through at
        # once (no waiting out gRPC's reconnect backoff), and its health follows.
        trainer = TrainerStack(store, address=lonely.config.trainer, prefix=prefix)
        models = lonely.models.ListModels(model_pb2.ListModelsRequest(), timeout=10).models
        assert [m.slug for m in models] == ["tiny"]
        wait_for(lonely, (True, True, True, True, False))
    finally:
        for node in (lonely, gateway, replica, trainer):
            if node is not None:
                node.stop()


@pytest.mark.slow
def test_a_redis_outage_keeps_the_gateway_serving_what_does_not_need_redis(tmp_path, tiny_base):
    """Redis down: traces are NOT_SERVING, but the gateway as a whole stays SERVING (an
    outage hits every gateway alike; a load balancer must not take them all out) and
    samples keep flowing on the replicas it last read from the registry, failing over
    from one that stops meanwhile instead of answering UNAVAILABLE for want of Redis."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.stack import PrivateRedis, free_port

    redis_server = PrivateRedis(free_port(), tmp_path / "redis")
    url = redis_server.url
    trainer = TrainerStack(tmp_path / "store", redis_url=url)
    trainer.add_base(tiny_base, "tiny")
    store, prefix = trainer.config.store, trainer.prefix
    a = SamplerReplica(store, prefix, redis_url=url, max_seq_len=256, replica_id="a")
    b = SamplerReplica(store, prefix, redis_url=url, max_seq_len=256, replica_id="b")
    node = GatewayNode(
        store, prefix, trainer.server.address, redis_url=url, health_interval_seconds=0.2
    )
    health = health_pb2_grpc.HealthStub(node.channel)

    def serving(name: str) -> bool:
        status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
        return status == health_pb2.HealthCheckResponse.SERVING

    def lists_both() -> bool:
        node.sampling.Sample(sample_req("tiny", max_tokens=2), timeout=60)  # reads the registry
        return node.gateway.router.known() == 2

    try:
        wait_until(lists_both, what="the gateway to list both replicas", interval=0.05)
        redis_server.stop()
        wait_until(lambda: not serving("headway.v1.TraceService"), what="traces NOT_SERVING")
        assert serving("") and serving("headway.v1.SamplingService")
        assert serving("headway.v1.TrainingService")
        a.stop()  # its registry entry cannot be removed: Redis is down
        for seed in range(4):  # each tries "a" or "b" first; none may fail
            reply = node.sampling.Sample(sample_req("tiny", max_tokens=2, seed=seed), timeout=60)
            assert reply.checkpoint == "base"
    finally:
        node.stop()
        b.stop()
        with contextlib.suppress(Exception):  # its key cleanup needs the Redis that is gone
            trainer.stop()
        if redis_server.proc.poll() is None:
            redis_server.stop()


@pytest.mark.slow
def test_a_full_replica_passes_requests_on_and_callers_are_told_to_retry(tmp_path, tiny_base):
    """A replica at capacity refuses with RESOURCE_EXHAUSTED + gRPC retry pushback: the
    gateway tries another replica; with none free, gRPC callers get the pushback, HTTP
    callers 429 with retry-after-ms, and the SDK retries then raises Overloaded."""
    import asyncio

    from headway import Overloaded, SamplingClient
    from headway.errors import PUSHBACK_KEY

    trainer = TrainerStack(tmp_path / "store")
    trainer.add_base(tiny_base, "tiny")
    store, prefix = trainer.config.store, trainer.prefix
    # max_queue=0: refuses every request. Its id sorts first, so it is tried first.
    full = SamplerReplica(store, prefix, max_seq_len=256, max_queue=0, replica_id="a-full")
    node = GatewayNode(store, prefix, trainer.server.address)
    ok = None
    try:
        with pytest.raises(grpc.RpcError) as err:
            node.sampling.Sample(sample_req("tiny", max_tokens=2), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests waiting" in err.value.details()
        assert dict(err.value.trailing_metadata())[PUSHBACK_KEY] == "100"

        client = openai.OpenAI(base_url=node.http_url, api_key="local", max_retries=0)
        with pytest.raises(openai.RateLimitError) as limited:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert limited.value.response.headers["retry-after-ms"] == "100"

        async def sdk_sample() -> None:
            sampler = SamplingClient("tiny", url=node.server.address, max_retries=2)
            try:
                await sampler.sample("hi", max_tokens=2)
            finally:
                await sampler.close()

        with pytest.raises(Overloaded, match="requests waiting"):
            asyncio.run(sdk_sample())

        ok = SamplerReplica(store, prefix, max_seq_len=256, replica_id="b-ok")

        def sample() -> sampling_pb2.SampleResponse | None:
            try:
                return node.sampling.Sample(sample_req("tiny", max_tokens=2), timeout=60)
            except grpc.RpcError as e:  # until the gateway's registry listing has "b-ok"
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return None

        reply = wait_until(sample, what="the free replica to serve", interval=0.1)
        assert reply.checkpoint == "base" and len(reply.sequences) == 1
        assert full.sampler.steps == 0  # everything was decoded elsewhere
    finally:
        for part in (node, ok, full, trainer):
            if part is not None:
                part.stop()


def test_routing_weighs_replicas_by_rows_reported_and_in_flight():
    """The replica holding the checkpoint first; then the fewest sequences, counting what
    each replica reported (decoding + waiting) and the rows this gateway has sent it."""
    import asyncio

    import redis.asyncio as aioredis

    from gateway.routing import Router
    from headway.server.replicas import ReplicaInfo, announce
    from tests.stack import REDIS_URL, clear_prefix

    prefix = redis_prefix()

    async def order(steps) -> list[list[str]]:
        client = aioredis.from_url(REDIS_URL)
        router = Router(client, prefix, cache_seconds=0.0)
        try:
            for info in (
                ReplicaInfo("a", "a:1", live_rows=2, queued_rows=3),
                ReplicaInfo("b", "b:1", live_rows=4),
                ReplicaInfo("c", "c:1", loaded=["m/ck"], live_rows=30),
            ):
                await announce(client, info, ttl=30, prefix=prefix)
            seen = []
            for step in steps:
                step(router)
                seen.append(await router.candidates("m", "ck"))
                seen[-1] = [address[0] for address in seen[-1]]
            return seen
        finally:
            await router.close()
            await client.aclose()

    try:
        seen = asyncio.run(
            order(
                [
                    lambda r: None,
                    lambda r: r.begin("b:1", 8),  # a request of n=8 sent to b
                    lambda r: r.end("b:1", 8),
                ]
            )
        )
    finally:
        clear_prefix(prefix)
    assert seen == [["c", "b", "a"], ["c", "a", "b"], ["c", "b", "a"]]


def test_a_dead_replica_is_failed_over(gateway_stack, caplog):
    stack = gateway_stack
    # Its id sorts first: with no load anywhere, the gateway tries it first.
    dead = SamplerReplica(stack.config.store, stack.prefix, max_seq_len=256, replica_id="a-dead")
    try:
        g = stack.gateway
        wait_until(
            lambda: len(g.server.run(g.gateway.router.replicas())) == 2,
            what="both replicas in the gateway's view of the registry",
        )
        # Stop one without withdrawing it from the registry.
        dead.server.run(dead.replica.server.stop(0))
        results = []

        def run() -> None:
            results.append(g.sampling.Sample(sample_req("tiny", max_tokens=3)).checkpoint)

        threads = [threading.Thread(target=run) for _ in range(8)]
        with caplog.at_level(logging.WARNING, logger="gateway.core"):
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert results == ["base"] * 8
        tried = [
            r
            for r in caplog.records
            if f"sampler {dead.server.address} unavailable" in r.getMessage()
        ]
        assert tried, "the dead replica was never tried"
    finally:
        dead.stop()
