"""Store records and trainer results as contract messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from headway.store import CheckpointRecord, CheckpointStore, ModelRecord
from headway.tensors import to_tensor
from headway.v1 import common_pb2, training_pb2
from trainer_svc.results import ForwardResult, OptimResult


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def model_pb(
    store: CheckpointStore, record: ModelRecord, show_path: bool = False, size: bool = False
) -> common_pb2.Model:
    """The contract's Model; a base's server path only with `show_path` (admins: others
    learn nothing of the server's filesystem); its bytes in the store with `size`."""
    head = store.head_checkpoint(record.slug)
    msg = common_pb2.Model(
        slug=record.slug,
        team=record.team,
        is_base=record.is_base,
        base=record.base,
        source=record.source,
        trainable=not record.is_base,
        full=record.kind == "full",
        head_checkpoint=head.id,
        head_step=head.step,
        created=timestamp(record.created),
        model_type=record.arch.get("model_type", ""),
        vocab_size=int(record.arch.get("vocab_size", 0)),
        max_context=int(record.arch.get("max_context", 0)),
        eos_token_ids=list(record.arch.get("eos_token_ids", [])),
        path=record.path if show_path else "",
    )
    if record.lora:
        msg.lora.CopyFrom(common_pb2.LoraConfig(**record.lora))
    if not record.is_base:
        policy = store.retention(record.slug)
        if policy.active:
            msg.retention.CopyFrom(common_pb2.RetentionPolicy(**policy.to_json()))
        if size:
            msg.store_bytes = store.model_bytes(record.slug)
    return msg


def checkpoint_pb(
    store: CheckpointStore,
    record: CheckpointRecord,
    head_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> common_pb2.Checkpoint:
    """The Checkpoint message of `record` (`head_id` and the model's `tags` read from the
    store unless given: a listing reads them once)."""
    if head_id is None:
        head_id = store.head(record.model)
    if tags is None:
        tags = store.tags(record.model)
    msg = common_pb2.Checkpoint(
        tags=sorted(name for name, ckpt in tags.items() if ckpt == record.id),
        evals=store.evals(record.model, record.id) if record.model else {},
        id=record.id,
        model=record.model,
        parent_id=record.parent_id,
        step=record.step,
        created=timestamp(record.created),
        is_head=record.id == head_id,
        sampler_path=store.sampler_path_of(record),
        state_path=store.state_path_of(record),
    )
    if record.stats:
        s = record.stats
        msg.stats.CopyFrom(
            common_pb2.CheckpointStats(
                loss_fn=s["loss_fn"],
                num_datums=s["num_datums"],
                num_tokens=s["num_tokens"],
                loss=s["loss"],
                reward_mean=s["reward_mean"],
                reward_std=s["reward_std"],
                learning_rate=s["learning_rate"],
                metrics=s["metrics"],
            )
        )
    return msg


def forward_backward_pb(result: ForwardResult) -> training_pb2.ForwardBackwardResponse:
    return training_pb2.ForwardBackwardResponse(
        logprobs=[to_tensor(lp, common_pb2.DTYPE_FLOAT32) for lp in result.logprobs],
        metrics=result.metrics,
        num_datums=result.num_datums,
        num_tokens=result.num_tokens,
    )


def optim_step_pb(store: CheckpointStore, result: OptimResult) -> training_pb2.OptimStepResponse:
    return training_pb2.OptimStepResponse(
        step=result.checkpoint.step,
        checkpoint=result.checkpoint.id,
        sampler_path=result.sampler_path,
        state_path=result.state_path,
        checkpoint_info=checkpoint_pb(store, result.checkpoint),
    )


def datum_tensors_pb(result: ForwardResult) -> list[training_pb2.DatumTensors]:
    out = []
    refs = result.reference_logprobs
    for i, (lp, d) in enumerate(zip(result.logprobs, result.datums, strict=True)):
        msg = training_pb2.DatumTensors(
            logprobs=to_tensor(lp, common_pb2.DTYPE_FLOAT32),
            target_tokens=to_tensor(d.target_tokens, common_pb2.DTYPE_INT32),
            mask=to_tensor(d.weights, common_pb2.DTYPE_FLOAT32),
            reward=d.reward,
            advantage=d.advantage,
            group_index=d.group_index,
        )
        if d.sampling_logprobs is not None:
            msg.sampling_logprobs.CopyFrom(to_tensor(d.sampling_logprobs, common_pb2.DTYPE_FLOAT32))
        if d.advantages is not None:
            msg.advantages.CopyFrom(to_tensor(d.advantages, common_pb2.DTYPE_FLOAT32))
        if refs is not None:
            msg.reference_logprobs.CopyFrom(to_tensor(refs[i], common_pb2.DTYPE_FLOAT32))
        out.append(msg)
    return out
