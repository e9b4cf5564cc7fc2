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
  matrix-vector products), so weight bytes / memory bandwidth bounds its time; and it must
  do its matmuls. Measured: a read and a copy of the model's bytes, and the step's matmuls
  alone at batch 1 and 8 in every layout the engine chooses among (`sampler_svc.kernels`),
  per weight shape, unfused and with q/k/v and gate/up fused, each shape after a read of the
  other weights (as in a step: from memory where the model outgrows the cache). The bound of
  each batch is transformers' step time over the larger of (weight bytes / read bandwidth)
  and (the step's matmuls at the fastest layout per shape): the highest fp32 ratio this
  machine allows. The engine's own choice per shape and bucket is printed with the
  alternatives' times it measured, and whether the layers' decode forward runs compiled
  (`sampler_svc.compiled`) with both ways' times.
- bf16: a second replica, `python -m sampler_svc --dtype bf16` in a child process, with an
  empty kernel cache (and so no compiled code: a first start on a machine): its start-up
  (spawn → first Sample served, layouts measured, decode compiled where it pays), and
  that of an fp32 replica started the same way, which compiles and times its decode step:
  `startup_s` is the longer; its decode at batch 8 against transformers generate in bf16; and its
  sampled logprobs against the fp32 forward of the same checkpoint (the fp32 replica's
  ComputeLogprobs, which equals the trainer's to 1e-4): mean / max |Δ logprob| and the k3
  estimate of KL(sampler ‖ trainer). Skipped (`n/a`) on a CPU without bf16 units.
- Qwen3.5: a Qwen3.5-shaped base of about the same size (`configs/qwen3_5-40m.json`: 6
  Gated DeltaNet + 2 gated-attention layers) registered beside it, after the reloads:
  SampleStream decode at batch 1 (greedy, tokens compared) and 8 against transformers
  `generate` on the same weights (its own cache and PyTorch fallback kernels), as above.
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
steps. Last line: `sampler_b1_vs_hf= sampler_b8_vs_hf= sampler_b8_bf16_vs_hf=
sampler_b1_bound= sampler_b8_bound= reload_lora_p50_ms= reload_full_over_floor_ms= startup_s=`
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

# The replica in this process keeps torch's OpenMP workers spinning as `python -m
# sampler_svc` does (sampler_svc/__main__.py says why): set before torch loads libgomp,
# then taken out so the children (transformers' baseline, the trainer) start with the
# environment they would have anyway.
SPIN = "1000000"
os.environ.setdefault("GOMP_SPINCOUNT", SPIN)

import numpy as np  # noqa: E402
import torch  # noqa: E402

if os.environ["GOMP_SPINCOUNT"] == SPIN:
    del os.environ["GOMP_SPINCOUNT"]
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
    BASE35,
    BATCH,
    DECODED,
    NEW,
    PROMPT,
    QWEN35,
    SamplerProcess,
    SamplerThread,
    concurrent,
    engine_decode,
    now,
    profile_engine,
    request,
    sampled_logprobs,
    scored_logprobs,
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
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 replica")
    args = parser.parse_args()
    from sampler_svc.config import SamplerConfig
    from sampler_svc.kernels import ATTENTION

    started, load_before = now(), os.getloadavg()[0]
    path = off_main(build_bench_model)
    add_tokenizer(path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    store = Path(tempfile.mkdtemp(prefix="headway-bench-store-"))
    prefix = redis_prefix("bench")
    trainer = replica = listener = probe = hf = hf16 = bf16 = hf35 = path35 = None
    bf16_supported = False
    try:
        listener = HeadListener(prefix)
        trainer = TrainerProcess(store, prefix)
        config = SamplerConfig(
            store=store,
            redis_url=shared_redis_url(),
            redis_prefix=prefix,
            max_batch=16,
            max_seq_len=256,
            device="cpu",  # CPU figures (bench_device.py measures a GPU)
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
        limit = hf.machine_limit(args.repeats)
        engine = replica.sampler.call(
            lambda: replica.sampler.ensure(BASE, replica.sampler.store.head(BASE))[0].engine
        )
        kernels, compiler = engine.kernels, engine.compiler
        if args.profile:
            profile_engine(replica.sampler, p1, 1, 0.0)
            profile_engine(replica.sampler, p1, BATCH, 1.0)

        # ---- bf16: a replica of its own (`--dtype bf16`, a child process, start-up timed)
        # against transformers generate in bf16, and its logprobs against the fp32 forward.
        from sampler_svc.kernels import bf16_units

        bf16_supported = bf16_units() and not args.no_bf16
        log16 = store.with_name(f"{store.name}-sampler-bf16.log")
        bf16 = SamplerProcess(
            store,
            prefix,
            log16,
            [
                "--dtype",
                "bf16" if bf16_supported else "fp32",
                "--max-batch",
                "16",
                "--max-seq-len",
                "256",
            ],
        )
        startup_s = bf16.startup_s
        delta: list[float] = []
        if bf16_supported:
            hf16 = HFWorker(path, "bf16")
            for i in range(1 + args.repeats):
                r16 = stream(bf16.stub, request(BASE, p1, BATCH, 1.0, i))
                hf16_t, _ = hf16.generate(prompt.expand(BATCH, -1).contiguous(), sample=True)
                hf16_pre = hf16.prefill(prompt.expand(BATCH, -1).contiguous())
                if i:
                    t.setdefault("ours_bf16_b8", []).append(r16["decode"])
                    t.setdefault("hf_bf16_b8", []).append(hf16_t - hf16_pre)
            # Sampler (bf16) vs trainer (fp32 forward: the fp32 replica's ComputeLogprobs,
            # equal to the trainer's to 1e-4) on the same checkpoint and tokens.
            for seed in range(4):
                rows16 = sampled_logprobs(bf16.stub, request(BASE, p1, BATCH, 1.0, 50 + seed))
                ref = scored_logprobs(replica.stub, BASE, [p1 + toks for toks, _ in rows16])
                for (_, lp16), lp32 in zip(rows16, ref, strict=True):
                    delta.extend((lp16 - lp32[len(p1) - 1 :]).tolist())
            hf16.close()
            hf16 = None
        # What the bf16 replica chose (its layouts, compiled or not; timings another
        # process disturbed), from its log: the bench's tables show the fp32 engine's.
        bf16_choices = bf16.logged("decode kernels (", "decode compiled", "dropped")
        bf16.stop()
        bf16 = None
        # ---- the cold start of an fp32 replica too: the one that compiles (auto).
        log32 = store.with_name(f"{store.name}-sampler-fp32.log")
        cold = SamplerProcess(
            store, prefix, log32, ["--dtype", "fp32", "--max-batch", "16", "--max-seq-len", "256"]
        )
        startups = [("bf16" if bf16_supported else "fp32", startup_s), ("fp32", cold.startup_s)]
        cold_compile = cold.logged("decode compiled")
        cold.stop()
        startup_s = max(seconds for _, seconds in startups)
        m = {k: med(v) for k, v in t.items()}

        # ---- reloads: LoRA fork, then full fork.
        probe = instrument(replica.sampler)
        one = p1[:1]  # the least work a first token can cost: one forward of one position
        reloads, floors = run_reloads(
            trainer, replica, listener, probe, vocab, one, args.reloads, args.warmup_reloads
        )
        probe.restore()
        probe = None

        # ---- Qwen3.5: the same decode workload on a Qwen3.5-shaped base of the same size.
        path35 = off_main(lambda: build_bench_model(QWEN35))
        add_tokenizer(path35)
        trainer.models.AddBase(model_pb2.AddBaseRequest(path=str(path35), name=BASE35))
        hf35 = HFWorker(path35)
        replica.stub.Sample(request(BASE35, p1, 1, 0.0, 0, max_tokens=2))
        agree35 = None
        for i in range(1 + args.repeats):
            r1 = stream(replica.stub, request(BASE35, p1, 1, 0.0, 0))
            hf_t, hf_tokens = hf35.generate(prompt, sample=False)
            hf_pre = hf35.prefill(prompt)
            if agree35 is None:
                agree35 = float((torch.tensor(r1["rows"]) == hf_tokens).float().mean())
            r8 = stream(replica.stub, request(BASE35, p1, BATCH, 1.0, i))
            hf8_t, _ = hf35.generate(prompt.expand(BATCH, -1).contiguous(), sample=True)
            hf8_pre = hf35.prefill(prompt.expand(BATCH, -1).contiguous())
            if i:
                for k, v in (("b1", r1["decode"]), ("hf_b1", hf_t - hf_pre),
                             ("b8", r8["decode"]), ("hf_b8", hf8_t - hf8_pre)):  # fmt: skip
                    t.setdefault(f"q35_{k}", []).append(v)
        m.update({k: med(t[k]) for k in t if k.startswith("q35_")})
    finally:
        if probe is not None:
            probe.restore()
        if hf35 is not None:
            hf35.close()
        if path35 is not None:
            shutil.rmtree(path35, ignore_errors=True)
        for extra in (bf16, hf16):
            if extra is not None:
                try:
                    extra.stop() if extra is bf16 else extra.close()
                except Exception as e:  # keep cleaning up
                    print(f"(stopping {type(extra).__name__}: {e})")
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
        store.with_name(f"{store.name}-sampler-bf16.log").unlink(missing_ok=True)
        store.with_name(f"{store.name}-sampler-fp32.log").unlink(missing_ok=True)
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
        ["qwen3.5 decode b1 tok/s (SampleStream, greedy)", tps(DECODED, m["q35_b1"]),
         tps(DECODED, m["q35_hf_b1"]), m["q35_hf_b1"] / m["q35_b1"]],
        ["qwen3.5 decode b8 tok/s (SampleStream n=8, T=1)", tps(BATCH * DECODED, m["q35_b8"]),
         tps(BATCH * DECODED, m["q35_hf_b8"]), m["q35_hf_b8"] / m["q35_b8"]],
        ["qwen3.5 greedy tokens equal b1", f"{agree35:.0%}", "", ""],
    ]  # fmt: skip
    print_table(
        "decode speed (medians; baseline: transformers generate, same weights)",
        ["metric", "headway", "transformers", "ratio"],
        rows,
    )

    step_bytes = limit["step_bytes"]
    read_bw = limit["model_bytes"] / limit["read_s"]
    hf_step = {b: (m[f"hf_b{b}"] - m[f"hf_b{b}_pre"]) / DECODED for b in (1, BATCH)}
    bound = {}  # the highest ratio this machine allows in fp32
    for b in (1, BATCH):
        floor_s = max(step_bytes / read_bw, limit[f"fastest_b{b}_s"])
        bound[b] = hf_step[b] / floor_s
    ms = lambda key: f"{limit[key] * 1e3:.2f}"  # noqa: E731
    rows = [
        ["weight bytes read per decode step (MB)", step_bytes / 1e6],
        [f"read of the model's {limit['model_bytes'] / 1e6:.0f} MB (ms, sum)",
         limit["read_s"] * 1e3],
        ["  read bandwidth (GB/s)", read_bw / 1e9],
        ["  step bound = weight bytes / read bandwidth (ms)", step_bytes / read_bw * 1e3],
        [f"copy of the model's {limit['model_bytes'] / 1e6:.0f} MB (ms)", limit["copy_s"] * 1e3],
        ["step's matmuls b1 / b8 as F.linear (ms)", f"{ms('linear_b1_s')} / {ms('linear_b8_s')}"],
        ["step's matmuls b1 / b8 as (W @ xT)T (ms)", f"{ms('rows_b1_s')} / {ms('rows_b8_s')}"],
        ["step's matmuls b1 / b8, fastest layout per shape (ms)",
         f"{ms('best_b1_s')} / {ms('best_b8_s')}"],
        ["  same, q/k/v and gate/up fused (ms)",
         f"{ms('fused_best_b1_s')} / {ms('fused_best_b8_s')}"],
        ["bound b1 / b8 = HF step / max(bandwidth bound, fastest matmuls)",
         f"{bound[1]:.2f} / {bound[BATCH]:.2f}"],
        ["ours: decode step b1 / b8 (ms, engine alone)",
         f"{m['engine_b1'] / DECODED * 1e3:.2f} / {m['engine_b8'] / DECODED * 1e3:.2f}"],
        ["HF: decode step b1 / b8 (ms)",
         f"{hf_step[1] * 1e3:.2f} / {hf_step[BATCH] * 1e3:.2f}"],
    ]  # fmt: skip
    print_table("machine limit (memory bandwidth, matmuls)", ["metric", "value"], rows)

    rows = []
    for b in (1, BATCH):
        for (o, i), bb in sorted(kernels.choice, key=lambda k: (k[1], k[0])):
            if bb != b:
                continue
            times = kernels.times.get(((o, i), b), {})
            alts = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in sorted(times.items()))
            rows.append([f"b{b} {o}x{i}", kernels.choice[(o, i), b], alts or "(forced)"])
        times = kernels.times.get((ATTENTION, b), {})
        alts = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in sorted(times.items()))
        rows.append([f"b{b} attention (per layer)", kernels.attention[b], alts or "(forced)"])
        times = compiler.times.get(b, {})
        alts = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in sorted(times.items()))
        way = "compiled" if compiler.runs(b) else "eager"
        rows.append([f"b{b} decode layers (whole)", way, alts or f"(--compile {compiler.mode})"])
    print_table(
        "decode kernel layouts the engine chose (ms per pass over that shape's weights; the "
        "layers' forward eager or compiled, sampler_svc.compiled)",
        ["bucket / weight shape", "chosen", "measured"],
        rows,
    )

    b8_bf16_vs_hf = "n/a"
    if bf16_supported:
        ours16 = tps(BATCH * DECODED, m["ours_bf16_b8"])
        hf16_tps = tps(BATCH * DECODED, m["hf_bf16_b8"])
        b8_bf16_vs_hf = f"{ours16 / hf16_tps:.2f}"
        d = np.asarray(delta)
        kl = float(np.mean(np.exp(-d) - 1 + d))  # k3 estimate of KL(sampler ‖ trainer)
        rows = [
            ["decode b8 tok/s bf16 (SampleStream n=8, T=1)", ours16, hf16_tps, b8_bf16_vs_hf],
            ["  vs our fp32 decode b8", ours16, ours_b8, ours16 / ours_b8],
            ["bf16 sampler vs fp32 trainer: mean |Δ logprob|", float(np.abs(d).mean()), "", ""],
            ["  max |Δ logprob|", float(np.abs(d).max()), "", ""],
            ["  KL(sampler ‖ trainer), k3 estimate over sampled tokens", kl, "", ""],
            ["  tokens compared", len(d), "", ""],
        ]  # fmt: skip
        print_table(
            "bf16 (a replica with --dtype bf16 vs transformers generate in bf16; agreement "
            "against the fp32 forward, the fp32 replica's ComputeLogprobs = the trainer's)",
            ["metric", "headway", "transformers", "ratio"],
            rows,
        )
        print("the bf16 replica's choices (its log):")
        for line in bf16_choices:
            print("  " + line.split("] ", 1)[-1])
    for dtype, seconds in startups:
        print(
            f"sampler start-up, {dtype} replica (spawn → first Sample served; kernels "
            f"measured, decode compiled and timed where --compile auto does, nothing cached): "
            f"{seconds:.1f} s"
        )
    for line in cold_compile:
        print("  fp32 replica: " + line.split("] ", 1)[-1])

    rows, _, reload_line = reload_report(reloads, floors)
    print_table(
        f"reload latency, ms over {args.reloads} reloads per fork (after "
        f"{args.warmup_reloads} warmup); publish = head message arrival in this process",
        ["metric", "p50", "p90"],
        rows,
    )
    print(
        f"\nbounds on this machine (fp32): b1 {bound[1]:.2f}×, b8 {bound[BATCH]:.2f}× "
        f"(transformers' step {hf_step[1] * 1e3:.1f} / {hf_step[BATCH] * 1e3:.1f} ms over the "
        f"larger of reading the weights, {step_bytes / read_bw * 1e3:.1f} ms, and the step's "
        f"matmuls at the fastest layout, {limit['fastest_b1_s'] * 1e3:.1f} / "
        f"{limit['fastest_b8_s'] * 1e3:.1f} ms); ours reach {b1_vs_hf / bound[1]:.0%} / "
        f"{b8_vs_hf / bound[BATCH]:.0%} of them."
    )
    print(
        "ratio: headway tok/s / transformers tok/s (>1 = headway faster). "
        "decode = (64 − 1) tokens per row over the decode phase.\n"
        "goals: sampler_b1_vs_hf and sampler_b8_vs_hf >= 1.5 (or >= 85% of the bound), "
        "sampler_b8_bf16_vs_hf >= 2, reload_lora_p50_ms <= 5, reload_full_over_floor_ms <= 5, "
        f"startup_s <= 60; bench took {now() - started:.0f} s; 1-min load average "
        f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end on "
        f"{os.cpu_count()} CPUs (a busy machine makes every figure above unreliable)"
    )
    print(
        f"sampler_b1_vs_hf={b1_vs_hf:.2f} sampler_b8_vs_hf={b8_vs_hf:.2f} "
        f"sampler_b8_bf16_vs_hf={b8_bf16_vs_hf} sampler_b1_bound={bound[1]:.2f} "
        f"sampler_b8_bound={bound[BATCH]:.2f} {reload_line} startup_s={startup_s:.1f}"
    )


if __name__ == "__main__":
    main()
