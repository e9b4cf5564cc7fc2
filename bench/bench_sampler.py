"""`make bench-sampler`: the sampler service's decode speed and head-reload latency.

Same run, same weights (the ~40M Qwen3-shaped config of `configs/qwen3-40m.json`, fp32,
saved once and registered as a base), prompt 32 tokens, 64 new tokens, end of sequence
ignored. One sampler replica runs in this process (its grpc.aio server on a background
event loop, as in production) and the trainer in a child process (`python -m trainer_svc`,
as `headway serve` runs it), on loopback ports, with a temp store and a Redis key prefix
of their own.

- Decode tokens/s through the service: (a) batch 1: one SampleStream, n=1, greedy;
  (b) batch 8: one SampleStream, n=8 at temperature 1 (seeded), i.e. 8 rows decoding
  together; the decode phase is timed from the chunk carrying the last first token (the
  prefill's) to the last token chunk: (64 − 1) tokens per row over 63 decode steps.
  (c) 8 concurrent single-sequence Sample calls (n=1, temperature 1, 8 client threads):
  end-to-end wall time of all 8, prefill and RPC included. Also the engine alone (the same
  engine, driven on its own thread with no RPC) to separate engine from service costs.
- Baseline: transformers `generate` on the same weights, batch 1 greedy and batch 8
  sampled at temperature 1 (no top-k/top-p either side), min = max new tokens 64; its
  decode phase is generate's time minus a prefill forward of the same prompt, over the
  same 63 tokens per row. (c) is compared end to end with generate at batch 8 and with 8
  users served one after another by generate at batch 1.
- Machine limit: a decode step must read every weight once (at batch 1 it is a chain of
  matrix-vector products), so weight bytes / memory bandwidth bounds its time. Measured:
  a read and a copy of the model's bytes, and the step's matmuls alone at batch 1 and 8,
  as F.linear and in the layout torch's CPU GEMM runs fastest here.
- Reload latency, full fork and LoRA fork (rank 32), ≥20 reloads each after warmup
  reloads: ForwardBackward + OptimStep on the trainer; the bench subscribes to the head
  channel and timestamps the publish message; it then waits until the replica lists the
  checkpoint, and sends an unpinned Sample (1-token prompt, 1 new token), which must name
  the new checkpoint.
  Latency = publish message → that reply (the first token served by the new checkpoint).
  The same Sample sent again right after gives the floor (no reload) for comparison, and
  the replica's own steps (event delivery, engine thread, adapter read, slot copy, weight
  copy) are timed by wrapping them in this process.

transformers runs in a child process (see `HFWorker`: one process holding two threads'
OpenMP teams slowed both sides, ours ~2x), interleaved with our runs, never concurrently.

Medians of repeats after a warmup round, ours and the baseline interleaved (the machine is
shared and noisy: read the ratios). `--profile` adds a torch.profiler table of engine
steps. Last line:
`sampler_b8_vs_hf=<r> sampler_b1_vs_hf=<r> reload_lora_p50_ms=<ms> reload_full_over_floor_ms=<ms>`
(reloads: publish → servable, LoRA p50; full p50 minus the weight-copy floor of the same run,
see `sampler_reload.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_tokenizer,
    build_bench_model,
    clean_redis,
    print_table,
)
from bench.sampler_baseline import HFWorker, off_main  # noqa: E402
from bench.sampler_decode import (  # noqa: E402
    BASE,
    BATCH,
    DECODED,
    NEW,
    PROMPT,
    SamplerThread,
    concurrent,
    engine_decode,
    now,
    profile_engine,
    request,
    stream,
)
from bench.sampler_reload import (  # noqa: E402
    FULL,
    LORA,
    LORA_RANK,
    HeadListener,
    TrainerProcess,
    instrument,
    reload_report,
    run_reloads,
)
from headway.testing import redis_prefix, shared_redis_url  # noqa: E402
from headway.v1 import common_pb2, model_pb2  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def med(values: list[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="timed decode rounds")
    parser.add_argument("--reloads", type=int, default=20, help="timed reloads per fork")
    parser.add_argument("--warmup-reloads", type=int, default=3, help="untimed reloads first")
    parser.add_argument("--profile", action="store_true", help="torch.profiler of engine steps")
    args = parser.parse_args()
    from sampler_svc.config import SamplerConfig

    started, load_before = now(), os.getloadavg()[0]
    path = off_main(build_bench_model)
    add_tokenizer(path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    store = Path(tempfile.mkdtemp(prefix="headway-bench-store-"))
    prefix = redis_prefix("bench")
    trainer = replica = listener = probe = hf = None
    try:
        listener = HeadListener(prefix)
        trainer = TrainerProcess(store, prefix)
        config = SamplerConfig(
            store=store,
            redis_url=shared_redis_url(),
            redis_prefix=prefix,
            max_batch=16,
            max_seq_len=256,
        )
        replica = SamplerThread(config)
        trainer.models.AddBase(model_pb2.AddBaseRequest(path=str(path), name=BASE))
        trainer.models.ForkModel(model_pb2.ForkModelRequest(source=BASE, name=FULL, full=True))
        lora = common_pb2.LoraConfig(rank=LORA_RANK, alpha=2 * LORA_RANK)
        trainer.models.ForkModel(model_pb2.ForkModelRequest(source=BASE, name=LORA, lora=lora))
        hf = HFWorker(path)
        params = hf.params
        print(
            f"model: qwen3-40m ({params:.1f}M params, fp32), prompt {PROMPT}, {NEW} new tokens, "
            f"torch threads {torch.get_num_threads()}, {torch.get_num_interop_threads()} interop"
        )

        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (1, PROMPT), generator=gen)
        prompts8 = torch.randint(0, vocab, (BATCH, PROMPT), generator=gen).tolist()
        p1 = prompt[0].tolist()
        for model in (BASE, FULL, LORA):  # every model served once before anything is timed
            replica.stub.Sample(request(model, p1, 1, 0.0, 0, max_tokens=2))

        # ---- decode speed: rounds of (ours, baseline) interleaved; round 0 is warmup.
        t: dict[str, list[float]] = {}
        agree = None
        for i in range(1 + args.repeats):
            runs: dict[str, float] = {}
            r1 = stream(replica.stub, request(BASE, p1, 1, 0.0, 0))
            runs["ours_b1"], runs["ours_b1_e2e"] = r1["decode"], r1["e2e"]
            runs["hf_b1"], hf_tokens = hf.generate(prompt, sample=False)
            runs["hf_b1_pre"] = hf.prefill(prompt)
            if agree is None:
                agree = float((torch.tensor(r1["rows"]) == hf_tokens).float().mean())
            r8 = stream(replica.stub, request(BASE, p1, BATCH, 1.0, i))
            runs["ours_b8"], runs["ours_b8_e2e"] = r8["decode"], r8["e2e"]
            runs["hf_b8"], _ = hf.generate(prompt.expand(BATCH, -1).contiguous(), sample=True)
            runs["hf_b8_pre"] = hf.prefill(prompt.expand(BATCH, -1).contiguous())
            runs["ours_c8"] = concurrent(replica.stub, prompts8, seed=100 * i)
            runs["engine_b1"] = engine_decode(replica.sampler, p1, 1, 0.0, 0)
            runs["engine_b8"] = engine_decode(replica.sampler, p1, BATCH, 1.0, i)
            if i:
                for k, v in runs.items():
                    t.setdefault(k, []).append(v)
        m = {k: med(v) for k, v in t.items()}
        limit = hf.machine_limit(args.repeats)
        if args.profile:
            profile_engine(replica.sampler, p1, 1, 0.0)
            profile_engine(replica.sampler, p1, BATCH, 1.0)

        # ---- reloads: LoRA fork, then full fork.
        probe = instrument(replica.sampler)
        one = p1[:1]  # the least work a first token can cost: one forward of one position
        reloads, floors = run_reloads(
            trainer, replica, listener, probe, vocab, one, args.reloads, args.warmup_reloads
        )
    finally:
        if probe is not None:
            probe.restore()
        for part in (replica, trainer):
            if part is not None:
                try:
                    part.stop()
                except Exception as e:  # keep cleaning up
                    print(f"(stopping {type(part).__name__}: {e})")
        if listener is not None:
            listener.close()
        if hf is not None:
            hf.close()
        clean_redis(prefix)
        shutil.rmtree(store, ignore_errors=True)
        store.with_name(f"{store.name}-trainer.log").unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)

    # ---- figures
    def tps(tokens: int, seconds: float) -> float:
        return tokens / seconds

    ours_b1 = tps(DECODED, m["ours_b1"])
    ours_b8 = tps(BATCH * DECODED, m["ours_b8"])
    hf_b1 = tps(DECODED, m["hf_b1"] - m["hf_b1_pre"])
    hf_b8 = tps(BATCH * DECODED, m["hf_b8"] - m["hf_b8_pre"])
    eng_b1 = tps(DECODED, m["engine_b1"])
    eng_b8 = tps(BATCH * DECODED, m["engine_b8"])
    c8 = tps(BATCH * NEW, m["ours_c8"])
    hf_b8_e2e = tps(BATCH * NEW, m["hf_b8"])
    hf_b1_seq = tps(NEW, m["hf_b1"])  # 8 users one after another: the same rate as one
    b8_vs_hf, b1_vs_hf = ours_b8 / hf_b8, ours_b1 / hf_b1
    rows = [
        ["decode b1 tok/s (SampleStream, greedy)", ours_b1, hf_b1, b1_vs_hf],
        ["decode b8 tok/s (SampleStream n=8, T=1)", ours_b8, hf_b8, b8_vs_hf],
        ["  engine alone b1 tok/s (no RPC)", eng_b1, hf_b1, eng_b1 / hf_b1],
        ["  engine alone b8 tok/s (no RPC)", eng_b8, hf_b8, eng_b8 / hf_b8],
        ["end-to-end b1 tok/s (incl. prefill)", tps(NEW, m["ours_b1_e2e"]), hf_b1_seq,
         m["hf_b1"] / m["ours_b1_e2e"]],
        ["end-to-end b8 tok/s (incl. prefill)", tps(BATCH * NEW, m["ours_b8_e2e"]), hf_b8_e2e,
         m["hf_b8"] / m["ours_b8_e2e"]],
        ["8 concurrent Sample calls tok/s vs HF b8", c8, hf_b8_e2e, c8 / hf_b8_e2e],
        ["8 concurrent Sample calls tok/s vs HF b1×8", c8, hf_b1_seq, c8 / hf_b1_seq],
        ["greedy tokens equal b1", f"{agree:.0%}", "", ""],
    ]  # fmt: skip
    print_table(
        "decode speed (medians; baseline: transformers generate, same weights)",
        ["metric", "headway", "transformers", "ratio"],
        rows,
    )

    step_bytes = limit["step_bytes"]
    read_bw = limit["model_bytes"] / limit["read_s"]
    rows = [
        ["weight bytes read per decode step (MB)", step_bytes / 1e6],
        [f"read of the model's {limit['model_bytes'] / 1e6:.0f} MB (ms, sum)",
         limit["read_s"] * 1e3],
        ["  read bandwidth (GB/s)", read_bw / 1e9],
        ["  step bound = weight bytes / read bandwidth (ms)", step_bytes / read_bw * 1e3],
        ["  max decode tok/s b1 at that bound", read_bw / step_bytes],
        [f"copy of the model's {limit['model_bytes'] / 1e6:.0f} MB (ms)", limit["copy_s"] * 1e3],
        ["step's matmuls b1 / b8 as F.linear (ms)",
         f"{limit['linear_b1_s'] * 1e3:.2f} / {limit['linear_b8_s'] * 1e3:.2f}"],
        ["step's matmuls b1 / b8 as (W @ xT)T, x ≥ 2 rows (ms)",
         f"{limit['best_b1_s'] * 1e3:.2f} / {limit['best_b8_s'] * 1e3:.2f}"],
        ["  max decode tok/s b1 / b8 with those matmuls",
         f"{1 / limit['best_b1_s']:.0f} / {BATCH / limit['best_b8_s']:.0f}"],
        ["ours: decode step b1 / b8 (ms, engine alone)",
         f"{m['engine_b1'] / DECODED * 1e3:.2f} / {m['engine_b8'] / DECODED * 1e3:.2f}"],
        ["HF: decode step b1 / b8 (ms)",
         f"{(m['hf_b1'] - m['hf_b1_pre']) / DECODED * 1e3:.2f} / "
         f"{(m['hf_b8'] - m['hf_b8_pre']) / DECODED * 1e3:.2f}"],
    ]  # fmt: skip
    print_table("machine limit (memory bandwidth)", ["metric", "value"], rows)

    rows, summary, reload_line = reload_report(reloads, floors)
    print_table(
        f"reload latency, ms over {args.reloads} reloads per fork (after "
        f"{args.warmup_reloads} warmup); publish = head message arrival in this process",
        ["metric", "p50", "p90"],
        rows,
    )
    # What bounds each goal on this machine, from the figures above.
    need_b1 = 1e3 / (2 * hf_b1)  # ms per step for 2× transformers at batch 1
    need_b8 = 1e3 * BATCH / (3 * hf_b8)  # ms per step for 3× at batch 8
    bound_ms = step_bytes / read_bw * 1e3
    print(
        "\nbounds on this machine:\n"
        f"  b1 ≥ 2× needs a decode step ≤ {need_b1:.1f} ms; reading the weights takes "
        f"{bound_ms:.1f} ms, the step's matmuls {limit['linear_b1_s'] * 1e3:.1f} ms as F.linear "
        f"({limit['best_b1_s'] * 1e3:.1f} ms as (W @ xT)T): at most "
        f"{1 / limit['linear_b1_s'] / hf_b1:.2f}× with F.linear, "
        f"{1 / limit['best_b1_s'] / hf_b1:.2f}× with the other layout, "
        f"{read_bw / step_bytes / hf_b1:.1f}× at the bandwidth bound\n"
        f"  b8 ≥ 3× needs a decode step ≤ {need_b8:.1f} ms; the step's matmuls take "
        f"{limit['linear_b8_s'] * 1e3:.1f} ms as F.linear ({limit['best_b8_s'] * 1e3:.1f} ms "
        f"as (W @ xT)T): at most {BATCH / limit['linear_b8_s'] / hf_b8:.2f}× / "
        f"{BATCH / limit['best_b8_s'] / hf_b8:.2f}×\n"
        f"  a first token costs one forward: the same Sample without a reload takes "
        f"{summary[FULL]['floor']:.1f} ms (full) / {summary[LORA]['floor']:.1f} ms (LoRA) p50, "
        f"and no forward can beat {bound_ms:.1f} ms (weight bytes / read bandwidth); the "
        f"reload itself (publish → loaded) is {summary[FULL].get('ensure_end', 0):.1f} ms "
        f"(full) / {summary[LORA].get('ensure_end', 0):.1f} ms (LoRA) p50"
    )
    print(
        "ratio: headway tok/s / transformers tok/s (>1 = headway faster). "
        "decode = (64 − 1) tokens per row over the decode phase.\n"
        "goals: sampler_b8_vs_hf >= 3, sampler_b1_vs_hf >= 2, reload_lora_p50_ms <= 5, "
        f"reload_full_over_floor_ms <= 5; bench took {now() - started:.0f} s; 1-min load average "
        f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end on "
        f"{os.cpu_count()} CPUs (a busy machine makes every figure above unreliable)"
    )
    print(f"sampler_b8_vs_hf={b8_vs_hf:.2f} sampler_b1_vs_hf={b1_vs_hf:.2f} " + reload_line)


if __name__ == "__main__":
    main()
