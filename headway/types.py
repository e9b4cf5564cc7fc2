"""Plain data the SDK hands out and takes in: runs, turns, and the results of its calls.

Everything here is a dataclass over Python lists and floats, so results print, compare
and pickle without protobuf or numpy; each knows how to turn itself into (or read itself
from) the contract message it stands for.

No torch and no grpc: imported by `headway.client`, `headway.agents` and `headway.eval`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

from headway.errors import InvalidArgument
from headway.tensors import floats, from_tensor, is_set, to_tensor, tokens
from headway.v1 import common_pb2, sampling_pb2, training_pb2

I32 = common_pb2.DTYPE_INT32
F32 = common_pb2.DTYPE_FLOAT32


# ------------------------------------------------------------------------ rollouts


@dataclass
class Turn:
    """One sampled turn: what the model read, what it wrote, and the logprobs it wrote with.

    `completion_logprobs[i]` is the sampling policy's logprob of `completion_tokens[i]` at
    temperature 1 (what the gateway returns with `return_token_ids`); `checkpoint` is the
    checkpoint that produced the turn ("" = unknown).
    """

    prompt_tokens: list[int]
    completion_tokens: list[int]
    completion_logprobs: list[float]
    checkpoint: str = ""

    def to_proto(self) -> common_pb2.Turn:
        """This turn as a `common_pb2.Turn`."""
        return common_pb2.Turn(
            prompt_tokens=to_tensor(np.asarray(self.prompt_tokens, dtype=np.int64), I32),
            completion_tokens=to_tensor(np.asarray(self.completion_tokens, dtype=np.int64), I32),
            completion_logprobs=to_tensor(
                np.asarray(self.completion_logprobs, dtype=np.float32), F32
            ),
            checkpoint=self.checkpoint,
        )

    @classmethod
    def from_proto(cls, turn: common_pb2.Turn) -> Turn:
        """Read a `common_pb2.Turn` (validated: dtypes, lengths)."""
        completion = (
            tokens(turn.completion_tokens, "turn.completion_tokens").tolist()
            if is_set(turn, "completion_tokens")
            else []
        )
        logprobs = (
            floats(turn.completion_logprobs, "turn.completion_logprobs").tolist()
            if is_set(turn, "completion_logprobs")
            else []
        )
        return cls(
            prompt_tokens=tokens(turn.prompt_tokens, "turn.prompt_tokens").tolist(),
            completion_tokens=completion,
            completion_logprobs=logprobs,
            checkpoint=turn.checkpoint,
        )


@dataclass
class Run:
    """One rollout: the conversation, the sampled turns (with token ids) and its reward.

    `turns` are recorded by an agent created with
    `completion_kwargs={"extra_body": {"return_token_ids": True}}`; without them a run
    cannot be trained on inline. `trace_id` is the gateway's trace of the same turns (set
    when token ids were returned), so the run can also be trained on by id. `reward` is
    None until the run is scored (`Taskset.run` does it); an unscored run is refused by
    the training calls.
    """

    turns: list[Turn] = field(default_factory=list)
    reward: float | None = None
    trace_id: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""
    # The task the run was made for (a `headway.eval.Task`), when it came from a Taskset.
    task: Any = None
    # Free-form extras a reward function or tool wants to keep with the run.
    info: dict[str, Any] = field(default_factory=dict)
    # Why the rollout failed ("TimeoutError: ..."), for a run `Taskset.run` kept in place
    # of one that raised or timed out; "" for a run that finished. An errored run has no
    # reward; the training calls drop it (and its group, by default).
    error: str = ""

    @property
    def errored(self) -> bool:
        """Whether the rollout failed (see `error`)."""
        return bool(self.error)

    @property
    def text(self) -> str:
        """The content of the last assistant message ("" when there is none)."""
        for message in reversed(self.messages):
            if message.get("role") == "assistant":
                return str(message.get("content") or "")
        return ""

    def to_trajectory(self, reward_scale: float = 1.0) -> common_pb2.Trajectory:
        """This run as a `common_pb2.Trajectory`, its reward multiplied by `reward_scale`.

        Raises `InvalidArgument` for a run with no recorded turns or no reward, or a
        non-finite scaled reward: things the trainer would refuse anyway, caught before
        anything is sent.
        """
        if not self.turns:
            raise InvalidArgument(
                "run has no recorded turns: create the agent with "
                'completion_kwargs={"extra_body": {"return_token_ids": True}} so that each '
                "turn's token ids and logprobs are recorded"
            )
        if self.reward is None:
            raise InvalidArgument(
                "run has no reward: score it first (Taskset.run does, or set run.reward)"
            )
        reward = float(self.reward) * reward_scale
        if not math.isfinite(reward):
            raise InvalidArgument(f"run reward {self.reward!r} x {reward_scale} is not finite")
        return common_pb2.Trajectory(
            turns=[t.to_proto() for t in self.turns], reward=reward, trace_id=self.trace_id
        )

    @classmethod
    def from_trajectory(cls, trajectory: common_pb2.Trajectory) -> Run:
        """A run holding a trajectory's turns, reward and trace id (no messages)."""
        return cls(
            turns=[Turn.from_proto(t) for t in trajectory.turns],
            reward=trajectory.reward,
            trace_id=trajectory.trace_id,
        )


# ---------------------------------------------------------------------- checkpoints


def _time(ts: Any) -> datetime:
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)


@dataclass
class ModelInfo:
    """A model of the catalogue (see the contract's `Model`): a base, or a fork of one."""

    slug: str
    base: str  # the base it derives from (itself for a base)
    source: str  # what it was forked from ("" for a base)
    kind: Literal["base", "lora", "full"]
    lora_rank: int  # 0 unless a LoRA fork
    trainable: bool  # this caller may train it
    head_checkpoint: str
    head_step: int
    created: datetime
    model_type: str
    vocab_size: int
    max_context: int
    team: str
    # What `SetRetention` keeps ({"keep_last", "keep_every", "keep_lineage"}), None if all.
    retention: dict[str, int] | None = None
    store_bytes: int = 0  # its own files in the store, when listed with sizes

    @classmethod
    def from_proto(cls, m: common_pb2.Model) -> ModelInfo:
        kind = "base" if m.is_base else ("full" if m.full else "lora")
        return cls(
            slug=m.slug,
            base=m.base,
            source=m.source,
            kind=kind,  # type: ignore[arg-type]
            lora_rank=m.lora.rank if kind == "lora" else 0,
            trainable=m.trainable,
            head_checkpoint=m.head_checkpoint,
            head_step=m.head_step,
            created=_time(m.created),
            model_type=m.model_type,
            vocab_size=m.vocab_size,
            max_context=m.max_context,
            team=m.team,
            retention=_retention(m.retention) if m.HasField("retention") else None,
            store_bytes=m.store_bytes,
        )


def _retention(policy: common_pb2.RetentionPolicy) -> dict[str, int]:
    return {
        "keep_last": policy.keep_last,
        "keep_every": policy.keep_every,
        "keep_lineage": policy.keep_lineage,
    }


@dataclass
class CheckpointStats:
    """What went into the optim step that produced a checkpoint (see `CheckpointStats`)."""

    loss_fn: str
    num_datums: int
    num_tokens: int
    loss: float
    reward_mean: float
    reward_std: float
    learning_rate: float
    metrics: dict[str, float]


@dataclass
class Checkpoint:
    """A node of a model's checkpoint tree."""

    id: str
    model: str
    parent_id: str
    step: int
    created: datetime
    is_head: bool
    sampler_path: str
    state_path: str
    stats: CheckpointStats | None = None
    tags: list[str] = field(default_factory=list)  # the model's tags naming it
    evals: dict[str, float] = field(default_factory=dict)  # recorded evaluation results

    @classmethod
    def from_proto(cls, c: common_pb2.Checkpoint) -> Checkpoint:
        stats = None
        if c.HasField("stats"):
            s = c.stats
            stats = CheckpointStats(
                loss_fn=s.loss_fn,
                num_datums=s.num_datums,
                num_tokens=s.num_tokens,
                loss=s.loss,
                reward_mean=s.reward_mean,
                reward_std=s.reward_std,
                learning_rate=s.learning_rate,
                metrics=dict(s.metrics),
            )
        return cls(
            id=c.id,
            model=c.model,
            parent_id=c.parent_id,
            step=c.step,
            created=_time(c.created),
            is_head=c.is_head,
            sampler_path=c.sampler_path,
            state_path=c.state_path,
            stats=stats,
            tags=list(c.tags),
            evals=dict(c.evals),
        )


# -------------------------------------------------------------------------- results


@dataclass
class ForwardBackwardResult:
    """Result of `forward_backward` (over all its substeps).

    `metrics` are the server's, merged over substeps the way the trainer merges them into
    a checkpoint's stats: ":sum" and "groups/" keys add up, "reward/mean" is weighted by
    the number of runs, the others by trained tokens. `logprobs` holds the trainer's
    logprob of each target token, one list per datum, in batch order.
    """

    metrics: dict[str, float]
    num_datums: int
    num_tokens: int
    logprobs: list[list[float]] = field(default_factory=list, repr=False)


@dataclass
class OptimStepResult:
    """Result of `optim_step`: the new head."""

    step: int
    checkpoint: str
    sampler_path: str
    state_path: str
    checkpoint_info: Checkpoint

    @classmethod
    def from_proto(cls, r: training_pb2.OptimStepResponse) -> OptimStepResult:
        return cls(
            step=r.step,
            checkpoint=r.checkpoint,
            sampler_path=r.sampler_path,
            state_path=r.state_path,
            checkpoint_info=Checkpoint.from_proto(r.checkpoint_info),
        )


@dataclass
class StepResult:
    """Result of `step`: the new head plus the forward-backward half's metrics."""

    step: int
    checkpoint: str
    sampler_path: str
    state_path: str
    metrics: dict[str, float]
    num_datums: int
    num_tokens: int
    checkpoint_info: Checkpoint


@dataclass
class CustomResult:
    """Result of `forward_backward_custom`.

    `loss` is the value the loss function returned; `metrics` are its metrics merged with
    the server's ("ratio/mean", "kl/sampler_trainer", "loss:sum", ...).
    """

    loss: float
    metrics: dict[str, float]
    num_datums: int
    num_tokens: int


@dataclass
class LossConfigKey:
    """One `loss_fn_config` key of a built-in loss."""

    name: str
    default: float
    description: str


@dataclass
class LossInfo:
    """A built-in loss: its name (pass as `loss_fn`), description and config keys."""

    name: str
    description: str
    config: list[LossConfigKey] = field(default_factory=list)

    @classmethod
    def from_proto(cls, info: training_pb2.LossInfo) -> LossInfo:
        return cls(
            name=info.name,
            description=info.description,
            config=[LossConfigKey(k.name, k.default_value, k.description) for k in info.config],
        )


StopReason = Literal["stop", "length"]
_STOP = {sampling_pb2.STOP_REASON_STOP: "stop", sampling_pb2.STOP_REASON_LENGTH: "length"}


TopLogprobs = list[list[tuple[int, float]]]  # per position: (token, logprob), most likely first


def _tops(ids: Any, lps: Any) -> TopLogprobs | None:
    """Per-position (token, logprob) pairs of [T, k] reply tensors; None when not asked."""
    if not ids.shape:
        return None
    top_ids = from_tensor(ids, "top_token_ids").tolist()
    top_lps = from_tensor(lps, "top_logprobs").tolist()
    return [list(zip(i, v, strict=True)) for i, v in zip(top_ids, top_lps, strict=True)]


@dataclass
class SampledSequence:
    """One completion: token ids, their logprobs (temperature 1), text and why it ended;
    with `top_logprobs` asked, each position's most likely tokens and their logprobs."""

    tokens: list[int]
    logprobs: list[float]
    text: str
    stop_reason: StopReason
    top_logprobs: TopLogprobs | None = None

    @classmethod
    def from_proto(cls, s: sampling_pb2.SampledSequence) -> SampledSequence:
        return cls(
            tokens=tokens(s.tokens, "tokens").tolist(),
            logprobs=floats(s.logprobs, "logprobs").tolist(),
            text=s.text,
            stop_reason=_STOP.get(s.stop_reason, "stop"),  # type: ignore[arg-type]
            top_logprobs=_tops(s.top_token_ids, s.top_logprobs),
        )


@dataclass
class LogprobsResult:
    """Result of `SamplingClient.compute_logprobs`: the exact checkpoint, and for each
    sequence logprobs[i] = log p(seq[i+1] | seq[..i]) at temperature 1 (len(seq) - 1 of
    them: the same numbers a Sample reports for tokens it drew, and the trainer computes)."""

    checkpoint: str
    logprobs: list[list[float]]

    @classmethod
    def from_proto(cls, r: sampling_pb2.ComputeLogprobsResponse) -> LogprobsResult:
        return cls(
            checkpoint=r.checkpoint,
            logprobs=[floats(t, "logprobs").tolist() for t in r.logprobs],
        )


@dataclass
class SampleResult:
    """Result of `SamplingClient.sample`: the exact checkpoint and the completions."""

    checkpoint: str
    model: str
    prompt_tokens: list[int]
    sequences: list[SampledSequence]
    # With prompt_logprobs: log p(prompt[i+1] | prompt[..i]) (one fewer than the prompt),
    # and with top_logprobs too, each of those positions' most likely tokens.
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: TopLogprobs | None = None

    @classmethod
    def from_proto(cls, r: sampling_pb2.SampleResponse) -> SampleResult:
        prompt = (
            tokens(r.prompt_tokens, "prompt_tokens").tolist() if is_set(r, "prompt_tokens") else []
        )
        prompt_lps = (
            floats(r.prompt_logprobs, "prompt_logprobs").tolist()
            if is_set(r, "prompt_logprobs")
            else None
        )
        return cls(
            checkpoint=r.checkpoint,
            model=r.model,
            prompt_tokens=prompt,
            sequences=[SampledSequence.from_proto(s) for s in r.sequences],
            prompt_logprobs=prompt_lps,
            prompt_top_logprobs=_tops(r.prompt_top_token_ids, r.prompt_top_logprobs),
        )
