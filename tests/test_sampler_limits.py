"""One team cannot freeze or exhaust a sampler replica: stop strings, prompts and
ComputeLogprobs are bounded before their work starts, stop strings cost work in proportion
to the new text only, ComputeLogprobs runs in pieces between decode steps, and a replica
whose engine thread dies says so at once (UNAVAILABLE, NOT_SERVING, out of the registry)
instead of holding requests forever."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import redis
import torch

from headway.modeling import Tokenizer, token_logprobs
from headway.server.replicas import ReplicaInfo, replica_key
from headway.tensors import to_tensor
from headway.v1 import common_pb2, sampling_pb2
from sampler_svc.requests import Collector, Spec
from tests.conftest import VOCAB, train_tokenizer
from tests.helpers_training import reference_module
from tests.stack import REDIS_URL, GatewayNode, SamplerReplica, wait_until

PROMPT = [5, 17, 33, 8, 41, 12]
I32 = common_pb2.DTYPE_INT32
HANG = 120  # seconds: only ever reached by a call that hangs (the bug), never by work


def request(prompt=PROMPT, **params) -> sampling_pb2.SampleRequest:
    return sampling_pb2.SampleRequest(
        model="tiny",
        prompt_tokens=to_tensor(prompt, I32),
        params=common_pb2.SamplingParams(**params),
    )


def refusal(call) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code().name, err.value.details()


class Gate:
    """Holds a replica's engine thread between two steps until `open()`: whatever is
    submitted meanwhile waits in its inbox, so the test decides what the engine finds."""

    def __init__(self, sampler) -> None:
        self._inside, self._open = threading.Event(), threading.Event()

        def hold() -> None:
            self._inside.set()
            self._open.wait(HANG)

        self._thread = threading.Thread(target=sampler.call, args=(hold,), daemon=True)
        self._thread.start()
        assert self._inside.wait(HANG), "the engine thread never took the gate"

    def open(self) -> None:
        self._open.set()


# ------------------------------------------------------------------------ stop strings
def test_ten_thousand_stop_strings_are_refused(sampling_stack):
    code, details = refusal(
        lambda: sampling_stack.sampler.stub.Sample(
            request(max_tokens=2, stop=[f"s{i}" for i in range(10_000)])
        )
    )
    assert code == "INVALID_ARGUMENT"
    assert "stop has 10000 strings; at most 32" in details
    assert sampling_stack.sampler.sampler.steps == 0


def test_a_megabyte_stop_string_is_refused(sampling_stack):
    code, details = refusal(
        lambda: sampling_stack.sampler.stub.Sample(request(max_tokens=2, stop=["x" * 2**20]))
    )
    assert code == "INVALID_ARGUMENT"
    assert "stop[0] is 1048576 characters long; a stop string may have at most 256" in details


def test_too_many_stop_token_ids_are_refused(sampling_stack):
    code, details = refusal(
        lambda: sampling_stack.sampler.stub.Sample(
            request(max_tokens=2, stop_token_ids=[1] * 100_000)
        )
    )
    assert code == "INVALID_ARGUMENT" and "stop_token_ids has 100000 ids" in details


def test_too_many_stop_strings_are_a_400_with_the_reason_on_the_openai_api(gateway_stack):
    client = openai.OpenAI(base_url=gateway_stack.gateway.http_url, api_key="local")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model="tiny", prompt="what is", max_tokens=2, stop=[f"s{i}" for i in range(100)]
        )
    assert err.value.status_code == 400
    assert "stop has 100 strings; at most 32 are allowed" in str(err.value)


class CountingTokenizer(Tokenizer):
    """The real tokenizer, counting the tokens it is asked to decode (the work measured)."""

    decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded += len(ids)
        return super().decode(ids, skip_special_tokens=skip_special_tokens)


def collect(tokenizer: Tokenizer, tokens: list[int], stop: list[str]) -> Collector:
    """A Collector fed `tokens` as engine events, then the engine's end of the row."""
    spec = Spec([1], 1, len(tokens), stop, frozenset(), [], False)
    loop = asyncio.new_event_loop()
    try:
        collector = Collector(spec, tokenizer, loop)
        for t in tokens:
            collector.apply("token", 0, (t, -1.0))
        collector.apply("done", 0, "length")
    finally:
        loop.close()
    return collector


def test_a_long_completion_with_stop_strings_costs_constant_work_per_token(tmp_path):
    """Before: every token decoded the whole completion again (quadratic work)."""
    base = Tokenizer.from_dir(train_tokenizer(tmp_path))
    text = " ".join(f"what is {a} plus {b}? it is {a + b}." for a in range(20) for b in range(10))
    tokens = base.encode(text, add_special_tokens=False)
    assert len(tokens) > 1500
    tokenizer = CountingTokenizer(base.backend)
    stops = ["never said", "nor this"]
    collector = collect(tokenizer, tokens, stops)
    seq = collector.sequences[0]
    assert seq.text == text and seq.stop_reason == "length"
    assert tokenizer.decoded <= 4 * len(tokens), f"{tokenizer.decoded} tokens decoded"
    # Each piece of new text is searched along with the longest stop's length - 1 before it.
    overlap = max(map(len, stops)) - 1
    assert seq.scanner.searched_chars <= len(stops) * (len(text) + overlap * len(tokens))


def byte_level_tokenizer(path: Path) -> Tokenizer:
    """A byte-level BPE (every byte a token, as GPT-2, Llama 3 and Qwen) with merges of
    multi-byte characters, so random ids split characters and make invalid UTF-8."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["naïve café — 5 € … 😀🎉 中文字符 Ωμέγα ß ñ", "plain ascii words here"] * 50
    tok.train_from_iterator(corpus, trainer)
    return Tokenizer(tok)


def metaspace_tokenizer() -> Tokenizer:
    """A SentencePiece-style BPE ("▁" for spaces, the decode drops a leading one)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["</s>"])
    tok.train_from_iterator(["the cat sat on the mat, café ünïcode"] * 20, trainer)
    return Tokenizer(tok)


def test_a_completion_of_invalid_bytes_costs_bounded_work_per_token(tmp_path):
    """A model that only emits lone UTF-8 continuation bytes (its text always ends in
    U+FFFD, so a character might still complete): the decoder gives up waiting after a
    bounded number of tokens instead of re-decoding the whole completion each time."""
    base = byte_level_tokenizer(tmp_path)
    lone = next(i for i in range(base.vocab_size) if base.decode([i, i]) == "\ufffd\ufffd")
    tokenizer = CountingTokenizer(base.backend)
    tokens = [lone] * 2000
    seq = collect(tokenizer, tokens, ["never"]).sequences[0]
    assert seq.text == "\ufffd" * 2000
    assert tokenizer.decoded <= 40 * len(tokens), f"{tokenizer.decoded} tokens decoded"


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_incremental_text_is_the_full_decode_of_random_tokens(tmp_path, kind):
    tokenizer = byte_level_tokenizer(tmp_path) if kind == "byte-level" else metaspace_tokenizer()
    rng = random.Random(0)
    vocab = tokenizer.vocab_size
    for length in [1, 2, 3, 5, 8, 13, 40, 100, 300] * 8:
        tokens = [rng.randrange(vocab) for _ in range(length)]
        collector = collect(tokenizer, tokens, [])
        assert collector.sequences[0].text == tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_stop_string_cuts_random_text_where_a_full_search_would(tmp_path):
    """The cut text is the full decode up to the stop string, whichever tokens it spans;
    the tokens end with the one that completed it."""
    tokenizer = byte_level_tokenizer(tmp_path)
    rng = random.Random(1)
    vocab = tokenizer.vocab_size
    for _ in range(150):
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(2, 80))]
        full = tokenizer.decode(tokens, skip_special_tokens=True)
        at = rng.randrange(len(full) or 1)
        # Not a U+FFFD: one at the end of the text may still become a character.
        stop = full[at : at + rng.randrange(1, 12)].replace("\ufffd", "") or "x"
        seq = collect(tokenizer, tokens, [stop, "never in here"]).sequences[0]
        if stop in full:
            assert seq.stop_reason == "stop" and seq.text == full[: full.index(stop)]
            kept = tokenizer.decode(seq.tokens, skip_special_tokens=True)
            before = tokenizer.decode(seq.tokens[:-1], skip_special_tokens=True)
            assert stop in kept and stop not in before
        else:
            assert seq.stop_reason == "length" and seq.text == full


def test_a_stream_never_shows_the_start_of_a_stop_string(sampling_stack):
    """Before: the text of the tokens before the one that completed a stop string was
    already streamed, so the stream's text ran on past the cut."""
    stub = sampling_stack.sampler.stub
    params = dict(max_tokens=30, temperature=0, ignore_eos=True)
    free = stub.Sample(request(**params)).sequences[0]
    tokenizer = Tokenizer.from_dir(sampling_stack.trainer.store.get_model("tiny").path)
    ids = np.frombuffer(free.tokens.data, np.int32).tolist()
    start = len(tokenizer.decode(ids[:4]))
    needle = free.text[start : start + 12]  # spans several tokens
    assert len(tokenizer.encode(needle, add_special_tokens=False)) >= 3
    whole = stub.Sample(request(stop=[needle], **params)).sequences[0]
    assert whole.text == free.text[: free.text.index(needle)]
    streamed = "".join(c.text for c in stub.SampleStream(request(stop=[needle], **params)))
    assert streamed == whole.text


# ----------------------------------------------------------------------------- prompts
def test_a_prompt_over_the_context_is_refused_before_its_ids_are_read(sampling_stack):
    """The length comes from the tensor's byte count: the out-of-vocabulary id at the end
    of a million-token prompt is never looked at (before, every id was read first)."""
    prompt = np.ones(1_000_000, np.int32)
    prompt[-1] = VOCAB + 7
    code, details = refusal(
        lambda: sampling_stack.sampler.stub.Sample(request(prompt=prompt, max_tokens=2))
    )
    assert code == "RESOURCE_EXHAUSTED"
    assert "prompt (1000000 tokens) + max_tokens (2) is over the context of 256" in details


def test_a_prompt_text_over_the_limit_is_refused_before_tokenizing(sampling_stack):
    req = sampling_pb2.SampleRequest(
        model="tiny", prompt_text="what is 1 plus 2? " * 20_000, params={"max_tokens": 2}
    )
    code, details = refusal(lambda: sampling_stack.sampler.stub.Sample(req))
    assert code == "RESOURCE_EXHAUSTED"
    assert "prompt_text is 360000 characters long, over this sampler's limit of 262144" in details


# -------------------------------------------------------------------- ComputeLogprobs
def logprobs_request(sequences) -> sampling_pb2.ComputeLogprobsRequest:
    return sampling_pb2.ComputeLogprobsRequest(
        model="tiny", sequences=[to_tensor(np.asarray(s, np.int32)) for s in sequences]
    )


def test_a_compute_logprobs_over_the_token_limit_is_refused(sampling_stack):
    """131,072 tokens per call by default; before, any number of tokens was computed."""
    seqs = [np.full(250, 3, np.int32)] * 600  # 150,000 tokens, each sequence in context
    code, details = refusal(
        lambda: sampling_stack.sampler.stub.ComputeLogprobs(logprobs_request(seqs))
    )
    assert code == "RESOURCE_EXHAUSTED"
    assert "the sequences hold 150000 tokens, over this sampler's limit of 131072" in details
    assert sampling_stack.sampler.sampler.scoring_pieces == 0


def test_more_sequences_than_the_token_limit_allows_are_refused_unread(sampling_stack):
    code, details = refusal(
        lambda: sampling_stack.sampler.stub.ComputeLogprobs(logprobs_request([[]] * 70_000))
    )
    assert code == "RESOURCE_EXHAUSTED" and "70000 sequences of ≥ 2 tokens" in details


def test_compute_logprobs_runs_between_decode_steps(sampling_stack):
    """A ComputeLogprobs of 4 × 250 tokens and a running Sample: the engine's forwards show
    a decode step between every two pieces of scoring. Before, the whole call ran in one
    go on the engine thread while every row waited."""
    replica = sampling_stack.sampler
    sampler = replica.sampler
    replica.stub.Sample(request(max_tokens=2))  # the base's engine is loaded
    model = next(iter(sampler.engines.values())).engine.model
    gate = Gate(sampler)
    sample = replica.stub.Sample.future(request(max_tokens=60, ignore_eos=True), timeout=HANG)
    wait_until(lambda: sampler.queue_depth == 1, what="the Sample to be queued")
    seqs = [[(7 * i + j) % VOCAB for j in range(250)] for i in range(4)]
    scored = replica.stub.ComputeLogprobs.future(logprobs_request(seqs), timeout=HANG)
    wait_until(lambda: sampler.queue_depth == 2, what="the ComputeLogprobs to be queued")
    forwards: list[str] = []

    def record(module, args, kwargs) -> None:
        T = args[0].shape[1]
        forwards.append("decode" if T == 1 else "prefill" if "rows" in kwargs else "score")

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        gate.open()
        reply, result = sample.result(), scored.result()
    finally:
        hook.remove()
    assert len(np.frombuffer(reply.sequences[0].tokens.data, np.int32)) == 60
    assert len(result.logprobs) == 4
    scoring = [i for i, kind in enumerate(forwards) if kind == "score"]
    assert len(scoring) == 4, forwards
    for a, b in zip(scoring, scoring[1:], strict=False):
        assert "decode" in forwards[a:b], f"no decode step between two pieces: {forwards}"


@pytest.fixture
def small_pieces(trainer_stack):
    """A replica that scores in pieces of at most 32 tokens."""
    replica = SamplerReplica(
        trainer_stack.config.store, trainer_stack.prefix, max_seq_len=256, logprobs_chunk_tokens=32
    )
    trainer_stack.sampler = replica
    yield trainer_stack
    replica.stop()


def test_logprobs_scored_in_pieces_are_those_of_one_forward(small_pieces):
    stack = small_pieces
    rng = random.Random(3)
    seqs = [[rng.randrange(VOCAB) for _ in range(n)] for n in (2, 10, 31, 33, 200, 256, 5)]
    reply = stack.sampler.stub.ComputeLogprobs(logprobs_request(seqs))
    module = reference_module(stack, "tiny")
    for seq, got in zip(seqs, reply.logprobs, strict=True):
        ids = torch.tensor([seq])
        with torch.inference_mode():
            want = token_logprobs(module(ids)[0, :-1], ids[0, 1:]).numpy()
        got = np.frombuffer(got.data, np.float32)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
    # 2 + 10 (one piece), 31 (one), 33 (two), 200 (seven), 256 (eight), 5 (one)
    assert stack.sampler.sampler.scoring_pieces == 20


# ------------------------------------------------------------------- engine failure
def fail_next_step(sampler) -> None:
    """Fault injection (nothing else makes a decode step raise): the next step of the
    loaded engine raises, as a device error or a bug would."""

    def broken() -> None:
        raise RuntimeError("injected decode fault")

    next(iter(sampler.engines.values())).engine.step = broken


def test_a_dead_engine_fails_requests_at_once_and_leaves_the_registry(sampling_stack):
    """Before: the engine thread died silently; requests in flight and new ones waited
    forever while the heartbeat kept advertising the replica."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    replica = sampling_stack.sampler
    sampler, stub = replica.sampler, replica.stub
    stub.Sample(request(max_tokens=2))
    key = replica_key(replica.replica.watcher.info.id, sampling_stack.prefix)
    client = redis.Redis.from_url(REDIS_URL)
    assert client.exists(key)
    gate = Gate(sampler)
    fail_next_step(sampler)
    in_flight = stub.Sample.future(request(max_tokens=50, ignore_eos=True), timeout=HANG)
    wait_until(lambda: sampler.queue_depth == 1, what="the Sample to be queued")
    gate.open()
    error = in_flight.exception()
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "sampler engine failed: RuntimeError('injected decode fault')" in error.details()

    code, details = refusal(lambda: stub.Sample(request(max_tokens=2), timeout=HANG))
    assert code == "UNAVAILABLE" and "sampler engine failed" in details
    code, _ = refusal(lambda: stub.ComputeLogprobs(logprobs_request([PROMPT]), timeout=HANG))
    assert code == "UNAVAILABLE"
    health = health_pb2_grpc.HealthStub(replica.channel)
    for service in ("", "headway.v1.SamplingService"):
        wait_until(
            lambda s=service: (
                health.Check(health_pb2.HealthCheckRequest(service=s)).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            ),
            what=f"health of {service!r} to be NOT_SERVING",
        )
    wait_until(lambda: not client.exists(key), what="the registry key to be deleted")
    assert replica.replica.watcher.info.id.encode() not in client.smembers(
        f"{sampling_stack.prefix}replicas"
    )
    client.close()


def test_the_gateway_fails_over_from_a_replica_whose_engine_dies(trainer_stack):
    """A Sample in flight on a replica whose engine dies is answered by another one."""
    store, prefix = trainer_stack.config.store, trainer_stack.prefix
    dying = SamplerReplica(store, prefix, max_seq_len=256, replica_id="a-dying")
    healthy = SamplerReplica(store, prefix, max_seq_len=256, replica_id="b-healthy")
    node = GatewayNode(store, prefix, trainer_stack.server.address, http=False)
    try:
        for replica in (dying, healthy):  # both hold the base: "a-dying" sorts first
            replica.stub.Sample(request(max_tokens=2))
        # ...once both heartbeats say so: the gateway's first reading of the registry must
        # not catch b-healthy listing the base before a-dying does (it would route there).
        client = redis.Redis.from_url(REDIS_URL)

        def lists_base(replica_id: str) -> bool:
            raw = client.get(replica_key(replica_id, prefix))
            return raw is not None and "tiny/base" in ReplicaInfo.from_json(raw).loaded

        wait_until(
            lambda: lists_base("a-dying") and lists_base("b-healthy"),
            what="both replicas to list the base in the registry",
        )
        client.close()
        # ...and the gateway's own view ranks a-dying first: its cached registry may still
        # hold a heartbeat from a-dying's warm-up Sample (load 1), which routed the request
        # to b-healthy in one run of many (the dying engine then never stepped).
        dying_address = dying.replica.watcher.info.address

        def routes_to_dying() -> bool:
            ranked = node.server.run(node.gateway.router.candidates("tiny", "base"))
            return ranked[0] == dying_address

        wait_until(routes_to_dying, what="the gateway to rank a-dying first for the base")
        gate = Gate(dying.sampler)
        fail_next_step(dying.sampler)
        # ignore_eos: a first token drawn as EOS would end the Sample at its admission,
        # before the step that fails (it happened in one CI run).
        reply = node.sampling.Sample.future(request(max_tokens=8, ignore_eos=True), timeout=HANG)
        wait_until(lambda: dying.sampler.queue_depth == 1, what="the Sample to reach a-dying")
        gate.open()
        assert len(reply.result().sequences) == 1
        assert dying.sampler.failure is not None and healthy.sampler.steps > 0
        # What headway_gateway_failovers_total{reason="unavailable"} reports.
        assert node.gateway.router.failovers == {"unavailable": 1}
    finally:
        for part in (node, dying, healthy):
            part.stop()
