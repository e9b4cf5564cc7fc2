"""`Sampler`: the engines of one replica, driven by one thread, fed from asyncio.

Every change to weights and every forward happens on the engine thread, between decode
steps: a checkpoint's weights are loaded into a free engine or adapter slot (never one a
live row uses), jobs join at step boundaries, and each step decodes every live row of
every engine, followed by one piece of the oldest ComputeLogprobs job (`scoring`). The gRPC
side submits jobs and receives their tokens through thread-safe callbacks; it never touches
torch.

If the engine thread dies (a bug, a device error), every request in flight or waiting fails
with UNAVAILABLE at once, later ones are refused the same way, and the failure listeners
(the server: health NOT_SERVING, out of the registry) are told, so gateways fail over to
other replicas instead of waiting on a replica that will never answer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from headway.errors import HeadwayError, NotFound, Overloaded, Unavailable
from headway.modeling import ModelConfig
from headway.modeling.placement import settle
from headway.store import CheckpointRef, CheckpointStore
from headway.store.weights import base_config
from sampler_svc.config import SamplerConfig
from sampler_svc.engine import Engine, GenerationJob
from sampler_svc.kernels import engine_dtype
from sampler_svc.multilora import NO_ADAPTER, AdapterBank
from sampler_svc.scoring import ScoringJob
from sampler_svc.weights import (
    copy_full_weights,
    load_engine_model,
    read_lora,
    serving_refs,
)

log = logging.getLogger(__name__)


def _same_shape(entry: EngineEntry, config: ModelConfig, dtype: torch.dtype) -> bool:
    """Whether `entry`'s engine computes what a fresh engine of `config` would (every
    architecture field; ids and unknown keys aside), in the dtype a fresh engine uses."""
    have = entry.engine.model.config
    if entry.engine.model.embed_tokens.weight.dtype != dtype:
        return False
    skip = {"extra", "bos_token_id", "eos_token_id"}
    return all(
        getattr(have, f.name) == getattr(config, f.name)
        for f in fields(config)
        if f.name not in skip
    )


@dataclass
class EngineEntry:
    """An engine and the adapters resident in its bank."""

    ref: CheckpointRef
    engine: Engine
    bank: AdapterBank
    adapters: OrderedDict[CheckpointRef, int] = field(default_factory=OrderedDict)  # LRU
    # Adapter slots held by scoring jobs in progress (not rows, but not to be reloaded).
    pins: Counter[int] = field(default_factory=Counter)

    def busy(self) -> bool:
        """Whether it has rows to decode."""
        return bool(self.engine.rows)

    def in_use(self) -> bool:
        """Whether its weights serve work in progress (rows or a scoring job)."""
        return self.busy() or any(self.pins.values())

    def slots_in_use(self) -> set[int]:
        return self.engine.slots_in_use() | {s for s, n in self.pins.items() if n}


@dataclass
class Pending:
    model: str
    checkpoint: str
    job: GenerationJob
    on_error: Callable[[HeadwayError | Exception], None]


class Sampler:
    """All engines of a replica and the thread that runs them."""

    def __init__(self, config: SamplerConfig) -> None:
        self.config = config
        device, dtype = settle(config.device, config.dtype)
        self.device = torch.device(device)  # of every engine's weights, caches and draws
        self.dtype = engine_dtype(dtype, device)  # of every engine's weights
        log.info("engines on %s in %s", device, self.dtype)
        self.store = CheckpointStore(config.store, recover=False)  # the trainer writes
        self.engines: OrderedDict[CheckpointRef, EngineEntry] = OrderedDict()
        self.served: dict[tuple[str, str], tuple[CheckpointRef, CheckpointRef | None]] = {}
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._waiting: deque[Pending] = deque()
        self._scoring: deque[ScoringJob] = deque()  # oldest first; the head runs
        # Rows of submitted jobs not yet decoding (the registry's load, with live rows);
        # changed by the gRPC thread (submit) and the engine thread (admit), hence the lock.
        self._queued_rows = 0
        self._rows_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler-engine", daemon=True)
        self.steps = 0
        self.tokens = 0  # tokens decoded (every row's, first tokens included)
        self.scoring_pieces = 0
        # Called on the engine thread with (kind, seconds) after each load: "lora" (an
        # adapter into a slot), "full" (full weights into an idle engine), "engine" (a new
        # engine). The server's metrics set it; nothing here knows about them.
        self.on_load: Callable[[str, float], None] = lambda kind, seconds: None
        # Set (once) when the engine thread died: why, as the error every request gets.
        self.failure: Unavailable | None = None
        self._failure_listeners: list[Callable[[Unavailable], None]] = []

    # ------------------------------------------------------------ public (any thread)
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30)

    def on_failure(self, listener: Callable[[Unavailable], None]) -> None:
        """Call `listener(error)` (on the engine thread) if the engine thread dies."""
        self._failure_listeners.append(listener)

    def check_alive(self) -> None:
        """Raise `Unavailable` if the engine thread has died."""
        if self.failure is not None:
            raise self.failure

    def _check_room(self) -> None:
        self.check_alive()
        if self.queue_depth >= self.config.max_queue:
            raise Overloaded(
                f"the sampler has {self.queue_depth} requests waiting (limit "
                f"{self.config.max_queue}); retry shortly or add replicas"
            )

    def _put(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        if self.failure is not None:  # died meanwhile: its own drain may have run already
            self._drain_inbox()

    def submit(self, pending: Pending) -> None:
        """Queue a job; its tokens arrive through `pending.job.emit`."""
        self._check_room()
        with self._rows_lock:
            self._queued_rows += pending.job.n
        self._put("submit", pending)

    def score(self, model: str, ckpt: str, sequences: list[list[int]]) -> Future[list[np.ndarray]]:
        """Queue a ComputeLogprobs job; its result (one array per sequence) in the future.

        Cancelling the future drops the rest of the job's work.
        """
        self._check_room()
        job = ScoringJob(model, ckpt, sequences)
        self._put("score", job)
        return job.future

    def compute_logprobs(
        self, model: str, ckpt: str, sequences: list[list[int]]
    ) -> list[np.ndarray]:
        """Logprobs of given sequences under (model, ckpt), waiting for them (any thread)."""
        return self.score(model, ckpt, sequences).result()

    def preload(self, model: str, checkpoint: str) -> None:
        """Load a checkpoint ahead of requests (a head event); best effort."""
        self._put("preload", (model, checkpoint))

    def call(self, fn: Callable[[], Any], timeout: float = 300) -> Any:
        """Run `fn` on the engine thread between steps and return its result."""
        self.check_alive()
        done: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._put("call", (fn, done))
        ok, value = done.get(timeout=timeout)
        if not ok:
            raise value
        return value

    @property
    def queue_depth(self) -> int:
        """Requests (Samples, ComputeLogprobs) waiting to start or to finish scoring."""
        return self._inbox.qsize() + len(self._waiting) + len(self._scoring)

    @property
    def queued_rows(self) -> int:
        """Rows of the jobs waiting to start."""
        return self._queued_rows

    def _dequeued(self, p: Pending) -> None:
        with self._rows_lock:
            self._queued_rows -= p.job.n

    @property
    def live_rows(self) -> int:
        return sum(len(e.engine.rows) for e in list(self.engines.values()))

    def loaded_checkpoints(self) -> list[str]:
        """ "model/checkpoint" of everything servable without a load."""
        return sorted(f"{m}/{c}" for (m, c) in list(self.served))

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the guard: never a silent dead engine behind a live port
            log.exception("the sampler engine thread failed; this replica stops serving")
            self._fail(e)

    def _loop(self) -> None:
        while not self._stop.is_set():
            idle = (
                not self._waiting
                and not self._scoring
                and not any(
                    e.busy() or e.engine.repacking or e.bank.pending for e in self.engines.values()
                )
            )
            try:
                kind, payload = self._inbox.get(timeout=0.05 if idle else 0)
                self._handle(kind, payload)
                while True:  # drain everything that arrived, then step
                    kind, payload = self._inbox.get_nowait()
                    self._handle(kind, payload)
            except queue.Empty:
                pass
            self._admit()
            for entry in list(self.engines.values()):
                if entry.busy():
                    decoded = entry.engine.tokens
                    entry.engine.step()
                    self.steps += 1
                    self.tokens += entry.engine.tokens - decoded
                # Packed copies made stale by a reload are made again one per turn of this
                # loop (a few ms each), so a request arriving meanwhile waits for one at most.
                entry.engine.repack(limit=1)
                # An adapter served from its file's map since a reload is copied into its
                # slot (one per turn, ~2-4 ms): the map lives only until then.
                entry.bank.stack_next()
            self._score_piece()

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "submit":
            self._waiting.append(payload)
        elif kind == "score":
            self._scoring.append(payload)
        elif kind == "preload":
            model, ckpt = payload
            try:
                self.ensure(model, ckpt)
            except Exception as e:  # a head event for something we cannot load now
                log.info("preload of %s/%s skipped: %s", model, ckpt, e)
        elif kind == "call":
            fn, done = payload
            try:
                done.put((True, fn()))
            except Exception as e:
                done.put((False, e))

    def _admit(self) -> None:
        """Start waiting jobs that fit, in order; a job that does not fit keeps its place."""
        still: deque[Pending] = deque()
        while self._waiting:
            p = self._waiting.popleft()
            if p.job.cancelled:
                self._dequeued(p)
                continue
            try:
                placed = self._place(p)
            except Exception as e:
                self._dequeued(p)
                p.on_error(e)
                continue
            if placed:
                self._dequeued(p)
            else:
                still.append(p)
        self._waiting = still

    def _place(self, p: Pending) -> bool:
        located = self.ensure(p.model, p.checkpoint)
        if located is None:
            return False  # no free engine or slot now: wait for rows to finish
        entry, slot = located
        if entry.engine.free_rows < p.job.n:
            return False
        p.job.slot = slot
        decoded = entry.engine.tokens
        entry.engine.admit(p.job)
        self.tokens += entry.engine.tokens - decoded
        return True

    def _score_piece(self) -> None:
        """One piece of the oldest scoring job (placing it on its engine first)."""
        if not self._scoring:
            return
        job = self._scoring[0]
        if not job.future.cancelled():  # else its caller left: drop the rest of the work
            try:
                if job.slot is None:
                    located = self.ensure(job.model, job.checkpoint)
                    if located is None:
                        raise Overloaded("no engine or adapter slot is free; retry shortly")
                    entry, job.slot = located
                    entry.pins[job.slot] += 1  # its weights stay until the job is done
                job.run_piece(self._entry_of(job).engine, self.config.logprobs_chunk_tokens)
                self.scoring_pieces += 1
                if not job.done:
                    return
                job.finish()
            except Exception as e:  # this job's error (a bad sequence, memory): not the engine's
                job.finish(e)
        self._scoring.popleft()
        if job.slot is not None:
            self._entry_of(job).pins[job.slot] -= 1

    def _entry_of(self, job: ScoringJob) -> EngineEntry:
        engine_ref, _ = self.served[(job.model, job.checkpoint)]  # pinned: still served
        return self.engines[engine_ref]

    def _fail(self, cause: BaseException) -> None:
        """The engine thread died: fail everything in flight and waiting, tell listeners."""
        error = Unavailable(f"sampler engine failed: {cause!r}; retry on another replica")
        self.failure = error  # first: whatever is queued from now on is drained by its sender
        jobs = {id(r.job): r.job for e in self.engines.values() for r in e.engine.rows}
        for job in jobs.values():
            _quietly(job.emit, "error", -1, error)
        while self._waiting:
            pending = self._waiting.popleft()
            self._dequeued(pending)
            _quietly(pending.on_error, error)
        while self._scoring:
            _quietly(self._scoring.popleft().finish, error)
        self._drain_inbox()
        for listener in self._failure_listeners:
            _quietly(listener, error)

    def _drain_inbox(self) -> None:
        """Refuse everything queued for a dead engine thread (any thread may call this)."""
        assert self.failure is not None
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._dequeued(payload)
                _quietly(payload.on_error, self.failure)
            elif kind == "score":
                _quietly(payload.finish, self.failure)
            elif kind == "call":
                payload[1].put((False, self.failure))

    def ensure(self, model: str, ckpt: str) -> tuple[EngineEntry, int] | None:
        """(engine, adapter slot) serving (model, ckpt), loading what is missing.

        None when it cannot be loaded now without disturbing live rows.
        """
        key = (model, ckpt)
        refs = self.served.get(key) or serving_refs(self.store, model, ckpt)
        engine_ref, adapter_ref = refs
        entry = self._engine(engine_ref)
        if entry is None:
            return None
        self.engines.move_to_end(engine_ref)
        if adapter_ref is None:
            slot = NO_ADAPTER
        elif adapter_ref in entry.adapters:
            entry.adapters.move_to_end(adapter_ref)
            slot = entry.adapters[adapter_ref]
        else:
            free = self._free_slot(entry)
            if free is None:
                return None
            start = time.perf_counter()
            config, tensors = read_lora(self.store, adapter_ref)
            entry.bank.load(free, config, tensors, keep=True)  # stacked at the next turn
            self.on_load("lora", time.perf_counter() - start)
            entry.adapters[adapter_ref] = slot = free
            log.info(
                "loaded adapter %s/%s into slot %d", adapter_ref.model, adapter_ref.checkpoint, slot
            )
        # Listed (and so advertised in the registry) only once its weights are in place.
        self.served[key] = refs
        return entry, slot

    def _free_slot(self, entry: EngineEntry) -> int | None:
        used = set(entry.adapters.values())
        for slot in range(1, entry.bank.slots):
            if slot not in used:
                return slot
        in_use = entry.slots_in_use()
        for ref, slot in list(entry.adapters.items()):  # least recently used first
            if slot not in in_use:
                del entry.adapters[ref]
                self._forget(lambda e, a, r=ref: a == r)
                return slot
        return None

    def _engine(self, ref: CheckpointRef) -> EngineEntry | None:
        if ref in self.engines:
            return self.engines[ref]
        record = self.store.get_checkpoint(ref.model, ref.checkpoint)
        full = record.kind == "full"
        config = base_config(self.store, ref.model) if full else None
        at_capacity = len(self.engines) >= self.config.max_engines
        # Full weights go into an idle engine of the same shape when there is one to give up:
        # an older checkpoint of the same model (the head moved on), or, when every engine
        # slot is taken, the least recently used idle engine of that shape. A busy engine is
        # never reused: a sequence in flight keeps the weights it started with.
        idle = [e for e in self.engines.values() if not e.in_use()]
        if full:
            same = [e for e in idle if _same_shape(e, config, self.dtype)]
            reuse = next((e for e in same if e.ref.model == ref.model), None)
            if reuse is None and at_capacity and same:
                reuse = same[0]
            if reuse is not None:
                self._drop(reuse)
                start = time.perf_counter()
                copy_full_weights(self.store, ref, reuse.engine.model)
                reuse.engine.weights_changed()
                reuse.ref, reuse.adapters = ref, OrderedDict()
                self.engines[ref] = reuse
                self.on_load("full", time.perf_counter() - start)
                log.info(
                    "loaded full weights %s/%s into an idle engine in %.0f ms",
                    ref.model,
                    ref.checkpoint,
                    1000 * (time.perf_counter() - start),
                )
                return reuse
        if at_capacity:
            if not idle:
                return None
            self._drop(idle[0])
        start = time.perf_counter()
        model = load_engine_model(self.store, ref).to(self.device, self.dtype)
        bank = AdapterBank(model, self.config.adapter_slots, self.config.max_lora_rank)
        max_len = min(self.config.max_seq_len, model.config.max_context)
        engine = Engine(model, bank, self.config.max_batch, max_len, compile=self.config.compile)
        self.engines[ref] = EngineEntry(ref, engine, bank)
        self.on_load("engine", time.perf_counter() - start)
        log.info(
            "loaded weights %s/%s in %.0f ms",
            ref.model,
            ref.checkpoint,
            1000 * (time.perf_counter() - start),
        )
        return self.engines[ref]

    def _drop(self, entry: EngineEntry) -> None:
        """Stop serving what `entry` holds (its weights and its adapters)."""
        del self.engines[entry.ref]
        self._forget(lambda e, a, r=entry.ref: e == r)

    def _forget(self, predicate: Callable[[CheckpointRef, CheckpointRef | None], bool]) -> None:
        for key, (engine_ref, adapter_ref) in list(self.served.items()):
            if predicate(engine_ref, adapter_ref):
                del self.served[key]


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    """Call `fn`, logging (not raising) its error: one failed notice must not stop the rest."""
    try:
        fn(*args)
    except Exception:
        log.exception("notifying a request of the engine failure failed")


__all__ = ["NotFound", "Pending", "Sampler"]
