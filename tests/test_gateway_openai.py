"""The gateway's OpenAI-compatible HTTP API, with a real trainer, sampler and Redis: token
ids, logprobs and traces, idempotent recording, multi-turn traces, streaming, errors, limits."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from headway.v1 import common_pb2, model_pb2, trace_pb2, training_pb2
from tests.helpers_gateway import post
from tests.stack import GatewayNode


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
