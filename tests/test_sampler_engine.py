"""The sampler's engine on its own (no services): the few-rows matmul layout of decode
steps against the model's own path in every kernel layout and in bf16, fused weights kept
current by reloads, adapter slots reloaded in place (from mapped files too), full weights
copied from a file, and the draw (top-k/top-p as a full sort)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from headway.modeling import LoraConfig, ModelConfig, ModelError, Transformer
from headway.modeling.load import hf_state_dict
from headway.modeling.lora import peft_config
from headway.modeling.model import grouped_attention
from headway.store.store import ADAPTER_FILE
from headway.store.tensorfile import write_safetensors
from headway.store.weights import read_adapter
from sampler_svc import kernels, sampling
from sampler_svc.engine import Engine, GenerationJob
from sampler_svc.kernels import (
    ATTENTIONS,
    PACKED,
    KernelChoice,
    grouped_fp32_attention,
    layout_names,
    pick,
    rows_linear,
)
from sampler_svc.multilora import AdapterBank
from sampler_svc.requests import row_generator
from sampler_svc.sampling import DrawParams, draw
from sampler_svc.weights import copy_weights_file
from tests.stack import TINY_DIMS

FAMILIES = {
    "qwen3": dict(model_type="qwen3", qk_norm=True, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", qkv_bias=True, tie_word_embeddings=False),
}


def tiny_model(family: str, seed: int = 0) -> Transformer:
    config = ModelConfig(**TINY_DIMS, **FAMILIES[family])
    model = Transformer(config)
    model.init_weights(std=0.1, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # nonzero biases, so that the bias path is exercised
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def adapter(bank: AdapterBank, rank: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, A in bank.A.items():
        out_f, in_f = bank.B[key].shape[1], A.shape[2]
        tensors[f"{key}.lora_A"] = torch.randn(rank, in_f, generator=gen) * 0.1
        tensors[f"{key}.lora_B"] = torch.randn(out_f, rank, generator=gen) * 0.1
    return tensors


def make_engine(family: str, layout: str | None = "linear") -> Engine:
    model = tiny_model(family)
    bank = AdapterBank(model, slots=2, max_rank=8)
    bank.load(1, LoraConfig(rank=4, alpha=8), adapter(bank, 4, seed=7))
    return Engine(model, bank, max_batch=8, max_seq_len=128, layout=layout)


def run(
    engine: Engine, prompt: list[int], n: int, slot: int, draws: list[DrawParams], max_tokens=24
):
    """Admit one job and step it to the end: per row (tokens, logprobs)."""
    out: dict[int, list[tuple[int, float]]] = {i: [] for i in range(n)}

    def emit(kind, row, payload):
        if kind == "token":
            out[row].append(payload)

    job = GenerationJob(prompt, n, max_tokens, frozenset(), draws, slot=slot, emit=emit)
    engine.admit(job)
    while job.live_rows:
        engine.step()
    return [([t for t, _ in out[i]], np.array([lp for _, lp in out[i]])) for i in range(n)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (5, 64), (3, 1, 64), (1, 7, 64)])
def test_rows_linear_is_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(48, 64, generator=gen)
    b = torch.randn(48, generator=gen) if bias else None
    got, want = rows_linear(x, w, b), F.linear(x, w, b)
    assert got.shape == want.shape and got.is_contiguous()
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_kernel_layout_decodes_as_the_model_path(family, monkeypatch):
    """Decode steps and short prefills in each few-row layout (fused q/k/v and gate/up, one
    live row duplicated to two for `rows`) give the tokens and, within 1e-5, the logprobs of
    the model's own unfused F.linear path, with and without an adapter, mixed slots too."""
    prompt = [5, 17, 33, 8, 41, 12]
    jobs = [  # (n, slot, temperature)
        (1, 0, 0.0),
        (1, 1, 0.0),
        (3, 0, 1.0),
        (3, 1, 1.0),
    ]
    results = {}
    for layout in (*layout_names(), None):  # None: every forward by the model path
        with monkeypatch.context() as m:
            if layout is None:
                m.setattr(KernelChoice, "table", lambda self, rows: None)
            engine = make_engine(family, layout=layout or "linear")
            for n, slot, temp in jobs:
                draws = [DrawParams(temp, 1.0, 0, row_generator(3, i)) for i in range(n)]
                results[layout, n, slot] = run(engine, prompt, n, slot, draws)
            mixed = mixed_run(engine, prompt)
            results[layout, "mixed"] = mixed
    for layout in layout_names():
        for key in [(n, slot) for n, slot, _ in jobs] + [("mixed",)]:
            fast, model_path = results[(layout, *key)], results[(None, *key)]
            for (tf, lf), (tm, lm) in zip(fast, model_path, strict=True):
                assert tf == tm, (layout, key)
                assert np.abs(lf - lm).max() <= 1e-5, (layout, key)


def mixed_run(engine: Engine, prompt: list[int]):
    """Two jobs of different slots decoding in the same steps: per row (tokens, logprobs)."""
    out: dict[tuple[int, int], list[tuple[int, float]]] = {}
    jobs = []
    for j, slot in enumerate((1, 0)):
        draws = [DrawParams(1.0, 1.0, 0, row_generator(9 + j, i)) for i in range(2)]

        def emit(kind, row, payload, j=j):
            if kind == "token":
                out.setdefault((j, row), []).append(payload)

        job = GenerationJob(prompt[j:], 2, 12, frozenset(), draws, slot=slot, emit=emit)
        engine.admit(job)
        jobs.append(job)
    while any(job.live_rows for job in jobs):
        engine.step()
    assert engine.mixed_steps > 0
    return [([t for t, _ in v], np.array([lp for _, lp in v])) for _, v in sorted(out.items())]


def test_measured_kernel_choice_covers_every_shape_and_bucket(tmp_path, monkeypatch):
    """The engine measures each fused decode shape at each batch bucket, caches the result
    on disk, and a second engine of the same shapes reads the cache instead of timing."""
    monkeypatch.setenv("HEADWAY_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.delenv("HEADWAY_KERNELS", raising=False)
    first = Engine(tiny_model("qwen3"), None, max_batch=4, max_seq_len=64)
    c = first.kernels
    shapes = {shape for shape, _ in c.choice}
    d = TINY_DIMS
    q = d["num_attention_heads"] * d["head_dim"]
    kv = d["num_key_value_heads"] * d["head_dim"]
    assert (q + 2 * kv, d["hidden_size"]) in shapes  # fused q/k/v
    assert (2 * d["intermediate_size"], d["hidden_size"]) in shapes  # fused gate/up
    assert c.buckets == [1, 2, 4, 8, 16, 32]
    assert set(c.choice) == {(s, b) for s in shapes for b in c.buckets}
    assert all(c.choice[k] == pick(c.times[k]) for k in c.choice)
    # Decode attention too: SDPA or grouped matmuls, per bucket.
    assert all(c.attention[b] == pick(c.times[("attention", 0), b]) for b in c.buckets)
    assert c.cached == 0 and (tmp_path / "kernels.json").exists()
    second = Engine(tiny_model("qwen3"), None, max_batch=4, max_seq_len=64)
    assert second.kernels.cached == len(c.choice) + len(c.buckets)
    assert second.kernels.choice == c.choice and second.kernels.attention == c.attention


def test_fused_weights_are_the_parameters_storage():
    """Copying new weights into the q/k/v and gate/up parameters (what a full reload does)
    changes the fused weights the decode steps read: the engine serves the new weights."""
    engine = make_engine("qwen2")
    other = tiny_model("qwen2", seed=5)
    attn, mlp = engine.model.layers[0].self_attn, engine.model.layers[0].mlp
    with torch.no_grad():
        for name, p in engine.model.state_dict().items():
            p.copy_(other.state_dict()[name])
    fused = attn.fused_qkv
    assert torch.equal(
        fused.weight, torch.cat([other.layers[0].self_attn.q_proj.weight,
                                 other.layers[0].self_attn.k_proj.weight,
                                 other.layers[0].self_attn.v_proj.weight])
    )  # fmt: skip
    q_bias = other.layers[0].self_attn.q_proj.bias
    assert torch.equal(fused.bias[: attn.q_proj.weight.shape[0]], q_bias)
    assert mlp.fused_gate_up.weight.data_ptr() == mlp.gate_proj.weight.data_ptr()
    prompt = [3, 9, 27]
    draws = [DrawParams(0.0, 1.0, 0, None)]
    got = run(engine, prompt, 1, 0, draws)
    fresh = Engine(other, None, max_batch=8, max_seq_len=128, layout="linear")
    want = run(fresh, prompt, 1, 0, draws)
    assert got[0][0] == want[0][0]
    assert np.abs(got[0][1] - want[0][1]).max() <= 1e-5


def test_a_slot_reloaded_with_a_smaller_adapter_holds_only_it():
    """Only the columns beyond the new rank that an earlier adapter wrote are cleared: the
    slot ends up exactly as if the small adapter had been loaded into a fresh bank."""
    model = tiny_model("qwen3")
    bank = AdapterBank(model, slots=2, max_rank=8)
    small = adapter(bank, 2, seed=2)
    bank.load(1, LoraConfig(rank=8, alpha=8), adapter(bank, 8, seed=1))
    bank.load(1, LoraConfig(rank=2, alpha=4), small)
    # An adapter that leaves out a projection clears that projection's columns too.
    partial = {k: v for k, v in adapter(bank, 3, seed=3).items() if "q_proj" not in k}
    bank.load(2, LoraConfig(rank=8, alpha=8), adapter(bank, 8, seed=4))
    bank.load(2, LoraConfig(rank=3, alpha=3), partial)
    fresh = AdapterBank(tiny_model("qwen3"), slots=2, max_rank=8)
    fresh.load(1, LoraConfig(rank=2, alpha=4), small)
    fresh.load(2, LoraConfig(rank=3, alpha=3), partial)
    for key in bank.A:
        assert torch.equal(bank.A[key], fresh.A[key]) and torch.equal(bank.B[key], fresh.B[key])
    assert bank.scaling_values == fresh.scaling_values == [0.0, 2.0, 1.0]
    assert torch.equal(bank.scaling, fresh.scaling)


def save_adapter_files(path, config: LoraConfig, tensors) -> None:
    """A PEFT adapter directory as the trainer writes it (`write_safetensors`)."""
    path.mkdir()
    peft = {f"base_model.model.model.{k}.weight": v for k, v in tensors.items()}
    write_safetensors(path / ADAPTER_FILE, peft, {"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(peft_config(config)))


@pytest.mark.parametrize("keep", [False, True])
def test_an_adapter_read_from_its_file_decodes_as_the_adapter(tmp_path, keep):
    """The sampler reads an adapter from its file: copied into the slot (keep=False), or
    served from the tensors read in place (keep=True, the reload's path) and stacked into
    the slot only when a batch mixes it with another adapter. At a rank below the slot's,
    after a larger adapter occupied the slot, and leaving out a projection (its update is
    zero), the engine decodes exactly as an engine given the adapter's tensors in memory,
    alone and in a mixed batch, and the slot ends up holding exactly the adapter."""
    large, small = LoraConfig(rank=8, alpha=8), LoraConfig(rank=3, alpha=6)
    engine = make_engine("qwen3")
    small_tensors = {
        k: v for k, v in adapter(engine.bank, 3, seed=11).items() if ".q_proj." not in k
    }
    save_adapter_files(tmp_path / "large", large, adapter(engine.bank, 8, seed=10))
    save_adapter_files(tmp_path / "small", small, small_tensors)
    engine.bank.load(1, *read_adapter(tmp_path / "large"))  # stacked: extent 8
    engine.bank.load(1, *read_adapter(tmp_path / "small", mapped=keep), keep=keep)
    assert bool(engine.bank.pending) == keep
    fresh = make_engine("qwen3")
    fresh.bank.load(1, small, small_tensors)
    draws = [DrawParams(0.0, 1.0, 0, None)]
    got, want = run(engine, [3, 9, 27], 1, 1, draws), run(fresh, [3, 9, 27], 1, 1, draws)
    assert got[0][0] == want[0][0]
    assert np.array_equal(got[0][1], want[0][1])
    assert bool(engine.bank.pending) == keep  # one adapter per batch: still in place
    got, want = mixed_run(engine, [3, 9, 27, 4]), mixed_run(fresh, [3, 9, 27, 4])
    for (tg, lg), (tw, lw) in zip(got, want, strict=True):
        assert tg == tw and np.abs(lg - lw).max() <= 1e-6
    assert not engine.bank.pending
    for key in engine.bank.A:
        assert torch.equal(engine.bank.A[key], fresh.bank.A[key])
        assert torch.equal(engine.bank.B[key], fresh.bank.B[key])


def test_an_adapter_of_the_wrong_shape_is_refused_and_changes_nothing(tmp_path):
    """A file whose tensors do not fit the base (another base's adapter) is a ModelError
    naming the projection, and the slot keeps what it served."""
    engine = make_engine("qwen3")
    before = {k: (engine.bank.views[1][k][0].clone(), engine.bank.views[1][k][1].clone())
              for k in engine.bank.A}  # fmt: skip
    bad = adapter(engine.bank, 4, seed=5)
    key = next(iter(engine.bank.A))
    bad[f"{key}.lora_A"] = bad[f"{key}.lora_A"][:, :-1]
    save_adapter_files(tmp_path / "bad", LoraConfig(rank=4, alpha=8), bad)
    with pytest.raises(ModelError, match=key):
        engine.bank.load(1, *read_adapter(tmp_path / "bad", mapped=True), keep=True)
    for k, (a, b) in before.items():
        assert torch.equal(engine.bank.views[1][k][0], a)
        assert torch.equal(engine.bank.views[1][k][1], b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_weights_are_copied_from_the_file_into_the_engine(tmp_path, dtype):
    """A full reload copies a checkpoint file into the engine's (fused) tensors; a bf16
    engine converts the fp32 file's numbers as `.to(bf16)` does."""
    engine = Engine(tiny_model("qwen2").to(dtype), None, max_batch=8, max_seq_len=128)
    other = tiny_model("qwen2", seed=5)
    write_safetensors(tmp_path / "w.safetensors", hf_state_dict(other), {"format": "pt"})
    copy_weights_file(tmp_path / "w.safetensors", engine.model)
    want = other.state_dict()
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, want[name].to(dtype)), name
    fused = engine.model.layers[0].mlp.fused_gate_up.weight
    assert torch.equal(fused[: want["layers.0.mlp.gate_proj.weight"].shape[0]],
                       want["layers.0.mlp.gate_proj.weight"].to(dtype))  # fmt: skip


def test_a_second_reload_reuses_the_copy_plan_until_the_tensors_move(tmp_path):
    """Where each tensor of a weights file goes is worked out once per model and header and
    reused by the next reload of the same model; a model whose tensors were re-pointed
    since (as fusing q/k/v does), or replaced, gets a new plan: each reload lands in the
    live tensors. A copy told not to keep its plan leaves none."""
    from sampler_svc import weights

    model = tiny_model("qwen2")
    for seed in (5, 6):
        other = tiny_model("qwen2", seed=seed)
        write_safetensors(tmp_path / f"{seed}.safetensors", hf_state_dict(other), {"format": "pt"})
    copy_weights_file(tmp_path / "5.safetensors", model)
    plan = weights._PLANS[model]
    copy_weights_file(tmp_path / "6.safetensors", model)
    assert weights._PLANS[model] is plan  # same header, same tensors: reused
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, tiny_model("qwen2", seed=6).state_dict()[name]), name
    Engine(model, None, max_batch=8, max_seq_len=128)  # fuses: q/k/v, gate/up re-pointed
    copy_weights_file(tmp_path / "5.safetensors", model)
    assert weights._PLANS[model] is not plan
    want = tiny_model("qwen2", seed=5).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    fused = model.layers[0].self_attn.fused_qkv.weight
    q = want["layers.0.self_attn.q_proj.weight"]
    assert torch.equal(fused[: q.shape[0]], q)  # in the fused storage the engine multiplies
    plan = weights._PLANS[model]
    norm = model.layers[0].input_layernorm
    norm.weight = torch.nn.Parameter(torch.zeros_like(norm.weight))  # a parameter replaced
    copy_weights_file(tmp_path / "6.safetensors", model)
    assert weights._PLANS[model] is not plan
    assert torch.equal(norm.weight, tiny_model("qwen2", seed=6).layers[0].input_layernorm.weight)
    fresh = tiny_model("qwen2")  # a model about to be moved or fused keeps no plan
    copy_weights_file(tmp_path / "5.safetensors", fresh, keep_plan=False)
    assert fresh not in weights._PLANS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_copies_follow_a_full_reload(tmp_path, dtype):
    """The `packed` layout multiplies by oneDNN-blocked copies of the weights. A full
    reload copies new weights into the engine in place: until re-packed, the engine decodes
    from the plain (new) weights, never the stale copies; after `repack`, from fresh copies;
    both as an engine built on the new weights does."""
    if PACKED not in layout_names("cpu", dtype):
        pytest.skip(f"this CPU's oneDNN cannot pack {dtype} (no oneDNN, or bf16 without AVX-512)")
    prompt, draws = [5, 17, 33, 8, 41, 12], [DrawParams(0.0, 1.0, 0, None)]
    engine = Engine(tiny_model("qwen2").to(dtype), None, 8, 128, layout=PACKED)
    assert engine.packed is not None and engine.packed.missing() == 0 and engine.packed.nbytes
    before = run(engine, prompt, 1, 0, draws, 12)
    other = tiny_model("qwen2", seed=5)
    want = run(Engine(other.to(dtype), None, 8, 128, layout=PACKED), prompt, 1, 0, draws, 12)
    assert before[0][0] != want[0][0]  # the two weight sets decode differently
    write_safetensors(tmp_path / "w.safetensors", hf_state_dict(other), {"format": "pt"})
    copy_weights_file(tmp_path / "w.safetensors", engine.model)
    engine.weights_changed()
    assert engine.packed.missing() > 0
    stale = run(engine, prompt, 1, 0, draws, 12)  # plain oneDNN on the copied weights
    assert engine.repack(limit=1) == 1 and engine.packed.missing() > 0
    engine.repack()
    fresh = run(engine, prompt, 1, 0, draws, 12)
    tol = 1e-5 if dtype == torch.float32 else 0.05
    for got in (stale, fresh):
        assert got[0][0] == want[0][0]
        assert np.abs(got[0][1] - want[0][1]).max() <= tol


def frequencies(logits: torch.Tensor, params: DrawParams, draws: int) -> np.ndarray:
    counts = np.zeros(logits.shape[-1])
    for _ in range(draws):
        token, _ = draw(logits[None], [params])
        counts[int(token[0])] += 1
    return counts / draws


@pytest.mark.slow
def test_the_draw_follows_the_shaped_distribution():
    """Temperature, top-k and top-p shape the draw: frequencies match the renormalised
    distribution, and a token outside top-k / top-p is never drawn."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    gen = torch.Generator().manual_seed(0)
    cases = [  # (temperature, top_p, top_k, the distribution drawn from)
        (1.0, 1.0, 0, torch.softmax(logits, -1)),
        (0.5, 1.0, 0, torch.softmax(logits / 0.5, -1)),
        (1.0, 1.0, 3, torch.softmax(logits[:3], -1)),
        # top-p 0.6: keep tokens while the mass before them is below 0.6 (here 2 tokens).
        (1.0, 0.6, 0, torch.softmax(logits[:2], -1)),
    ]
    for temp, top_p, top_k, expected in cases:
        freq = frequencies(logits, DrawParams(temp, top_p, top_k, gen), 4000)
        want = np.zeros(len(logits))
        want[: len(expected)] = expected.numpy()
        assert np.all(freq[want == 0] == 0), (temp, top_p, top_k, freq)
        assert np.abs(freq - want).max() < 0.03, (temp, top_p, top_k, freq, want)


def test_the_draw_is_seeded_per_row_and_greedy_is_the_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 50, generator=gen) * 2

    def rows(seed: int) -> list[DrawParams]:
        return [
            DrawParams(1.0, 1.0, 0, row_generator(seed, 0)),
            DrawParams(0.0, 1.0, 0, row_generator(seed, 1)),  # greedy
            DrawParams(0.8, 0.9, 10, row_generator(seed, 2)),
            DrawParams(1.0, 1.0, 0, row_generator(seed, 3)),
            DrawParams(1.3, 1.0, 5, row_generator(seed, 4)),
        ]

    a, b, c = rows(4), rows(4), rows(5)
    draws_a = [draw(logits, a)[0].tolist() for _ in range(20)]
    draws_b = [draw(logits, b)[0].tolist() for _ in range(20)]
    draws_c = [draw(logits, c)[0].tolist() for _ in range(20)]
    assert draws_a == draws_b and draws_a != draws_c
    assert all(d[1] == int(logits[1].argmax()) for d in draws_a)
    # A row's tokens do not depend on the rows drawn beside it.
    alone = rows(4)[3:4]
    assert [draw(logits[3:4], alone)[0].item() for _ in range(20)] == [d[3] for d in draws_a]
    # Logprobs are the policy's at temperature 1, whatever shaped the draw.
    tokens, lps = draw(logits, rows(4))
    assert torch.allclose(lps, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])


@pytest.mark.parametrize("vocab", [50, 2000])
def test_top_k_top_p_from_candidates_keep_what_a_full_sort_keeps(vocab):
    """The candidate-set filter (topk, then the full sort only for rows whose nucleus runs
    past the candidates) masks exactly the tokens the full sort of the vocabulary masks, and
    seeded draws through it give the same tokens and logprobs."""
    gen = torch.Generator().manual_seed(2)
    # Peaked rows (nucleus among the candidates) and flat ones (the fallback).
    scales = torch.tensor([8.0, 4.0, 0.05, 1.0, 2.0, 0.01, 6.0, 3.0, 0.5, 1.0])
    logits = torch.randn(len(scales), vocab, generator=gen) * scales[:, None]
    top_k = torch.tensor([0, 5, 0, 100, 0, 0, 3, 70, 0, 1])
    top_p = torch.tensor([0.9, 1.0, 0.95, 0.8, 0.5, 1.0, 0.7, 0.99, 0.999, 0.3])
    for scale in (1.0, 0.3):  # also every row at a temperature
        x = logits / scale
        want = sampling._filter_sorted(x, top_k, top_p)
        got = sampling._filter(x, top_k, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.equal(got[~torch.isinf(got)], want[~torch.isinf(want)])

    def params(seed: int) -> list[DrawParams]:
        return [
            DrawParams(0.7 + 0.1 * i, float(top_p[i]), int(top_k[i]), row_generator(seed, i))
            for i in range(len(scales))
        ]

    exact, fast = params(3), params(3)
    for _ in range(10):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(sampling, "_filter", sampling._filter_sorted)
            t_exact, lp_exact = draw(logits, exact)
        t_fast, lp_fast = draw(logits, fast)
        assert torch.equal(t_exact, t_fast) and torch.equal(lp_exact, lp_fast)


@pytest.mark.parametrize("layout", sorted(layout_names("cpu", torch.bfloat16)))
def test_a_bf16_engine_reports_fp32_logprobs_close_to_the_fp32_model(layout):
    """`--dtype bf16`: weights, activations and cache in bf16 (every layout), logprobs
    computed in fp32 from the bf16 logits, within bf16 rounding of the fp32 engine's."""
    prompt = [5, 17, 33, 8, 41, 12]
    draws = [DrawParams(0.0, 1.0, 0, None)]
    model32 = tiny_model("qwen3")
    want = run(Engine(model32, None, 4, 64, layout="linear"), prompt, 1, 0, draws, 8)
    model16 = tiny_model("qwen3").to(torch.bfloat16)
    engine = Engine(model16, None, 4, 64, layout=layout)
    assert engine.caches[0].k.dtype == torch.bfloat16
    assert engine.model.layers[0].self_attn.fused_qkv.weight.dtype == torch.bfloat16
    got = run(engine, prompt, 1, 0, draws, 8)
    assert got[0][1].dtype == np.float64 or got[0][1].dtype == np.float32
    # Teacher-forced on the fp32 tokens: the bf16 engine's logprob of each.
    scored = engine.score(prompt + want[0][0], 0, len(prompt) + 8, None, 0)
    assert np.abs(scored[len(prompt) - 1 :] - want[0][1]).max() < 0.1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grouped_decode_attention_decodes_as_sdpa(family):
    """Decode attention as plain grouped matmuls (the other choices the engine measures,
    in the engine's dtype and in fp32) gives SDPA's tokens and, within 1e-5, its logprobs,
    adapters and mixed slots included."""
    prompt = [5, 17, 33, 8, 41, 12]
    results = {}
    for attention in ATTENTIONS:
        engine = make_engine(family)
        engine.kernels.attention = dict.fromkeys(engine.kernels.buckets, attention)
        for n, slot, temp in [(1, 1, 0.0), (3, 0, 1.0)]:
            draws = [DrawParams(temp, 1.0, 0, row_generator(3, i)) for i in range(n)]
            results[attention, n] = run(engine, prompt, n, slot, draws)
        results[attention, "mixed"] = mixed_run(engine, prompt)
    for name in ATTENTIONS:
        for key in (1, 3, "mixed"):
            for (tg, lg), (ts, ls) in zip(results[name, key], results["sdpa", key], strict=True):
                assert tg == ts
                assert np.abs(lg - ls).max() <= 1e-5


@pytest.mark.parametrize("dims", [(4, 2, 1, 16, 9), (1, 8, 2, 8, 33), (3, 4, 4, 16, 5)])
def test_grouped_attention_is_sdpa(dims):
    B, H, kv, D, L = dims
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, 1, D, generator=gen)
    k, v = torch.randn(2, B, kv, L, D, generator=gen)
    pos = torch.randint(0, L, (B, 1), generator=gen)
    mask = (torch.arange(L) <= pos[..., None])[:, None]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (grouped_attention(q, k, v, mask) - want).abs().max() <= 1e-5
    # A bf16 engine's grouped_fp32: the fp32 result of its bf16 numbers, rounded to bf16
    # (within one bf16 rounding of values of order 1).
    q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ref = F.scaled_dot_product_attention(
        q16.float(), k16.float(), v16.float(), attn_mask=mask, enable_gqa=True
    )
    got = grouped_fp32_attention(q16, k16, v16, mask)
    assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max() <= 1e-2


def test_the_two_level_inverse_cdf_picks_what_a_flat_cumulative_sum_picks():
    """Blocks then one block's cumulative sum: the token a flat fp64 cumulative sum over the
    vocabulary picks for the same u, and never a token of zero probability."""
    gen = torch.Generator().manual_seed(4)
    V = 1000  # not a multiple of the block
    logits = torch.randn(6, V, generator=gen) * torch.tensor([0.1, 1, 3, 8, 1, 2])[:, None]
    logits[4, 300:] = float("-inf")  # a top-k-like cut: zeros past the first blocks
    logits[5, ::2] = float("-inf")
    probs = torch.softmax(logits, -1)
    for _ in range(200):
        u = torch.rand(6, generator=gen, dtype=torch.float64)
        cdf = probs.double().cumsum(-1)
        total = cdf[:, -1]
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        flat = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
        got = sampling._inverse_cdf(probs, u)
        assert torch.equal(got, flat)
        assert bool((probs[torch.arange(6), got] > 0).all())


@pytest.mark.skipif(PACKED not in layout_names(), reason="this torch has no oneDNN to pack")
def test_measuring_the_layouts_packs_at_most_timed_bytes_of_weights(monkeypatch):
    """Timing `packed` needs packed copies: of the first weights up to TIMED_BYTES only (a
    large model's group of one shape is GBs), every layout timed on them, scaled to all."""
    from sampler_svc import kernels

    monkeypatch.setattr(kernels, "TIMED_BYTES", 3 * 64 * 64 * 4)
    packed_counts = []
    real = kernels.PackedWeights.track

    def track(self, weights):
        packed_counts.append(len(weights))
        real(self, weights)

    monkeypatch.setattr(kernels.PackedWeights, "track", track)
    weights = [torch.randn(64, 64) for _ in range(10)]
    times = kernels.time_layouts(weights, 1, rounds=1)
    assert packed_counts == [3] and set(times) == set(layout_names())
    assert all(t > 0 for t in times.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_engine_offers_only_the_layouts_this_cpu_runs(dtype):
    """oneDNN's layouts are candidates only where oneDNN runs the dtype on this CPU (its
    bf16 path needs AVX-512 or AVX-NE-CONVERT: a Zen 3 has neither); an engine of that
    dtype builds, measures and decodes either way, and asking for a layout this machine
    cannot run says which it can."""
    names = layout_names("cpu", dtype)
    assert {"linear", "rows"} <= set(names)
    assert ("onednn" in names) == (PACKED in names) == kernels.onednn_runs(dtype)
    engine = Engine(tiny_model("qwen3").to(dtype), None, 4, 64)
    assert (engine.packed is not None) == (PACKED in names)
    assert {name for times in engine.kernels.times.values() for name in times} <= {
        *names,
        *kernels.ATTENTIONS,
    }
    assert len(run(engine, [5, 17, 33], 1, 0, [DrawParams(0.0, 1.0, 0, None)], 4)[0][0]) == 4
    missing = [n for n in (*kernels.LAYOUTS, PACKED) if n not in names]
    for name in missing:
        with pytest.raises(ValueError, match="choose among linear, rows"):
            Engine(tiny_model("qwen3").to(dtype), None, 4, 64, layout=name)
