"""Property-based fuzzing of what clients send: tensors, training batches, HTTP bodies and
raw gRPC messages. No input may produce anything but a valid result or a precise error:
never another exception, an UNKNOWN / INTERNAL status, a 500, or a dead server.

Bounded in examples and derandomized (the same examples on every run, so CI is
reproducible). The pure parts run in-process; the live parts post to real servers (a
trainer, a sampler and a gateway on loopback, real Redis), with a tiny context and few
rows so that any request the fuzzer gets accepted costs little.
"""

from __future__ import annotations

import http.client
import json
import math
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from headway.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from headway.tensors import declared_size, floats, from_tensor, to_tensor, tokens
from headway.v1 import common_pb2, model_pb2, sampling_pb2, trace_pb2, training_pb2
from tests.conftest import VOCAB
from trainer_svc.batches import BatchLimits, assemble, check_size
from trainer_svc.datums import assemble_batch, declared_lengths

WAIT = 120.0  # only catches hangs
# derandomize: the same examples on every run; no database: none replayed from earlier runs.
PURE = settings(max_examples=300, deadline=None, derandomize=True, database=None)
LIVE = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WIRE = [d for d in common_pb2.DType.values() if d != common_pb2.DTYPE_UNSPECIFIED]
ITEMSIZE = {1: 4, 2: 8, 3: 2, 4: 2, 5: 4, 6: 8, 7: 1}

# ------------------------------------------------------------------------- tensors

huge = st.integers(-(2**63), 2**63 - 1)
dims = st.lists(st.integers(-2, 6) | huge, max_size=4) | st.lists(
    st.integers(0, 1), min_size=60, max_size=70
)
any_tensor = st.builds(
    common_pb2.Tensor,
    data=st.binary(max_size=48),
    dtype=st.integers(-2, 9) | st.integers(-(2**31), 2**31 - 1),
    shape=dims,
)


@st.composite
def consistent_tensor(draw: Any) -> common_pb2.Tensor:
    """A tensor whose bytes match its shape, any known dtype: reaches the decoding."""
    dtype = draw(st.sampled_from(WIRE))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    size = math.prod(shape) * ITEMSIZE[dtype]
    data = draw(st.binary(min_size=size, max_size=size))
    return common_pb2.Tensor(data=data, dtype=dtype, shape=shape)


def packed(values: Any, dtypes: list[int]) -> st.SearchStrategy[common_pb2.Tensor]:
    """Well-formed 1-D tensors of `values`, in one of `dtypes`."""

    def pack(vals: list, dtype: int) -> common_pb2.Tensor:
        with np.errstate(over="ignore", invalid="ignore"):
            return to_tensor(np.asarray(vals, dtype=np.float64), dtype)

    return st.builds(pack, st.lists(values, max_size=7), st.sampled_from(dtypes))


token_ids = st.integers(-2, VOCAB + 3)
token_tensor = st.one_of(
    st.builds(
        lambda vals, dtype: to_tensor(np.asarray(vals, dtype=np.int64), dtype),
        st.lists(token_ids, max_size=7),
        st.sampled_from([common_pb2.DTYPE_INT32, common_pb2.DTYPE_INT64]),
    ),
    any_tensor,
    consistent_tensor(),
)
float_tensor = st.one_of(
    packed(
        st.floats(allow_nan=True, allow_infinity=True, width=32) | st.just(-1.0),
        [common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_FLOAT64, common_pb2.DTYPE_BFLOAT16],
    ),
    any_tensor,
    consistent_tensor(),
)
tensor = st.one_of(any_tensor, consistent_tensor(), token_tensor, float_tensor)
# Shapes numpy itself cannot hold, whatever the bytes: more dimensions than it supports,
# or no elements but dimensions whose product overflows.
I32_ = common_pb2.DTYPE_INT32
EDGES = [
    common_pb2.Tensor(dtype=I32_, shape=[1] * 70, data=b"\0" * 4),
    common_pb2.Tensor(dtype=I32_, shape=[0] * 70),
    common_pb2.Tensor(dtype=I32_, shape=[0, 2**62]),
    common_pb2.Tensor(dtype=common_pb2.DTYPE_BOOL, shape=[2**40, 2**40, 0]),
]


def edges(test: Any) -> Any:
    """`test` with the EDGES tried first, on every run."""
    for t in EDGES:
        test = example(t)(test)
    return test


@PURE
@edges
@given(tensor)
def test_decoding_any_tensor_gives_its_array_or_invalid_argument(t: common_pb2.Tensor) -> None:
    assert declared_size(t) >= 0  # never raises: limits are checked with it first
    try:
        array = from_tensor(t, "x")
    except InvalidArgument as e:
        assert e.message.startswith("x: ")
    else:
        assert list(array.shape) == list(t.shape)


@PURE
@edges
@given(tensor)
def test_decoding_token_ids_gives_valid_ids_or_invalid_argument(t: common_pb2.Tensor) -> None:
    try:
        ids = tokens(t, "x")
    except InvalidArgument as e:
        assert e.message.startswith("x: ")
    else:
        assert ids.ndim == 1 and ids.dtype == np.int64 and (ids >= 0).all()
        assert len(ids) == declared_size(t)


@PURE
@edges
@given(tensor)
def test_decoding_floats_gives_finite_float32_or_invalid_argument(t: common_pb2.Tensor) -> None:
    try:
        values = floats(t, "x")
    except InvalidArgument as e:
        assert e.message.startswith("x: ")
    else:
        assert values.ndim == 1 and values.dtype == np.float32 and np.isfinite(values).all()


# ------------------------------------------------------------------------- batches


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | strategy


def _message(cls: type, **fields: Any) -> Any:
    return cls(**{k: v for k, v in fields.items() if v is not None})


rewards = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0])
datum = st.builds(
    _message,
    st.just(common_pb2.Datum),
    input_tokens=maybe(token_tensor),
    target_tokens=maybe(token_tensor),
    weights=maybe(float_tensor),
    sampling_logprobs=maybe(float_tensor),
    advantages=maybe(float_tensor),
    reward=rewards,
    group_index=st.integers(-2, 3),
)
turn = st.builds(
    _message,
    st.just(common_pb2.Turn),
    prompt_tokens=maybe(token_tensor),
    completion_tokens=maybe(token_tensor),
    completion_logprobs=maybe(float_tensor),
)
trajectory = st.builds(common_pb2.Trajectory, turns=st.lists(turn, max_size=4), reward=rewards)
item = st.one_of(
    st.builds(lambda d: common_pb2.TrainingItem(datum=d), datum),
    st.builds(lambda t: common_pb2.TrainingItem(trajectory=t), trajectory),
    st.builds(lambda i: common_pb2.TrainingItem(trace_id=i), st.text(max_size=8)),
    st.just(common_pb2.TrainingItem()),
)
batches = st.lists(item, max_size=6)
group_sizes = st.integers(-2, 4)
LIMITS = BatchLimits(max_items=5, max_turns=8, max_tokens=40)
CONTEXT = 12


def _valid(datums: list) -> None:
    for d in datums:
        n = len(d.input_tokens)
        assert n >= 1 and len(d.target_tokens) == n == len(d.weights)
        assert np.isfinite(d.weights).all() and (d.weights >= 0).all()
        for extra in (d.sampling_logprobs, d.advantages):
            assert extra is None or (len(extra) == n and np.isfinite(extra).all())
        assert math.isfinite(d.reward) and math.isfinite(d.advantage)


@pytest.mark.slow  # seconds: hundreds of batches assembled
@PURE
@given(batches, group_sizes, st.booleans())
def test_assembling_any_batch_gives_valid_datums_or_a_precise_error(items, group, norm) -> None:
    try:
        batch = assemble_batch(items, group_size=group, normalize_std=norm)
    except (InvalidArgument, ResourceExhausted, NotFound, FailedPrecondition):
        return
    _valid(batch.datums)
    assert len(batch.rewards) == len(items) and math.isfinite(batch.reward_mean)
    # The pre-decode bound never claims more tokens than the batch has.
    declared = sum(sum(declared_lengths(i)) for i in items)
    assert declared <= sum(len(d.input_tokens) for d in batch.datums)


@pytest.mark.slow  # seconds: hundreds of batches assembled
@PURE
@given(batches, group_sizes, st.booleans())
def test_the_trainers_checks_refuse_precisely_and_only_what_decoding_would(
    items, group, norm
) -> None:
    """`check_size` (counts and byte lengths, nothing decoded) raises only
    ResourceExhausted, and never refuses a batch that decoding shows is within limits."""
    try:
        check_size(items, LIMITS, CONTEXT)
        sized = True
    except ResourceExhausted:
        sized = False
    try:
        batch = assemble(
            items, limits=LIMITS, vocab_size=VOCAB, context=CONTEXT, group_size=group,
            normalize_std=norm,
        )  # fmt: skip
    except (InvalidArgument, ResourceExhausted):
        return
    assert sized, "refused before decoding a batch that is within every limit"
    _valid(batch.datums)
    for d in batch.datums:
        assert len(d.input_tokens) <= CONTEXT
        assert (d.input_tokens < VOCAB).all() and (d.target_tokens < VOCAB).all()
    assert sum(len(d.input_tokens) for d in batch.datums) <= LIMITS.max_tokens
    assert len(items) <= LIMITS.max_items


# ------------------------------------------------------------------- a live stack


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    """Trainer, sampler and gateway (HTTP on) over a base of a 64-token context, forked
    as "m"; the sampler serves at most 4 rows of 64 tokens per request."""
    from tests.stack import GatewayNode, SamplerReplica, TrainerStack, make_tiny_base

    root: Path = tmp_path_factory.mktemp("fuzz")
    trainer = TrainerStack(root / "store")
    replica = gateway = None
    try:
        trainer.add_base(make_tiny_base(root / "base", max_position_embeddings=64), "tiny")
        trainer.fork("m")
        replica = SamplerReplica(trainer.config.store, trainer.prefix, max_seq_len=64, max_n=4)
        gateway = GatewayNode(trainer.config.store, trainer.prefix, trainer.server.address)
        trainer.sampler, trainer.gateway = replica, gateway
        yield trainer
    finally:
        for part in (gateway, replica):
            if part is not None:
                part.stop()
        trainer.stop()


def post(url: str, path: str, body: bytes) -> int:
    """POST `body` as JSON; the status (the whole reply is read, streams included)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def assert_all_answer(stack: Any) -> None:
    """The gateway (gRPC and HTTP), the trainer and the sampler are up and answering."""
    for channel in (stack.channel, stack.sampler.channel, stack.gateway.channel):
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stack.models.ListModels(model_pb2.ListModelsRequest(), timeout=WAIT)
    request = sampling_pb2.SampleRequest(
        model="m",
        prompt_tokens=to_tensor([5, 17, 33], common_pb2.DTYPE_INT32),
        params=common_pb2.SamplingParams(max_tokens=1),
    )
    assert stack.gateway.sampling.Sample(request, timeout=WAIT).sequences
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 1}).encode()
    assert post(stack.gateway.http_url, "/v1/completions", body) == 200


# ------------------------------------------------------------------- HTTP bodies

json_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
any_json = st.recursive(
    json_scalar,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
odd = st.sampled_from(
    [0, -1, 2**31, 2**63, -(2**64), 1e300, -0.0, 0.5, "", "1", True, None, [], {}]
)


anything = st.one_of(odd, any_json, st.integers(-(2**70), 2**70))
role = st.sampled_from(["user", "system", "assistant"])
message = st.fixed_dictionaries({"role": role, "content": st.text(max_size=30)})
odd_message = st.fixed_dictionaries(
    {"role": role | anything}, optional={"content": st.text(max_size=30) | anything}
)
# Each field with a value the API accepts: a body of these is sampled for real.
VALID = {
    "messages": st.lists(message, min_size=1, max_size=3),
    "prompt": st.text(min_size=1, max_size=30) | st.lists(st.integers(0, VOCAB - 1), min_size=1),
    "prompt_token_ids": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
    "max_tokens": st.integers(1, 6),
    "max_completion_tokens": st.integers(1, 6),
    "n": st.integers(1, 4),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 50),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=4),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "logprobs": st.booleans(),
    "return_token_ids": st.booleans(),
    "trace_id": st.just(""),
    "checkpoint": st.just(""),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
}
# ... and values near the edges or of another type.
ODD = {
    "messages": st.lists(odd_message | anything, max_size=3),
    "prompt": st.lists(st.integers(-3, VOCAB + 3), max_size=6),
    "prompt_token_ids": st.lists(st.integers(-3, VOCAB + 3), max_size=6),
    "max_tokens": st.integers(-1, 200),
    "n": st.integers(-1, 40),
    "temperature": st.floats(-1, 1e6),
    "top_p": st.floats(-0.5, 1.5),
    "trace_id": st.sampled_from(["tr-" + "0" * 24, "nope"]),
    "checkpoint": st.sampled_from(["base", "nope", "../x", "c" * 300]),
    "model": st.sampled_from(["nope", "", "m" * 300]),
}


@st.composite
def near_valid(draw: Any) -> dict[str, Any]:
    """A valid body (messages and prompt both set, for either route) with a few fields
    set to valid values, then at most two set to odd ones or to anything at all."""
    body = {
        "model": draw(st.sampled_from(["m", "tiny"])),
        "messages": draw(VALID["messages"]),
        "prompt": draw(VALID["prompt"]),
    }
    for name in draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=5)):
        body[name] = draw(VALID[name])
    for name in draw(st.lists(st.sampled_from([*VALID, "model"]), unique=True, max_size=2)):
        body[name] = draw(ODD.get(name, anything) | anything)
    return body


targeted = near_valid()
BAD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "1" + "0" * 400]
BAD_TEXT = ["[" * 60 + "]" * 60, '"\\ud800"', "tru", "0x10", "'x'", "", '{"a":'] + BAD_NUMBERS


def _spliced(body: dict, field: str, text: str) -> bytes:
    return json.dumps({**body, field: "\0"}).replace('"\\u0000"', text).encode()


raw_bodies = st.one_of(
    st.builds(_spliced, targeted, st.sampled_from([*VALID, "model"]), st.sampled_from(BAD_TEXT)),
    st.binary(max_size=120),
    st.text(max_size=60).map(str.encode),
)
bodies = st.one_of(
    targeted.map(lambda b: json.dumps(b).encode()),
    any_json.map(lambda b: json.dumps(b).encode()),
    raw_bodies,
)


@pytest.mark.slow
@LIVE
@given(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), bodies)
@example(  # found by the fuzzing: a pin no file name can hold reached stat(), a 500
    "/v1/completions", json.dumps({"model": "m", "prompt": "hi", "checkpoint": "c" * 300}).encode()
)
def test_no_http_body_gets_a_500(live, path: str, body: bytes) -> None:
    status = post(live.gateway.http_url, path, body)
    event(f"HTTP {status}")  # the spread shows with --hypothesis-show-statistics
    assert status < 500, (status, body[:300])


@pytest.mark.slow
def test_every_server_answers_after_the_http_fuzzing(live) -> None:
    assert_all_answer(live)


# ------------------------------------------------------------- raw gRPC messages


def _methods() -> list[tuple[str, str, bool]]:
    """(server, method path, response-streaming) of every RPC each server serves."""
    out = []
    for module, service, servers in (
        (model_pb2, "ModelService", ("gateway", "trainer")),
        (training_pb2, "TrainingService", ("gateway", "trainer")),
        (sampling_pb2, "SamplingService", ("gateway", "sampler")),
        (trace_pb2, "TraceService", ("gateway",)),
    ):
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            for server in servers:
                path = f"/headway.v1.{service}/{method.name}"
                out.append((server, path, method.server_streaming))
    return out


@pytest.mark.slow
@LIVE
@given(st.sampled_from(_methods()), st.binary(max_size=48))
def test_random_bytes_as_any_request_get_a_precise_status(live, method, raw: bytes) -> None:
    """Bytes that do not parse are INVALID_ARGUMENT; bytes that happen to parse are a
    request like any other. Never UNKNOWN or INTERNAL (a server fault)."""
    server, path, streaming = method
    channel = {"gateway": live.gateway.channel, "trainer": live.channel}.get(
        server, live.sampler.channel
    )
    call = (channel.unary_stream if streaming else channel.unary_unary)(path)
    try:
        reply = call(raw, timeout=WAIT)
        if streaming:
            list(reply)
        event("OK")
    except grpc.RpcError as e:
        event(e.code().name)
        assert e.code() not in (
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.DATA_LOSS,
        ), (path, raw, e.details())


@pytest.mark.slow
def test_every_server_answers_after_the_grpc_fuzzing(live) -> None:
    assert_all_answer(live)
