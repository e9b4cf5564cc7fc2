"""The sampler bench's reload latency: a training step on the trainer (a child process),
the head event it publishes, and the replica in this process catching up.

`reload_once` runs one ForwardBackward + OptimStep and times, from the head message's
arrival here, the replica listing the checkpoint and serving its first token; `Probe`
times the replica's own steps by wrapping them in this process. See `bench_sampler.py`.
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
