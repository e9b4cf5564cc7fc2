"""`Trainer`: the domain behind TrainingService and ModelService, with no gRPC in it.

It owns the store, the in-memory training states (`LoadedStates`: LRU, restored from
heads, bounded per team), the shared frozen weights, and the order of things: requests
for one model are serialized by a lock, and a call re-resolves its model inside that lock
(a model deleted and re-created meanwhile is another model); different models proceed
independently, never on the event loop: batch decoding and checkpoint writes in worker
threads, torch work one call at a time, in arrival order, on the trainer's one torch
thread (`trainer_svc.torch_thread`: why).
A training call with a request id seen before returns its first result (`ReplyCache`);
an OptimStep saves, promotes and then publishes (`HeadPublisher`), and returns once the
new head survives a crash of this process (files written and renamed, HEAD moved); the
fsyncs that make it survive a power loss follow in the background unless
`TrainerConfig.sync_saves` (see headway/store/durable.py). Each training call arrives as
one object (`trainer_svc.calls`), built by the servicer from its request. Every request
is bounded before work proportional to its size starts (`batches`, `forwards`,
`adapters`, the metric and request-id checks below).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
import torch

from headway.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from headway.modeling.placement import settle
from headway.server.auth import Caller
from headway.server.heads import live_name, names_key, run_key
from headway.store import (
    OPTIMIZER_FILE,
    CheckpointRecord,
    CheckpointStore,
    ModelRecord,
    check_slug,
)
from headway.store.retention import Retention
from trainer_svc import batches, compute, losses, precision
from trainer_svc.adapters import LoraRequest
from trainer_svc.bases import base_directory, validate_base
from trainer_svc.calls import (
    AdamArgs,
    BackwardCustomCall,
    BatchArgs,
    Call,
    ForwardBackwardCall,
    ForwardCustomCall,
    KlArgs,
    LossArgs,
    OptimStepCall,
    StepCall,
)
from trainer_svc.config import TrainerConfig
from trainer_svc.datums import Batch
from trainer_svc.forks import plan_fork
from trainer_svc.forwards import (
    ForwardLimits,
    check_client_metrics,
    check_weight_sizes,
    decode_weights,
)
from trainer_svc.kernels import Kernels
from trainer_svc.loaded import LoadedStates
from trainer_svc.pool import FrozenPool
from trainer_svc.publisher import HeadPublisher
from trainer_svc.ranks import Compute, RankedCompute, RankGroup
from trainer_svc.reference import KlPenalty, load_reference, resolve_reference
from trainer_svc.replies import ReplyCache
from trainer_svc.results import ForwardResult, OptimResult, reply_bytes
from trainer_svc.spares import SpareWriter
from trainer_svc.state import (
    ModelState,
    checkpoint_writers,
    weights_file,
)
from trainer_svc.torch_thread import TorchThread

log = logging.getLogger(__name__)
T = TypeVar("T")


class Trainer:
    """Training and model management over a checkpoint store, publishing heads to Redis."""

    def __init__(
        self, config: TrainerConfig, redis: Any | None = None, group: RankGroup | None = None
    ) -> None:
        """`group`: this process is rank 0 of a torch.distributed trainer (see ranks.py)."""
        self.config = config
        self.store = CheckpointStore(
            config.store, sync=config.sync_saves, max_pending=config.max_pending_syncs
        )
        self.redis = redis
        # Weights and optimizer state are fp32; `mode` is how they are computed with
        # (--dtype, and the matmul kernels measured on this machine).
        self.dtype = torch.float32
        device, dtype = settle(config.device, config.dtype)
        self.device = torch.device(device)  # of every module, gradient and AdamW state
        log.info("training on %s, --dtype %s", device, dtype)
        # The measured CPU kernels serve CPU forwards only (a GPU runs torch's own).
        kernels = Kernels() if self.device.type == "cpu" else None
        # Every torch call of this process runs on this one thread (why: torch_thread), the
        # --dtype bf16 probe's matmuls first.
        self.torch = TorchThread()
        mode = compute.ComputeMode(self.torch.call(precision.choose, dtype, device), kernels)
        micro, keep = config.microbatch_tokens, config.keep_graph_tokens
        self.pool = FrozenPool(self.store, self.dtype, self.device)
        references = functools.partial(load_reference, self.store, self.pool)
        # The torch work: in this process, or on every rank of the group.
        self.compute = (
            RankedCompute(group, mode, micro, keep, references, lambda: self._states.values())
            if group
            else Compute(mode, micro, keep, references)
        )
        self._locks: dict[str, asyncio.Lock] = {}
        self._states = LoadedStates(
            self.store,
            self.pool,
            self.dtype,
            config.max_loaded_models,
            config.max_pinned_per_team,
            in_use=lambda slug: self._lock(slug).locked(),
            run=self.torch.run,
        )
        self._create_lock = asyncio.Lock()
        # Called with (phase, seconds) once an OptimStep's parts are done ("state_wait",
        # "adamw", "checkpoint_write", "head"), on the event loop. The server's
        # metrics set it; nothing here knows about them.
        self.on_phase: Callable[[str, float], None] = lambda phase, seconds: None
        # Its metrics registry and the port of /metrics (0: not served): trainer_svc.server's.
        self.metrics: Any = None
        self.metrics_port = 0
        self._replies = ReplyCache(
            config.request_cache, config.reply_cache_model_bytes, config.reply_cache_bytes
        )
        self._batch_limits = batches.BatchLimits(
            config.max_batch_items, config.max_batch_turns, config.max_batch_tokens
        )
        self._forward_limits = ForwardLimits(
            config.max_pending_forwards,
            config.max_pending_forward_bytes,
            config.max_total_pending_forward_bytes,
        )
        self.heads = HeadPublisher(redis, config.redis_prefix, self.store)

    # ------------------------------------------------------------ visibility
    def model(self, slug: str, team: str) -> ModelRecord:
        """The record of `slug` if `team` may see it; NotFound otherwise (never "forbidden")."""
        return self.store.visible_model(slug, team)

    def trainable(self, slug: str, team: str) -> ModelRecord:
        record = self.model(slug, team)
        if record.is_base:
            raise FailedPrecondition(
                f"model {slug!r} is a base and is read-only: fork it (ForkModel) and train the fork"
            )
        return record

    def _lock(self, slug: str) -> asyncio.Lock:
        return self._locks.setdefault(slug, asyncio.Lock())

    def _still(self, record: ModelRecord, team: str) -> None:
        """Inside the model's lock: the model a call resolved before queueing is still
        there, the same model, still visible to the caller. A call must never run on a
        model deleted and re-created under its name meanwhile (by anyone)."""
        current = self.model(record.slug, team)  # NotFound if gone or now another team's
        if (current.created, current.team) != (record.created, record.team):
            raise NotFound(
                f"model {record.slug!r} was deleted while this call waited, and a new model "
                "took its name; send the call again if it is meant for the new model"
            )

    # ----------------------------------------------------------- model admin
    def list_models(self, team: str) -> list[ModelRecord]:
        return self.store.visible_models(team)

    async def add_base(self, path: str, name: str, caller: Caller) -> ModelRecord:
        """Register a Hugging Face directory as a public base (validated, referenced): an
        admin action, limited to the base roots (see `trainer_svc.bases`)."""
        directory = base_directory(path, caller, self.config.base_roots)
        name = check_slug(name or directory.name)
        arch = await self.torch.run(validate_base, directory)  # builds the model: torch
        record = ModelRecord(
            slug=name,
            team="",
            is_base=True,
            base=name,
            created=time.time(),
            path=str(directory),
            arch=arch,
        )
        root = CheckpointRecord(id="base", model=name, kind="base", step=0, created=time.time())
        async with self._create_lock:
            self.store.create_model(record, root)
        log.info("registered base %s from %s", name, directory)
        await self.heads.publish(name, root)
        return record

    async def fork(
        self,
        source: str,
        name: str,
        team: str,
        lora: LoraRequest | None,
        full: bool,
        *,
        checkpoint: str = "",
        with_optimizer: bool = False,
    ) -> ModelRecord:
        """A new model of `team` starting from `source`'s head or `checkpoint`
        (copy-on-write), with its optimizer state if `with_optimizer` (`forks.plan_fork`).

        The fork references the source's files, so it holds the source's lock: a
        concurrent DeleteModel of the source waits, then sees the fork as a dependent, and
        the head is read where no OptimStep moves it. Bases are never deleted or moved:
        forks of a base (every team's) do not queue behind each other.
        """
        check_slug(name)
        src = self.model(source, team)
        held = contextlib.nullcontext() if src.is_base else self._lock(source)
        async with held:
            if not src.is_base:
                self._still(src, team)
            return await self._fork(src, name, team, lora, full, checkpoint, with_optimizer)

    async def _fork(
        self,
        src: ModelRecord,
        name: str,
        team: str,
        ask: LoraRequest | None,
        full: bool,
        checkpoint: str = "",
        with_optimizer: bool = False,
    ) -> ModelRecord:
        # On the torch thread: a fork builds model shells and writes a new adapter.
        plan = await self.torch.run(
            plan_fork, self.store, src, name, team, ask, full, self.config.max_lora_rank,
            checkpoint, with_optimizer,
        )  # fmt: skip
        async with self._create_lock:
            await self.torch.run(self.store.create_model, plan.record, plan.root, plan.writer)
        log.info("forked %s from %s@%s (%s)", name, src.slug, plan.root.parent_id, plan.root.kind)
        await self.heads.publish(name, plan.root)
        return plan.record

    async def set_head(self, slug: str, ckpt_id: str, team: str) -> CheckpointRecord:
        """Move HEAD (rollback / branch point); the next step continues from there."""
        model = self.trainable(slug, team)
        async with self._lock(slug):
            self._still(model, team)
            # In a thread: it may wait for the checkpoint's background fsync.
            record = await asyncio.to_thread(self.store.set_head, slug, ckpt_id)
            self._states.drop(slug)  # reload weights *and* optimizer state from the new head
        await self.heads.publish(slug, record)
        return record

    async def tag(
        self, slug: str, ckpt_id: str, name: str, team: str, remove: bool = False
    ) -> CheckpointRecord:
        """Name checkpoint `ckpt_id` of `slug` `name` (or remove the tag `name`); the
        checkpoint the tag names."""
        model = self.trainable(slug, team)
        async with self._lock(slug):
            self._still(model, team)
            if remove:
                named = self.store.untag(slug, name)
                if named is None:  # removed; the checkpoint it named was deleted since
                    raise NotFound(
                        f"tag {name!r} of {slug!r} is removed; it named a checkpoint deleted since"
                    )
                return named
            return self.store.tag(slug, ckpt_id, name)

    async def delete(self, slug: str, team: str) -> None:
        """Delete a fork (refused for bases and for models others fork from)."""
        model = self.model(slug, team)
        async with self._lock(slug):
            self._still(model, team)
            self.store.delete_model(slug)
            self._states.drop(slug)
            self._replies.forget(slug)
        await self.heads.forget(slug)

    # -------------------------------------------------------------- training
    async def forward_backward(self, call: ForwardBackwardCall) -> ForwardResult:
        """Accumulate the gradient of a built-in loss over a batch."""
        record = self.trainable(call.model, call.team)

        async def run() -> ForwardResult:
            return await self._forward_backward(record, call.batch, call.loss, call.kl)

        return await self._once(record, call, "forward_backward", run)

    async def _forward_backward(
        self, record: ModelRecord, args: BatchArgs, loss_args: LossArgs, kl_args: KlArgs | None
    ) -> ForwardResult:
        loss, cfg = losses.resolve(loss_args.name, loss_args.config)
        kl = None
        if kl_args is not None:  # NotFound for an unknown reference, before any work
            ckpt = await self._reference(record.slug, kl_args.reference)
            kl = KlPenalty(kl_args.coef, ckpt)
        with self._states.pinning(record):
            batch = await self._batch(record, args)
            state = await self._states.load(record.slug)
            logprobs, metrics = await self.torch.run(
                self.compute.forward_backward, state, batch.datums, loss, cfg, kl
            )
            metrics.update(_batch_metrics(batch))
            state.acc.add(loss.name, len(batch.datums), batch.rewards, metrics)
        return ForwardResult(logprobs, metrics, len(batch.datums), batch.num_tokens)

    async def forward_custom(self, call: ForwardCustomCall) -> ForwardResult:
        """Forward half of a custom loss: logprobs and datum tensors, graph kept if it fits
        (see `ForwardLimits`)."""
        slug = call.model
        record = self.trainable(slug, call.team)

        async def run() -> ForwardResult:
            reference = None
            if call.reference is not None:  # NotFound for an unknown one, before any work
                reference = await self._reference(slug, call.reference)
            with self._states.pinning(record):
                self._forward_room(slug, tokens=0)  # the count first: refused before decoding
                batch = await self._batch(record, call.batch)
                self._forward_room(slug, sum(len(d.input_tokens) for d in batch.datums))
                state = await self._states.load(slug)
                forward_id = f"fwd-{secrets.token_hex(8)}"
                kept = await self.torch.run(
                    self.compute.forward_custom, state, batch.datums, forward_id, reference
                )
                kept.batch = batch
                kept_graphs = kept.graphs is not None
                try:
                    self._forward_limits.admit(
                        slug, kept, state.forwards.values(), self._pending_forward_bytes()
                    )
                except ResourceExhausted:
                    await self.torch.run(self.compute.discard_forward, state, forward_id)
                    raise
                if kept_graphs and kept.graphs is None:  # dropped to fit: on every rank
                    await self.torch.run(self.compute.drop_graphs, state, forward_id)
                state.forwards[forward_id] = kept
            metrics = _batch_metrics(batch)
            n = len(batch.datums)
            return ForwardResult(
                kept.logprobs, metrics, n, batch.num_tokens, batch.datums, forward_id,
                kept.reference_logprobs,
            )  # fmt: skip

        def keep(result: ForwardResult) -> ForwardResult:
            # The forward holds them.
            return replace(result, logprobs=[], datums=[], reference_logprobs=None)

        def replay(stored: ForwardResult) -> ForwardResult:
            state = self._states.get(slug)
            kept = state.forwards.get(stored.forward_id) if state is not None else None
            if kept is None:
                raise FailedPrecondition(
                    f"request_id {call.request_id!r}: this ForwardCustom ran once already and "
                    f"its forward {stored.forward_id!r} was consumed or discarded since "
                    "(BackwardCustom, optim_step, set_head); run ForwardCustom again with a "
                    "new request_id"
                )
            return replace(
                stored,
                logprobs=kept.logprobs,
                datums=kept.datums,
                reference_logprobs=kept.reference_logprobs,
            )

        return await self._once(record, call, "forward_custom", run, keep, replay)

    async def _reference(self, slug: str, reference: str) -> str:
        """The checkpoint id of a KL reference of `slug` ("" = its root); NotFound for an
        id the model does not have."""
        try:
            return await asyncio.to_thread(resolve_reference, self.store, slug, reference)
        except NotFound as e:
            raise NotFound(
                f"KL reference {reference!r}: {e}; name a checkpoint of model {slug!r} "
                "(headway models checkpoints), or leave it empty for the model's root"
            ) from e

    def _forward_room(self, slug: str, tokens: int) -> None:
        state = self._states.get(slug)
        pending = state.forwards.values() if state is not None else []
        self._forward_limits.check_room(slug, pending, self._pending_forward_bytes(), tokens)

    def _pending_forward_bytes(self) -> int:
        return sum(k.nbytes for s in self._states.values() for k in s.forwards.values())

    async def backward_custom(self, call: BackwardCustomCall) -> ForwardResult:
        """Backward half: backpropagate −Σ w·logprob through the kept or recomputed forward."""
        slug, forward_id = call.model, call.forward_id
        record = self.trainable(slug, call.team)
        check_client_metrics(
            call.client_metrics, self.config.max_client_metrics, self.config.max_metric_key_chars
        )

        async def run() -> ForwardResult:
            state = self._states.get(slug)
            kept = state.forwards.get(forward_id) if state is not None else None
            if state is None or kept is None:
                raise NotFound(
                    f"forward_id {forward_id!r} not found for model {slug!r}: it was consumed, "
                    "or discarded by an optim_step or set_head since; run ForwardCustom again"
                )
            check_weight_sizes(call.weights, kept.datums)  # before decoding any of them
            w = await asyncio.to_thread(decode_weights, call.weights, kept.datums)
            metrics = await self.torch.run(self.compute.backward_custom, state, kept, w, forward_id)
            del state.forwards[forward_id]
            metrics.update(_batch_metrics(kept.batch))
            metrics.update(call.client_metrics)
            state.acc.add("custom", len(kept.datums), kept.batch.rewards, metrics)
            tokens = int(sum(np.count_nonzero(x) for x in w))
            return ForwardResult([], metrics, len(kept.datums), tokens)

        return await self._once(record, call, "backward_custom", run)

    async def optim_step(self, call: OptimStepCall) -> OptimResult:
        """AdamW → save → promote HEAD → publish; returns once the head survives a crash
        of this process (and a power loss, with `sync_saves`)."""
        record = self.trainable(call.model, call.team)
        call.adam.check()

        async def run() -> OptimResult:
            return await self._optim_step(call.model, call.adam, call.request_id)

        return await self._once(record, call, "optim_step", run)

    async def step(self, call: StepCall) -> tuple[ForwardResult, OptimResult]:
        """ForwardBackward then OptimStep, atomically for the model."""
        record = self.trainable(call.model, call.team)
        call.adam.check()  # everything is validated before anything is applied

        async def run() -> tuple[ForwardResult, OptimResult]:
            fb = await self._forward_backward(record, call.batch, call.loss, call.kl)
            return fb, await self._optim_step(call.model, call.adam, call.request_id)

        return await self._once(record, call, "step", run)

    async def _optim_step(self, slug: str, adam: AdamArgs, request_id: str) -> OptimResult:
        # A state not in memory holds no gradient (pinned states are never evicted).
        state = self._states.get(slug)
        if state is None or not state.acc.has_grad:
            raise FailedPrecondition(
                "no gradient accumulated since the last optim_step: call forward_backward first"
            )
        record = CheckpointRecord(
            id=self.store.new_checkpoint_id(state.head.step + 1),
            model=slug,
            kind="lora" if state.record.lora else "full",
            step=state.head.step + 1,
            created=0.0,
            parent_id=state.head.id,
            has_optimizer=True,
            stats=state.acc.stats(adam.learning_rate),
            request_id=request_id,
        )
        try:
            await self._apply_and_save(state, adam, record)
        except BaseException:
            # The optimizer may have stepped in memory: forget the state, so the next use
            # reloads the durable head instead of diverging from it.
            self._states.drop(slug)
            raise
        state.head = record
        state.reset_accumulation()
        await self.heads.publish(slug, record)
        await self._apply_retention(slug)
        return self._optim_result(record)

    async def _apply_retention(self, slug: str) -> None:
        """Prune the model by its retention policy, if it has one, after a step: what is
        still being written stays for the next step's prune (nothing waits), and a
        failure is logged (the step stands)."""
        policy = self.store.retention(slug)
        if not policy.active:
            return
        try:
            pinned = await self._named(slug)
            deleted, _, freed = await asyncio.to_thread(
                self.store.prune, slug, policy, False, True, pinned
            )
        except Exception:
            log.exception("retention of %s failed; its checkpoints stay", slug)
            return
        if deleted:
            log.info(
                "retention of %s deleted %d checkpoint(s), %.1f MB", slug, len(deleted), freed / 1e6
            )

    async def record_eval(
        self, slug: str, ckpt_id: str, metrics: dict[str, float], team: str
    ) -> CheckpointRecord:
        """Record evaluation `metrics` on checkpoint `ckpt_id` of `slug` (bounded as
        client metrics are: they are stored)."""
        model = self.trainable(slug, team)
        check_client_metrics(
            metrics, self.config.max_client_metrics, self.config.max_metric_key_chars
        )
        async with self._lock(slug):
            self._still(model, team)
            return await asyncio.to_thread(self.store.record_eval, slug, ckpt_id, metrics)

    async def delete_checkpoint(self, slug: str, ckpt_id: str, team: str) -> int:
        """Delete one checkpoint of `slug` (see `CheckpointStore.delete_checkpoint`); the
        bytes freed."""
        model = self.trainable(slug, team)
        async with self._lock(slug):
            self._still(model, team)
            pinned = await self._named(slug)
            return await asyncio.to_thread(self.store.delete_checkpoint, slug, ckpt_id, pinned)

    async def prune(
        self, slug: str, policy: Retention | None, team: str, dry_run: bool
    ) -> tuple[list[CheckpointRecord], dict[str, str], int]:
        """Apply `policy` (None: the model's own) to `slug` now; see `CheckpointStore.prune`."""
        model = self.trainable(slug, team)
        if policy is None or not policy.active:
            policy = self.store.retention(slug)
        if not policy.active:
            raise InvalidArgument(
                f"no retention rule to prune {slug!r} by: give keep_last, keep_every or "
                "keep_lineage (or set the model's policy: SetRetention)"
            )
        async with self._lock(slug):
            self._still(model, team)
            pinned = await self._named(slug)
            return await asyncio.to_thread(self.store.prune, slug, policy, dry_run, False, pinned)

    async def _named(self, slug: str) -> dict[str, str]:
        """Checkpoints of `slug` the Tinker API names (in Redis), id → why: no delete
        removes them. Unavailable when Redis does not answer (nothing is deleted then);
        none without a Redis at all (no gateway can have named any)."""
        if self.redis is None:
            return {}
        run = run_key(slug, self.store.get_model(slug).created)
        try:
            raw = await self.redis.hgetall(names_key(run, self.config.redis_prefix))
        except Exception as e:
            raise Unavailable(
                f"cannot read the Tinker API's names of {slug!r} from Redis ({e}); "
                "nothing was deleted: retry"
            ) from e
        out: dict[str, str] = {}
        for path, value in raw.items():
            entry = json.loads(value)
            if live_name(entry):
                name = path.decode() if isinstance(path, bytes) else path
                out.setdefault(entry["checkpoint"], f"named {name!r} by the Tinker API")
        return out

    async def set_retention(self, slug: str, policy: Retention, team: str) -> ModelRecord:
        """Keep `policy` as `slug`'s retention policy and apply it once now."""
        model = self.trainable(slug, team)
        async with self._lock(slug):
            self._still(model, team)
            await asyncio.to_thread(self.store.set_retention, slug, policy)
            await self._apply_retention(slug)
        return model

    async def _apply_and_save(
        self, state: ModelState, adam: AdamArgs, record: CheckpointRecord
    ) -> None:
        """AdamW on the torch thread; the waits and writes around it on worker threads,
        so that other models' torch work runs meanwhile (the model's lock keeps its
        tensors still until the checkpoint is written)."""
        waiting = time.perf_counter()
        # The previous step's optimizer state may still be being written from the moments
        # AdamW is about to change in place.
        await asyncio.to_thread(self.store.wait_deferred, record.model, state.head.id)
        started = time.perf_counter()
        norm = await self.torch.run(self.compute.optim_step, state, adam)
        record.stats["metrics"]["grad/norm"] = norm
        stepped = time.perf_counter()
        written = await asyncio.to_thread(self._save, state, record)
        self.on_phase("state_wait", started - waiting)
        self.on_phase("adamw", stepped - started)
        self.on_phase("checkpoint_write", written - stepped)
        self.on_phase("head", time.perf_counter() - written)
        log.debug(
            "optim_step %s/%s: AdamW %.1f ms, checkpoint written %.1f ms, HEAD %.1f ms",
            record.model,
            record.id,
            1e3 * (stepped - started),
            1e3 * (written - stepped),
            1e3 * (time.perf_counter() - written),
        )

    def _save(self, state: ModelState, record: CheckpointRecord) -> float:
        """Write the state's checkpoint `record` and move HEAD to it; returns the
        `perf_counter` time its files were written at."""
        # Files may go over pages allocated while the model trained (trainer_svc.spares).
        spares = SpareWriter(
            self.store,
            record.model,
            state.spare_choices,
            self.config.spare_min_bytes,
            [weights_file(state), OPTIMIZER_FILE],
        )
        record.sized_first = spares.sized_first
        write, optimizer = checkpoint_writers(state, spares, self.config.direct_state_bytes)
        if optimizer.size >= self.config.defer_state_bytes:
            self.store.write_checkpoint(record, write, deferred=optimizer)
        else:  # small: written with the weights, as cheap as a background job's bookkeeping
            self.store.write_checkpoint(
                record, lambda d: (write(d), optimizer.write(d / optimizer.name))
            )
        written = time.perf_counter()
        self.store.promote(record)  # fsynced after the files
        return written

    def _optim_result(self, record: CheckpointRecord) -> OptimResult:
        return OptimResult(
            record, self.store.sampler_path_of(record), self.store.state_path_of(record)
        )

    # --------------------------------------------------------------- helpers
    async def _batch(self, record: ModelRecord, args: BatchArgs) -> Batch:
        """The call's batch, bounded before decoding, decoded in a worker thread."""
        return await asyncio.to_thread(
            batches.assemble,
            args.items,
            limits=self._batch_limits,
            vocab_size=int(record.arch["vocab_size"]),
            context=int(record.arch["max_context"]),
            group_size=args.group_size,
            normalize_std=args.normalize_std,
        )

    async def _once(
        self,
        record: ModelRecord,
        call: Call,
        kind: str,
        run: Callable[[], Awaitable[T]],
        keep: Callable[[T], Any] | None = None,
        replay: Callable[[Any], T] | None = None,
    ) -> T:
        """Run `run` under the model's lock, at most once per `call.request_id` (see
        replies.py).

        `keep` turns the result into what the reply cache stores, `replay` a stored value
        back into the reply (default: the result itself).
        """
        request_id, limit = call.request_id, self.config.max_request_id_chars
        if len(request_id) > limit:
            raise InvalidArgument(
                f"request_id has {len(request_id)} characters, over the limit of {limit}; "
                "a UUID is a good request_id"
            )
        slug = record.slug
        async with self._lock(slug):
            self._still(record, call.team)
            reply = self._replies.get(slug, request_id) if request_id else None
            if reply is not None:
                stored = reply.value_for(kind, request_id)
                return replay(stored) if replay is not None else stored
            if request_id and kind in ("optim_step", "step"):
                done = self.store.find_request(slug, request_id)  # survives restarts
                if done is not None:
                    await self._finish_promotion(slug, done)
                    result = self._optim_result(done)
                    if kind == "optim_step":
                        return result  # type: ignore[return-value]
                    # The forward half's logprobs died with the process; its metrics
                    # live on in the checkpoint's stats.
                    stats = done.stats or {}
                    fb = ForwardResult(
                        [],
                        dict(stats.get("metrics", {})),
                        stats.get("num_datums", 0),
                        stats.get("num_tokens", 0),
                    )
                    return (fb, result)  # type: ignore[return-value]

            async def run_and_keep() -> T:
                value = await run()
                if request_id:
                    stored = keep(value) if keep is not None else value
                    self._replies.put(slug, request_id, kind, stored, reply_bytes(stored))
                return value

            # A caller that goes away does not stop the work (its torch runs on in a
            # thread): the model's lock is held until it ends, so no other call overlaps
            # it (a step's save must never see a forward's swapped-in reference weights),
            # and its reply is kept for the caller's retry, which must not apply it twice.
            return await unabandoned(run_and_keep())

    async def _finish_promotion(self, slug: str, record: CheckpointRecord) -> None:
        """Complete an OptimStep interrupted between its checkpoint and its HEAD move.

        A crash in that window leaves the checkpoint on disk and HEAD on its parent; the
        client's retry (same request id) must get that checkpoint *as the head*. Only the
        step right after the current head is promoted: replays of older requests never
        move HEAD back.
        """
        if self.store.head(slug) == record.parent_id:
            await asyncio.to_thread(self.store.set_head, slug, record.id)
            self._states.drop(slug)  # reload from the promoted head
            await self.heads.publish(slug, record)

    @property
    def mode(self) -> compute.ComputeMode:
        """How the trainer computes (--dtype, the measured kernels)."""
        return self.compute.mode

    @mode.setter
    def mode(self, mode: compute.ComputeMode) -> None:
        self.compute.mode = mode

    async def close(self) -> None:
        """Stop the other ranks and the torch thread, finish the background fsyncs, stop
        background publishing, close Redis."""
        try:
            await self.torch.run(self.compute.close)
        finally:
            self.torch.close()
            await asyncio.to_thread(self.store.flush)
        await self.heads.close()
        if self.metrics is not None:
            self.metrics.stop()

    @property
    def loaded(self) -> list[str]:
        """Slugs whose training state is in memory, least recently used first."""
        return self._states.loaded


def _batch_metrics(batch: Batch) -> dict[str, float]:
    return {"reward/mean": batch.reward_mean, "groups/no_signal": float(batch.no_signal_groups)}


async def unabandoned(work: Awaitable[T]) -> T:
    """Await `work`; if the waiting is cancelled, let `work` finish first (waiting on
    through further cancellations), then propagate the cancellation."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})
        raise
