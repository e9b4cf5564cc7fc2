"""The sampler bench's baseline: transformers `generate` on the same weights, and the
machine's limit (weight bytes a decode step reads, memory bandwidth, the step's matmuls),
both run in a child process of their own (see `HFWorker`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import ChildCalls, median_time, serve_calls
from bench.sampler_decode import BATCH, NEW, now


class HFBaseline:
    """transformers generate on the same weights: decode time = generate − prefill."""

    def __init__(self, path: Path, dtype: str = "fp32") -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype
        ).eval()
        common = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
        self.greedy = dict(common, do_sample=False)
        self.sampled = dict(common, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, sample: bool) -> tuple[float, torch.Tensor]:
        start = now()
        out = self.model.generate(prompt, **(self.sampled if sample else self.greedy))
        return now() - start, out[:, prompt.shape[1] :]

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor) -> float:
        start = now()
        self.model(prompt, use_cache=True)
        return now() - start


class HFWorker(ChildCalls):
    """`HFBaseline` (and the machine-limit probe) in a child process, called like one.

    Why a process: torch's CPU ops run on OpenMP (libgomp), and every thread that runs a
    parallel op keeps a team of workers for the life of the process. With more such workers
    than cores (here: this thread's, the replica's engine thread's), libgomp stops spinning
    and puts threads to sleep at every parallel region, which made the engine's decode step
    ~2x slower than in a sampler process of its own (`headway serve` runs each service as a
    child process) and transformers' ~15% slower. The baseline in a process of its own, and
    no torch work on this thread, leave the replica's engine thread the only team here.
    """

    def __init__(self, path: Path, dtype: str = "fp32") -> None:
        super().__init__("transformers baseline process", _hf_serve, str(path), dtype)
        self.params = self.call("params")

    def generate(self, prompt: torch.Tensor, sample: bool) -> tuple[float, torch.Tensor]:
        return self.call("generate", prompt, sample)

    def prefill(self, prompt: torch.Tensor) -> float:
        return self.call("prefill", prompt)

    def machine_limit(self, repeats: int) -> dict[str, float]:
        return self.call("machine_limit", repeats)


def _hf_serve(path: str, dtype: str, conn: Any) -> None:
    """The baseline process: answers HFWorker's calls until told to stop."""
    hf = HFBaseline(Path(path), dtype)
    calls: dict[str, Callable[..., Any]] = {
        "params": lambda: sum(p.numel() for p in hf.model.parameters()) / 1e6,
        "generate": hf.generate,
        "prefill": hf.prefill,
        "machine_limit": lambda repeats: machine_limit(hf.model, repeats),
    }
    serve_calls(calls, conn)


def off_main(fn: Callable[[], Any]) -> Any:
    """`fn()` on a short-lived thread: its OpenMP team ends with it (see HFWorker)."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    if not result:
        raise RuntimeError(f"{fn} failed (see the traceback above)")
    return result[0]


# --------------------------------------------------------------------------- machine limit
@torch.inference_mode()
def machine_limit(model: torch.nn.Module, repeats: int) -> dict[str, Any]:
    """Weight bytes a decode step reads, the memory bandwidth, and the step's matmuls alone.

    The matmuls are timed in every layout of `sampler_svc.kernels` (what our engine chooses
    among; F.linear is what transformers calls), per weight shape, interleaved, for the
    model's own projections and for q/k/v and gate/up fused (what our engine multiplies):
    the fastest per shape, summed, is what a decode step's matmuls can cost here. Each
    shape is timed after a read of the model's other weights, as a step reads them in
    between (`kernels.Evictor`: from memory where the model outgrows the cache).
    """
    from sampler_svc.kernels import Evictor, layout_names, time_layouts

    linears = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    weights = list(linears.values())
    step_bytes = sum(w.numel() * w.element_size() for w in weights)  # lm_head = embedding
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    reps = max(repeats, 5)
    src = torch.randn(model_bytes // 4)
    dst = torch.empty_like(src)
    out: dict[str, Any] = {
        "step_bytes": step_bytes,
        "model_bytes": model_bytes,
        "copy_s": median_time(lambda: dst.copy_(src), reps),
        "read_s": median_time(lambda: src.sum(), reps),
    }
    fused: list[torch.Tensor] = []
    for name, w in linears.items():
        if name.endswith("q_proj"):
            base = name[: -len("q_proj")]
            fused.append(torch.cat([linears[base + p] for p in ("q_proj", "k_proj", "v_proj")]))
        elif name.endswith("gate_proj"):
            base = name[: -len("gate_proj")]
            fused.append(torch.cat([linears[base + p] for p in ("gate_proj", "up_proj")]))
        elif not name.endswith(("k_proj", "v_proj", "up_proj")):
            fused.append(w)
    for label, ws in (("", weights), ("fused_", fused)):
        groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for w in ws:
            groups.setdefault(tuple(w.shape), []).append(w)
        others = {
            sh: Evictor(w for other, g in groups.items() if other != sh for w in g) for sh in groups
        }
        for batch in (1, BATCH):
            per_shape = {
                sh: time_layouts(g, batch, rounds=reps, evict=others[sh])
                for sh, g in groups.items()
            }
            for layout in layout_names(ws[0].device, ws[0].dtype):
                out[f"{label}{layout}_b{batch}_s"] = sum(t[layout] for t in per_shape.values())
            out[f"{label}best_b{batch}_s"] = sum(min(t.values()) for t in per_shape.values())
    for batch in (1, BATCH):
        out[f"fastest_b{batch}_s"] = min(out[f"best_b{batch}_s"], out[f"fused_best_b{batch}_s"])
    return out
