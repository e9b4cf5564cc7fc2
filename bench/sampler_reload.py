"""The sampler bench's reload latency: a training step on the trainer (a child process),
the head event it publishes, and the replica in this process catching up.

`reload_once` runs one ForwardBackward + OptimStep and times, from the head message's
arrival here, the replica listing the checkpoint (servable: its weights in place) and
serving its first token; `Probe` times the replica's own steps by wrapping them in this
process; `copy_floor` times the least a full reload must do, a plain memory-to-memory copy
of the engine's weight bytes, between the reloads of the same run. `run_reloads` and
`reload_report` are what `bench_sampler.py` runs and prints; `python -m
bench.sampler_reload` runs the reloads alone (no decode bench, no transformers) and
prints the same table and last line `reload_lora_p50_ms=<ms> reload_full_over_floor_ms=<ms>`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.sampler_decode import SamplerThread, now, request
from headway.server.heads import HeadEvent, channel
from headway.tensors import to_tensor
from headway.testing import ServiceProcess, shared_redis_url
from headway.v1 import common_pb2, model_pb2_grpc, training_pb2, training_pb2_grpc

FULL, LORA = "full", "lora"
LORA_RANK = 32


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


def copy_floor(replica: SamplerThread, model: str, repeats: int = 3) -> float:
    """Seconds of the fastest plain copy (memory to memory, preallocated) of the weight
    bytes of the engine serving `model`: what no full reload can beat. Both a single
    thread's memcpy (numpy) and torch's threaded copy are timed; the faster counts."""
    import torch

    engine_ref, _ = replica.sampler.served[
        next(k for k in list(replica.sampler.served) if k[0] == model)
    ]
    tensors = list(replica.sampler.engines[engine_ref].engine.model.state_dict().values())
    seen, src = set(), []
    for t in tensors:  # tied weights once
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            src.append(t.detach().contiguous())
    dst = [torch.empty_like(t) for t in src]
    raw = [(d.reshape(-1).view(torch.uint8).numpy(), t.reshape(-1).view(torch.uint8).numpy())
           for d, t in zip(dst, src, strict=True)]  # fmt: skip
    best = float("inf")
    for _ in range(repeats):
        start = now()
        for d, t in raw:
            np.copyto(d, t)
        best = min(best, now() - start)
        start = now()
        for d, t in zip(dst, src, strict=True):
            d.copy_(t)
        best = min(best, now() - start)
    return best


def run_reloads(
    trainer: TrainerProcess,
    replica: SamplerThread,
    listener: HeadListener,
    probe: Probe,
    vocab: int,
    prompt: list[int],
    reloads: int,
    warmup: int,
) -> tuple[dict[str, list[dict[str, float]]], list[float]]:
    """LoRA then full reloads (`warmup` untimed first); the copy floor after each full one."""
    out: dict[str, list[dict[str, float]]] = {LORA: [], FULL: []}
    floors: list[float] = []
    for model in (LORA, FULL):
        for i in range(warmup + reloads):
            items = cross_entropy_items(vocab, seed=i)
            r = reload_once(trainer, replica, listener, probe, model, items, prompt)
            if i >= warmup:
                out[model].append(r)
                if model == FULL:
                    floors.append(copy_floor(replica, FULL))
    return out, floors


def reload_report(
    reloads: dict[str, list[dict[str, float]]], floors: list[float]
) -> tuple[list[list[Any]], dict[str, dict[str, float]], str]:
    """(table rows in ms, per-fork p50/p90 summaries, the last line's reload keys).

    Servable = the replica lists the checkpoint (weights in place, the next Sample pinned
    to it runs at once). reload_lora_p50_ms: publish → servable, LoRA, p50;
    reload_full_over_floor_ms: publish → servable, full, p50, minus the copy floor p50."""
    summary: dict[str, dict[str, float]] = {}
    rows: list[list[Any]] = []
    floor_ms = float(np.median(floors)) * 1e3 if floors else float("nan")
    for model, label in ((FULL, "full"), (LORA, f"LoRA r{LORA_RANK}")):
        rs = reloads[model]
        s = summary[model] = {}
        for k in rs[0]:
            vals = [r[k] * 1e3 for r in rs if k in r]
            s[k], s[k + "_p90"] = float(np.median(vals)), float(np.percentile(vals, 90))
        rows.append([f"{label}: publish → servable (listed)", s["listed"], s["listed_p90"]])
        if model == FULL:
            rows.append(["full:   copy floor (weight bytes, memory → memory)", floor_ms, ""])
        rows.append([f"{label}: publish → first token served", s["served"], s["served_p90"]])
        rows.append([f"{label}: OptimStep reply → first token served", s["served_from_reply"],
                     s["served_from_reply_p90"]])  # fmt: skip
        rows.append([f"{label}: same Sample, no reload (its floor)", s["floor"], s["floor_p90"]])
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
    line = (
        f"reload_lora_p50_ms={summary[LORA]['listed']:.1f} "
        f"reload_full_over_floor_ms={summary[FULL]['listed'] - floor_ms:.1f}"
    )
    return rows, summary, line


def main() -> None:
    """The reloads alone: the same replica, trainer and timings as `make bench-sampler`."""
    import argparse
    import json
    import shutil
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import add_tokenizer, build_bench_model, clean_redis, print_table
    from bench.sampler_decode import BASE
    from headway.testing import redis_prefix
    from headway.v1 import model_pb2
    from sampler_svc.config import SamplerConfig

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reloads", type=int, default=20, help="timed reloads per fork")
    parser.add_argument("--warmup-reloads", type=int, default=3, help="untimed reloads first")
    args = parser.parse_args()
    path = build_bench_model()
    add_tokenizer(path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    store = Path(tempfile.mkdtemp(prefix="headway-bench-store-"))
    prefix = redis_prefix("bench")
    trainer = replica = listener = probe = None
    try:
        listener = HeadListener(prefix)
        trainer = TrainerProcess(store, prefix)
        config = SamplerConfig(store=store, redis_url=shared_redis_url(), redis_prefix=prefix,
                               max_batch=16, max_seq_len=256, device="cpu")  # fmt: skip
        replica = SamplerThread(config)
        trainer.models.AddBase(model_pb2.AddBaseRequest(path=str(path), name=BASE))
        trainer.models.ForkModel(model_pb2.ForkModelRequest(source=BASE, name=FULL, full=True))
        lora = common_pb2.LoraConfig(rank=LORA_RANK, alpha=2 * LORA_RANK)
        trainer.models.ForkModel(model_pb2.ForkModelRequest(source=BASE, name=LORA, lora=lora))
        one = [1]
        for model in (BASE, FULL, LORA):
            replica.stub.Sample(request(model, one, 1, 0.0, 0, max_tokens=2))
        probe = instrument(replica.sampler)
        reloads, floors = run_reloads(
            trainer, replica, listener, probe, vocab, one, args.reloads, args.warmup_reloads
        )
    finally:
        if probe is not None:
            probe.restore()
        for part in (replica, trainer):
            if part is not None:
                part.stop()
        if listener is not None:
            listener.close()
        clean_redis(prefix)
        shutil.rmtree(store, ignore_errors=True)
        store.with_name(f"{store.name}-trainer.log").unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    rows, _, line = reload_report(reloads, floors)
    title = f"reload latency, ms over {args.reloads} reloads per fork"
    print_table(title, ["metric", "p50", "p90"], rows)
    print(line)


if __name__ == "__main__":
    main()
