"""TraceService end to end: a real gRPC server on a loopback port, the real Redis.

Each server uses its own key prefix; every key under it is deleted at the end. The team
comes from the `x-headway-team` metadata (what the gateway sets after authentication) and
the visible models are a fixed set.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from gateway.trace_service import TraceServicer
from gateway.traces import TraceStore
from headway.channels import CHANNEL_OPTIONS
from headway.errors import FailedPrecondition, NotFound
from headway.server.grpc import team_of
from headway.tensors import to_tensor
from headway.v1 import common_pb2, trace_pb2, trace_pb2_grpc
from tests.stack import REDIS_URL, ServerThread, redis_prefix, team_md, wait_until

MODELS = {"alpha", "beta"}


async def _team(context: grpc.aio.ServicerContext) -> str:
    return team_of(context)


async def _model_visible(model: str, team: str) -> None:
    if model not in MODELS:
        raise NotFound(f"model '{model}' not found")


class TraceServer:
    """A TraceService server over Redis with its own prefix, plus a stub and a sync client."""

    def __init__(self, retention_seconds: float = 3600, **limits: Any) -> None:
        self.prefix = redis_prefix()

        async def start() -> tuple[grpc.aio.Server, int, TraceStore]:
            client = aioredis.from_url(REDIS_URL)
            store = TraceStore(client, self.prefix, retention_seconds, **limits)
            server = grpc.aio.server(options=CHANNEL_OPTIONS)
            trace_pb2_grpc.add_TraceServiceServicer_to_server(
                TraceServicer(store, _team, _model_visible), server
            )
            port = server.add_insecure_port("127.0.0.1:0")
            return server, port, store

        self.server = ServerThread(start)
        self.store: TraceStore = self.server.payload
        self.channel = self.server.channel()
        self.stub = trace_pb2_grpc.TraceServiceStub(self.channel)
        self.redis = redis.Redis.from_url(REDIS_URL)

    def keys(self) -> list[bytes]:
        return sorted(self.redis.scan_iter(match=self.prefix + "*"))

    def record(self, turn: common_pb2.Turn, team: str = "red", **fields: str) -> Any:
        fields.setdefault("model", "alpha")
        req = trace_pb2.RecordTurnRequest(turn=turn, **fields)
        return self.stub.RecordTurn(req, metadata=team_md(team))

    def get(self, trace_id: str, team: str = "red") -> trace_pb2.Trace:
        return self.stub.GetTrace(
            trace_pb2.GetTraceRequest(trace_id=trace_id), metadata=team_md(team)
        )

    def set_reward(self, trace_id: str, reward: float, team: str = "red") -> trace_pb2.Trace:
        req = trace_pb2.SetRewardRequest(trace_id=trace_id, reward=reward)
        return self.stub.SetReward(req, metadata=team_md(team))

    def stop(self) -> None:
        self.channel.close()
        self.server.run(self.store.redis.aclose())
        self.server.stop()
        keys = self.keys()
        if keys:
            self.redis.delete(*keys)
        self.redis.close()


@pytest.fixture(scope="module")
def svc() -> Iterator[TraceServer]:
    server = TraceServer()
    yield server
    server.stop()


def turn(
    prompt: list[int], completion: list[int], logprobs: list[float], checkpoint: str = "ck-1"
) -> common_pb2.Turn:
    return common_pb2.Turn(
        prompt_tokens=to_tensor(np.asarray(prompt, dtype=np.int32)),
        completion_tokens=to_tensor(np.asarray(completion, dtype=np.int64)),
        completion_logprobs=to_tensor(np.asarray(logprobs, dtype=np.float32)),
        checkpoint=checkpoint,
    )


def status(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def unknown_id() -> str:
    return f"tr-{secrets.token_hex(12)}"


TURN_1 = turn([1, 2, 3], [4, 5], [-0.25, -1.5])
TURN_2 = turn([1, 2, 3, 4, 5, 6], [7, 8, 9], [-0.125, -2.0, -3.1415927], checkpoint="ck-2")


def test_record_two_turns_then_get_returns_them_in_order_bytes_exact(svc: TraceServer) -> None:
    first = svc.record(TURN_1)
    assert first.trace_id.startswith("tr-") and len(first.trace_id) == 27
    assert first.turn_index == 0
    second = svc.record(TURN_2, trace_id=first.trace_id, model="")
    assert (second.trace_id, second.turn_index) == (first.trace_id, 1)

    trace = svc.get(first.trace_id)
    assert trace.trace_id == first.trace_id and trace.model == "alpha"
    assert list(trace.turns) == [TURN_1, TURN_2]
    for got, sent in zip(trace.turns, (TURN_1, TURN_2), strict=True):
        for name in ("prompt_tokens", "completion_tokens", "completion_logprobs"):
            assert getattr(got, name).data == getattr(sent, name).data
            assert getattr(got, name).dtype == getattr(sent, name).dtype
    assert not trace.has_reward and trace.reward == 0
    lifetime = trace.expires.ToMilliseconds() - trace.created.ToMilliseconds()
    assert lifetime == 3600 * 1000
    assert abs(trace.created.ToMilliseconds() / 1000 - time.time()) < 60


def test_set_reward_shows_in_get_and_trajectory_and_replaces(svc: TraceServer) -> None:
    trace_id = svc.record(TURN_1).trace_id
    svc.record(TURN_2, trace_id=trace_id)
    reply = svc.set_reward(trace_id, 0.75)
    assert reply.has_reward and reply.reward == 0.75 and list(reply.turns) == [TURN_1, TURN_2]
    assert svc.set_reward(trace_id, -1.5).reward == -1.5

    trace = svc.get(trace_id)
    assert trace.has_reward and trace.reward == -1.5
    traj = svc.server.run(svc.store.trajectory(trace_id, "red"))
    assert traj == common_pb2.Trajectory(turns=[TURN_1, TURN_2], reward=-1.5, trace_id=trace_id)


def test_zero_reward_is_a_reward(svc: TraceServer) -> None:
    trace_id = svc.record(TURN_1).trace_id
    assert svc.set_reward(trace_id, 0.0).has_reward
    assert svc.server.run(svc.store.trajectory(trace_id, "red")).reward == 0.0


def test_trajectory_without_reward_is_failed_precondition(svc: TraceServer) -> None:
    trace_id = svc.record(TURN_1).trace_id
    with pytest.raises(FailedPrecondition, match="has no reward yet: attach one with SetReward"):
        svc.server.run(svc.store.trajectory(trace_id, "red"))
    assert FailedPrecondition.code == "FAILED_PRECONDITION"


def test_trajectory_of_unknown_or_other_team_is_not_found(svc: TraceServer) -> None:
    trace_id = svc.record(TURN_1).trace_id
    svc.set_reward(trace_id, 1.0)
    for tid, team in ((trace_id, "blue"), (unknown_id(), "red")):
        with pytest.raises(NotFound, match="not found"):
            svc.server.run(svc.store.trajectory(tid, team))


def test_other_team_gets_not_found_like_an_unknown_trace(svc: TraceServer) -> None:
    trace_id = svc.record(TURN_1, team="red").trace_id
    svc.set_reward(trace_id, 2.0, team="red")
    missing = unknown_id()
    calls = {
        "GetTrace": lambda tid: svc.get(tid, team="blue"),
        "SetReward": lambda tid: svc.set_reward(tid, 5.0, team="blue"),
        "RecordTurn": lambda tid: svc.record(TURN_2, team="blue", trace_id=tid),
    }
    for name, call in calls.items():
        theirs = status(lambda call=call: call(trace_id))
        unknown = status(lambda call=call: call(missing))
        assert theirs.code() == unknown.code() == grpc.StatusCode.NOT_FOUND, name
        assert f"trace '{trace_id}' not found" in theirs.details(), name
        assert theirs.details().replace(trace_id, missing) == unknown.details(), name
    # Nothing of the other team's calls reached red's trace.
    trace = svc.get(trace_id, team="red")
    assert list(trace.turns) == [TURN_1] and trace.reward == 2.0


def test_malformed_trace_id_is_not_found(svc: TraceServer) -> None:
    for tid in ("nope", "tr-123", f"{unknown_id()}:turns"):
        assert status(lambda tid=tid: svc.get(tid)).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_retention_expires_the_trace_and_every_key() -> None:
    """A trace of a 1 s retention is gone once Redis has expired it, every key at once (the
    keys share one deadline: see the next test). Checked only after the expiry: before it,
    what a test sees depends on how fast it runs."""
    short = TraceServer(retention_seconds=1)
    try:
        trace_id = short.record(TURN_1).trace_id

        def expired() -> bool:
            try:
                short.get(trace_id)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
                return True
            return False

        wait_until(expired, what="the trace to expire", interval=0.1)
        err = status(lambda: short.record(TURN_2, trace_id=trace_id))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        # Nothing is left, the team's byte count included (it lapses within a bucket width).
        wait_until(lambda: short.keys() == [], what="every key of the trace to lapse")
    finally:
        short.stop()


def test_appending_keeps_the_deadline_fixed_from_creation(svc: TraceServer) -> None:
    trace_id = svc.record(TURN_1).trace_id
    deadline = svc.redis.pexpiretime(svc.store.key(trace_id))
    assert deadline - svc.get(trace_id).created.ToMilliseconds() == 3600 * 1000
    # Let the clock move past a millisecond tick: a deadline recomputed from now would differ.
    wait_until(lambda: time.time() * 1000 >= deadline - 3600 * 1000 + 2, what="2 ms to pass")
    svc.record(TURN_2, trace_id=trace_id)
    svc.set_reward(trace_id, 1.0)
    for key in (svc.store.key(trace_id), svc.store.turns_key(trace_id)):
        assert svc.redis.pexpiretime(key) == deadline
    assert svc.get(trace_id).expires.ToMilliseconds() == deadline


def _bad_turns() -> dict[str, tuple[common_pb2.Turn, str]]:
    mismatch = turn([1, 2], [3, 4, 5, 6], [-1.0, -1.0, -1.0])
    nan = turn([1, 2], [3, 4], [-1.0, math.nan])
    empty_prompt = turn([], [3], [-1.0])
    float_tokens = turn([1, 2], [3], [-1.0])
    float_tokens.prompt_tokens.CopyFrom(to_tensor(np.asarray([1.0, 2.0], dtype=np.float32)))
    no_logprobs = turn([1, 2], [3], [-1.0])
    no_logprobs.ClearField("completion_logprobs")
    return {
        "mismatch": (
            mismatch,
            "turn.completion_logprobs has 3 values but turn.completion_tokens has 4",
        ),
        "nan": (nan, "turn.completion_logprobs: NaN at position 1"),
        "empty prompt": (empty_prompt, "turn.prompt_tokens is empty"),
        "float tokens": (float_tokens, "turn.prompt_tokens: token ids must be DTYPE_INT32"),
        "no logprobs": (no_logprobs, "turn.completion_logprobs is required"),
        "no prompt": (common_pb2.Turn(), "turn.prompt_tokens is required"),
    }


def test_invalid_turn_is_invalid_argument_and_records_nothing(svc: TraceServer) -> None:
    trace_id = svc.record(TURN_1).trace_id
    before = svc.keys()
    for name, (bad, message) in _bad_turns().items():
        for fields in ({}, {"trace_id": trace_id}):
            err = status(lambda bad=bad, fields=fields: svc.record(bad, **fields))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, fields)
            assert message in err.details(), (name, err.details())
    assert svc.keys() == before
    assert list(svc.get(trace_id).turns) == [TURN_1]


def test_missing_turn_is_invalid_argument(svc: TraceServer) -> None:
    req = trace_pb2.RecordTurnRequest(model="alpha")
    err = status(lambda: svc.stub.RecordTurn(req, metadata=team_md("red")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "turn is required" in err.details()


def test_completion_may_be_empty_or_absent(svc: TraceServer) -> None:
    empty = turn([1, 2], [], [])
    absent = common_pb2.Turn(prompt_tokens=to_tensor(np.asarray([5], dtype=np.int64)))
    trace_id = svc.record(empty).trace_id
    assert svc.record(absent, trace_id=trace_id).turn_index == 1
    assert list(svc.get(trace_id).turns) == [empty, absent]


def test_retried_record_with_same_request_id_appends_once(svc: TraceServer) -> None:
    first = svc.record(TURN_1, request_id="req-a")
    again = svc.record(TURN_1, request_id="req-a")
    assert (again.trace_id, again.turn_index) == (first.trace_id, 0)

    appended = svc.record(TURN_2, trace_id=first.trace_id, request_id="req-b")
    retried = svc.record(TURN_2, trace_id=first.trace_id, request_id="req-b")
    assert (
        (retried.trace_id, retried.turn_index)
        == (first.trace_id, 1)
        == (
            appended.trace_id,
            appended.turn_index,
        )
    )
    assert list(svc.get(first.trace_id).turns) == [TURN_1, TURN_2]

    # The key is the caller's: another team reusing the id starts its own trace.
    blue = svc.record(TURN_1, team="blue", request_id="req-a")
    assert blue.trace_id != first.trace_id


def test_request_id_key_expires_with_the_trace(svc: TraceServer) -> None:
    trace_id = svc.record(TURN_1, request_id="req-ttl").trace_id
    key = svc.store.request_key("red", "", "req-ttl")
    assert svc.redis.pexpiretime(key) == svc.redis.pexpiretime(svc.store.key(trace_id))


def test_unknown_model_is_not_found_and_empty_model_invalid(svc: TraceServer) -> None:
    before = svc.keys()
    err = status(lambda: svc.record(TURN_1, model="gamma"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "model 'gamma'" in err.details()
    err = status(lambda: svc.record(TURN_1, model=""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "model is empty" in err.details()
    assert svc.keys() == before


def test_other_model_than_the_traces_is_invalid_argument(svc: TraceServer) -> None:
    trace_id = svc.record(TURN_1, model="alpha").trace_id
    err = status(lambda: svc.record(TURN_2, trace_id=trace_id, model="beta"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'beta' is not the model of trace" in err.details() and "'alpha'" in err.details()
    assert svc.record(TURN_2, trace_id=trace_id, model="alpha").turn_index == 1


def test_non_finite_reward_is_invalid_argument(svc: TraceServer) -> None:
    trace_id = svc.record(TURN_1).trace_id
    for reward in (math.nan, math.inf, -math.inf):
        err = status(lambda reward=reward: svc.set_reward(trace_id, reward))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must be finite" in err.details()
    assert not svc.get(trace_id).has_reward


def test_empty_trace_id_is_invalid_argument(svc: TraceServer) -> None:
    for call in (lambda: svc.get(""), lambda: svc.set_reward("", 1.0)):
        err = status(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "trace_id is empty" in err.details()


# ----------------------------------------------------------------------------- caps


def used_bytes(server: TraceServer, team: str = "red") -> int:
    return server.server.run(server.store.quota.used(server.store.redis, team))


def test_a_turn_over_max_turn_bytes_is_resource_exhausted_and_records_nothing() -> None:
    small = TraceServer(max_turn_bytes=200)
    try:
        big = turn(list(range(1, 60)), [4, 5], [-0.25, -1.5])
        assert len(big.SerializeToString()) > 200
        err = status(lambda: small.record(big))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_turn_bytes" in err.details() and "200" in err.details()
        assert small.keys() == []
        assert small.record(TURN_1).turn_index == 0  # a turn within the limit is recorded
    finally:
        small.stop()


def test_a_trace_at_max_turns_refuses_the_next_turn_and_keeps_its_turns() -> None:
    short = TraceServer(max_turns=3)
    try:
        trace_id = short.record(TURN_1).trace_id
        for _ in range(2):
            short.record(TURN_2, trace_id=trace_id)
        err = status(lambda: short.record(TURN_2, trace_id=trace_id))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_trace_turns" in err.details() and "new trace" in err.details()
        assert len(short.get(trace_id).turns) == 3
        assert short.record(TURN_2).turn_index == 0  # a new trace starts afresh
    finally:
        short.stop()


def test_a_team_over_its_redis_bytes_is_refused_while_other_teams_record() -> None:
    from gateway.quota import OVERHEAD, TeamQuota

    size = len(TURN_1.SerializeToString()) + OVERHEAD
    capped = TraceServer()
    try:
        capped.store.quota = TeamQuota.for_retention(capped.prefix, 2 * size, 3600)
        trace_id = capped.record(TURN_1).trace_id
        capped.record(TURN_1, trace_id=trace_id)
        assert used_bytes(capped) == 2 * size
        before = capped.keys()
        for call in (
            lambda: capped.record(TURN_1, trace_id=trace_id),  # appending
            lambda: capped.record(TURN_1),  # starting a new trace
        ):
            err = status(call)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_team_redis_bytes" in err.details()
        assert capped.keys() == before and len(capped.get(trace_id).turns) == 2
        # Another team has its own count.
        assert capped.record(TURN_1, team="blue").turn_index == 0
        assert used_bytes(capped, "blue") == size
    finally:
        capped.stop()


def test_a_teams_bytes_stop_counting_once_its_traces_expire() -> None:
    """The count is kept in buckets by expiry time: after the trace and its bucket expire,
    the team can record again (waits on the condition, whatever the machine's speed)."""
    from gateway.quota import OVERHEAD, TeamQuota

    size = len(TURN_1.SerializeToString()) + OVERHEAD
    short = TraceServer(retention_seconds=1)
    try:
        short.store.quota = TeamQuota.for_retention(short.prefix, size, 1)
        short.record(TURN_1)
        wait_until(lambda: used_bytes(short) == 0, what="the team's bytes to stop counting")
        assert short.record(TURN_1).turn_index == 0
    finally:
        short.stop()
