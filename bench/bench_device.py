"""`make gpu-check`'s figures: the decoder, the sampler engine and the trainer on one device.

`python bench/bench_device.py --device cuda` (what `make gpu-check` runs) or any other
device (`--device cpu` runs here). Same weights as the other benches (the ~40M Qwen3-shaped
`configs/qwen3-40m.json`), in the device's default dtype unless `--dtype` says otherwise:

- decoder: our prefill + cached greedy decode against transformers' `generate` on the same
  device, weights and dtype, batch 1 and 8 (and whether the greedy tokens agree);
- sampler engine: 8 rows of one request decoded together through `sampler_svc.engine`
  (the path the service runs), tokens/s, and in fp32 the largest gap between the logprobs
  it reported and a full forward of the sampled sequences (the 1e-4 invariant);
- trainer: `Step` (forward, backward, AdamW, checkpoint) of a LoRA and a full fork through
  the trainer's gRPC server in this process (a real Redis: see `headway.testing`).

Every timing on a GPU synchronises the device before the clock is read. Medians of
repeats; the last line is `key=value` figures.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_tokenizer, build_bench_model, clean_redis, print_table  # noqa: E402
from headway.modeling import Transformer, load_model, round_up, token_logprobs  # noqa: E402
from headway.modeling.placement import settle  # noqa: E402
from sampler_svc.kernels import TORCH_DTYPES  # noqa: E402

PROMPT, NEW, ROWS = 32, 64, 8


def timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Median seconds of `fn()` over `repeats` runs (one warmup), synchronising a GPU."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def median(fn: Callable[[], object], repeats: int) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return median


@torch.inference_mode()
def greedy(model: Transformer, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Prefill once, then `new` one-token decode steps on the prompt's device (no host sync)."""
    B, T = prompt.shape
    dev = prompt.device
    caches = model.new_caches(B, round_up(T + new))
    out = torch.empty(B, new, dtype=torch.long, device=dev)
    positions = torch.arange(T, device=dev).expand(B, T)
    logits = model(
        prompt, positions, caches=caches, output_index=torch.full((B,), T - 1, device=dev)
    )
    for i in range(new):
        token = logits[:, -1].argmax(-1)
        out[:, i] = token
        pos = torch.full((B, 1), T + i, device=dev)
        logits = model(token[:, None], pos, caches=caches, validate=False)
    return out


def bench_decoder(path: Path, device: torch.device, dtype: torch.dtype, repeats: int) -> list:
    import transformers

    ours, _ = load_model(path)
    ours = ours.to(device, dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    median = timer(device)
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    rows = []
    for batch in (1, ROWS):
        prompt = torch.randint(0, ours.config.vocab_size, (batch, PROMPT), device=device)
        with torch.inference_mode():
            agree = greedy(ours, prompt, NEW) == hf.generate(prompt, **kwargs)[:, PROMPT:]
            t_ours = median(lambda p=prompt: greedy(ours, p, NEW), repeats)
            t_hf = median(lambda p=prompt: hf.generate(p, **kwargs), repeats)
        rows.append([f"decoder b{batch} tok/s", batch * NEW / t_ours, batch * NEW / t_hf,
                     t_hf / t_ours, f"{agree.float().mean().item():.0%}"])  # fmt: skip
    return rows


def bench_engine(path: Path, device: torch.device, dtype: torch.dtype, repeats: int) -> list:
    from sampler_svc.engine import Engine, GenerationJob
    from sampler_svc.requests import row_generator
    from sampler_svc.sampling import DrawParams

    model, _ = load_model(path)
    model = model.to(device, dtype)
    engine = Engine(model, None, max_batch=ROWS, max_seq_len=round_up(PROMPT + NEW + 1))
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT,)).tolist()
    got: dict[int, list[tuple[int, float]]] = {}

    def run() -> None:
        got.clear()

        def emit(kind: str, row: int, payload: object) -> None:
            if kind == "token":
                got.setdefault(row, []).append(payload)  # type: ignore[arg-type]

        draws = [DrawParams(1.0, 1.0, 0, row_generator(7, i)) for i in range(ROWS)]
        engine.admit(GenerationJob(prompt, ROWS, NEW, frozenset(), draws, emit=emit))
        while engine.rows:
            engine.step()

    seconds = timer(device)(run, repeats)
    gap = ""
    if dtype == torch.float32:
        worst = 0.0
        with torch.inference_mode():
            for pairs in got.values():
                ids = torch.tensor([prompt + [t for t, _ in pairs]], device=device)
                full = token_logprobs(model(ids)[0, :-1], ids[0, 1:])[PROMPT - 1 :].cpu()
                worst = max(worst, (full - torch.tensor([lp for _, lp in pairs])).abs().max())
        gap = f"{float(worst):.1e}"
    return [[f"sampler engine b{ROWS} tok/s", ROWS * NEW / seconds, "", "", gap]]


def bench_trainer(path: Path, device: str, dtype: str, repeats: int) -> list:
    from bench.bench_trainer import LORA_RANK, Bench, ServerThread, make_batch, training_items
    from headway.testing import redis_prefix
    from headway.v1 import common_pb2, model_pb2

    store = Path(tempfile.mkdtemp(prefix="headway-bench-device-"))
    prefix = redis_prefix("bench-device")
    srv = ServerThread(store, prefix, device=device, dtype=dtype)
    try:
        srv.models.AddBase(model_pb2.AddBaseRequest(path=str(path), name="base40m"))
        srv.models.ForkModel(model_pb2.ForkModelRequest(source="base40m", name="full", full=True))
        lora = common_pb2.LoraConfig(rank=LORA_RANK, alpha=2 * LORA_RANK)
        srv.models.ForkModel(model_pb2.ForkModelRequest(source="base40m", name="lora", lora=lora))
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        b = Bench(srv, training_items(make_batch(vocab)))
        median = timer(torch.device(device))
        return [
            [f"trainer Step {name} s", median(lambda n=name: b.step(n), repeats), "", "", ""]
            for name in ("lora", "full")
        ]
    finally:
        srv.stop()
        clean_redis(prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (default cuda)")
    parser.add_argument("--dtype", default="", help="fp32 or bf16 (default: the device's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-trainer", action="store_true", help="skip the trainer (no Redis)")
    args = parser.parse_args()
    try:
        device_name, dtype_name = settle(args.device, args.dtype)
    except ValueError as e:
        parser.error(str(e))
    device, dtype = torch.device(device_name), TORCH_DTYPES[dtype_name]
    torch.manual_seed(0)
    path = build_bench_model()
    add_tokenizer(path)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"device {device_name} ({gpu}), dtype {dtype_name}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    rows = bench_decoder(path, device, dtype, args.repeats)
    rows += bench_engine(path, device, dtype, args.repeats)
    if not args.no_trainer:
        rows += bench_trainer(path, device_name, dtype_name, args.repeats)
    print_table(
        f"on {device_name} in {dtype_name} (medians; transformers on the same device)",
        ["metric", "headway", "transformers", "ratio", "greedy agree / logprob gap"],
        rows,
    )
    figures = {}
    for name, ours, _, ratio, _ in rows:
        key = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")  # "decoder b1 tok/s" → ...
        if ratio != "":
            figures[key.removesuffix("_tok_s") + "_vs_hf"] = ratio
        else:
            figures[key] = ours
    print(" ".join(f"{k}={v:.4g}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
