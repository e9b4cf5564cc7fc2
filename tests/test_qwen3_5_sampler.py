"""Sampling Qwen3.5: per-row recurrent and conv state beside the KV cache, the sampler's
invariants unchanged.

The model on its own: prefill + decode logits equal a full forward, rows at different
positions; a prefill in chunks equals one in one piece; a row reused by a new prompt starts
from zero state; the decode step is the recurrent rule. Then through a real sampler replica
and trainer: sampler logprobs = trainer logprobs (LoRA and full forks, n > 1 rows sharing
one prefill), greedy = argmax of full forwards, seeds reproduce, rows of two LoRA forks in
one step, and a reload never changes the weights under a row in flight; and through the
gateway, the `openai` client gets transformers' logprobs for the sampled tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from headway.modeling import load_model
from headway.modeling.qwen3_5.delta_rule import gated_delta_step, recurrent_gated_delta_rule
from headway.modeling.qwen3_5.state import LinearAttentionState
from headway.tensors import to_tensor
from headway.v1 import common_pb2, model_pb2, sampling_pb2, training_pb2
from tests.helpers_training import adam, batch, greedy_reference, reference_module
from tests.stack import EngineGate, SamplerReplica, TrainerStack, wait_until
from tests.test_qwen3_5_model import SHAPES, VOCAB, build_text
from tests.test_qwen3_5_trainer import qwen35_base
from tests.test_sampler import PROMPT, lps, sample, toks, trainer_logprobs

TOL = 1e-4


def ours(shape: str, path: Path, seed: int = 3) -> torch.nn.Module:
    build_text(shape, seed=seed).save_pretrained(path)
    model, _ = load_model(path)
    return model.eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def at(start: int, end: int, rows: int = 1) -> torch.Tensor:
    return torch.arange(start, end).expand(rows, -1)


# ------------------------------------------------------------------ the model on its own


def test_gated_delta_step_is_one_step_of_the_recurrent_rule():
    gen = torch.Generator().manual_seed(0)
    B, H, Dk, Dv = 3, 4, 8, 6
    q, k = torch.randn(2, B, H, 1, Dk, generator=gen)
    k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(B, H, 1, Dv, generator=gen)
    g = -torch.rand(B, H, 1, generator=gen)
    beta = torch.rand(B, H, 1, generator=gen)
    state = torch.randn(B, H, Dk, Dv, generator=gen)
    want_out, want_state = recurrent_gated_delta_rule(q, k, v, g, beta, state.clone())
    out = gated_delta_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[..., 0], beta[..., 0], state)
    assert (out - want_out[:, :, 0]).abs().max() <= 1e-6
    assert (state - want_state).abs().max() <= 1e-6  # updated in place


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_prefill_then_decode_equals_the_full_forward(shape, tmp_path):
    """Three prompts of different lengths prefilled one by one into rows 2, 0 and 1 of the
    caches, then decoded together (the first rows' window, each row at its own position):
    every logit equals that of one causal forward over the whole sequence."""
    model = ours(shape, tmp_path)
    lengths, steps = (70, 5, 1), 12
    seqs = [tokens(1, n + steps, seed=i)[0] for i, n in enumerate(lengths)]
    caches = model.new_caches(4, 128)
    kinds = ["LinearAttentionState" if t == "linear_attention" else "KVCache" for t in
             model.config.layer_types]  # fmt: skip
    assert [type(c).__name__ for c in caches] == kinds
    with torch.inference_mode():
        full = [model(s[None])[0] for s in seqs]
        order = (2, 0, 1)  # cache row of each sequence
        for seq, n, row, ref in zip(seqs, lengths, order, full, strict=True):
            got = model(seq[None, :n], at(0, n), caches=caches, rows=torch.tensor([row]))
            assert (got[0] - ref[:n]).abs().max() <= TOL
        by_row = sorted(range(3), key=lambda i: order[i])  # sequence in cache rows 0, 1, 2
        windows = [c.window(3, 128) for c in caches]
        worst = 0.0
        for t in range(steps):
            pos = torch.tensor([[lengths[i] + t] for i in by_row])
            ids = torch.stack([seqs[i][lengths[i] + t] for i in by_row])[:, None]
            got = model(ids, pos, caches=windows)
            for r, i in enumerate(by_row):
                worst = max(worst, float((got[r, 0] - full[i][lengths[i] + t]).abs().max()))
    assert worst <= TOL


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_prefill_in_chunks_equals_one_in_one_piece(shape, tmp_path):
    """Chunks of 1, 9, 64 and 16 tokens (crossing the delta rule's 64-token chunks) continue
    each other's state: the logits, the decode after them and the states equal those of the
    one-piece prefill."""
    model = ours(shape, tmp_path)
    seq = tokens(1, 91, seed=5)
    one, pieces = model.new_caches(1, 96), model.new_caches(1, 96)
    with torch.inference_mode():
        whole = model(seq[:, :90], caches=one)
        parts, start = [], 0
        for size in (1, 9, 64, 16):
            piece = seq[:, start : start + size]
            parts.append(model(piece, at(start, start + size), caches=pieces))
            start += size
        assert (torch.cat(parts, dim=1) - whole).abs().max() <= TOL
        nxt = [model(seq[:, 90:], at(90, 91), caches=c) for c in (one, pieces)]
    assert (nxt[0] - nxt[1]).abs().max() <= TOL
    for a, b in zip(one, pieces, strict=True):
        if isinstance(a, LinearAttentionState):
            assert (a.recurrent - b.recurrent).abs().max() <= TOL
            assert (a.conv - b.conv).abs().max() <= TOL


def test_rows_share_a_prefill_move_and_restart_from_zero(tmp_path):
    """The engine's row operations on a hybrid cache: a prompt's state copied into two more
    rows decodes each as its own sequence; the last row moved into a freed one continues
    exactly; a row reused by a new prompt (position 0) ignores what it held."""
    model = ours("gqa-k3-5layers", tmp_path)
    prompt, P = tokens(1, 20, seed=1), 20
    conts = tokens(3, 4, seed=2)
    caches = model.new_caches(4, 64)
    with torch.inference_mode():
        model(prompt, caches=caches, rows=torch.tensor([0]))
        for c in caches:
            c.copy_row(0, slice(1, 3), P)
        win = [c.window(3, 64) for c in caches]
        first = model(conts[:, :2], at(P, P + 2, 3), caches=win)
        for c in caches:  # row 0 finished: row 2 moves into it
            c.copy_row(2, slice(0, 1), P + 2)
        win = [c.window(2, 64) for c in caches]
        moved = model(conts[[2, 1], 2:], at(P + 2, P + 4, 2), caches=win)
        for r in range(3):
            ref = model(torch.cat((prompt[0], conts[r]))[None])[0, P:]
            assert (first[r] - ref[:2]).abs().max() <= TOL
            if r:
                assert (moved[2 - r] - ref[2:]).abs().max() <= TOL
        fresh = tokens(1, 7, seed=3)
        reused = model(fresh, caches=caches, rows=torch.tensor([1]))
        assert (reused - model(fresh)).abs().max() <= TOL


def test_a_bf16_model_samples_near_its_full_forward(tmp_path):
    """bf16 weights (a `--dtype bf16` engine): the conv state is bf16, the recurrent state
    stays fp32, and prefill + decode logprobs stay near the bf16 full forward's."""
    model = ours("gqa-k3-5layers", tmp_path).to(torch.bfloat16)
    seq = tokens(1, 40, seed=4)
    caches = model.new_caches(2, 64)
    states = [c for c in caches if isinstance(c, LinearAttentionState)]
    assert {(s.recurrent.dtype, s.conv.dtype) for s in states} == {(torch.float32, torch.bfloat16)}
    with torch.inference_mode():
        full = model(seq).float().log_softmax(-1)
        out = [model(seq[:, :30], caches=caches, rows=torch.tensor([1]))]
        for t in range(30, 40):
            out.append(
                model(seq[:, t : t + 1], at(t, t + 1), caches=caches, rows=torch.tensor([1]))
            )
        got = torch.cat(out, dim=1).float().log_softmax(-1)
    assert (got - full).abs().max() < 0.05


def test_a_cache_longer_than_the_context_is_refused(tmp_path):
    from headway.modeling import ModelError

    model = ours("mqa-k4-3layers-tied", tmp_path)
    with pytest.raises(ModelError, match="exceeds the model's context of 256"):
        model.new_caches(1, 512)


# ------------------------------------------------------------------ through a sampler replica


@pytest.fixture
def q35_stack(tmp_path: Path):
    """A trainer with the Qwen3.5 base "q35" (text layout) and one sampler replica."""
    stack = TrainerStack(tmp_path / "store")
    stack.add_base(qwen35_base(tmp_path / "base", "text"), "q35")
    stack.sampler = SamplerReplica(
        stack.config.store, stack.prefix, max_seq_len=256, logprobs_chunk_tokens=16
    )
    yield stack
    stack.sampler.stop()
    stack.stop()


def trained(stack, name: str, *, full: bool = False, seed: int = 50):
    """A Qwen3.5 fork one training step away from the base."""
    stack.fork(name, source="q35", full=full, rank=4)
    return stack.train.Step(
        training_pb2.StepRequest(
            model=name, data=batch(seed=seed), loss_fn="cross_entropy", adam=adam(5e-2)
        )
    ).optim_step


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_sampler_logprobs_equal_the_trainers(q35_stack, full):
    """n = 4 rows share one prefill and draw apart; every sampled token's logprob equals
    the trainer's forward of the whole sequence, and ComputeLogprobs (in 16-token pieces,
    the state carried between them) gives them again."""
    stack = q35_stack
    trained(stack, "m", full=full)
    reply = sample(
        stack, "m", n=4, max_tokens=24, temperature=0.8, top_p=0.95, seed=3, ignore_eos=True
    )
    assert len({tuple(toks(s)) for s in reply.sequences}) > 1
    for seq, t in zip(reply.sequences, trainer_logprobs(stack, "m", reply), strict=True):
        assert np.abs(t - lps(seq)).max() <= TOL
    head = stack.models.GetHead(model_pb2.GetHeadRequest(model="m")).id
    seqs = [to_tensor(PROMPT + toks(s)) for s in reply.sequences]
    computed = stack.sampler.stub.ComputeLogprobs(
        sampling_pb2.ComputeLogprobsRequest(model="m", checkpoint=head, sequences=seqs)
    )
    for seq, c in zip(reply.sequences, computed.logprobs, strict=True):
        got = np.frombuffer(c.data, np.float32)[len(PROMPT) - 1 :]
        assert np.abs(got - lps(seq)).max() <= TOL


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_greedy_is_the_argmax_of_full_forwards(q35_stack, full):
    stack = q35_stack
    trained(stack, "m", full=full)
    reply = sample(stack, "m", n=2, max_tokens=20, temperature=0, ignore_eos=True)
    expected = greedy_reference(reference_module(stack, "m"), PROMPT, 20)
    assert [toks(s) for s in reply.sequences] == [expected, expected]


def test_a_seed_reproduces_its_tokens(q35_stack):
    stack = q35_stack
    a, b, c = (
        sample(stack, "q35", n=3, max_tokens=16, seed=s, ignore_eos=True) for s in (11, 11, 12)
    )
    assert [toks(s) for s in a.sequences] == [toks(s) for s in b.sequences]
    assert [toks(s) for s in a.sequences] != [toks(s) for s in c.sequences]


def test_rows_of_two_lora_forks_decode_in_one_step(q35_stack):
    """Two forks' rows in the same decode steps get exactly what each gets alone."""
    import threading

    stack = q35_stack
    trained(stack, "a", seed=50)
    trained(stack, "b", seed=60)
    alone = {m: sample(stack, m, max_tokens=30, temperature=0, ignore_eos=True) for m in "ab"}
    engine = next(iter(stack.sampler.sampler.engines.values())).engine
    before, results = engine.mixed_steps, {}

    def run(m: str) -> None:
        results[m] = sample(stack, m, max_tokens=30, temperature=0, ignore_eos=True)

    threads = [threading.Thread(target=run, args=(m,)) for m in "ab"]
    with EngineGate() as gate:  # a's row is held before its first step until b is queued
        threads[0].start()
        gate.wait_held()
        threads[1].start()
        wait_until(lambda: stack.sampler.sampler.queue_depth, what="b at the replica")
        gate.release()
        for t in threads:
            t.join()
    assert engine.mixed_steps > before
    for m in "ab":
        assert toks(results[m].sequences[0]) == toks(alone[m].sequences[0])
        assert np.abs(lps(results[m].sequences[0]) - lps(alone[m].sequences[0])).max() <= TOL
    assert toks(alone["a"].sequences[0]) != toks(alone["b"].sequences[0])


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_a_reload_never_changes_weights_under_a_row_in_flight(q35_stack, full):
    """The engine is held mid-sequence (EngineGate) while a new head is trained, published
    and loaded; the row finishes with the weights it started with."""
    stack = q35_stack
    sampler = stack.sampler.sampler
    first = trained(stack, "m", full=full)
    wait_until(lambda: f"m/{first.checkpoint}" in sampler.loaded_checkpoints(), what="a load")
    request = sampling_pb2.SampleRequest(
        model="m",
        prompt_tokens=to_tensor(PROMPT),
        checkpoint=first.checkpoint,
        params=common_pb2.SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
    )
    got = []
    with EngineGate(steps=4) as gate:
        for chunk in stack.sampler.stub.SampleStream(request):
            got += np.frombuffer(chunk.tokens.data, np.int32).tolist()
            if len(got) == 5:
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
    assert got == greedy_reference(reference_module(stack, "m", first.checkpoint), PROMPT, 60)
    # And the new head is what a new request gets.
    new = sample(stack, "m", max_tokens=12, temperature=0, ignore_eos=True)
    assert toks(new.sequences[0]) == greedy_reference(reference_module(stack, "m"), PROMPT, 12)


def test_the_openai_client_through_the_gateway_gets_transformers_logprobs(q35_stack):
    """A chat completion of the Qwen3.5 base through the gateway's OpenAI HTTP API: its
    token ids' logprobs equal transformers' forward of the same weights (≤1e-4)."""
    import openai
    from transformers import AutoModelForCausalLM

    from tests.stack import GatewayNode

    stack = q35_stack
    node = GatewayNode(stack.config.store, stack.prefix, stack.server.address)
    try:
        client = openai.OpenAI(base_url=node.http_url, api_key="local")
        c = client.chat.completions.create(
            model="q35",
            messages=[{"role": "user", "content": "what is 1 plus 2?"}],
            max_tokens=12,
            n=2,
            seed=4,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
    finally:
        node.stop()
    hf = AutoModelForCausalLM.from_pretrained(stack.trainer.store.get_model("q35").path).eval()
    for choice in c.choices:
        ids = torch.tensor([c.prompt_token_ids + choice.token_ids])
        with torch.inference_mode():
            ref = hf(ids, use_cache=False).logits[0, :-1].log_softmax(-1)
        ref = ref.gather(-1, ids[0, 1:, None])[:, 0][len(c.prompt_token_ids) - 1 :]
        got = torch.tensor([t.logprob for t in choice.logprobs.content])
        assert len(got) == len(choice.token_ids) == 12
        assert (got - ref).abs().max() <= TOL
