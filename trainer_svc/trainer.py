"""`Trainer`: the domain behind TrainingService and ModelService, with no gRPC in it.

It owns the store, the in-memory training states (LRU, restored from heads), the shared
frozen weights, and the order of things: requests for one model are serialized by a lock
(different models proceed independently, their torch work in threads); a training call
with a request id seen before returns its first result; an OptimStep saves, promotes and
then publishes, and returns only when the new head is durable.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from headway.datums import Batch, DatumArrays, assemble_batch, check_vocab
from headway.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from headway.heads import HeadEvent, mirror_key, publish_head
from headway.internal_auth import Caller
from headway.modeling import LoraConfig
from headway.store import CheckpointRecord, CheckpointRef, CheckpointStore, ModelRecord, check_slug
from headway.store.weights import base_config, full_state
from headway.v1 import common_pb2
from trainer_svc import compute, losses
from trainer_svc.bases import base_directory, validate_base
from trainer_svc.config import TrainerConfig
from trainer_svc.pool import FrozenPool
from trainer_svc.state import ModelState, checkpoint_writer, fresh_adapter_writer, load_state

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class AdamArgs:
    """AdamParams with defaults applied."""

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def check(self) -> None:
        compute.check_adam(
            self.learning_rate,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            self.grad_clip_norm,
        )


@dataclass
class ForwardResult:
    """Result of ForwardBackward (and of ForwardCustom's forward half)."""

    logprobs: list[np.ndarray]
    metrics: dict[str, float]
    num_datums: int
    num_tokens: int
    datums: list[DatumArrays] = field(default_factory=list)
    forward_id: str = ""


@dataclass
class StepResult:
    """Result of OptimStep: the new head."""

    checkpoint: CheckpointRecord
    sampler_path: str
    state_path: str


@dataclass
class _Reply:
    kind: str
    value: Any


class Trainer:
    """Training and model management over a checkpoint store, publishing heads to Redis."""

    def __init__(self, config: TrainerConfig, redis: Any | None = None) -> None:
        self.config = config
        self.store = CheckpointStore(config.store)
        self.redis = redis
        self.dtype = getattr(torch, config.dtype)
        self.pool = FrozenPool(self.store, self.dtype)
        self._states: OrderedDict[str, ModelState] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._create_lock = asyncio.Lock()
        self._replies: dict[str, OrderedDict[str, _Reply]] = {}
        self._unpublished: dict[str, CheckpointRecord] = {}  # heads Redis has not heard of
        self.publisher: asyncio.Task[None] | None = None  # the retry_publishes task

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

    # ----------------------------------------------------------- model admin
    def list_models(self, team: str) -> list[ModelRecord]:
        return self.store.visible_models(team)

    async def add_base(self, path: str, name: str, caller: Caller) -> ModelRecord:
        """Register a Hugging Face directory as a public base (validated, referenced): an
        admin action, limited to the base roots (see `trainer_svc.bases`)."""
        directory = base_directory(path, caller, self.config.base_roots)
        name = check_slug(name or directory.name)
        arch = await asyncio.to_thread(validate_base, directory)
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
        await self._publish(name, root)
        return record

    async def fork(
        self, source: str, name: str, team: str, lora: LoraConfig | None, full: bool
    ) -> ModelRecord:
        """A new model of `team` starting from `source`'s head (copy-on-write)."""
        check_slug(name)
        src = self.model(source, team)
        src_head = self.store.head_checkpoint(source)
        now = time.time()
        root_id = self.store.new_checkpoint_id(0)
        root = CheckpointRecord(
            id=root_id,
            model=name,
            kind="full" if full else "lora",
            step=0,
            created=now,
            parent_id=src_head.id,
            parent_model=source,
        )
        record = ModelRecord(
            slug=name,
            team=team,
            is_base=False,
            base=src.base,
            created=now,
            source=source,
            arch=dict(src.arch),
        )
        writer = None
        if full:
            if src.lora:
                # A full fork of an adapter model owns the merged weights: there is no file
                # to reference. Every other full fork references its source's files.
                merged = await asyncio.to_thread(full_state, self.store, source, src_head.id)
                writer = _full_weights_writer(merged)
            else:
                root.ref = CheckpointRef(source, src_head.id)
        else:
            inherit = src.lora is not None and (lora is None or _lora_dict(lora) == src.lora)
            if inherit:
                # Continue the source's adapter over the same frozen weights.
                record.lora, record.frozen = dict(src.lora), src.frozen
                root.ref = CheckpointRef(source, src_head.id)
            else:
                lora = lora or LoraConfig()
                record.lora = _lora_dict(lora)
                record.frozen = CheckpointRef(source, src_head.id)
                config = base_config(self.store, source)
                writer = fresh_adapter_writer(config, lora, src.base, secrets.randbits(62))
        async with self._create_lock:
            await asyncio.to_thread(self.store.create_model, record, root, writer)
        log.info("forked %s from %s@%s (%s)", name, source, src_head.id, root.kind)
        await self._publish(name, root)
        return record

    async def set_head(self, slug: str, ckpt_id: str, team: str) -> CheckpointRecord:
        """Move HEAD (rollback / branch point); the next step continues from there."""
        self.trainable(slug, team)
        async with self._lock(slug):
            record = self.store.set_head(slug, ckpt_id)
            self._drop(slug)  # reload weights *and* optimizer state from the new head
        await self._publish(slug, record)
        return record

    async def delete(self, slug: str, team: str) -> None:
        """Delete a fork (refused for bases and for models others fork from)."""
        self.model(slug, team)
        async with self._lock(slug):
            self.store.delete_model(slug)
            self._drop(slug)
            self._replies.pop(slug, None)
        if self.redis is not None:
            try:
                await self.redis.delete(mirror_key(slug, self.config.redis_prefix))
            except Exception as e:  # the store is the truth; a stale mirror is harmless
                log.warning("could not remove head mirror of %s: %s", slug, e)

    # -------------------------------------------------------------- training
    async def forward_backward(
        self,
        slug: str,
        team: str,
        items: Sequence[common_pb2.TrainingItem],
        loss_fn: str,
        loss_fn_config: dict[str, float],
        group_size: int,
        normalize_std: bool,
        request_id: str,
    ) -> ForwardResult:
        """Accumulate the gradient of a built-in loss over a batch."""
        record = self.trainable(slug, team)

        async def run() -> ForwardResult:
            return await self._forward_backward(
                record, items, loss_fn, loss_fn_config, group_size, normalize_std
            )

        return await self._once(slug, request_id, "forward_backward", run)

    async def _forward_backward(
        self,
        record: ModelRecord,
        items: Sequence[common_pb2.TrainingItem],
        loss_fn: str,
        loss_fn_config: dict[str, float],
        group_size: int,
        normalize_std: bool,
    ) -> ForwardResult:
        loss, cfg = losses.resolve(loss_fn, loss_fn_config)
        batch = self._batch(record, items, group_size, normalize_std)
        state = await self._state(record.slug)
        logprobs, metrics = await asyncio.to_thread(
            compute.forward_backward, state, batch.datums, loss, cfg, self.config.microbatch_tokens
        )
        metrics.update(_batch_metrics(batch))
        state.acc.add(loss.name, len(batch.datums), _rewards(batch), metrics)
        return ForwardResult(logprobs, metrics, len(batch.datums), batch.num_tokens)

    async def forward_custom(
        self,
        slug: str,
        team: str,
        items: Sequence[common_pb2.TrainingItem],
        group_size: int,
        normalize_std: bool,
        request_id: str,
    ) -> ForwardResult:
        """Forward half of a custom loss: logprobs and datum tensors, graph kept if it fits."""
        record = self.trainable(slug, team)

        async def run() -> ForwardResult:
            batch = self._batch(record, items, group_size, normalize_std)
            state = await self._state(slug)
            logprobs, kept = await asyncio.to_thread(
                compute.forward_custom,
                state,
                batch.datums,
                self.config.microbatch_tokens,
                self.config.keep_graph_tokens,
            )
            forward_id = f"fwd-{secrets.token_hex(8)}"
            kept.batch = batch  # type: ignore[attr-defined]
            state.forwards[forward_id] = kept
            return ForwardResult(
                logprobs,
                _batch_metrics(batch),
                len(batch.datums),
                batch.num_tokens,
                batch.datums,
                forward_id,
            )

        return await self._once(slug, request_id, "forward_custom", run)

    async def backward_custom(
        self,
        slug: str,
        team: str,
        forward_id: str,
        weights: list[np.ndarray],
        client_metrics: dict[str, float],
        request_id: str,
    ) -> ForwardResult:
        """Backward half: backpropagate −Σ w·logprob through the kept or recomputed forward."""
        self.trainable(slug, team)

        async def run() -> ForwardResult:
            state = await self._state(slug)
            kept = state.forwards.get(forward_id)
            if kept is None:
                raise NotFound(
                    f"forward_id {forward_id!r} not found for model {slug!r}: it was consumed, "
                    "or discarded by an optim_step or set_head since; run ForwardCustom again"
                )
            _check_weights(weights, kept.datums)
            for key, value in client_metrics.items():
                if not math.isfinite(value):
                    raise InvalidArgument(f"metrics[{key!r}] = {value} is not finite")
            metrics = await asyncio.to_thread(compute.backward_custom, state, kept, weights)
            del state.forwards[forward_id]
            metrics.update(_batch_metrics(kept.batch))
            metrics.update(client_metrics)
            state.acc.add("custom", len(kept.datums), _rewards(kept.batch), metrics)
            tokens = int(sum(np.count_nonzero(w) for w in weights))
            return ForwardResult([], metrics, len(kept.datums), tokens)

        return await self._once(slug, request_id, "backward_custom", run)

    async def optim_step(self, slug: str, team: str, adam: AdamArgs, request_id: str) -> StepResult:
        """AdamW → save → promote HEAD → publish; returns once the head is durable."""
        self.trainable(slug, team)
        adam.check()
        return await self._once(
            slug, request_id, "optim_step", lambda: self._optim_step(slug, adam, request_id)
        )

    async def step(
        self,
        slug: str,
        team: str,
        items: Sequence[common_pb2.TrainingItem],
        loss_fn: str,
        loss_fn_config: dict[str, float],
        group_size: int,
        normalize_std: bool,
        adam: AdamArgs,
        request_id: str,
    ) -> tuple[ForwardResult, StepResult]:
        """ForwardBackward then OptimStep, atomically for the model."""
        record = self.trainable(slug, team)
        adam.check()  # everything is validated before anything is applied

        async def run() -> tuple[ForwardResult, StepResult]:
            fb = await self._forward_backward(
                record, items, loss_fn, loss_fn_config, group_size, normalize_std
            )
            return fb, await self._optim_step(slug, adam, request_id)

        return await self._once(slug, request_id, "step", run)

    async def _optim_step(self, slug: str, adam: AdamArgs, request_id: str) -> StepResult:
        state = await self._state(slug)
        if not state.acc.has_grad:
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
            await asyncio.to_thread(self._apply_and_save, state, adam, record)
        except BaseException:
            # The optimizer may have stepped in memory: forget the state, so the next use
            # reloads the durable head instead of diverging from it.
            self._drop(slug)
            raise
        state.head = record
        state.reset_accumulation()
        await self._publish(slug, record)
        return self._step_result(slug, record)

    def _apply_and_save(self, state: ModelState, adam: AdamArgs, record: CheckpointRecord) -> None:
        norm = compute.optim_step(
            state,
            adam.learning_rate,
            adam.beta1,
            adam.beta2,
            adam.eps,
            adam.weight_decay,
            adam.grad_clip_norm,
        )
        record.stats["metrics"]["grad/norm"] = norm
        self.store.write_checkpoint(record, checkpoint_writer(state))
        self.store.set_head(record.model, record.id)

    def _step_result(self, slug: str, record: CheckpointRecord) -> StepResult:
        return StepResult(
            record, self.store.sampler_path(slug, record.id), self.store.state_path(slug, record.id)
        )

    # --------------------------------------------------------------- helpers
    def _batch(
        self,
        record: ModelRecord,
        items: Sequence[common_pb2.TrainingItem],
        group_size: int,
        normalize_std: bool,
    ) -> Batch:
        batch = assemble_batch(items, group_size=group_size, normalize_std=normalize_std)
        check_vocab(batch.datums, int(record.arch["vocab_size"]))
        context = int(record.arch["max_context"])
        for j, d in enumerate(batch.datums):
            if len(d.input_tokens) > context:
                raise ResourceExhausted(
                    f"datum {j} ({d.source}) has {len(d.input_tokens)} tokens, over the model's "
                    f"context of {context}; shorten it"
                )
        total = sum(len(d.input_tokens) for d in batch.datums)
        if total > self.config.max_batch_tokens:
            raise ResourceExhausted(
                f"batch of {total} tokens is over the trainer's limit of "
                f"{self.config.max_batch_tokens}; split it over several calls"
            )
        return batch

    async def _once(
        self, slug: str, request_id: str, kind: str, run: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `run` under the model's lock, at most once per request id."""
        async with self._lock(slug):
            replies = self._replies.setdefault(slug, OrderedDict())
            if request_id and request_id in replies:
                reply = replies[request_id]
                if reply.kind != kind:
                    raise InvalidArgument(
                        f"request_id {request_id!r} was already used by a {reply.kind} call; "
                        "use a fresh id for each call"
                    )
                return reply.value
            if request_id and kind in ("optim_step", "step"):
                done = self.store.find_request(slug, request_id)  # survives restarts
                if done is not None:
                    await self._finish_promotion(slug, done)
                    result = self._step_result(slug, done)
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
            value = await run()
            if request_id:
                replies[request_id] = _Reply(kind, value)
                while len(replies) > self.config.request_cache:
                    replies.popitem(last=False)
            return value

    async def _finish_promotion(self, slug: str, record: CheckpointRecord) -> None:
        """Complete an OptimStep interrupted between its checkpoint and its HEAD move.

        A crash in that window leaves the checkpoint on disk and HEAD on its parent; the
        client's retry (same request id) must get that checkpoint *as the head*. Only the
        step right after the current head is promoted: replays of older requests never
        move HEAD back.
        """
        if self.store.head(slug) == record.parent_id:
            self.store.set_head(slug, record.id)
            self._drop(slug)  # reload from the promoted head
            await self._publish(slug, record)

    async def close(self) -> None:
        """Stop background publishing and close the Redis client."""
        if self.publisher is not None:
            self.publisher.cancel()
            await asyncio.gather(self.publisher, return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()

    async def mirror_heads(self) -> None:
        """Mirror every model's head in Redis (at start: a crash may have left it stale)."""
        for model in self.store.list_models():
            await self._publish(model.slug, self.store.head_checkpoint(model.slug))

    async def retry_publishes(self, interval: float = 1.0) -> None:
        """Forever: re-publish heads whose publish failed (Redis was down)."""
        while True:
            await asyncio.sleep(interval)
            for slug in list(self._unpublished):
                record = self._unpublished.pop(slug)
                try:
                    if self.store.head(slug) == record.id:
                        await self._publish(slug, record)
                except NotFound:  # deleted meanwhile
                    pass

    async def _state(self, slug: str) -> ModelState:
        """The model's training state, loaded from its head if not in memory."""
        if slug in self._states:
            self._states.move_to_end(slug)
            return self._states[slug]
        state = await asyncio.to_thread(load_state, self.store, self.pool, slug, self.dtype)
        self._states[slug] = state
        self._evict()
        return state

    def _evict(self) -> None:
        """Drop least recently used idle states beyond capacity (restored from heads later)."""
        excess = len(self._states) - self.config.max_loaded_models
        for slug in list(self._states):
            if excess <= 0:
                break
            state = self._states[slug]
            if not state.busy and not self._lock(slug).locked():
                self._drop(slug)
                excess -= 1

    def _drop(self, slug: str) -> None:
        state = self._states.pop(slug, None)
        if state is not None and state.frozen_ref is not None:
            self.pool.release(state.frozen_ref)

    @property
    def loaded(self) -> list[str]:
        """Slugs whose training state is in memory, least recently used first."""
        return list(self._states)

    async def _publish(self, slug: str, record: CheckpointRecord) -> None:
        if self.redis is None:
            return
        event = HeadEvent(model=slug, checkpoint=record.id, step=record.step)
        try:
            await publish_head(self.redis, event, self.config.redis_prefix)
            self._unpublished.pop(slug, None)
        except Exception as e:
            self._unpublished[slug] = record  # retried by retry_publishes
            # The head is already durable; samplers reconcile from the store and the
            # mirror on reconnect, and the gateway pins requests to the store's head.
            log.warning("head of %s moved to %s but Redis publish failed: %s", slug, record.id, e)


def _lora_dict(lora: LoraConfig) -> dict[str, Any]:
    return {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(lora.target_modules)}


def _full_weights_writer(state: dict[str, torch.Tensor]) -> Callable[[Path], None]:
    from safetensors.torch import save_file

    from headway.modeling.load import hf_name
    from headway.store import WEIGHTS_FILE

    def write(directory: Path) -> None:
        tensors = {hf_name(k): v.contiguous() for k, v in state.items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    return write


def _batch_metrics(batch: Batch) -> dict[str, float]:
    return {"reward/mean": batch.reward_mean, "groups/no_signal": float(batch.no_signal_groups)}


def _rewards(batch: Batch) -> list[float]:
    return batch.rewards


def _check_weights(weights: list[np.ndarray], datums: list[DatumArrays]) -> None:
    if len(weights) != len(datums):
        raise InvalidArgument(
            f"weights has {len(weights)} tensors but the forward had {len(datums)} datums; "
            "send one per datum, in order"
        )
    for i, (w, d) in enumerate(zip(weights, datums, strict=True)):
        if len(w) != len(d.input_tokens):
            raise InvalidArgument(
                f"weights[{i}] has {len(w)} values but datum {i} has "
                f"{len(d.input_tokens)} positions"
            )
