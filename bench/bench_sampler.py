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
`sampler_b8_vs_hf=<r> sampler_b1_vs_hf=<r> reload_full_p50_ms=<ms> reload_lora_p50_ms=<ms>`.
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
    add_tokenizer,
    build_bench_model,
    clean_redis,
    median_time,
    print_table,
)
from headway.channels import CHANNEL_OPTIONS  # noqa: E402
from headway.server.heads import HeadEvent, channel  # noqa: E402
from headway.tensors import to_tensor  # noqa: E402
from headway.testing import ServiceProcess, redis_prefix, shared_redis_url  # noqa: E402
from headway.v1 import (  # noqa: E402
    common_pb2,
    model_pb2,
    model_pb2_grpc,
    sampling_pb2,
    sampling_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

PROMPT, NEW, BATCH = 32, 64, 8
DECODED = NEW - 1  # tokens per row made by decode steps (the first comes from the prefill)
BASE, FULL, LORA = "base40m", "full", "lora"
LORA_RANK = 32
I32 = common_pb2.DTYPE_INT32
now = time.perf_counter


# ------------------------------------------------------------------------------ servers
class SamplerThread:
    """A sampler replica's grpc.aio server on a private event loop in a daemon thread."""

    def __init__(self, config: Any) -> None:
        from sampler_svc.server import create_replica

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def boot() -> tuple[Any, int, Any]:
            server, port, replica = await create_replica(config)
            await server.start()
            return server, port, replica

        _, port, self.replica = self.run(boot())
        self.sampler = self.replica.sampler
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        self.stub = sampling_pb2_grpc.SamplingServiceStub(self.channel)

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.channel.close()
        self.run(self.replica.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class TrainerProcess(ServiceProcess):
    """The trainer as `python -m trainer_svc`, a child process, as `headway serve` runs it
    (in this process its torch threads would slow the replica's: see `HFWorker`)."""

    def __init__(self, store: Path, prefix: str) -> None:
        log = store.with_name(f"{store.name}-trainer.log")
        super().__init__("trainer", "trainer_svc", ["--store", str(store)], log, prefix)
        try:
            self.wait_ready(time.monotonic() + 60)
        except BaseException:
            self.stop()
            raise
        self.models = model_pb2_grpc.ModelServiceStub(self.channel)
        self.train = training_pb2_grpc.TrainingServiceStub(self.channel)


class HeadListener:
    """Subscribes to the head channel and timestamps each event's arrival here."""

    def __init__(self, prefix: str) -> None:
        import redis

        self.client = redis.Redis.from_url(shared_redis_url())
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(channel(prefix))
        while (m := self.pubsub.get_message(timeout=5)) is None or m["type"] != "subscribe":
            pass
        self.arrivals: dict[str, float] = {}
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None and message["type"] == "message":
                t = now()
                event = HeadEvent.from_json(message["data"])
                with self.cond:
                    self.arrivals.setdefault(event.checkpoint, t)
                    self.cond.notify_all()

    def wait(self, checkpoint: str, timeout: float = 10) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: checkpoint in self.arrivals, timeout):
                raise TimeoutError(f"no head event for {checkpoint} within {timeout} s")
            return self.arrivals[checkpoint]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)
        self.pubsub.close()
        self.client.close()


class Probe:
    """Times chosen functions of the replica in this process (wrapped, restored at the end)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float, Any]] = []  # (name, start, end, key)
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, name: str, key: Callable[..., Any] | None = None) -> None:
        fn = getattr(owner, attr)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            start = now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spans.append((name, start, now(), key(*args) if key else None))

        self._undo.append((owner, attr, owner.__dict__.get(attr)))
        setattr(owner, attr, timed_call)

    def restore(self) -> None:
        for owner, attr, old in reversed(self._undo):
            if old is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)
        self._undo.clear()

    def first(self, name: str, key: Any = None, after: float = 0.0) -> tuple[float, float] | None:
        for n, start, end, k in self.spans:
            if n == name and start >= after and (key is None or k == key):
                return start, end
        return None

    def within(self, name: str, start: float, end: float) -> float:
        """Total time of `name` spans inside [start, end]."""
        return sum(e - s for n, s, e, _ in self.spans if n == name and s >= start and e <= end)


def instrument(sampler: Any) -> Probe:
    import sampler_svc.sampler as sampler_mod
    from sampler_svc.multilora import AdapterBank

    probe = Probe()
    probe.wrap(sampler, "preload", "event", key=lambda m, c: (m, c))
    probe.wrap(sampler, "ensure", "ensure", key=lambda m, c: (m, c))
    probe.wrap(sampler_mod, "serving_refs", "serving_refs")
    probe.wrap(sampler_mod, "read_lora", "read_lora")
    probe.wrap(sampler_mod, "copy_full_weights", "copy_full_weights")
    probe.wrap(sampler_mod, "load_engine_model", "load_engine_model")
    probe.wrap(AdapterBank, "load", "slot_copy")
    return probe


# ------------------------------------------------------------------------------- sampling
def request(
    model: str, prompt: list[int], n: int, temperature: float, seed: int, max_tokens: int = NEW
) -> sampling_pb2.SampleRequest:
    params = common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=True, n=n
    )
    return sampling_pb2.SampleRequest(
        model=model, prompt_tokens=to_tensor(prompt, I32), params=params
    )


def stream(stub: Any, req: sampling_pb2.SampleRequest) -> dict[str, Any]:
    """Run a SampleStream: decode-phase time, end-to-end time and the tokens of each row."""
    n = req.params.n or 1
    rows: list[list[int]] = [[] for _ in range(n)]
    start = now()
    decode_start = last = 0.0
    firsts = 0
    for chunk in stub.SampleStream(req):
        if not chunk.tokens.data:
            continue
        t = now()
        tokens = np.frombuffer(chunk.tokens.data, np.int32).tolist()
        if not rows[chunk.index]:
            firsts += 1
            if firsts == n:  # every row has its prefill token: decoding starts
                decode_start = t
        rows[chunk.index].extend(tokens)
        last = t
    assert all(len(r) == NEW for r in rows), [len(r) for r in rows]
    return {"decode": last - decode_start, "e2e": now() - start, "rows": rows}


def concurrent(stub: Any, prompts: list[list[int]], seed: int) -> float:
    """Wall time of len(prompts) single-sequence Sample calls sent at once from threads."""
    barrier = threading.Barrier(len(prompts) + 1)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        req = request(BASE, prompts[i], 1, 1.0, seed + i)
        barrier.wait()
        try:
            reply = stub.Sample(req)
            assert len(reply.sequences[0].tokens.data) == 4 * NEW
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    start = now()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return now() - start


def drive(sampler: Any, prompt: list[int], n: int, temperature: float, seed: int) -> float:
    """On the engine thread: admit one job on the base's engine and step it to the end;
    the decode phase's time (after the prefill)."""
    from sampler_svc.engine import Job
    from sampler_svc.requests import row_generator
    from sampler_svc.sampling import DrawParams

    located = sampler.ensure(BASE, sampler.store.head(BASE))
    assert located is not None
    entry, slot = located
    draws = [DrawParams(temperature, 1.0, 0, row_generator(seed, i)) for i in range(n)]
    job = Job(prompt, n, NEW, frozenset(), draws, slot=slot)
    entry.engine.admit(job)
    start = now()
    while job.live_rows:
        entry.engine.step()
    return now() - start


def engine_decode(sampler: Any, prompt: list[int], n: int, temperature: float, seed: int) -> float:
    """Decode-phase time of the replica's engine driven directly on its thread (no RPC)."""
    return sampler.call(lambda: drive(sampler, prompt, n, temperature, seed))


def profile_engine(sampler: Any, prompt: list[int], n: int, temperature: float) -> None:
    """torch.profiler over one request's decode steps on the engine thread."""
    from torch.profiler import ProfilerActivity, profile

    def run() -> str:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            drive(sampler, prompt, n, temperature, 0)
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)

    print(f"\ntorch.profiler: engine decode, batch {n}, prefill + {DECODED} steps (self CPU)")
    print(sampler.call(run))


# ------------------------------------------------------------------------------ baseline
class HFBaseline:
    """transformers generate on the same weights: decode time = generate − prefill."""

    def __init__(self, path: Path) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32
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


class HFWorker:
    """`HFBaseline` (and the machine-limit probe) in a child process, called like one.

    Why a process: torch's CPU ops run on OpenMP (libgomp), and every thread that runs a
    parallel op keeps a team of workers for the life of the process. With more such workers
    than cores (here: this thread's, the replica's engine thread's), libgomp stops spinning
    and puts threads to sleep at every parallel region, which made the engine's decode step
    ~2x slower than in a sampler process of its own (`headway serve` runs each service as a
    child process) and transformers' ~15% slower. The baseline in a process of its own, and
    no torch work on this thread, leave the replica's engine thread the only team here.
    """

    def __init__(self, path: Path) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_hf_serve, args=(str(path), child), daemon=True)
        self.proc.start()
        child.close()
        self.params = self._call("params")

    def _call(self, cmd: str, *args: Any) -> Any:
        self.conn.send((cmd, args))
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(f"transformers baseline process: {value}")
        return value

    def generate(self, prompt: torch.Tensor, sample: bool) -> tuple[float, torch.Tensor]:
        return self._call("generate", prompt, sample)

    def prefill(self, prompt: torch.Tensor) -> float:
        return self._call("prefill", prompt)

    def machine_limit(self, repeats: int) -> dict[str, float]:
        return self._call("machine_limit", repeats)

    def close(self) -> None:
        try:
            self.conn.send(("stop", ()))
        finally:
            self.proc.join(timeout=30)


def _hf_serve(path: str, conn: Any) -> None:
    """The baseline process: answers HFWorker's calls until told to stop."""
    hf = HFBaseline(Path(path))
    calls: dict[str, Callable[..., Any]] = {
        "params": lambda: sum(p.numel() for p in hf.model.parameters()) / 1e6,
        "generate": hf.generate,
        "prefill": hf.prefill,
        "machine_limit": lambda repeats: machine_limit(hf.model, repeats),
    }
    while True:
        cmd, args = conn.recv()
        if cmd == "stop":
            return
        try:
            conn.send((True, calls[cmd](*args)))
        except Exception as e:  # reported in the bench process
            conn.send((False, repr(e)))


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
def machine_limit(model: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Weight bytes a decode step reads, the memory bandwidth, and the step's matmuls alone.

    The matmuls are timed as `F.linear(x, W)` (what our engine and transformers call) and
    as `(W @ xᵀ)ᵀ` with x padded to at least 2 rows, the layout torch's CPU GEMM streams
    the weights fastest in: the second is what a decode step's matmuls can cost here.
    """
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    step_bytes = sum(w.numel() * w.element_size() for w in weights)  # lm_head = embedding
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    reps = max(repeats, 5)
    src = torch.randn(model_bytes // 4)
    dst = torch.empty_like(src)
    out = {
        "step_bytes": step_bytes,
        "model_bytes": model_bytes,
        "copy_s": median_time(lambda: dst.copy_(src), reps),
        "read_s": median_time(lambda: src.sum(), reps),
    }
    for batch in (1, BATCH):
        xs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}
        x2 = {k: torch.randn(max(batch, 2), k) for k in xs}

        def linear(xs: dict[int, torch.Tensor] = xs) -> None:
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)

        def weights_left(xs: dict[int, torch.Tensor] = x2) -> None:
            for w in weights:
                torch.mm(w, xs[w.shape[1]].T)  # (W @ xT)T: the transpose is a view

        out[f"linear_b{batch}_s"] = median_time(linear, reps)
        out[f"best_b{batch}_s"] = median_time(weights_left, reps)
    return out


# -------------------------------------------------------------------------------- reloads
def cross_entropy_items(vocab: int, seed: int) -> list[common_pb2.TrainingItem]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, 17)
    datum = common_pb2.Datum(
        input_tokens=to_tensor(tokens[:-1]),
        target_tokens=to_tensor(tokens[1:]),
        weights=to_tensor(np.ones(16, np.float32)),
    )
    return [common_pb2.TrainingItem(datum=datum)]


def reload_once(
    trainer: TrainerProcess,
    replica: SamplerThread,
    listener: HeadListener,
    probe: Probe,
    model: str,
    items: list[common_pb2.TrainingItem],
    prompt: list[int],
) -> dict[str, float]:
    """One training step of `model` and the replica catching up; times in seconds."""
    trainer.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(model=model, data=items, loss_fn="cross_entropy")
    )
    adam = common_pb2.AdamParams(learning_rate=1e-5)
    sent = now()
    reply = trainer.train.OptimStep(training_pb2.OptimStepRequest(model=model, adam=adam))
    replied = now()
    ckpt, key = reply.checkpoint, f"{model}/{reply.checkpoint}"
    while key not in replica.sampler.loaded_checkpoints():
        if now() - sent > 30:
            raise TimeoutError(f"the replica never listed {key}")
        time.sleep(0.0005)  # a tight poll would steal a core from the load it waits for
    listed = now()
    first = replica.stub.Sample(request(model, prompt, 1, 0.0, 0, max_tokens=1))
    served = now()
    if first.checkpoint != ckpt:
        raise AssertionError(f"served by {first.checkpoint}, not the new head {ckpt}")
    again = replica.stub.Sample(request(model, prompt, 1, 0.0, 0, max_tokens=1))
    floor = now() - served
    assert again.checkpoint == ckpt
    published = listener.wait(ckpt)
    out = {
        "optim_step": replied - sent,
        "reply_lag": replied - published,  # publish message here → OptimStep reply here
        "listed": listed - published,
        "served": served - published,
        "served_from_reply": served - replied,
        "floor": floor,
    }
    event = probe.first("event", (model, ckpt))
    ensure = probe.first("ensure", (model, ckpt))
    if event is not None and ensure is not None:
        s, e = ensure
        out["event"] = event[0] - published  # publish message → replica's watcher
        out["wake"] = s - event[0]  # watcher → engine thread starts loading
        out["ensure"] = e - s
        out["ensure_end"] = e - published
        for name in ("serving_refs", "read_lora", "slot_copy", "copy_full_weights"):
            out[name] = probe.within(name, s, e)
        out["fresh_engine"] = probe.within("load_engine_model", s, e)
    return out


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
        reloads: dict[str, list[dict[str, float]]] = {LORA: [], FULL: []}
        for model in (LORA, FULL):
            for i in range(args.warmup_reloads + args.reloads):
                items = cross_entropy_items(vocab, seed=i)
                r = reload_once(trainer, replica, listener, probe, model, items, one)
                if i >= args.warmup_reloads:
                    reloads[model].append(r)
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

    summary: dict[str, dict[str, float]] = {}
    rows = []
    for model, label in ((FULL, "full"), (LORA, f"LoRA r{LORA_RANK}")):
        rs = reloads[model]
        s = summary[model] = {}
        for k in rs[0]:
            vals = [r[k] * 1e3 for r in rs if k in r]
            s[k], s[k + "_p90"] = med(vals), percentile(vals, 90)
        rows.append([f"{label}: publish → first token served", s["served"], s["served_p90"]])
        rows.append([f"{label}: publish → in loaded_checkpoints()", s["listed"], s["listed_p90"]])
        rows.append([f"{label}: OptimStep reply → first token", s["served_from_reply"],
                     s["served_from_reply_p90"]])  # fmt: skip
        rows.append([f"{label}: same Sample again, no reload (floor)", s["floor"], s["floor_p90"]])
        if "ensure" in s:
            rows.append([f"{label}:   publish → watcher has the event", s["event"],
                         s["event_p90"]])  # fmt: skip
            rows.append([f"{label}:   watcher → engine thread starts", s["wake"], s["wake_p90"]])
            rows.append([f"{label}:   load (ensure) total", s["ensure"], s["ensure_p90"]])
            parts = ("serving_refs", "read_lora", "slot_copy", "copy_full_weights", "fresh_engine")
            for part in parts:
                if s.get(part, 0) > 0.05:
                    rows.append([f"{label}:     {part}", s[part], s[part + "_p90"]])
            rows.append([f"{label}:   publish → loaded", s["ensure_end"], s["ensure_end_p90"]])
        rows.append([f"{label}: OptimStep call (train + save)", s["optim_step"],
                     s["optim_step_p90"]])  # fmt: skip
    print_table(
        f"reload latency, ms over {args.reloads} reloads per fork (after "
        f"{args.warmup_reloads} warmup); publish = head message arrival in this process",
        ["metric", "p50", "p90"],
        rows,
    )
    full_p50, lora_p50 = summary[FULL]["served"], summary[LORA]["served"]
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
        "goals: sampler_b8_vs_hf >= 3, sampler_b1_vs_hf >= 2, reload_full_p50_ms <= 30, "
        f"reload_lora_p50_ms <= 5; bench took {now() - started:.0f} s; 1-min load average "
        f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end on "
        f"{os.cpu_count()} CPUs (a busy machine makes every figure above unreliable)"
    )
    print(
        f"sampler_b8_vs_hf={b8_vs_hf:.2f} sampler_b1_vs_hf={b1_vs_hf:.2f} "
        f"reload_full_p50_ms={full_p50:.1f} reload_lora_p50_ms={lora_p50:.1f}"
    )


if __name__ == "__main__":
    main()
