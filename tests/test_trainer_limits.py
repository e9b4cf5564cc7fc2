"""The trainer's resource bounds: one team can neither stall nor exhaust it.

Each test is the exploit of a missing bound (a request decoded on the event loop before
any limit, forwards or replies kept without limit, models pinned in memory by un-applied
gradients) and checks that the refusal names the limit and changes nothing.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from headway.errors import PUSHBACK_KEY
from headway.tensors import to_tensor
from headway.v1 import common_pb2, model_pb2, training_pb2
from tests.helpers_training import adam, batch, items, rl_datum
from tests.stack import TrainerStack, team_md
from trainer_svc import datums


@pytest.fixture
def make_stack(tmp_path, tiny_base):
    """Trainer stacks with the base "tiny" registered, each with its own limits."""
    stacks: list[TrainerStack] = []

    def make(**config) -> TrainerStack:
        stack = TrainerStack(tmp_path / f"store-{len(stacks)}", **config)
        stacks.append(stack)
        stack.add_base(tiny_base, "tiny")
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def _fb(
    model: str, data, loss_fn: str = "importance_sampling"
) -> training_pb2.ForwardBackwardRequest:
    return training_pb2.ForwardBackwardRequest(model=model, data=data, loss_fn=loss_fn)


def _fc(model: str, data=None, request_id: str = "") -> training_pb2.ForwardCustomRequest:
    return training_pb2.ForwardCustomRequest(
        model=model, data=data or batch(), request_id=request_id
    )


def _ones(reply: training_pb2.ForwardCustomResponse) -> list[common_pb2.Tensor]:
    """Custom-loss weights of 1 for every position of a ForwardCustom's datums."""
    return [to_tensor(np.ones(d.logprobs.shape[0], np.float32)) for d in reply.data]


def _trajectory(turns: list[tuple[list[int], list[int]]], reward: float = 1.0):
    return common_pb2.TrainingItem(
        trajectory=common_pb2.Trajectory(
            turns=[
                common_pb2.Turn(
                    prompt_tokens=to_tensor(np.asarray(p, np.int32)),
                    completion_tokens=to_tensor(np.asarray(c, np.int32)),
                    completion_logprobs=to_tensor(np.full(len(c), -1.0, np.float32)),
                )
                for p, c in turns
            ],
            reward=reward,
        )
    )


def _conversation(turns: int, new: int, continued: bool) -> list[tuple[list[int], list[int]]]:
    """`turns` turns of `new` prompt tokens and `new` completion tokens each; with
    `continued`, each prompt repeats the whole conversation so far (one sequence)."""
    out, so_far = [], []
    for k in range(turns):
        fresh = [(7 * k + i) % 50 + 1 for i in range(new)]
        prompt = so_far + fresh if continued else fresh
        completion = [(3 * k + i) % 50 + 1 for i in range(new)]
        out.append((prompt, completion))
        so_far = prompt + completion
    return out


# --------------------------------------------------------------- batches, before decoding


def test_a_flood_of_tiny_datums_is_refused_on_its_count_before_any_decoding(
    make_stack, monkeypatch
):
    """200,000 one-token datums (a few MB on the wire) used to be decoded one by one on
    the event loop, then trained. Decoding is observed by counting calls of the real
    `datum_from_proto` (instrumentation: the count is the only change)."""
    stack = make_stack()
    stack.fork("m")
    decoded: list[str] = []
    real = datums.datum_from_proto

    def counting(d: common_pb2.Datum, what: str):
        decoded.append(what)
        return real(d, what)

    monkeypatch.setattr(datums, "datum_from_proto", counting)
    one = common_pb2.Datum(input_tokens=to_tensor([1]), target_tokens=to_tensor([2]))
    flood = [common_pb2.TrainingItem(datum=one)] * 200_000
    err = _refused(
        lambda: stack.train.ForwardBackward(_fb("m", flood, "cross_entropy"), timeout=600)
    )
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "200000 items, over the trainer's limit of 65536" in err.details()
    assert "split it" in err.details()
    assert decoded == [] and stack.trainer.loaded == []


def test_turns_over_the_limit_are_refused_before_decoding(make_stack):
    stack = make_stack(max_batch_turns=4)
    stack.fork("m")
    five = [_trajectory(_conversation(5, 3, continued=False))]
    err = _refused(lambda: stack.train.ForwardBackward(_fb("m", five)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "5 trajectory turns, over the trainer's limit of 4" in err.details()
    assert stack.trainer.loaded == []


def test_a_conversation_is_counted_by_the_datum_it_makes_not_by_its_turns(make_stack):
    """Each turn's prompt repeats the conversation: 6 turns sum to 210 tokens, yet they
    make one datum of 59. The pre-decode count must not refuse it; two trajectories of
    separate sequences (12 datums of 9 tokens: 108) are over the limit of 100."""
    stack = make_stack(max_batch_tokens=100)
    stack.fork("m")
    one_sequence = [_trajectory(_conversation(6, 5, continued=True))]
    reply = stack.train.ForwardBackward(_fb("m", one_sequence))
    assert reply.num_datums == 1 and reply.logprobs[0].shape == [59]
    separate = [_trajectory(_conversation(6, 5, continued=False))] * 2
    err = _refused(lambda: stack.train.ForwardBackward(_fb("m", separate)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the trainer's limit of 100" in err.details()


def test_declared_lengths_are_the_datum_lengths_and_never_more():
    """The pre-decode count against the decoder's truth, for continued and separate
    turns; with token dtypes mixed between turns it may only undercount."""
    for continued in (True, False):
        for turns in (1, 2, 5):
            item = _trajectory(_conversation(turns, 4, continued))
            truth = [
                len(d.input_tokens)
                for d in datums.assemble_batch([item], group_size=0, normalize_std=False).datums
            ]
            assert datums.declared_lengths(item) == truth
    mixed = _trajectory(_conversation(3, 4, continued=False))
    wide = mixed.trajectory.turns[1].prompt_tokens
    wide.CopyFrom(to_tensor(np.frombuffer(wide.data, np.int32).astype(np.int64)))
    truth = datums.assemble_batch([mixed], group_size=0, normalize_std=False).datums
    declared = datums.declared_lengths(mixed)
    assert sum(declared) <= sum(len(d.input_tokens) for d in truth)
    assert datums.declared_lengths(items(rl_datum(0, n=12))[0]) == [12]


def test_batch_decoding_runs_off_the_event_loop(make_stack, monkeypatch):
    """While model a's batch is being decoded, the trainer answers other calls, and
    another model trains. Decoding is held at a's first datum on an event the test
    controls (instrumentation of the real `datum_from_proto`: it waits, then decodes)."""
    stack = make_stack()
    stack.fork("a")
    stack.fork("b")
    started, release = threading.Event(), threading.Event()
    real = datums.datum_from_proto

    def gated(d: common_pb2.Datum, what: str):
        if not started.is_set():
            started.set()
            release.wait(timeout=300)  # only a hang guard: the test sets it
        return real(d, what)

    monkeypatch.setattr(datums, "datum_from_proto", gated)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(stack.train.ForwardBackward, _fb("a", batch(seed=1)))
        assert started.wait(timeout=120)
        try:
            head = stack.models.GetHead(model_pb2.GetHeadRequest(model="b"), timeout=60)
            other = stack.train.ForwardBackward(_fb("b", batch(seed=2)), timeout=60)
            assert not held.done(), "a's decoding was released before the others answered"
        finally:
            release.set()
        assert held.result(timeout=120).num_datums == 3
    assert head.step == 0 and other.num_datums == 3


# -------------------------------------------------------------------- pending forwards


def test_pending_forwards_are_capped_per_model_until_a_backward_frees_one(make_stack):
    stack = make_stack()
    stack.fork("m")
    forwards = [stack.train.ForwardCustom(_fc("m", batch(seed=s))) for s in range(4)]
    err = _refused(lambda: stack.train.ForwardCustom(_fc("m", batch(seed=9))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4 custom-loss forwards awaiting BackwardCustom" in err.details()
    assert "run BackwardCustom" in err.details()
    assert len(stack.trainer._states["m"].forwards) == 4
    first = forwards[0]
    stack.train.BackwardCustom(
        training_pb2.BackwardCustomRequest(
            model="m", forward_id=first.forward_id, weights=_ones(first)
        )
    )
    stack.train.ForwardCustom(_fc("m", batch(seed=9)))
    assert len(stack.trainer._states["m"].forwards) == 4


def test_a_forward_whose_graph_does_not_fit_keeps_only_its_inputs(make_stack):
    """The kept graph is what gives way: the backward recomputes the forward."""
    stack = make_stack(max_pending_forward_bytes=64 * 1024)
    stack.fork("m")
    reply = stack.train.ForwardCustom(_fc("m"))
    kept = stack.trainer._states["m"].forwards[reply.forward_id]
    assert kept.graphs is None and 0 < kept.nbytes <= 64 * 1024
    done = stack.train.BackwardCustom(
        training_pb2.BackwardCustomRequest(
            model="m", forward_id=reply.forward_id, weights=_ones(reply)
        )
    )
    assert done.num_datums == 3


def test_a_kept_graph_is_measured(make_stack):
    stack = make_stack()
    stack.fork("m")
    reply = stack.train.ForwardCustom(_fc("m"))
    kept = stack.trainer._states["m"].forwards[reply.forward_id]
    # 42 padded positions through 2 layers of width 64 save tens of KB of activations.
    assert kept.graphs is not None and kept.graph_bytes > 42 * 64 * 2 * 4


def test_a_forward_whose_inputs_do_not_fit_is_refused_before_it_runs(make_stack):
    stack = make_stack(max_pending_forward_bytes=1024)
    stack.fork("m")
    err = _refused(lambda: stack.train.ForwardCustom(_fc("m")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the trainer's limit of 1024 per model" in err.details()
    assert stack.trainer.loaded == []


def test_pending_forwards_are_bounded_over_all_models(make_stack):
    total = 12 * 1024
    stack = make_stack(max_total_pending_forward_bytes=total, max_pinned_per_team=8)
    refusal = None
    for i in range(8):
        stack.fork(f"m{i}")
        try:
            stack.train.ForwardCustom(_fc(f"m{i}"))
        except grpc.RpcError as e:
            refusal = e
            break
        assert stack.trainer._pending_forward_bytes() <= total
    assert refusal is not None and refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"over all models, over the trainer's limit of {total}" in refusal.details()


# ------------------------------------------------------------------------ reply cache


def test_a_forward_custom_retry_is_answered_from_its_pending_forward_never_the_cache(
    make_stack,
):
    stack = make_stack()
    stack.fork("m")
    first = stack.train.ForwardCustom(_fc("m", request_id="fc-1"))
    again = stack.train.ForwardCustom(_fc("m", request_id="fc-1"))
    assert again == first and len(stack.trainer._states["m"].forwards) == 1
    stored = stack.trainer._replies.get("m", "fc-1").value
    assert stored.datums == [] and stored.logprobs == [], "the cache holds datums"
    stack.train.BackwardCustom(
        training_pb2.BackwardCustomRequest(
            model="m", forward_id=first.forward_id, weights=_ones(first)
        )
    )
    err = _refused(lambda: stack.train.ForwardCustom(_fc("m", request_id="fc-1")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "was consumed or discarded" in err.details()
    assert stack.trainer._states["m"].forwards == {}


def test_a_reply_over_the_cache_budget_is_never_applied_twice(make_stack):
    stack = make_stack(reply_cache_model_bytes=4096)
    stack.fork("m")
    big = items(*(rl_datum(i, n=200) for i in range(6)))  # 4800 bytes of logprobs
    request = _fb("m", big)
    request.request_id = "big-1"
    stack.train.ForwardBackward(request)
    err = _refused(lambda: stack.train.ForwardBackward(request))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "applied once already" in err.details()
    assert stack.trainer._states["m"].acc.num_datums == 6


def test_replies_are_bounded_in_bytes_per_model_and_in_total(make_stack):
    stack = make_stack(reply_cache_model_bytes=4096, reply_cache_bytes=6144)
    for name in ("a", "b"):
        stack.fork(name)
        for i in range(12):
            request = _fb(name, batch(seed=i))
            request.request_id = f"{name}-{i}"
            stack.train.ForwardBackward(request)
    cache = stack.trainer._replies
    assert 0 < cache.nbytes <= 6144
    assert cache._bytes.get("a", 0) <= 4096 and cache._bytes["b"] <= 4096
    # The most recent ids are remembered (a retry applies nothing), the oldest forgotten.
    assert cache.get("b", "b-11") is not None and cache.get("a", "a-0") is None


def test_a_long_request_id_is_refused(make_stack):
    stack = make_stack()
    stack.fork("m")
    request = _fb("m", batch())
    request.request_id = "x" * 257
    err = _refused(lambda: stack.train.ForwardBackward(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of 256" in err.details()
    assert stack.trainer.loaded == []


# ---------------------------------------------------------------------- pinned states


def test_a_team_cannot_pin_more_than_its_share_of_the_loaded_models(make_stack):
    """max_loaded_models 4: a team may hold un-applied work on 2 models at once."""
    stack = make_stack(max_loaded_models=4)
    red, blue = team_md("red"), team_md("blue")
    for name in ("r1", "r2", "r3"):
        stack.fork(name, team="red")
    stack.fork("b1", team="blue")
    for name in ("r1", "r2"):
        stack.train.ForwardBackward(_fb(name, batch()), metadata=red)
    err = _refused(lambda: stack.train.ForwardBackward(_fb("r3", batch()), metadata=red))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "on 2 models (r1, r2)" in err.details() and "optim_step" in err.details()
    err = _refused(lambda: stack.train.ForwardCustom(_fc("r3"), metadata=red))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "r3" not in stack.trainer.loaded
    stack.train.ForwardBackward(_fb("b1", batch()), metadata=blue)  # other teams train on
    stack.train.OptimStep(training_pb2.OptimStepRequest(model="r1", adam=adam()), metadata=red)
    stack.train.ForwardBackward(_fb("r3", batch()), metadata=red)


def test_loading_a_model_when_every_slot_holds_unapplied_work_is_overloaded(make_stack):
    """max_loaded_models 2: red and blue each pin one model; green must wait (a retryable
    refusal with a pushback) instead of pushing memory past the bound."""
    stack = make_stack(max_loaded_models=2)
    for team in ("red", "blue", "green"):
        stack.fork(team, team=team)
    for team in ("red", "blue"):
        stack.train.ForwardBackward(_fb(team, batch()), metadata=team_md(team))
    err = _refused(
        lambda: stack.train.ForwardBackward(_fb("green", batch()), metadata=team_md("green"))
    )
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in err.details()
    assert PUSHBACK_KEY in dict(err.trailing_metadata())
    assert sorted(stack.trainer.loaded) == ["blue", "red"]
    stack.train.OptimStep(
        training_pb2.OptimStepRequest(model="red", adam=adam()), metadata=team_md("red")
    )
    stack.train.ForwardBackward(_fb("green", batch()), metadata=team_md("green"))
    assert sorted(stack.trainer.loaded) == ["blue", "green"]
