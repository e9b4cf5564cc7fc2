"""`make bench-trainer`: our trainer's training steps against a plain transformers loop.

Same run, same weights (the ~40M Qwen3-shaped config of `configs/qwen3-40m.json`, fp32),
same batch: 8 sequences × 128 tokens of importance-sampling data (first 16 positions of
each masked, random sampling logprobs and advantages, fixed seed), learning rate 1e-5.

- Step: our gRPC `Step` (built-in importance_sampling) on a FULL fork, against a plain
  transformers loop doing full fine-tuning too (forward, log_softmax + gather, the same
  summed loss −Σ w·exp(lp − q)·A, backward, torch.optim.AdamW step), each side 3 steps back
  to back per round. Our Step also writes a checkpoint (weights before the reply; the
  optimizer state after it, overlapping the next step, and waited for at the end of the
  round; fsyncs in the background: see headway/store/durable.py) and the loop saves
  nothing, so the forward/backward and the OptimStep of the full fork are also timed
  apart.
- Custom loss: ForwardCustom, the same loss's gradient computed client-side from the
  returned DatumTensors (w = ratio·A·mask), BackwardCustom, OptimStep; against
  ForwardBackward (built-in) + OptimStep, on a LoRA fork (rank 32), same batch.
- Save: OptimStep alone (after a ForwardBackward) for the LoRA fork (the OptimSteps of
  both runs above) and the full fork: the reply's latency (AdamW, weights written, HEAD
  moved, published), and apart from it the deferred optimizer-state write; the table adds
  the page-cache write of the weights alone (the reply's floor on this machine), into new
  pages and into pages freed by dropping an earlier file's cache, as the store does once
  a superseded checkpoint is on disk.
- bf16: a second trainer started with `--dtype bf16` (its own store, the same base), its
  ForwardBackward on a full fork against ours in fp32 (interleaved) and the loop's, and how
  far its loss and logprobs are from fp32's on the same batch at the same weights (the
  first ForwardBackward of each). Where the CPU does not multiply bf16 faster the trainer
  computes in fp32 and the rows say so.
- torch.distributed: the trainer as 1 process × 2 threads and as 2 processes × 1 thread
  (torchrun, gloo), Step tokens/s on a full and a LoRA fork (bench/trainer_ranks.py).

Medians of repeats after a warmup round, the compared runs interleaved (the machine is
shared and noisy: read the ratios, not the absolute figures). Last line:
`trainer_vs_hf=<r> fb_vs_hf=<r> custom_vs_builtin=<r> lora_save_ms=<ms>
full_optim_vs_adamw=<r> ranks_2x1_vs_1x2=<r>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ChildCalls,
    add_tokenizer,
    build_bench_model,
    clean_redis,
    print_table,
    serve_calls,
)
from bench.sampler_baseline import off_main  # noqa: E402
from bench.trainer_ranks import measure_ranks  # noqa: E402
from headway.channels import CHANNEL_OPTIONS  # noqa: E402
from headway.store import atomic  # noqa: E402
from headway.store.tensorfile import write_safetensors  # noqa: E402
from headway.tensors import floats, to_tensor  # noqa: E402
from headway.testing import redis_prefix, shared_redis_url  # noqa: E402
from headway.v1 import (  # noqa: E402
    common_pb2,
    model_pb2,
    model_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

BATCH, SEQ, PROMPT = 8, 128, 16  # datums, tokens per datum, masked leading positions
LR, BETAS, EPS = 1e-5, (0.9, 0.95), 1e-8  # AdamParams defaults, weight decay 0 both sides
LOSS = "importance_sampling"
LORA_RANK = 32


# ------------------------------------------------------------------------------ setup
class ServerThread:
    """The trainer's grpc.aio server on a private event loop in a daemon thread."""

    def __init__(self, store: Path, prefix: str, **config_fields: Any) -> None:
        from trainer_svc.config import TrainerConfig
        from trainer_svc.server import create_server

        # On the CPU unless told otherwise: these are CPU figures (bench_device.py: a GPU's).
        config_fields.setdefault("device", "cpu")
        config = TrainerConfig(
            store=store, redis_url=shared_redis_url(), redis_prefix=prefix, **config_fields
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def boot() -> tuple[grpc.aio.Server, int, Any]:
            server, port, trainer = await create_server(config)
            await server.start()
            return server, port, trainer

        self.server, port, self.trainer = self.run(boot())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        self.models = model_pb2_grpc.ModelServiceStub(self.channel)
        self.train = training_pb2_grpc.TrainingServiceStub(self.channel)

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.channel.close()
        self.run(self.server.stop(grace=1))
        if self.trainer.redis is not None:
            self.run(self.trainer.redis.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def make_batch(vocab: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """BATCH importance-sampling datums of SEQ tokens: arrays both sides train on."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(BATCH):
        tokens = rng.integers(0, vocab, SEQ + 1)
        w = np.r_[np.zeros(PROMPT), np.ones(SEQ - PROMPT)].astype(np.float32)
        out.append(
            {
                "input": tokens[:-1],
                "target": tokens[1:],
                "w": w,
                "q": (-rng.uniform(9.0, 12.0, SEQ)).astype(np.float32) * w,  # ≈ log(1/32000)
                "a": rng.normal(size=SEQ).astype(np.float32) * w,
            }
        )
    return out


def training_items(batch: list[dict[str, np.ndarray]]) -> list[common_pb2.TrainingItem]:
    out = []
    for d in batch:
        datum = common_pb2.Datum(
            input_tokens=to_tensor(d["input"]),
            target_tokens=to_tensor(d["target"]),
            weights=to_tensor(d["w"]),
            sampling_logprobs=to_tensor(d["q"]),
            advantages=to_tensor(d["a"]),
        )
        out.append(common_pb2.TrainingItem(datum=datum))
    return out


# ---------------------------------------------------------------------------- baseline
class PlainLoop:
    """The reference: a transformers model trained with a textbook loop, full fine-tuning."""

    def __init__(self, path: Path, batch: list[dict[str, np.ndarray]]) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.train()
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0
        )
        self.ids = torch.from_numpy(np.stack([d["input"] for d in batch]))
        self.targets = torch.from_numpy(np.stack([d["target"] for d in batch]))
        self.w, self.q, self.a = (
            torch.from_numpy(np.stack([d[k] for d in batch])) for k in ("w", "q", "a")
        )
        self.first_lp: torch.Tensor | None = None

    def fwd_bwd(self) -> None:
        logits = self.model(input_ids=self.ids).logits
        lp = torch.log_softmax(logits.float(), -1).gather(-1, self.targets[..., None])[..., 0]
        if self.first_lp is None:
            self.first_lp = lp.detach().clone()
        loss = -(self.w * torch.exp(lp - self.q) * self.a).sum()
        loss.backward()

    def opt_step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.fwd_bwd()
        self.opt_step()


class LoopWorker(ChildCalls):
    """`PlainLoop` in a child process, called like one.

    Why a process (as `bench.sampler_baseline.HFWorker`): every thread that runs torch's
    parallel CPU ops keeps an OpenMP team for the life of the process; with the loop's
    team beside the trainer's compute thread's, libgomp has more workers than cores, stops
    spinning and puts them to sleep at every parallel region, slowing both sides (a
    training step is thousands of such regions). `headway serve` runs the trainer as a
    process of its own; the loop gets one too, and this process's main thread runs no torch
    while anything is timed.
    """

    def __init__(self, path: Path, batch: list[dict[str, np.ndarray]]) -> None:
        super().__init__("plain loop process", _loop_serve, str(path), batch)
        self.params: int = self.call("params")
        self.first_lp: torch.Tensor | None = None

    def fwd_bwd(self) -> None:
        self.call("fwd_bwd")
        if self.first_lp is None:
            self.first_lp = self.call("first_lp")

    def opt_step(self) -> None:
        self.call("opt_step")

    def step(self) -> None:
        self.call("step")
        if self.first_lp is None:
            self.first_lp = self.call("first_lp")


def _loop_serve(path: str, batch: list[dict[str, np.ndarray]], conn: Any) -> None:
    """The loop's process: answers LoopWorker's calls until told to stop."""
    loop = PlainLoop(Path(path), batch)
    calls: dict[str, Callable[[], Any]] = {
        "params": lambda: sum(p.numel() for p in loop.model.parameters()),
        "fwd_bwd": loop.fwd_bwd,
        "opt_step": loop.opt_step,
        "step": loop.step,
        "first_lp": lambda: loop.first_lp,
    }
    serve_calls(calls, conn)


# -------------------------------------------------------------------------- measuring
def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times of each fn, run in turn `warmup + repeats` times (warmup runs dropped)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for key, fn in fns.items():
            t = timed(fn)
            if i >= warmup:
                times[key].append(t)
    return times


def med(values: list[float]) -> float:
    return statistics.median(values)


def save_figures(opt_full: list[float], loop_opt: list[float], opt_lora: list[float]) -> str:
    """The last line's save figures: `lora_save_ms`, the median OptimStep of the LoRA fork
    (AdamW on the adapter, checkpoint written, HEAD moved; fsync in the background unless
    the trainer runs with sync_saves), and `full_optim_vs_adamw`, the median OptimStep of
    the full fork over the median AdamW step of the plain loop (AdamW alone)."""
    lora_save_ms = med(opt_lora) * 1e3
    full_optim_vs_adamw = med(opt_full) / med(loop_opt)
    return f"lora_save_ms={lora_save_ms:.1f} full_optim_vs_adamw={full_optim_vs_adamw:.2f}"


def page_cache_write_seconds(directory: Path, nbytes: int, repeats: int = 3) -> dict[str, float]:
    """Median seconds to write `nbytes` into a new file of `directory`, without fsync: the
    least a full fork's OptimStep spends before it replies (its weights must be readable
    by samplers and survive a kill -9). "new": each file kept, as checkpoints are, so each
    write takes pages never used before; "released": each file fsynced and its page cache
    dropped before the next write, as the store does with superseded files
    (`CheckpointStore._unread_after`), so a write reuses freed pages (several times faster
    on a VM whose host backs guest memory on first touch and takes freed memory back)."""
    data = torch.ones(nbytes // 4)
    out = {}
    for mode in ("new", "released"):
        times, files = [], []
        for i in range(repeats + (mode == "released")):
            files.append(directory / f"write-floor-{mode}-{i}")
            start = time.perf_counter()
            write_safetensors(files[-1], {"x": data})
            times.append(time.perf_counter() - start)
            if mode == "released":
                atomic.fsync_file(files[-1])
                atomic.drop_cached(files[-1])
            else:
                time.sleep(0.5)
        for file in files:
            file.unlink()
        out[mode] = med(times[1:] if mode == "released" else times)
    return out


def save_rows(write_s: dict[str, float], split: dict[str, list[float]]) -> list[list[object]]:
    """Table rows: the deferred rest of a full fork's save, the page-cache write floor of
    its weights (on the reply's path) into new and into released pages, and the lowest
    full_optim_vs_adamw the latter leaves on this machine (AdamW + that write, over AdamW)."""
    adamw = med(split["loop_opt"])
    return [
        ["  after the reply: optimizer state write, ms", med(split["deferred"]) * 1e3, "", ""],
        ["  page-cache write of the weights, new pages, ms", write_s["new"] * 1e3, "", ""],
        ["  same into released pages, ms", write_s["released"] * 1e3, "", ""],
        ["  → lowest full_optim_vs_adamw here", (adamw + write_s["released"]) / adamw, "", ""],
    ]


def spare_choice_rows(trainer: Any) -> list[list[object]]:
    """Table rows: each fork's checkpoint files, written over a spare vs as a new file
    (medians of the trainer's own last timed writes, `SpareChoice`), and its choice."""
    rows: list[list[object]] = []
    for slug in ("full", "lora"):
        state = trainer._states.get(slug)
        for name, choice in sorted(state.spare_choices.items()) if state else []:
            over, new = (choice.median(way) * 1e3 for way in (True, False))
            pick = "→ spare" if choice.faster() else "→ new"
            rows.append([f"  {slug} {name} write ms, over a spare / new file", over, new, pick])
    return rows


# ------------------------------------------------------------------------- the runs
class Bench:
    """The trainer in this process, its forks, the batch and the plain loop."""

    def __init__(self, srv: ServerThread, items: list[common_pb2.TrainingItem]) -> None:
        self.srv, self.items = srv, items
        self.adam = common_pb2.AdamParams(learning_rate=LR)

    def step(self, model: str) -> Any:
        req = training_pb2.StepRequest(model=model, data=self.items, loss_fn=LOSS, adam=self.adam)
        return self.srv.train.Step(req)

    def drain(self, model: str, checkpoint: str) -> float:
        """Wait for `checkpoint`'s deferred optimizer-state write; returns the seconds."""
        start = time.perf_counter()
        self.srv.trainer.store.wait_deferred(model, checkpoint)
        return time.perf_counter() - start

    def fb(self, model: str) -> Callable[[], Any]:
        req = training_pb2.ForwardBackwardRequest(model=model, data=self.items, loss_fn=LOSS)
        return lambda: self.srv.train.ForwardBackward(req)

    def optim(self, model: str) -> Callable[[], Any]:
        req = training_pb2.OptimStepRequest(model=model, adam=self.adam)
        return lambda: self.srv.train.OptimStep(req)

    def custom_fb(self, model: str) -> Callable[[], None]:
        train = self.srv.train

        def run() -> None:
            fwd = train.ForwardCustom(
                training_pb2.ForwardCustomRequest(model=model, data=self.items)
            )
            weights = []
            for i, d in enumerate(fwd.data):
                lp = floats(d.logprobs, f"data[{i}].logprobs")
                q = floats(d.sampling_logprobs, f"data[{i}].sampling_logprobs")
                a = floats(d.advantages, f"data[{i}].advantages")
                mask = floats(d.mask, f"data[{i}].mask")
                # d/dlp of −mask·exp(lp − q)·A is −w with w = mask·ratio·A: the gradient
                # of the −Σ w·lp that BackwardCustom backpropagates.
                weights.append(to_tensor((mask * np.exp(lp - q) * a).astype(np.float32)))
            train.BackwardCustom(
                training_pb2.BackwardCustomRequest(
                    model=model, forward_id=fwd.forward_id, weights=weights
                )
            )

        return run


def logprobs_of(reply: Any) -> np.ndarray:
    return np.stack([floats(x, "lp") for x in reply.logprobs])


def measure_step(
    b: Bench, loop: LoopWorker, repeats: int, block: int = 3
) -> tuple[float, float, float]:
    """Full fine-tuning, our Step vs the plain loop's: (our median s per step, the loop's,
    max |Δ logprob| of the first step, same weights and batch). Each side runs `block`
    steps back to back, in turn; ours end with the wait for the last deferred
    optimizer-state write, so a block is sustained training with the background write
    overlapping the next step as it does in a training loop, and all its work counted."""
    first: dict[str, Any] = {}

    def steps_full() -> None:
        for _ in range(block):
            reply = b.step("full")
            first.setdefault("step", reply)
        b.drain("full", reply.optim_step.checkpoint)

    def steps_loop() -> None:
        for _ in range(block):
            loop.step()

    t = interleaved({"step": steps_full, "loop": steps_loop}, repeats)
    assert loop.first_lp is not None
    lp_diff = float(
        np.abs(logprobs_of(first["step"].forward_backward) - loop.first_lp.numpy()).max()
    )
    return med(t["step"]) / block, med(t["loop"]) / block, lp_diff


def measure_full_fork(b: Bench, loop: LoopWorker, repeats: int) -> dict[str, list[float]]:
    """The full fork's step split in its halves, against the loop's: each round times our
    ForwardBackward, our OptimStep (its reply: AdamW, weights written, HEAD moved,
    published), then the rest of its write (the deferred optimizer state, waited for
    before the loop runs so that it does not slow the baseline), the loop's
    forward/backward and its AdamW step (warmup round dropped)."""
    replies: list[Any] = []
    optim = b.optim("full")
    fns = {"fb": b.fb("full"), "opt": lambda: replies.append(optim()),
           "deferred": lambda: b.drain("full", replies[-1].checkpoint),
           "loop_fb": loop.fwd_bwd, "loop_opt": loop.opt_step}  # fmt: skip
    return interleaved(fns, repeats)


def measure_custom(b: Bench, repeats: int) -> tuple[float, float, list[float]]:
    """LoRA fork: a custom loss (ForwardCustom + BackwardCustom) + OptimStep against the
    built-in ForwardBackward + OptimStep, interleaved: (built-in median s, custom median s,
    the OptimSteps' times, which are the LoRA save latency)."""
    opt_lora: list[float] = []

    def with_optim(forward_backward: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            forward_backward()
            opt_lora.append(timed(b.optim("lora")))

        return run

    t = interleaved(
        {"builtin": with_optim(b.fb("lora")), "custom": with_optim(b.custom_fb("lora"))}, repeats
    )
    return med(t["builtin"]), med(t["custom"]), opt_lora[2:]  # the warmup round's two dropped


def measure_bf16(
    path: Path, b32: Bench, loop: LoopWorker, repeats: int
) -> tuple[str, list[list[object]]]:
    """A `--dtype bf16` trainer beside ours in fp32: (its precision note, table rows)."""
    store = Path(tempfile.mkdtemp(prefix="headway-bench-store-bf16-"))
    prefix = redis_prefix("bench16")
    srv = ServerThread(store, prefix, dtype="bf16")
    try:
        srv.models.AddBase(model_pb2.AddBaseRequest(path=str(path), name="base40m"))
        srv.models.ForkModel(model_pb2.ForkModelRequest(source="base40m", name="full", full=True))
        srv.models.ForkModel(model_pb2.ForkModelRequest(source="base40m", name="fp32", full=True))
        b16 = Bench(srv, b32.items)
        note = srv.trainer.mode.precision.note
        # The same weights (the base's), the same batch: the first ForwardBackward of each.
        r16 = b16.fb("full")()
        from trainer_svc.compute import ComputeMode  # the same trainer, once in fp32

        bf16_mode = srv.trainer.mode
        srv.trainer.mode = ComputeMode(kernels=bf16_mode.kernels)
        r32 = b16.fb("fp32")()
        srv.trainer.mode = bf16_mode
        lp16, lp32 = logprobs_of(r16), logprobs_of(r32)
        diff = np.abs(lp16 - lp32)
        loss16, loss32 = r16.metrics["loss:sum"], r32.metrics["loss:sum"]
        t = interleaved(
            {"bf16": b16.fb("full"), "fp32": b32.fb("full"), "loop": loop.fwd_bwd}, repeats
        )
    finally:
        if srv is not None:
            srv.stop()
        clean_redis(prefix)
        shutil.rmtree(store, ignore_errors=True)
    t16, t32, t_loop = med(t["bf16"]) * 1e3, med(t["fp32"]) * 1e3, med(t["loop"]) * 1e3
    rows: list[list[object]] = [
        ["bf16 ForwardBackward ms (full) / ours fp32", t16, t32, t32 / t16],
        ["bf16 ForwardBackward ms (full) / loop fp32", t16, t_loop, t_loop / t16],
        ["bf16 vs fp32 |Δ logprob| mean / max", f"{diff.mean():.1e}", f"{diff.max():.1e}", ""],
        ["bf16 vs fp32 loss (same weights, batch)", loss16, loss32,
         f"{abs(loss16 - loss32) / max(abs(loss32), 1e-9):.1e} rel"],
    ]  # fmt: skip
    return note, rows


# ------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed blocks of 3 Steps and of 3 loop steps"
    )
    parser.add_argument("--save-repeats", type=int, default=5, help="timed OptimSteps per fork")
    parser.add_argument("--bf16-repeats", type=int, default=3, help="timed bf16 rounds")
    args = parser.parse_args()
    started = time.perf_counter()

    path = off_main(build_bench_model)  # no torch on this thread: see LoopWorker
    add_tokenizer(path)
    store = Path(tempfile.mkdtemp(prefix="headway-bench-store-"))
    prefix = redis_prefix("bench")
    srv = ServerThread(store, prefix)
    loop = None
    try:
        srv.models.AddBase(model_pb2.AddBaseRequest(path=str(path), name="base40m"))
        srv.models.ForkModel(model_pb2.ForkModelRequest(source="base40m", name="full", full=True))
        lora = common_pb2.LoraConfig(rank=LORA_RANK, alpha=2 * LORA_RANK)
        srv.models.ForkModel(model_pb2.ForkModelRequest(source="base40m", name="lora", lora=lora))

        config = json.loads((path / "config.json").read_text())
        batch = make_batch(config["vocab_size"])
        b = Bench(srv, training_items(batch))
        loop = LoopWorker(path, batch)
        params = loop.params / 1e6
        print(
            f"model: qwen3-40m ({params:.1f}M params, fp32), batch {BATCH}×{SEQ} tokens, "
            f"torch threads {torch.get_num_threads()}"
        )

        t_step, t_loop, lp_diff = measure_step(b, loop, args.repeats)  # 1. Step vs loop
        split = measure_full_fork(b, loop, args.save_repeats)  # 2. its halves
        t_builtin, t_custom, opt_lora = measure_custom(b, args.save_repeats)  # 3. LoRA
        bf16_note, bf16_rows = measure_bf16(path, b, loop, args.bf16_repeats)  # 4. bf16
        weight_bytes = 4 * loop.params  # fp32
        write_s = page_cache_write_seconds(store, weight_bytes)
        spare_rows = spare_choice_rows(srv.trainer)
        srv.stop()  # its threads would compete with the two trainers below
        srv = None
        loop.close()  # its ~0.6 GB of weights and AdamW state too
        loop = None
        rank_rows, ranks_ratio = measure_ranks(  # 5. torch.distributed
            path, b.items, BATCH * SEQ, prefix, lora_rank=LORA_RANK, lr=LR,
            repeats=args.repeats,
        )  # fmt: skip
    finally:
        if srv is not None:
            srv.stop()
        if loop is not None:
            loop.close()
        clean_redis(prefix)
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)

    tokens = BATCH * SEQ
    ours_tps, loop_tps = tokens / t_step, tokens / t_loop
    trainer_vs_hf = ours_tps / loop_tps
    custom_vs_builtin = t_custom / t_builtin
    fb_ms, opt_ms = med(split["fb"]) * 1e3, med(split["opt"]) * 1e3
    loop_fb_ms, loop_opt_ms = med(split["loop_fb"]) * 1e3, med(split["loop_opt"]) * 1e3
    fb_vs_hf = loop_fb_ms / fb_ms
    rows = [
        ["Step tok/s (full fork, incl. checkpoint)", ours_tps, loop_tps, trainer_vs_hf],
        ["  ForwardBackward ms (full) / loop fwd+bwd", fb_ms, loop_fb_ms, fb_vs_hf],
        ["  OptimStep ms (full: AdamW+weights) / AdamW", opt_ms, loop_opt_ms, loop_opt_ms / opt_ms],
        ["custom-loss step ms (LoRA) / built-in", t_custom * 1e3, t_builtin * 1e3,
         custom_vs_builtin],
        ["OptimStep save ms, LoRA r32", med(opt_lora) * 1e3, "", ""],
        ["OptimStep save ms, full", opt_ms, "", ""],
        ["logprobs max |diff| vs loop, step 0", f"{lp_diff:.1e}", "", ""],
        *bf16_rows,
    ]  # fmt: skip
    rows += save_rows(write_s, split) + spare_rows
    rows += rank_rows
    print_table(
        "trainer speed (medians; baseline: plain transformers loop, which saves nothing)",
        ["metric", "headway", "baseline", "ratio"],
        rows,
    )
    print(
        "ratio: baseline time / ours (>1 = headway faster), except the custom-loss row: "
        "custom time / built-in time.\n"
        f"--dtype bf16 chose: {bf16_note}\n"
        "goals: trainer_vs_hf >= 1.0, fb_vs_hf >= 1.0, custom_vs_builtin <= 1.1, "
        "lora_save_ms <= 30, full_optim_vs_adamw <= 1.5; "
        f"bench took {time.perf_counter() - started:.0f} s (load {os.getloadavg()[0]:.1f})"
    )
    print(
        f"trainer_vs_hf={trainer_vs_hf:.2f} fb_vs_hf={fb_vs_hf:.2f} "
        f"custom_vs_builtin={custom_vs_builtin:.2f} "
        + save_figures(split["opt"], split["loop_opt"], opt_lora)
        + f" ranks_2x1_vs_1x2={ranks_ratio:.2f}"
    )


if __name__ == "__main__":
    main()
