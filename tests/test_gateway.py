"""The gateway over real gRPC and HTTP, with a real trainer, samplers and Redis."""

from __future__ import annotations

import contextlib
import logging
import threading

import grpc
import numpy as np
import openai
import pytest

from headway.server.keys import create_key
from headway.tensors import to_tensor
from headway.v1 import common_pb2, model_pb2, sampling_pb2, trace_pb2, training_pb2
from tests.helpers_training import adam, batch
from tests.stack import (
    EngineGate,
    GatewayNode,
    SamplerReplica,
    TrainerStack,
    http_call,
    redis_prefix,
    wait_until,
)

PROMPT = [5, 17, 33, 8, 41, 12]
I32 = common_pb2.DTYPE_INT32


def sample_req(model, checkpoint="", **params):
    return sampling_pb2.SampleRequest(
        model=model,
        prompt_tokens=to_tensor(PROMPT, I32),
        checkpoint=checkpoint,
        params=common_pb2.SamplingParams(**params),
    )


def post(
    url: str, body: bytes | list[bytes], headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    """A raw HTTP POST (a list body is sent chunked): (status, reply JSON)."""
    status, _, reply = http_call(url, body, headers)
    return status, reply


def code_of(call) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code().name, err.value.details()


@pytest.mark.slow
def test_read_your_writes_without_head_events(tmp_path, tiny_base):
    # The trainer publishes under another prefix: no head event ever reaches the replica.
    trainer = TrainerStack(tmp_path / "store")
    prefix = redis_prefix()
    replica = SamplerReplica(tmp_path / "store", prefix, max_seq_len=256)
    gateway = GatewayNode(tmp_path / "store", prefix, trainer.server.address, http=False)
    try:
        trainer.add_base(tiny_base, "tiny")
        gateway.models.ForkModel(model_pb2.ForkModelRequest(source="tiny", name="m"))
        for round_ in range(50):
            step = gateway.train.Step(training_pb2.StepRequest(
                model="m", data=batch(seed=round_), loss_fn="importance_sampling",
                adam=adam(1e-3))).optim_step  # fmt: skip
            reply = gateway.sampling.Sample(sample_req("m", max_tokens=2))
            assert reply.checkpoint == step.checkpoint, f"round {round_} served a stale head"
        assert replica.replica.watcher.reconciles == 1  # connected, yet never told
    finally:
        gateway.stop()
        replica.stop()
        trainer.stop()


def test_every_service_health_and_reflection_on_one_port(gateway_stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = gateway_stack.gateway.channel
    health = health_pb2_grpc.HealthStub(channel)
    for service in (
        "",
        "headway.v1.ModelService",
        "headway.v1.SamplingService",
        "headway.v1.TrainingService",
        "headway.v1.TraceService",
    ):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in reply.list_services_response.service}
    assert {
        "headway.v1.ModelService",
        "headway.v1.SamplingService",
        "headway.v1.TrainingService",
        "headway.v1.TraceService",
        "grpc.health.v1.Health",
    } <= names


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


def test_pinned_checkpoint_through_the_gateway(gateway_stack):
    g = gateway_stack.gateway
    g.models.ForkModel(model_pb2.ForkModelRequest(source="tiny", name="m"))
    first = g.models.GetHead(model_pb2.GetHeadRequest(model="m")).id
    g.train.Step(training_pb2.StepRequest(model="m", data=batch(), loss_fn="ppo", adam=adam()))
    assert g.sampling.Sample(sample_req("m", first, max_tokens=2)).checkpoint == first
    assert (
        code_of(lambda: g.sampling.Sample(sample_req("m", "nope", max_tokens=2)))[0] == "NOT_FOUND"
    )


def test_training_takes_trace_ids_mixed_with_inline_trajectories(gateway_stack):
    g = gateway_stack.gateway
    g.models.ForkModel(model_pb2.ForkModelRequest(source="tiny", name="m"))
    client = openai.OpenAI(base_url=g.http_url, api_key="local")
    traces = []
    for seed in range(2):
        c = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "what is 3 plus 4?"}],
            max_tokens=6,
            seed=seed,
            extra_body={"return_token_ids": True},
        )
        traces.append(c.trace_id)
        g.traces.SetReward(trace_pb2.SetRewardRequest(trace_id=c.trace_id, reward=float(seed)))
    trace = g.traces.GetTrace(trace_pb2.GetTraceRequest(trace_id=traces[0]))
    inline = common_pb2.Trajectory(turns=list(trace.turns), reward=0.5)
    data = [
        common_pb2.TrainingItem(trace_id=traces[0]),
        common_pb2.TrainingItem(trajectory=inline),
        common_pb2.TrainingItem(trace_id=traces[1]),
    ]
    reply = g.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(
            model="m", data=data, loss_fn="importance_sampling", group_size=3
        )
    )
    assert reply.num_datums == 3 and reply.metrics["reward/mean"] == pytest.approx(0.5)
    # The trainer's logprobs of a traced turn are the sampler's (same checkpoint).
    turn = trace.turns[0]
    sampled = np.frombuffer(turn.completion_logprobs.data, np.float32)
    got = np.frombuffer(reply.logprobs[0].data, np.float32)[-len(sampled) :]
    assert np.abs(got - sampled).max() <= 1e-4
    no_reward = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_body={"return_token_ids": True},
    ).trace_id
    for trace_id, code in ((no_reward, "FAILED_PRECONDITION"), ("tr-" + "0" * 24, "NOT_FOUND")):
        assert (
            code_of(
                lambda t=trace_id: g.train.ForwardBackward(
                    training_pb2.ForwardBackwardRequest(
                        model="m", data=[common_pb2.TrainingItem(trace_id=t)], loss_fn="ppo"
                    )
                )
            )[0]
            == code
        )


def test_openai_chat_returns_token_ids_logprobs_and_a_trace(gateway_stack):
    g = gateway_stack.gateway
    client = openai.OpenAI(base_url=g.http_url, api_key="local")
    c = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "what is 1 plus 2?"}],
        max_tokens=8,
        n=2,
        temperature=1.0,
        seed=4,
        extra_body={"return_token_ids": True},
    )
    assert len(c.choices) == 2 and c.usage.prompt_tokens == len(c.prompt_token_ids)
    for choice in c.choices:
        assert len(choice.token_ids) == len(choice.logprobs.content) >= 1
        assert choice.prompt_token_ids == c.prompt_token_ids
        assert all(t.logprob <= 0 for t in choice.logprobs.content)
        trace = g.traces.GetTrace(trace_pb2.GetTraceRequest(trace_id=choice.trace_id))
        assert (
            np.frombuffer(trace.turns[0].completion_tokens.data, np.int32).tolist()
            == choice.token_ids
        )
        assert trace.turns[0].checkpoint == c.checkpoint == "base"
    # The chat template is the base's: the prompt is what the tokenizer renders.
    tok = g.gateway.store.get_model("tiny")
    from headway.modeling.tokenizer import Tokenizer

    expected = Tokenizer.from_dir(tok.path).apply_chat_template(
        [{"role": "user", "content": "what is 1 plus 2?"}]
    )
    assert c.prompt_token_ids == expected
    again = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "what is 1 plus 2?"}],
        max_tokens=8,
        n=2,
        temperature=1.0,
        seed=4,
        extra_body={"return_token_ids": True},
    )
    assert [ch.token_ids for ch in again.choices] == [ch.token_ids for ch in c.choices]


def test_a_retried_recording_request_is_answered_once(gateway_stack):
    """An Idempotency-Key makes a retried turn return the first reply and record nothing
    more: without it a client retry (timeout, 5xx) would add a turn the client never saw."""
    import json

    from gateway.replies import ReplyCache, body_digest

    g = gateway_stack.gateway
    client = openai.OpenAI(base_url=g.http_url, api_key="local")

    def chat(key: str | None, **extra) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "what is 1 plus 2?"}],
            max_tokens=8,
            temperature=1.0,  # unseeded: a second sample would differ
            extra_body={"return_token_ids": True, **extra},
            extra_headers={"Idempotency-Key": key} if key else None,
        )

    def turns(trace_id: str) -> int:
        return len(g.traces.GetTrace(trace_pb2.GetTraceRequest(trace_id=trace_id)).turns)

    first = chat("k-1")
    again = chat("k-1")
    assert again.model_dump() == first.model_dump()  # the same reply: tokens, ids, trace
    assert turns(first.trace_id) == 1
    # A retried continuation appends once too.
    follow = chat("k-2", trace_id=first.trace_id)
    assert chat("k-2", trace_id=first.trace_id).model_dump() == follow.model_dump()
    assert follow.trace_id == first.trace_id and turns(first.trace_id) == 2
    # Without a key every request is new.
    assert chat(None).trace_id != chat(None).trace_id

    url = f"{g.http_url}/chat/completions"
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "return_token_ids": True,
    }
    raw = json.dumps(body).encode()
    # The same key with another body; a malformed key; with streaming: 400, nothing run.
    status, reply = post(url, raw, {"Idempotency-Key": "k-1"})
    assert status == 400 and "different request body" in reply["error"]["message"]
    status, reply = post(url, raw, {"Idempotency-Key": "x" * 256})
    assert status == 400 and "printable ASCII" in reply["error"]["message"]
    streamed = json.dumps({**body, "stream": True}).encode()
    status, reply = post(url, streamed, {"Idempotency-Key": "k-3"})
    assert status == 400 and "non-streaming" in reply["error"]["message"]
    # A failed request releases its key: the retry runs again (and fails the same way).
    pinned = json.dumps({**body, "checkpoint": "s999999-nope"}).encode()
    for _ in range(2):
        status, reply = post(url, pinned, {"Idempotency-Key": "k-4"})
        assert status == 404, reply
    # While another gateway holds the key (claimed, not answered): 409, try again later.
    cache = ReplyCache(g.gateway.redis, g.config.redis_prefix)
    assert g.server.run(cache.claim("", "k-5", body_digest(body))) is None
    status, reply = post(url, raw, {"Idempotency-Key": "k-5"})
    assert status == 409 and "still in progress" in reply["error"]["message"]
    g.server.run(cache.release("", "k-5"))
    status, reply = post(url, raw, {"Idempotency-Key": "k-5"})
    assert status == 200 and turns(reply["trace_id"]) == 1


@pytest.mark.slow
def test_a_burst_of_recording_requests_all_succeed_first_time(gateway_stack):
    """A training step's rollouts arrive at once: each takes Redis connections (its trace,
    its idempotency key). 160 concurrent requests, no client retries: all answered."""
    import asyncio

    g = gateway_stack.gateway

    async def burst() -> list[openai.types.chat.ChatCompletion]:
        client = openai.AsyncOpenAI(base_url=g.http_url, api_key="local", max_retries=0)
        try:
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="tiny",
                        messages=[{"role": "user", "content": f"what is {i} plus 2?"}],
                        max_tokens=2,
                        extra_body={"return_token_ids": True},
                        extra_headers={"Idempotency-Key": f"burst-{i}"},
                    )
                    for i in range(160)
                )
            )
        finally:
            await client.close()

    replies = asyncio.run(burst())
    assert len({r.trace_id for r in replies}) == 160


def test_openai_multi_turn_continues_one_trace(gateway_stack):
    g = gateway_stack.gateway
    client = openai.OpenAI(base_url=g.http_url, api_key="local")
    first = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "what is 1 plus 2?"}],
        max_tokens=4,
        extra_body={"return_token_ids": True},
    )
    ch = first.choices[0]
    follow = ch.prompt_token_ids + ch.token_ids + [2, 1] + first.prompt_token_ids[1:5]
    second = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "unused"}],
        max_tokens=4,
        extra_body={
            "return_token_ids": True,
            "prompt_token_ids": follow,
            "trace_id": first.trace_id,
        },
    )
    assert second.trace_id == first.trace_id and second.prompt_token_ids == follow
    trace = g.traces.GetTrace(trace_pb2.GetTraceRequest(trace_id=first.trace_id))
    assert len(trace.turns) == 2
    g.traces.SetReward(trace_pb2.SetRewardRequest(trace_id=first.trace_id, reward=1.0))
    g.models.ForkModel(model_pb2.ForkModelRequest(source="tiny", name="m"))
    # One continued trajectory → one datum: the second prompt extends the first turn.
    reply = g.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(
            model="m", data=[common_pb2.TrainingItem(trace_id=first.trace_id)], loss_fn="ppo"
        )
    )
    assert reply.num_datums == 1
    assert reply.num_tokens == len(ch.token_ids) + len(second.choices[0].token_ids)


def test_openai_completions_streaming_and_models(gateway_stack):
    g = gateway_stack.gateway
    client = openai.OpenAI(base_url=g.http_url, api_key="local")
    whole = client.completions.create(
        model="tiny",
        prompt="what is 2 plus",
        max_tokens=10,
        seed=9,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=10,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=10,
        seed=3,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    parts, finish = [], None
    for event in stream:
        delta = event.choices[0].delta
        parts.append(delta.content or "")
        finish = event.choices[0].finish_reason or finish
    assert "".join(parts) == chat.choices[0].message.content and finish == "length"
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]


def test_http_errors_have_openai_shape_and_status(gateway_stack):
    g = gateway_stack.gateway
    client = openai.OpenAI(base_url=g.http_url, api_key="local")
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404 and "nope" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-1
        )
    assert "temperature" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=100_000
        )
    status, body = post(f"{g.http_url}/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def test_request_bodies_over_the_limit_are_refused_unread(gateway_stack):
    stack = gateway_stack
    small = GatewayNode(stack.config.store, stack.prefix, stack.server.address, max_body_bytes=1000)
    try:
        big = (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}'
        )
        status, body = post(f"{small.http_url}/chat/completions", big)
        assert status == 413 and body["error"]["code"] == "request_too_large"
        # No Content-Length: refused while it streams in.
        status, body = post(f"{small.http_url}/chat/completions", [b"x" * 500] * 10)
        assert status == 413 and body["error"]["code"] == "request_too_large"
    finally:
        small.stop()


def test_keys_and_teams(gateway_stack):
    stack = gateway_stack
    red, blue = create_key(stack.config.store, "red"), create_key(stack.config.store, "blue")
    node = GatewayNode(stack.config.store, stack.prefix, stack.server.address, auth=True)
    try:
        md = lambda key: [("authorization", f"Bearer {key}")]  # noqa: E731
        for bad in ([], [("authorization", "Basic abc")], md("hw_unknown")):
            code, _ = code_of(
                lambda b=bad: node.models.ListModels(model_pb2.ListModelsRequest(), metadata=b)
            )
            assert code == "UNAUTHENTICATED"
        node.models.ForkModel(
            model_pb2.ForkModelRequest(source="tiny", name="secret"), metadata=md(red)
        )
        calls = [
            lambda: node.models.GetModel(
                model_pb2.GetModelRequest(model="secret"), metadata=md(blue)
            ),
            lambda: node.sampling.Sample(sample_req("secret", max_tokens=2), metadata=md(blue)),
            lambda: node.train.ForwardBackward(
                training_pb2.ForwardBackwardRequest(model="secret", data=batch(), loss_fn="ppo"),
                metadata=md(blue),
            ),
            lambda: node.traces.RecordTurn(
                trace_pb2.RecordTurnRequest(
                    model="secret", turn=common_pb2.Turn(prompt_tokens=to_tensor([1], I32))
                ),
                metadata=md(blue),
            ),
        ]
        for call in calls:
            code, details = code_of(call)
            assert code == "NOT_FOUND" and "secret" in details
        assert node.sampling.Sample(sample_req("secret", max_tokens=2), metadata=md(red)).checkpoint
        listed = [
            m.slug
            for m in node.models.ListModels(model_pb2.ListModelsRequest(), metadata=md(blue)).models
        ]
        assert listed == ["tiny"]
        http = openai.OpenAI(base_url=node.http_url, api_key="hw_wrong")
        with pytest.raises(openai.AuthenticationError) as err:
            http.models.list()
        assert err.value.status_code == 401
        assert [
            m.id for m in openai.OpenAI(base_url=node.http_url, api_key=red).models.list().data
        ] == ["tiny", "secret"]
    finally:
        node.stop()


@pytest.mark.slow
def test_deadline_propagates_and_frees_the_rows(gateway_stack):
    """A Sample whose deadline passes while its rows decode ends DEADLINE_EXCEEDED, the
    deadline reaches the sampler (its job is cancelled) and the rows leave the engine. The
    engine is held at its first decode step (EngineGate, a stall injected into the real
    sampler) so the request cannot finish before its deadline however fast the machine;
    the deadline only has to outlast the request's way to the engine (~20 ms here)."""
    stack = gateway_stack
    request = sample_req("tiny", max_tokens=240, n=4, ignore_eos=True)
    outcome: list[tuple[str, str]] = []
    with EngineGate() as gate:
        call = threading.Thread(
            target=lambda: outcome.append(
                code_of(lambda: stack.gateway.sampling.Sample(request, timeout=3))
            )
        )
        call.start()
        engine = gate.wait_held()
        assert stack.sampler.sampler.live_rows == 4
        call.join(timeout=120)
        assert [code for code, _ in outcome] == ["DEADLINE_EXCEEDED"]
        wait_until(
            lambda: all(row.job.cancelled for row in engine.rows),
            what="the deadline to cancel the job on the sampler",
        )
        gate.release()
        wait_until(lambda: stack.sampler.sampler.live_rows == 0, what="the rows to leave")


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
