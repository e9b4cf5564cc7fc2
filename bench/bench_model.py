"""`make bench-model`: our decoder's prefill and cached decode against transformers' generate.

Same run, same weights (the ~40M Qwen3-shaped config of `configs/qwen3-40m.json`, fp32),
prompt 32 tokens, 64 new tokens, greedy, batch 1 and 8. Decode tokens/s is new tokens over
the decode phase; for transformers the decode phase is generate's time minus a prefill
forward of the same prompt. The same rows again for a Qwen3.5-shaped model of about the
same size (`configs/qwen3_5-40m.json`: 6 Gated DeltaNet + 2 gated-attention layers; our
per-row recurrent state against transformers' own cache and its PyTorch fallback kernels,
the ones it runs without `flash-linear-attention`). Last line (the Qwen3 model's):
`decode_b8_vs_hf=<r> decode_b1_vs_hf=<r>`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import build_bench_model, median_time, print_table  # noqa: E402
from headway.modeling import Transformer, load_model, round_up  # noqa: E402

PROMPT, NEW = 32, 64


@torch.inference_mode()
def greedy(model: Transformer, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Prefill once, then `new` one-token decode steps; no host sync inside the loop."""
    B, T = prompt.shape
    caches = model.new_caches(B, round_up(T + new))
    out = torch.empty(B, new, dtype=torch.long)
    last = torch.full((B,), T - 1)
    logits = model(prompt, torch.arange(T).expand(B, T), caches=caches, output_index=last)
    for i in range(new):
        token = logits[:, -1].argmax(-1)
        out[:, i] = token
        pos = torch.full((B, 1), T + i)
        logits = model(token[:, None], pos, caches=caches, validate=False)
    return out


@torch.inference_mode()
def prefill_only(model: Transformer, prompt: torch.Tensor) -> None:
    B, T = prompt.shape
    caches = model.new_caches(B, round_up(T + NEW))
    model(prompt, torch.arange(T).expand(B, T), caches=caches, output_index=torch.full((B,), T - 1))


def measure(name: str, repeats: int, label: str = "") -> tuple[list[list], dict[int, float]]:
    """Table rows (prefixed `label`) and decode ratios per batch of the config `name`."""
    import transformers

    torch.manual_seed(0)
    path = build_bench_model(name)
    ours, _ = load_model(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"model: {name} ({params:.1f}M params, fp32), torch threads {torch.get_num_threads()}")

    hf_kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    rows, ratios = [], {}
    for batch in (1, 8):
        prompt = torch.randint(0, ours.config.vocab_size, (batch, PROMPT))
        # Same weights, same greedy decode: the tokens must agree, or the figures mean nothing.
        ours_tokens = greedy(ours, prompt, NEW)
        with torch.inference_mode():
            hf_tokens = hf.generate(prompt, **hf_kwargs)[:, PROMPT:]
        agree = (ours_tokens == hf_tokens).float().mean().item()

        t_pre = median_time(lambda p=prompt: prefill_only(ours, p), repeats)
        t_all = median_time(lambda p=prompt: greedy(ours, p, NEW), repeats)
        with torch.inference_mode():
            t_hf_pre = median_time(lambda p=prompt: hf(p, use_cache=True), repeats)
            t_hf_all = median_time(lambda p=prompt: hf.generate(p, **hf_kwargs), repeats)
        ours_decode = batch * NEW / (t_all - t_pre)
        hf_decode = batch * NEW / (t_hf_all - t_hf_pre)
        ratios[batch] = ours_decode / hf_decode
        rows.append(
            [
                f"{label}prefill b{batch} tok/s",
                batch * PROMPT / t_pre,
                batch * PROMPT / t_hf_pre,
                t_hf_pre / t_pre,
            ]
        )
        rows.append([f"{label}decode b{batch} tok/s", ours_decode, hf_decode, ratios[batch]])
        rows.append([f"{label}greedy tokens equal b{batch}", f"{agree:.0%}", "", ""])
    shutil.rmtree(path, ignore_errors=True)
    return rows, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows, ratios = measure("qwen3-40m", args.repeats)
    rows35, _ = measure("qwen3_5-40m", args.repeats, label="qwen3.5 ")
    print_table(
        "decoder speed (median of repeats)",
        ["metric", "headway", "transformers", "ratio"],
        rows + rows35,
    )
    print(f"decode_b8_vs_hf={ratios[8]:.2f} decode_b1_vs_hf={ratios[1]:.2f}")


if __name__ == "__main__":
    main()
