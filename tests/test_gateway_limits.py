"""One team cannot exhaust a gateway or its Redis: request sizes per service, calls in
flight per team, Redis failures as retryable errors, HTTP work off the event loop, and
HTTP parameters checked before anything uses them.

Real trainer, sampler, gateway and Redis throughout. Where a call must stay in flight, it
is held by something real the test controls: a Redis of the test's own, paused with
CLIENT PAUSE (writes wait until CLIENT UNPAUSE).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from headway.server.keys import create_key
from headway.tensors import to_tensor
from headway.v1 import common_pb2, model_pb2, sampling_pb2, trace_pb2, training_pb2
from tests.helpers_gateway import I32, code_of, post, sample_req
from tests.helpers_training import batch
from tests.stack import GatewayNode, PrivateRedis, free_port, http_call, wait_until

WAIT = 60.0  # only catches hangs: every wait below is for a condition


def a_turn(prompt: list[int]) -> common_pb2.Turn:
    return common_pb2.Turn(prompt_tokens=to_tensor(prompt, I32))


# ------------------------------------------------------------------ request sizes


def test_each_service_refuses_requests_over_its_own_size_limit(trainer_stack):
    """Sampling, trace and model requests have small limits, training the large one; a
    request over its service's limit is RESOURCE_EXHAUSTED naming the limit, before any
    parsing, routing or relaying (this gateway has no sampler: a Sample that got through
    would be UNAVAILABLE)."""
    limits = dict(
        max_sampling_request_bytes=4096,
        max_trace_request_bytes=4096,
        max_model_request_bytes=4096,
    )
    stack = trainer_stack
    node = GatewayNode(stack.config.store, stack.prefix, stack.server.address, **limits)
    try:
        big = list(range(1, 2000))  # 8 KB of int32 tokens
        calls = {
            "max_sampling_request_bytes": lambda: node.sampling.Sample(
                sampling_pb2.SampleRequest(model="tiny", prompt_tokens=to_tensor(big, I32))
            ),
            "max_trace_request_bytes": lambda: node.traces.RecordTurn(
                trace_pb2.RecordTurnRequest(model="tiny", turn=a_turn(big))
            ),
            "max_model_request_bytes": lambda: node.models.GetModel(
                model_pb2.GetModelRequest(model="m" * 8000)
            ),
        }
        for field, call in calls.items():
            code, details = code_of(call)
            assert code == "RESOURCE_EXHAUSTED", (field, details)
            assert field in details and "4096" in details
        # Training takes requests far larger than that (here it reaches the trainer, which
        # answers for its unknown model).
        request = training_pb2.ForwardBackwardRequest(
            model="nope", data=batch(), loss_fn="cross_entropy"
        )
        request.data.append(
            common_pb2.TrainingItem(trajectory=common_pb2.Trajectory(turns=[a_turn(big)]))
        )
        assert request.ByteSize() > 4096
        assert code_of(lambda: node.train.ForwardBackward(request))[0] == "NOT_FOUND"
        # Requests within the limits are served as before.
        assert node.traces.RecordTurn(
            trace_pb2.RecordTurnRequest(model="tiny", turn=a_turn([1, 2]))
        ).trace_id
    finally:
        node.stop()


# ---------------------------------------------------------------- calls per team


def test_a_team_at_its_call_limit_is_told_to_retry_while_another_team_is_served(
    trainer_stack, tmp_path
):
    """Team red fills its 2 slots with RecordTurn calls that wait on a paused Redis; its
    next call, gRPC or HTTP, is refused at once with a retry pushback (429 over HTTP),
    while team blue's calls are served; once Redis resumes, red's calls complete."""
    stack = trainer_stack
    red, blue = create_key(stack.config.store, "red"), create_key(stack.config.store, "blue")
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    node = GatewayNode(
        stack.config.store,
        stack.prefix,
        stack.server.address,
        redis_url=redis.url,
        auth=True,
        max_calls_per_team=2,
    )
    md = lambda key: [("authorization", f"Bearer {key}")]  # noqa: E731
    held = []
    try:
        redis.client.execute_command("CLIENT", "PAUSE", 600_000, "WRITE")
        request = trace_pb2.RecordTurnRequest(model="tiny", turn=a_turn([1, 2, 3]))
        held = [node.traces.RecordTurn.future(request, metadata=md(red)) for _ in range(2)]
        blocked = lambda: redis.client.info("clients")["blocked_clients"]  # noqa: E731
        wait_until(lambda: blocked() == 2, what="red's calls waiting on Redis")

        with pytest.raises(grpc.RpcError) as err:
            node.models.ListModels(model_pb2.ListModelsRequest(), metadata=md(red), timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_calls_per_team" in err.value.details()
        assert dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"]
        status, headers, body = http_call(
            f"{node.http_url}/models", None, {"Authorization": f"Bearer {red}"}
        )
        assert status == 429 and body["error"]["code"] == "overloaded"
        assert "retry-after" in {k.lower() for k in headers}

        listed = node.models.ListModels(
            model_pb2.ListModelsRequest(), metadata=md(blue), timeout=WAIT
        )
        assert [m.slug for m in listed.models] == ["tiny"]
        status, _, body = http_call(
            f"{node.http_url}/models", None, {"Authorization": f"Bearer {blue}"}
        )
        assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]

        redis.client.execute_command("CLIENT", "UNPAUSE")
        assert all(f.result(timeout=WAIT).trace_id for f in held)
        assert node.models.ListModels(model_pb2.ListModelsRequest(), metadata=md(red)).models
    finally:
        redis.client.execute_command("CLIENT", "UNPAUSE")
        for f in held:
            f.cancel()
        node.stop()
        redis.stop()


def test_every_kind_of_call_gives_its_slot_back(gateway_stack):
    """Unary and streamed, answered, failed or cancelled, gRPC or HTTP: each call frees
    its team's slot when it ends, so a team is never locked out by its own past calls."""
    import openai

    stack = gateway_stack
    node = GatewayNode(stack.config.store, stack.prefix, stack.server.address, max_calls_per_team=1)
    http = openai.OpenAI(base_url=node.http_url, api_key="local", max_retries=0)
    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)

    def cancelled_stream() -> None:
        stream = node.sampling.SampleStream(sample_req("tiny", max_tokens=50, ignore_eos=True))
        next(stream)
        stream.cancel()

    def http_error() -> None:
        with pytest.raises(openai.NotFoundError):
            http.chat.completions.create(**{**chat, "model": "nope"})

    calls = {
        "unary": lambda: node.sampling.Sample(sample_req("tiny", max_tokens=2)),
        "unary error": lambda: code_of(
            lambda: node.models.GetModel(model_pb2.GetModelRequest(model="nope"))
        ),
        "stream": lambda: list(node.sampling.SampleStream(sample_req("tiny", max_tokens=3))),
        "cancelled stream": cancelled_stream,
        "http": lambda: http.chat.completions.create(**chat),
        "http stream": lambda: list(http.chat.completions.create(**chat, stream=True)),
        "http error": http_error,
    }
    try:
        for what, call in calls.items():
            call()
            wait_until(lambda: node.gateway.slots.in_flight("") == 0, what=f"the slot of {what}")
        assert node.sampling.Sample(sample_req("tiny", max_tokens=2)).checkpoint
    finally:
        http.close()
        node.stop()


# ------------------------------------------------------------------ Redis failures


def test_redis_down_is_unavailable_on_grpc_and_503_on_http(trainer_stack, tmp_path):
    """With the gateway's Redis stopped, a trace call is UNAVAILABLE and a recording HTTP
    call 503 (both retryable), with a message that says Redis is unavailable."""
    stack = trainer_stack
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    node = GatewayNode(stack.config.store, stack.prefix, stack.server.address, redis_url=redis.url)
    try:
        trace_id = node.traces.RecordTurn(
            trace_pb2.RecordTurnRequest(model="tiny", turn=a_turn([1, 2]))
        ).trace_id
        redis.stop()
        code, details = code_of(
            lambda: node.traces.GetTrace(trace_pb2.GetTraceRequest(trace_id=trace_id))
        )
        assert code == "UNAVAILABLE" and "Redis unavailable" in details
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "what is 1 plus 2?"}],
            "max_tokens": 2,
            "return_token_ids": True,
        }
        status, reply = post(
            f"{node.http_url}/chat/completions",
            json.dumps(body).encode(),
            {"Idempotency-Key": "k-1"},
        )
        assert status == 503, reply
        assert reply["error"]["status"] == "UNAVAILABLE"
        assert "Redis unavailable" in reply["error"]["message"]
        # Both counted where an operator sees them (headway_gateway_redis_errors_total).
        registry = node.process.metrics.registry
        failed = registry.get_sample_value("headway_gateway_redis_errors_total", {"where": "call"})
        assert failed == 2
    finally:
        node.stop()
        redis.stop()


def test_a_full_redis_refuses_writes_as_unavailable_and_still_serves_reads(trainer_stack, tmp_path):
    """Under maxmemory-policy noeviction (the recommended policy), a full Redis refuses
    writes with OOM: a RecordTurn is UNAVAILABLE (retryable), and traces already stored
    are still read."""
    stack = trainer_stack
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    node = GatewayNode(stack.config.store, stack.prefix, stack.server.address, redis_url=redis.url)
    try:
        request = trace_pb2.RecordTurnRequest(model="tiny", turn=a_turn([1, 2]))
        trace_id = node.traces.RecordTurn(request).trace_id
        redis.client.config_set("maxmemory-policy", "noeviction")
        redis.client.config_set("maxmemory", 1)
        code, details = code_of(lambda: node.traces.RecordTurn(request))
        assert code == "UNAVAILABLE" and "maxmemory" in details
        trace = node.traces.GetTrace(trace_pb2.GetTraceRequest(trace_id=trace_id))
        assert len(trace.turns) == 1
    finally:
        node.stop()
        redis.stop()


# -------------------------------------------------------------- off the event loop


MARKER = "hold-me-7f3a"


@pytest.mark.parametrize("stage", ["parse", "render"])
def test_http_work_in_progress_does_not_stop_grpc_from_answering(gateway_stack, monkeypatch, stage):
    """While an HTTP request's body is being parsed (or its chat template rendered), held
    on an event the test controls, the gateway still answers gRPC calls: that work is not
    on the event loop that serves them. The hold wraps the real function, in process (the
    only way to keep one in progress deterministically)."""
    import headway.modeling.tokenizer

    started, release = threading.Event(), threading.Event()

    def hold(real: Callable[..., Any], position: int) -> Callable[..., Any]:
        def held(*args: Any, **kwargs: Any) -> Any:
            value = args[position]
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if MARKER in text:
                started.set()
                release.wait(WAIT)
            return real(*args, **kwargs)

        return held

    if stage == "parse":
        monkeypatch.setattr(json, "loads", hold(json.loads, 0))
    else:
        cls = headway.modeling.tokenizer.Tokenizer
        monkeypatch.setattr(cls, "render_chat", hold(cls.render_chat, 1))
    g = gateway_stack.gateway
    body = {"model": "tiny", "messages": [{"role": "user", "content": MARKER}], "max_tokens": 2}
    answers: list[tuple[int, dict]] = []
    client = threading.Thread(
        target=lambda: answers.append(
            post(f"{g.http_url}/chat/completions", json.dumps(body).encode())
        )
    )
    client.start()
    try:
        assert started.wait(WAIT), "the HTTP request never reached the held stage"
        trace_id = g.traces.RecordTurn(
            trace_pb2.RecordTurnRequest(model="tiny", turn=a_turn([1, 2])), timeout=WAIT
        ).trace_id
        assert g.traces.GetTrace(trace_pb2.GetTraceRequest(trace_id=trace_id), timeout=WAIT)
    finally:
        release.set()
        client.join(WAIT)
    assert answers and answers[0][0] == 200, answers


# ---------------------------------------------------------------- HTTP parameters

BAD_BODIES: list[tuple[str, bytes | dict, str | None]] = [
    # (what, body, the param the error must name)
    ("infinite max_tokens", b'{"max_tokens": Infinity}', None),
    ("NaN temperature", b'{"temperature": NaN}', None),
    ("a number too large for a float", b'{"temperature": 1e999}', None),
    ("fractional max_tokens", {"max_tokens": 2.5}, "max_tokens"),
    ("boolean max_tokens", {"max_tokens": True}, "max_tokens"),
    ("max_tokens over int32", {"max_tokens": 2**40}, "max_tokens"),
    ("negative n", {"n": -1}, "n"),
    ("string seed", {"seed": "x"}, "seed"),
    ("string temperature", {"temperature": "hot"}, "temperature"),
    ("numeric stop", {"stop": 7}, "stop"),
    ("stop list with a number", {"stop": ["a", 7]}, "stop"),
    ("numeric trace_id", {"trace_id": 5, "return_token_ids": True}, "trace_id"),
    ("string return_token_ids", {"return_token_ids": "yes"}, "return_token_ids"),
    ("numeric checkpoint", {"checkpoint": 5}, "checkpoint"),
    ("numeric role", {"messages": [{"role": 5, "content": "x"}]}, "messages"),
    ("numeric content", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    (
        "content part with numeric text",
        {"messages": [{"role": "user", "content": [{"text": 1}]}]},
        "messages",
    ),
    ("message that is a string", {"messages": ["hi"]}, "messages"),
    ("token ids over int32", {"prompt_token_ids": [1, 2**40]}, "prompt_token_ids"),
    ("boolean token ids", {"prompt_token_ids": [True, 2]}, "prompt_token_ids"),
    ("deeply nested body", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
]


def test_bad_http_parameters_are_400_naming_them_never_500(gateway_stack):
    g = gateway_stack.gateway
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    wrong = []
    for what, body, param in BAD_BODIES:
        if isinstance(body, bytes):  # raw JSON: merged into a valid body by hand
            raw = json.dumps(base).encode()[:-1] + b", " + body[1:]
        else:
            raw = json.dumps({**base, **body}).encode()
        status, _, reply = http_call(f"{g.http_url}/chat/completions", raw)
        error = reply.get("error", {})
        if status != 400 or error.get("param") != param or not error.get("message"):
            wrong.append((what, status, error))
    assert not wrong, wrong


def test_prompt_text_that_cannot_fit_the_context_is_refused_before_tokenizing(gateway_stack):
    g = gateway_stack.gateway
    body = {"model": "tiny", "prompt": "what is 1 plus 2? " * 20_000, "max_tokens": 2}
    status, reply = post(f"{g.http_url}/completions", json.dumps(body).encode())
    assert status == 400 and reply["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert "characters" in reply["error"]["message"]


# ------------------------------------------------------------- stored replies, workers


def test_a_reply_too_large_to_keep_is_answered_and_its_retry_names_its_trace(gateway_stack):
    """Never replayed, never run twice: the retry is told the reply was not kept and where
    its turn was recorded."""
    stack = gateway_stack
    node = GatewayNode(
        stack.config.store, stack.prefix, stack.server.address, max_stored_reply_bytes=100
    )
    try:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "what is 1 plus 2?"}],
            "max_tokens": 3,
            "return_token_ids": True,
        }
        url, raw = f"{node.http_url}/chat/completions", json.dumps(body).encode()
        status, first = post(url, raw, {"Idempotency-Key": "big-1"})
        assert status == 200 and first["trace_id"]
        status, again = post(url, raw, {"Idempotency-Key": "big-1"})
        assert status == 400 and again["error"]["status"] == "FAILED_PRECONDITION"
        assert first["trace_id"] in again["error"]["message"]
        assert "max_stored_reply_bytes" in again["error"]["message"]
        trace = node.traces.GetTrace(trace_pb2.GetTraceRequest(trace_id=first["trace_id"]))
        assert len(trace.turns) == 1
    finally:
        node.stop()


def test_stored_replies_count_toward_the_team_quota_and_one_over_it_is_not_kept():
    import asyncio

    import redis.asyncio as aioredis

    from gateway.quota import OVERHEAD, TeamQuota
    from gateway.replies import DEFAULT_TTL_SECONDS, ReplyCache
    from headway.errors import FailedPrecondition
    from tests.stack import REDIS_URL, clear_prefix, redis_prefix

    prefix = redis_prefix()

    async def scenario() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        quota = TeamQuota.for_retention(prefix, 1000, DEFAULT_TTL_SECONDS)
        cache = ReplyCache(client, prefix, quota=quota)
        try:
            small = json.dumps({"choices": [{"trace_id": "tr-a"}]}).encode()
            assert await cache.claim("red", "k-1", "d1") is None
            assert await cache.store("red", "k-1", "d1", small, ["tr-a"])
            assert await cache.claim("red", "k-1", "d1") == small  # the exact bytes
            used = await quota.used(client, "red")
            assert used >= len(small) + OVERHEAD
            big = json.dumps({"choices": [{"text": "x" * 2000}]}).encode()
            assert await cache.claim("red", "k-2", "d2") is None
            assert not await cache.store("red", "k-2", "d2", big, ["tr-b"])
            with pytest.raises(FailedPrecondition) as err:
                await cache.claim("red", "k-2", "d2")
            assert "max_team_redis_bytes" in err.value.message and "tr-b" in err.value.message
            assert used < await quota.used(client, "red") < used + len(big)  # the note only
        finally:
            await client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        clear_prefix(prefix)


def test_tinker_results_count_toward_the_team_quota_and_only_that_team_waits():
    """A Tinker future's stored result counts in its team's bytes: over the cap, the team's
    next operation is refused (the stored result still answers its retrieve), while
    another team's operations go on."""
    import asyncio

    import redis.asyncio as aioredis

    from gateway.quota import OVERHEAD, TeamQuota
    from gateway.tinker_state import KEEP_SECONDS, SMALL_RESULT, Result, TinkerState
    from headway.errors import ResourceExhausted
    from tests.stack import REDIS_URL, clear_prefix, redis_prefix

    prefix = redis_prefix()
    big = {"loss": "x" * 2000}

    async def scenario() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        quota = TeamQuota.for_retention(prefix, 1000, KEEP_SECONDS)
        state = TinkerState(client, prefix, max_pending=0, quota=quota)

        async def work() -> Result:
            return Result(big)

        try:
            rid = await state.submit("red", work, lambda e: Result({"error": str(e)}))
            got = await state.retrieve(rid, "red")
            assert got is not None and len(got.encode()) > 2000
            assert await quota.used(client, "red") >= len(got.encode()) + OVERHEAD
            with pytest.raises(ResourceExhausted) as err:
                await state.submit("red", work, lambda e: Result({"error": str(e)}))
            assert "max_team_redis_bytes" in err.value.message
            assert (await state.retrieve(rid, "red")).encode() == got.encode()  # still there
            other = await state.submit("blue", work, lambda e: Result({"error": str(e)}))
            assert (await state.retrieve(other, "blue")).encode() == got.encode()
            # A retried seq_id gets its first submission's id, though that one's result
            # took the team over the cap; a new operation does not start.
            first = await state.submit("yellow", work, lambda e: Result({}), "run-y", 1)
            await state.retrieve(first, "yellow")
            assert await state.submit("yellow", work, lambda e: Result({}), "run-y", 1) == first
            with pytest.raises(ResourceExhausted):
                await state.submit("yellow", work, lambda e: Result({}), "run-y", 2)
        finally:
            await client.aclose()

    async def huge() -> None:
        # A result larger than SMALL_RESULT that would pass the cap is kept as its error.
        client = aioredis.Redis.from_url(REDIS_URL)
        quota = TeamQuota.for_retention(prefix, 4 * SMALL_RESULT, KEEP_SECONDS)
        state = TinkerState(client, prefix, max_pending=0, quota=quota)

        async def work() -> Result:
            return Result({"loss": "x" * (8 * SMALL_RESULT)})

        try:
            rid = await state.submit("green", work, lambda e: Result({"error": str(e)}))
            kept = (await state.retrieve(rid, "green")).encode()
            assert b"max_team_redis_bytes" in kept and len(kept) < SMALL_RESULT
            assert await quota.used(client, "green") < quota.cap
        finally:
            await client.aclose()

    try:
        asyncio.run(scenario())
        asyncio.run(huge())
    finally:
        clear_prefix(prefix)


def test_a_team_uses_at_most_half_the_worker_threads():
    """Red's held jobs take its half of a 2-thread pool; blue's job still runs at once, and
    red's next job waits for red's share, not for a thread."""
    import asyncio

    from gateway.workers import Workers

    workers = Workers(2)
    release, started = threading.Event(), []

    def held(i: int) -> int:
        started.append(i)
        release.wait(WAIT)
        return i

    async def scenario() -> None:
        red = [asyncio.ensure_future(workers.run("red", held, i)) for i in range(2)]
        while not started:
            await asyncio.sleep(0.01)
        assert await asyncio.wait_for(workers.run("blue", str.upper, "blue"), WAIT) == "BLUE"
        assert started == [0]
        release.set()
        assert await asyncio.gather(*red) == [0, 1]

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        workers.close()


def test_a_tinker_operation_whose_gateway_stopped_is_given_up_and_the_run_goes_on(monkeypatch):
    """Gateway A runs a run's operation and stops (its task gone, as with a killed
    process: no result, no lease renewal); gateway B holds the run's next operation behind
    it. When A's lease lapses, B answers A's future with a server error that says so (a
    poller does not wait for ever) and runs its own operation."""
    import asyncio

    import redis.asyncio as aioredis

    from gateway import tinker_state
    from gateway.tinker_state import Result, TinkerState
    from tests.stack import REDIS_URL, clear_prefix, redis_prefix

    monkeypatch.setattr(tinker_state, "LEASE_SECONDS", 1)
    prefix = redis_prefix()

    def failed(e: BaseException) -> Result:
        return Result({"error": str(e), "category": "server"})

    async def scenario() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        a, b = TinkerState(client, prefix, 0), TinkerState(client, prefix, 0)
        started = asyncio.Event()

        async def hangs() -> Result:
            started.set()
            await asyncio.Event().wait()  # never
            return Result({})

        async def second() -> Result:
            return Result({"ran": True})

        try:
            first = await a.submit("red", hangs, failed, run="run-1", seq=1)
            await started.wait()
            then = await b.submit("red", second, failed, run="run-1", seq=2)
            a.local[first].cancel()  # gateway A stops
            lost = None
            while lost is None:  # each retrieve holds up to POLL_SECONDS
                lost = await b.retrieve(first, "red")
            assert "stopped before it finished" in lost.encode().decode()
            got = None
            while got is None:
                got = await b.retrieve(then, "red")
            assert got.encode() == Result({"ran": True}).encode()
        finally:
            await client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        clear_prefix(prefix)
