"""The sampler over gRPC with a real trainer and Redis: exact logprobs, seeds, greedy,
reloads, pinning, batching of LoRA forks, limits and cancellation."""

from __future__ import annotations

import json
import threading

import grpc
import numpy as np
import pytest
import redis
import torch

from headway.modeling import token_logprobs
from headway.server.replicas import list_replicas, replica_key
from headway.tensors import to_tensor
from headway.v1 import common_pb2, model_pb2, sampling_pb2, training_pb2
from tests.conftest import VOCAB
from tests.helpers_training import adam, batch, greedy_reference, reference_module
from tests.stack import HANG_SECONDS, REDIS_URL, EngineGate, team_md, wait_until

PROMPT = [5, 17, 33, 8, 41, 12]


def sample(stack, model, *, prompt=PROMPT, checkpoint="", **params):
    req = sampling_pb2.SampleRequest(
        model=model,
        prompt_tokens=to_tensor(prompt, common_pb2.DTYPE_INT32),
        checkpoint=checkpoint,
        params=common_pb2.SamplingParams(**params),
    )
    return stack.sampler.stub.Sample(req)


def trainer_logprobs(stack, model: str, reply) -> list[np.ndarray]:
    """The trainer's logprob of each sampled token of `reply` (sampled after PROMPT): one
    ForwardBackward of every sequence, prompt positions weighted 0."""
    data = []
    for seq in reply.sequences:
        full_seq = PROMPT + toks(seq)
        weights = np.r_[np.zeros(len(PROMPT) - 1), np.ones(len(toks(seq)))].astype(np.float32)
        data.append(
            common_pb2.TrainingItem(
                datum=common_pb2.Datum(
                    input_tokens=to_tensor(full_seq[:-1]),
                    target_tokens=to_tensor(full_seq[1:]),
                    weights=to_tensor(weights),
                )
            )
        )
    fb = stack.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(model=model, data=data, loss_fn="cross_entropy")
    )
    return [np.frombuffer(t.data, np.float32)[len(PROMPT) - 1 :] for t in fb.logprobs]


def toks(seq) -> list[int]:
    return np.frombuffer(seq.tokens.data, np.int32).tolist()


def lps(seq) -> np.ndarray:
    return np.frombuffer(seq.logprobs.data, np.float32)


def trained(stack, name, *, full=False, steps=1):
    """A fork with `steps` training steps behind it (so its weights differ from the base)."""
    stack.fork(name, full=full, rank=4)
    reply = None
    for s in range(steps):
        reply = stack.train.Step(
            training_pb2.StepRequest(
                model=name, data=batch(seed=50 + s), loss_fn="cross_entropy", adam=adam(5e-2)
            )
        )
    return reply.optim_step if reply else None


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_sampler_and_trainer_logprobs_agree(sampling_stack, full):
    stack = sampling_stack
    trained(stack, "m", full=full)
    # A shaped draw (temperature, top-p, top-k): logprobs are still the policy's at T = 1.
    reply = sample(
        stack,
        "m",
        n=4,
        max_tokens=12,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        seed=3,
        ignore_eos=True,
    )
    head = stack.models.GetHead(model_pb2.GetHeadRequest(model="m")).id
    assert reply.checkpoint == head
    worst = 0.0
    for seq, t in zip(reply.sequences, trainer_logprobs(stack, "m", reply), strict=True):
        worst = max(worst, float(np.abs(t - lps(seq)).max()))
    assert worst <= 1e-4, f"sampler and trainer logprobs differ by {worst:.2e}"
    # ComputeLogprobs is the same function again.
    seqs = [to_tensor(PROMPT + toks(s)) for s in reply.sequences]
    computed = stack.sampler.stub.ComputeLogprobs(
        sampling_pb2.ComputeLogprobsRequest(model="m", checkpoint=head, sequences=seqs)
    )
    for seq, c in zip(reply.sequences, computed.logprobs, strict=True):
        got = np.frombuffer(c.data, np.float32)[len(PROMPT) - 1 :]
        assert np.abs(got - lps(seq)).max() <= 1e-4


def test_same_seed_same_tokens(sampling_stack):
    stack = sampling_stack
    a = sample(stack, "tiny", n=3, max_tokens=16, seed=11, ignore_eos=True)
    b = sample(stack, "tiny", n=3, max_tokens=16, seed=11, ignore_eos=True)
    c = sample(stack, "tiny", n=3, max_tokens=16, seed=12, ignore_eos=True)
    assert [toks(s) for s in a.sequences] == [toks(s) for s in b.sequences]
    assert [toks(s) for s in a.sequences] != [toks(s) for s in c.sequences]
    # The n rows of one request draw independently.
    assert len({tuple(toks(s)) for s in a.sequences}) > 1


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_greedy_is_the_argmax_of_a_full_forward(sampling_stack, full):
    stack = sampling_stack
    trained(stack, "m", full=full)
    reply = sample(stack, "m", n=2, max_tokens=20, temperature=0, ignore_eos=True)
    expected = greedy_reference(reference_module(stack, "m"), PROMPT, 20)
    assert [toks(s) for s in reply.sequences] == [expected, expected]


def test_a_published_head_is_loaded_before_any_request(sampling_stack):
    stack = sampling_stack
    stack.fork("m", rank=4)
    sample(stack, "m", max_tokens=2)  # the replica now serves m
    reply = stack.train.Step(
        training_pb2.StepRequest(
            model="m", data=batch(seed=1), loss_fn="cross_entropy", adam=adam(1e-2)
        )
    ).optim_step
    wait_until(
        lambda: f"m/{reply.checkpoint}" in stack.sampler.sampler.loaded_checkpoints(),
        what="the head event to load the new adapter",
    )
    assert sample(stack, "m", max_tokens=2).checkpoint == reply.checkpoint
    # Served from the map of its file at first, the adapter is copied into its slot by the
    # engine's loop, which then holds no map of the file (deleted on a shared store, a
    # mapped file would kill the replica).
    banks = [e.bank for e in stack.sampler.sampler.engines.values()]
    wait_until(lambda: not any(b.pending for b in banks), what="the adapter to be stacked")
    assert sample(stack, "m", max_tokens=2).checkpoint == reply.checkpoint


def test_pinned_checkpoint_is_served_exactly_and_unknown_is_not_found(sampling_stack):
    stack = sampling_stack
    first = trained(stack, "m")
    second = stack.train.Step(
        training_pb2.StepRequest(
            model="m", data=batch(seed=9), loss_fn="cross_entropy", adam=adam(5e-2)
        )
    ).optim_step
    old = sample(
        stack, "m", checkpoint=first.checkpoint, max_tokens=12, temperature=0, ignore_eos=True
    )
    assert old.checkpoint == first.checkpoint
    expected = greedy_reference(reference_module(stack, "m", first.checkpoint), PROMPT, 12)
    assert toks(old.sequences[0]) == expected
    new = sample(stack, "m", max_tokens=12, temperature=0, ignore_eos=True)
    assert new.checkpoint == second.checkpoint
    with pytest.raises(grpc.RpcError) as err:
        sample(stack, "m", checkpoint="s000009-deadbeef", max_tokens=2)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
@pytest.mark.slow
def test_a_reload_never_changes_weights_under_a_sequence_in_flight(sampling_stack, full):
    """The engine is held after 5 tokens (EngineGate, a stall injected into the real
    sampler) until the head event is queued, so the reload lands mid-sequence on any
    machine."""
    stack = sampling_stack
    sampler = stack.sampler.sampler
    first = trained(stack, "m", full=full)
    # Its head event handled: the only event the replica can have queued below is the next.
    wait_until(lambda: f"m/{first.checkpoint}" in sampler.loaded_checkpoints(), what="a load")
    request = sampling_pb2.SampleRequest(
        model="m",
        prompt_tokens=to_tensor(PROMPT),
        checkpoint=first.checkpoint,
        params=common_pb2.SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
    )
    tokens = []
    with EngineGate(steps=4) as gate:  # the first token comes with the prefill, 4 steps more
        for chunk in stack.sampler.stub.SampleStream(request):
            tokens += np.frombuffer(chunk.tokens.data, np.int32).tolist()
            if len(tokens) == 5:  # mid-sequence: train, publish, let the replica reload
                nxt = stack.train.Step(
                    training_pb2.StepRequest(
                        model="m", data=batch(seed=3), loss_fn="cross_entropy", adam=adam(5e-2)
                    )
                )
                wait_until(lambda: sampler.queue_depth, what="the head event at the replica")
                gate.release()
                ckpt = nxt.optim_step.checkpoint
                wait_until(
                    lambda c=ckpt: f"m/{c}" in sampler.loaded_checkpoints(),
                    what="the new head to load",
                )
    assert len(tokens) == 200
    expected = greedy_reference(reference_module(stack, "m", first.checkpoint), PROMPT, 200)
    assert tokens == expected


def test_a_new_full_head_is_copied_into_the_idle_engine_and_served_exactly(sampling_stack):
    stack = sampling_stack
    first = trained(stack, "m", full=True)
    sample(stack, "m", max_tokens=2)
    sampler = stack.sampler.sampler
    engines = dict(sampler.engines)
    (entry,) = [e for ref, e in engines.items() if ref.model == "m"]
    second = stack.train.Step(
        training_pb2.StepRequest(
            model="m", data=batch(seed=9), loss_fn="cross_entropy", adam=adam(5e-2)
        )
    ).optim_step
    wait_until(
        lambda: f"m/{second.checkpoint}" in sampler.loaded_checkpoints(),
        what="the new head to load",
    )
    # The same engine (no new one was built for "m") now holds the new head, and only it.
    # (Engines of the shared stack's other models may load meanwhile: their heads' events.)
    assert list(sampler.engines.values()).count(entry) == 1
    assert entry.ref.checkpoint == second.checkpoint
    assert [e for ref, e in sampler.engines.items() if ref.model == "m"] == [entry]
    assert f"m/{first.checkpoint}" not in sampler.loaded_checkpoints()
    for ckpt in (second.checkpoint, first.checkpoint, second.checkpoint):  # back and forth
        reply = sample(stack, "m", checkpoint=ckpt, n=2, max_tokens=16, seed=1, ignore_eos=True)
        assert reply.checkpoint == ckpt
        assert list(sampler.engines.values()).count(entry) == 1
        module = reference_module(stack, "m", ckpt)
        for seq in reply.sequences:
            ids = torch.tensor([PROMPT + toks(seq)])
            with torch.inference_mode():
                ref = token_logprobs(module(ids)[0, :-1], ids[0, 1:])[len(PROMPT) - 1 :]
            assert np.abs(ref.numpy() - lps(seq)).max() <= 1e-4
        greedy = sample(stack, "m", checkpoint=ckpt, max_tokens=12, temperature=0, ignore_eos=True)
        assert toks(greedy.sequences[0]) == greedy_reference(module, PROMPT, 12)


def test_rows_of_two_lora_forks_decode_in_one_batch(sampling_stack):
    stack = sampling_stack
    trained(stack, "a")
    trained(stack, "b")
    alone = {m: sample(stack, m, max_tokens=40, temperature=0, ignore_eos=True) for m in "ab"}
    engine = next(iter(stack.sampler.sampler.engines.values())).engine
    mixed_before = engine.mixed_steps
    results = {}

    def run(m):
        results[m] = sample(stack, m, max_tokens=40, temperature=0, ignore_eos=True)

    threads = [threading.Thread(target=run, args=(m,)) for m in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.mixed_steps > mixed_before, "the two forks never shared a decode step"
    for m in "ab":
        assert toks(results[m].sequences[0]) == toks(alone[m].sequences[0])
        assert np.abs(lps(results[m].sequences[0]) - lps(alone[m].sequences[0])).max() <= 1e-4
    assert toks(alone["a"].sequences[0]) != toks(alone["b"].sequences[0])


def test_stop_token_and_stop_string(sampling_stack):
    stack = sampling_stack
    free = sample(stack, "tiny", max_tokens=30, temperature=0, ignore_eos=True).sequences[0]
    stop_token = toks(free)[4]
    first_at = toks(free).index(stop_token)
    stopped = sample(
        stack, "tiny", max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[stop_token]
    ).sequences[0]
    assert toks(stopped) == toks(free)[: first_at + 1]  # the stop token is included
    assert stopped.stop_reason == sampling_pb2.STOP_REASON_STOP
    assert free.stop_reason == sampling_pb2.STOP_REASON_LENGTH
    needle = free.text[6:9]
    cut = sample(
        stack, "tiny", max_tokens=30, temperature=0, ignore_eos=True, stop=[needle]
    ).sequences[0]
    assert cut.text == free.text[: free.text.index(needle)]
    assert cut.stop_reason == sampling_pb2.STOP_REASON_STOP
    assert len(toks(cut)) < len(toks(free))


def test_stream_yields_the_same_tokens_as_sample(sampling_stack):
    stack = sampling_stack
    params = dict(n=2, max_tokens=10, seed=5, ignore_eos=True)
    whole = sample(stack, "tiny", **params)
    request = sampling_pb2.SampleRequest(
        model="tiny",
        prompt_tokens=to_tensor(PROMPT),
        params=common_pb2.SamplingParams(**params),
        include_prompt_logprobs=True,
    )
    chunks = list(stack.sampler.stub.SampleStream(request))
    assert chunks[0].checkpoint == "base" and len(chunks[0].prompt_logprobs.shape) == 1
    per_row = {0: [], 1: []}
    for c in chunks[1:]:
        per_row[c.index] += np.frombuffer(c.tokens.data, np.int32).tolist()
    assert [per_row[0], per_row[1]] == [toks(s) for s in whole.sequences]


def tensor2d(t, dtype) -> np.ndarray:
    return np.frombuffer(t.data, dtype).reshape(tuple(t.shape))


def test_top_logprobs_are_the_policys_most_likely_tokens_at_temperature_1(sampling_stack):
    """top_logprobs at each sampled and prompt position: the K largest of a full forward's
    log-softmax (T = 1, whatever drew the token), most likely first; where the drawn token
    is among them its entry is its reported logprob, bit for bit; a stream sends the same."""
    stack = sampling_stack
    trained(stack, "m")
    k = 5
    params = dict(n=2, max_tokens=8, temperature=0.8, top_k=30, seed=4, ignore_eos=True)
    request = sampling_pb2.SampleRequest(
        model="m",
        prompt_tokens=to_tensor(PROMPT),
        params=common_pb2.SamplingParams(top_logprobs=k, **params),
        include_prompt_logprobs=True,
    )
    reply = stack.sampler.stub.Sample(request)
    module = reference_module(stack, "m")
    found = 0
    for seq in reply.sequences:
        ids, top = tensor2d(seq.top_token_ids, np.int32), tensor2d(seq.top_logprobs, np.float32)
        assert ids.shape == top.shape == (len(toks(seq)), k)
        with torch.no_grad():
            logits = module(torch.tensor([PROMPT + toks(seq)]))[0].float()
        want = torch.log_softmax(logits, -1).topk(k, -1)
        # Position i of the completion is predicted by logits row len(PROMPT) - 1 + i.
        rows = slice(len(PROMPT) - 1, len(PROMPT) - 1 + len(toks(seq)))
        assert ids.tolist() == want.indices[rows].tolist()
        assert np.abs(top - want.values[rows].numpy()).max() <= 1e-4
        assert (np.diff(top, axis=1) <= 0).all()  # most likely first
        for i, token in enumerate(toks(seq)):
            if token in ids[i]:
                found += 1
                assert top[i][list(ids[i]).index(token)] == lps(seq)[i]  # the same bits
    assert found  # at T = 0.8 within the top 30, most drawn tokens are among the top 5
    # The prompt's positions: P - 1 rows of K, and their logprobs beside prompt_logprobs.
    p_ids = tensor2d(reply.prompt_top_token_ids, np.int32)
    p_top = tensor2d(reply.prompt_top_logprobs, np.float32)
    assert p_ids.shape == p_top.shape == (len(PROMPT) - 1, k)
    with torch.no_grad():
        logits = module(torch.tensor([PROMPT]))[0].float()
    want = torch.log_softmax(logits[:-1], -1).topk(k, -1)
    assert p_ids.tolist() == want.indices.tolist()
    assert np.abs(p_top - want.values.numpy()).max() <= 1e-4
    # A stream: the same rows, chunk by chunk, and the prompt's on the first chunk.
    chunks = list(stack.sampler.stub.SampleStream(request))
    assert tensor2d(chunks[0].prompt_top_token_ids, np.int32).tolist() == p_ids.tolist()
    per_row: dict[int, list] = {0: [], 1: []}
    for c in chunks[1:]:
        if c.tokens.data:
            per_row[c.index] += tensor2d(c.top_token_ids, np.int32).tolist()
    assert [per_row[0], per_row[1]] == [
        tensor2d(s.top_token_ids, np.int32).tolist() for s in reply.sequences
    ]
    # Not asked: no such fields (and nothing extra computed).
    plain = sample(stack, "m", max_tokens=3, seed=1)
    assert not plain.sequences[0].HasField("top_token_ids")
    assert not plain.HasField("prompt_top_token_ids")


def test_a_unary_sample_wakes_the_event_loop_per_sequence_end_not_per_token(
    sampling_stack, monkeypatch
):
    """A Sample without stop strings hands its events to the replica's event loop when a
    sequence ends (n wake-ups at most, whatever the length), with the tokens a stream of
    the same request sends."""
    from sampler_svc.requests import Collector

    stack = sampling_stack
    deliveries: list[int] = []
    deliver = Collector._deliver

    def counted(self) -> None:
        deliveries.append(len(self._pending))
        deliver(self)

    monkeypatch.setattr(Collector, "_deliver", counted)
    params = dict(n=2, max_tokens=16, seed=3, ignore_eos=True)
    whole = sample(stack, "tiny", **params)
    assert 1 <= len(deliveries) <= 2  # both rows end at the same step: usually one
    assert sum(deliveries) == 2 * (16 + 1)  # every token and each row's end
    request = sampling_pb2.SampleRequest(
        model="tiny", prompt_tokens=to_tensor(PROMPT), params=common_pb2.SamplingParams(**params)
    )
    streamed: dict[int, list[int]] = {0: [], 1: []}
    for chunk in stack.sampler.stub.SampleStream(request):
        streamed[chunk.index] += np.frombuffer(chunk.tokens.data, np.int32).tolist()
    assert [streamed[0], streamed[1]] == [toks(s) for s in whole.sequences]


def one_row_collector(loop, live: bool = True, interval: float = 0.0):
    """A Collector of one greedy sequence of up to 4 tokens, without text (no tokenizer):
    what the engine emits is fed to it by hand."""
    from sampler_svc.requests import Collector, Spec
    from sampler_svc.sampling import DrawParams

    spec = Spec([1], 1, 4, [], frozenset(), [DrawParams(0.0, 1.0, 0, None)], False)
    return Collector(spec, None, loop, live, interval)  # type: ignore[arg-type]  # no text


def test_a_collector_wakes_its_loop_at_each_step_only_when_live():
    """Live (a stream, or stop strings to find): a step's tokens wake the loop. Not live:
    only an event that ends a sequence does; either way the loop then gets every event."""
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        for live in (False, True):
            collector = one_row_collector(loop, live)
            collector.job.emit("token", 0, (5, -0.5))
            collector.job.flush()  # as the engine does after a step
            assert collector._wake_due == live
            collector.job.emit("done", 0, "length")
            collector.job.flush()
            assert collector._wake_due
            events = loop.run_until_complete(collector.next_events())
            assert [kind for kind, _, _ in events] == ["token", "done"]
    finally:
        loop.close()


def test_a_live_collector_wakes_its_loop_at_most_once_an_interval():
    """With an interval: the first tokens wake the loop at once; tokens drawn within the
    interval arm one timer instead of a wake-up each; a sequence's end wakes it at once;
    the loop gets every event, in order, each once."""
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        collector = one_row_collector(loop, interval=3600.0)
        collector.job.emit("token", 0, (5, -0.5))
        collector.job.flush()
        assert collector._wake_due  # the first tokens: at once
        first = loop.run_until_complete(collector.next_events())
        assert [payload for _, _, payload in first] == [(5, -0.5)]
        for token in (6, 7):
            collector.job.emit("token", 0, (token, -0.5))
            collector.job.flush()
            assert not collector._wake_due and collector._timer_due  # within the interval
        collector.job.emit("done", 0, "length")
        collector.job.flush()
        assert collector._wake_due  # the end: at once
        rest = loop.run_until_complete(collector.next_events())
        assert [(kind, payload) for kind, _, payload in rest] == [
            ("token", (6, -0.5)),
            ("token", (7, -0.5)),
            ("done", "length"),
        ]
        assert collector._timer is None  # the end's delivery cancelled the armed timer
    finally:
        loop.close()


def test_tokens_within_a_stream_interval_leave_when_it_ends():
    """Tokens that arrive within the interval and are followed by nothing (the engine busy
    elsewhere, the sequence not ended) are still delivered: by the timer they armed."""
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        collector = one_row_collector(loop, interval=0.01)
        collector.job.emit("token", 0, (5, -0.5))
        collector.job.flush()
        loop.run_until_complete(collector.next_events())  # the first: at once
        collector.job.emit("token", 0, (6, -0.5))
        collector.job.flush()  # within the interval, most likely: a timer (or, late, a wake)
        events = loop.run_until_complete(asyncio.wait_for(collector.next_events(), HANG_SECONDS))
        assert [payload for _, _, payload in events] == [(6, -0.5)]
    finally:
        loop.close()


def test_a_stream_sends_what_its_interval_gathered_in_one_chunk(sampling_stack):
    """A replica whose stream interval outlasts the request sends each sequence's first
    tokens at once and every later one with its end, in one more chunk: the same tokens as
    the unary call. (That a live collector wakes the loop once an interval is the unit test
    above's; here the whole path, engine to client, with the interval in the way.)"""
    stack = sampling_stack
    params = dict(n=2, max_tokens=20, seed=5, ignore_eos=True)
    whole = sample(stack, "tiny", **params)
    request = sampling_pb2.SampleRequest(
        model="tiny", prompt_tokens=to_tensor(PROMPT), params=common_pb2.SamplingParams(**params)
    )
    config = stack.sampler.config
    before, config.stream_interval_ms = config.stream_interval_ms, 3_600_000.0
    try:
        chunks = list(stack.sampler.stub.SampleStream(request))[1:]  # after the checkpoint's
    finally:
        config.stream_interval_ms = before
    per_row: dict[int, list[list[int]]] = {0: [], 1: []}
    for c in chunks:
        per_row[c.index].append(np.frombuffer(c.tokens.data, np.int32).tolist())
    for row, seq in enumerate(whole.sequences):
        assert sum(per_row[row], []) == toks(seq)
        assert len(per_row[row]) <= 2, per_row[row]


def test_tokens_a_stream_has_not_sent_yet_leave_together(sampling_stack):
    """When the engine runs ahead of the stream (the replica's event loop busy), the tokens
    waiting for a sequence go out in one chunk, not a message each. Deterministically: the
    engine is held after the prefill (EngineGate), the loop is then held by a callback of
    the test's, and the engine let go to decode the whole request; once the loop runs
    again, each row's 19 decoded tokens leave in one chunk, with its end."""
    stack = sampling_stack
    params = dict(n=2, max_tokens=20, seed=5, ignore_eos=True)
    whole = sample(stack, "tiny", **params)
    request = sampling_pb2.SampleRequest(
        model="tiny", prompt_tokens=to_tensor(PROMPT), params=common_pb2.SamplingParams(**params)
    )
    loop_held, loop_free = threading.Event(), threading.Event()

    def hold_loop() -> None:
        loop_held.set()
        loop_free.wait(HANG_SECONDS)

    with EngineGate() as gate:
        stream = stack.sampler.stub.SampleStream(request)
        assert next(stream).checkpoint == "base"
        gate.wait_held()  # prefilled, first tokens drawn and emitted
        stack.sampler.server.loop.call_soon_threadsafe(hold_loop)
        wait_until(loop_held.is_set, what="the replica's event loop to be held")
        gate.release()
        wait_until(lambda: stack.sampler.sampler.live_rows == 0, what="the request to decode")
        loop_free.set()
        chunks = list(stream)
    per_row: dict[int, list[list[int]]] = {0: [], 1: []}
    for c in chunks:
        per_row[c.index].append(np.frombuffer(c.tokens.data, np.int32).tolist())
    for row, seq in enumerate(whole.sequences):
        assert sum(per_row[row], []) == toks(seq)
        assert len(per_row[row][-1]) >= 19  # the decoded tokens, together
        assert chunks[-1].stop_reason == sampling_pb2.STOP_REASON_LENGTH


def test_cancelling_a_stream_frees_its_rows(sampling_stack):
    """The engine is held at its first decode step (EngineGate, a stall injected into the
    real sampler): the rows are still live when the stream is cancelled, on any machine."""
    stack = sampling_stack
    request = sampling_pb2.SampleRequest(
        model="tiny",
        prompt_tokens=to_tensor(PROMPT),
        params=common_pb2.SamplingParams(n=4, max_tokens=240, ignore_eos=True),
    )
    with EngineGate() as gate:
        stream = stack.sampler.stub.SampleStream(request)
        next(stream)  # the first tokens, drawn with the prefill
        engine = gate.wait_held()
        assert stack.sampler.sampler.live_rows == 4
        stream.cancel()
        wait_until(
            lambda: all(row.job.cancelled for row in engine.rows),
            what="the cancellation to reach the job",
        )
        gate.release()
        wait_until(lambda: stack.sampler.sampler.live_rows == 0, what="the cancelled rows to leave")


@pytest.mark.slow
def test_a_waiting_request_counts_its_rows_in_the_reported_load(sampling_stack):
    """Load is in sequences: a queued request of n=3 weighs 3, like 3 decoding rows. The
    engine is held at its first decode step (EngineGate, a stall injected into the real
    sampler), so the full engine stays full until the heartbeat has reported it."""
    import asyncio

    import redis.asyncio as aioredis

    stack = sampling_stack
    replica = stack.sampler.sampler
    full = sampling_pb2.SampleRequest(
        model="tiny",
        prompt_tokens=to_tensor(PROMPT),
        params=common_pb2.SamplingParams(n=32, max_tokens=240, ignore_eos=True),
    )
    with EngineGate() as gate:
        stream = stack.sampler.stub.SampleStream(full)  # every row of the engine
        next(stream)
        engine = gate.wait_held()
        assert replica.live_rows == 32
        done: dict[str, object] = {}
        waiting = threading.Thread(
            target=lambda: done.update(reply=sample(stack, "tiny", n=3, max_tokens=2))
        )
        waiting.start()
        wait_until(lambda: replica.queued_rows == 3, what="the second request to queue")

        async def reported() -> int:
            client = aioredis.from_url(REDIS_URL)
            try:
                (info,) = await list_replicas(client, stack.prefix)
                return info.load
            finally:
                await client.aclose()

        wait_until(
            lambda: asyncio.run(reported()) == 35,
            what="the heartbeat to report 32 + 3",
            interval=0.1,
        )
        stream.cancel()
        wait_until(
            lambda: all(row.job.cancelled for row in engine.rows),
            what="the cancellation to reach the job",
        )
    waiting.join(timeout=120)
    assert len(done["reply"].sequences) == 3
    wait_until(lambda: replica.queued_rows == 0 and replica.live_rows == 0, what="an idle replica")


BAD = {
    "token over vocab": (
        dict(prompt=[1, VOCAB]),
        dict(max_tokens=2),
        "INVALID_ARGUMENT",
        "outside the vocabulary",
    ),
    "empty prompt": (dict(prompt=[]), dict(max_tokens=2), "INVALID_ARGUMENT", "prompt is empty"),
    "negative temperature": (
        {},
        dict(max_tokens=2, temperature=-0.1),
        "INVALID_ARGUMENT",
        "temperature",
    ),
    "top_p zero": (
        {},
        dict(max_tokens=2, top_p=0.0),
        "INVALID_ARGUMENT",
        "top_p must lie in (0, 1]",
    ),
    "top_p over one": ({}, dict(max_tokens=2, top_p=1.5), "INVALID_ARGUMENT", "top_p"),
    "negative top_k": ({}, dict(max_tokens=2, top_k=-1), "INVALID_ARGUMENT", "top_k"),
    "negative n": ({}, dict(max_tokens=2, n=-1), "INVALID_ARGUMENT", "n must be"),
    "zero max_tokens": ({}, dict(max_tokens=0), "INVALID_ARGUMENT", "max_tokens must be"),
    "top_logprobs over the limit": (
        {},
        dict(max_tokens=2, top_logprobs=21),
        "INVALID_ARGUMENT",
        "top_logprobs must lie in 0..20",
    ),
    "negative top_logprobs": (
        {},
        dict(max_tokens=2, top_logprobs=-1),
        "INVALID_ARGUMENT",
        "top_logprobs",
    ),
    "over the context": ({}, dict(max_tokens=251), "RESOURCE_EXHAUSTED", "over the context of 256"),
    "n over the limit": ({}, dict(max_tokens=2, n=33), "RESOURCE_EXHAUSTED", "limit of 32"),
    "unknown model": (
        dict(model="nope"),
        dict(max_tokens=2),
        "NOT_FOUND",
        "model 'nope' not found",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_precise_statuses(sampling_stack, case):
    overrides, params, code, fragment = BAD[case]
    model = overrides.get("model", "tiny")
    with pytest.raises(grpc.RpcError) as err:
        sample(sampling_stack, model, prompt=overrides.get("prompt", PROMPT), **params)
    assert err.value.code().name == code and fragment in err.value.details()
    assert sampling_stack.sampler.sampler.live_rows == 0


def test_another_teams_model_is_not_found(sampling_stack):
    stack = sampling_stack
    stack.fork("secret", team="red")
    req = sampling_pb2.SampleRequest(
        model="secret",
        prompt_tokens=to_tensor(PROMPT),
        params=common_pb2.SamplingParams(max_tokens=2),
    )
    with pytest.raises(grpc.RpcError) as err:
        stack.sampler.stub.Sample(req, metadata=team_md("blue"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert stack.sampler.stub.Sample(req, metadata=team_md("red")).checkpoint


@pytest.mark.slow
def test_replica_heartbeats_into_the_registry(sampling_stack):
    stack = sampling_stack
    sample(stack, "tiny", max_tokens=2)
    import asyncio

    import redis.asyncio as aioredis

    async def read():
        client = aioredis.from_url(REDIS_URL)
        try:
            return await list_replicas(client, stack.prefix)
        finally:
            await client.aclose()

    def listed_loaded():
        replicas = asyncio.run(read())
        return replicas if replicas and "tiny/base" in replicas[0].loaded else None

    (info,) = wait_until(listed_loaded, what="a heartbeat listing tiny/base", interval=0.1)
    assert info.address == stack.sampler.server.address and "tiny/base" in info.loaded
    ttl = redis.Redis.from_url(REDIS_URL).pttl(f"{stack.prefix}replica:{info.id}")
    assert 0 < ttl <= 5000


@pytest.mark.slow
def test_a_head_missed_while_redis_was_down_is_reconciled_on_reconnect(trainer_stack, tmp_path):
    from tests.stack import PrivateRedis, SamplerReplica, free_port

    stack = trainer_stack
    stack.fork("m", rank=4)
    port = free_port()
    redis_a = PrivateRedis(port, tmp_path / "redis-a")
    replica = SamplerReplica(stack.config.store, stack.prefix, redis_url=redis_a.url)
    redis_b = None
    try:
        stack.sampler = replica
        assert sample(stack, "m", max_tokens=2).checkpoint.startswith("s000000")
        wait_until(lambda: replica.replica.watcher.reconciles == 1, what="the first reconcile")
        redis_a.stop()
        # A step while the replica's Redis is down: its event never reaches the replica
        # (the trainer publishes elsewhere), only the head mirror will tell.
        reply = stack.train.Step(
            training_pb2.StepRequest(
                model="m", data=batch(seed=1), loss_fn="cross_entropy", adam=adam(1e-2)
            )
        ).optim_step
        # The Redis that comes back holds the mirror key the trainer would have written
        # (an RDB made beforehand), and no message is ever published on it.
        staging = PrivateRedis(free_port(), tmp_path / "redis-b")
        staging.client.set(
            f"{stack.prefix}head:m",
            json.dumps({"model": "m", "checkpoint": reply.checkpoint, "step": reply.step}),
        )
        staging.stop(save=True)
        redis_b = PrivateRedis(port, tmp_path / "redis-b")
        wait_until(
            lambda: f"m/{reply.checkpoint}" in replica.sampler.loaded_checkpoints(),
            what="reconciliation from the head mirror",
        )
        # Counted once the reconnect's announce is done, which may be just after the
        # reconciled load is visible (a CI run read it in between): waited for, not read.
        wait_until(lambda: replica.replica.watcher.reconciles >= 2, what="the reconcile counted")
    finally:
        replica.stop()
        if redis_b is not None:
            redis_b.stop()


def test_a_replica_back_on_an_emptied_redis_reloads_its_heads_and_reregisters_at_once(
    trainer_stack, tmp_path
):
    """Redis came back without its data (no RDB: no head mirror, no registry), and nothing
    is ever published on it: on reconnect the replica still preloads the store's head of
    every model it serves (the heads come from the store, not from a mirror that may be
    stale or gone), and puts itself back in the registry without waiting for a heartbeat
    (here an hour away)."""
    from tests.stack import PrivateRedis, SamplerReplica, free_port

    stack = trainer_stack
    stack.fork("m", rank=4)
    port = free_port()
    redis_a = PrivateRedis(port, tmp_path / "redis-a")
    # The trainer publishes on the suite's Redis: no event or mirror reaches this one.
    replica = SamplerReplica(
        stack.config.store, stack.prefix, redis_url=redis_a.url, heartbeat_seconds=3600
    )
    redis_b = None
    try:
        stack.sampler = replica
        assert sample(stack, "m", max_tokens=2).checkpoint.startswith("s000000")  # it serves m
        watcher = replica.replica.watcher
        wait_until(lambda: watcher.reconciles == 1, what="the first reconciliation")
        redis_a.stop()  # without saving: it comes back empty
        reply = stack.train.Step(
            training_pb2.StepRequest(
                model="m", data=batch(seed=1), loss_fn="cross_entropy", adam=adam(1e-2)
            )
        ).optim_step
        redis_b = PrivateRedis(port, tmp_path / "redis-b")
        wait_until(lambda: watcher.reconciles == 2, what="the reconnection")
        replica.sampler.call(lambda: None)  # the preloads its reconciliation queued have run
        assert f"m/{reply.checkpoint}" in replica.sampler.loaded_checkpoints()
        assert redis_b.client.exists(replica_key(watcher.info.id, stack.prefix))
    finally:
        replica.stop()
        redis_a.stop()
        if redis_b is not None:
            redis_b.stop()
