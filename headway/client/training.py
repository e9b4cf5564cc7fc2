"""`TrainingClient`: trains one model (forward_backward, optim_step, step, custom losses,
its checkpoint tree and head), and its blocking twin `SyncTrainingClient`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from headway.client import rpcs
from headway.client.base import BoundClient
from headway.client.batches import (
    BatchItem,
    batch_calls,
    forward_backward_result,
)
from headway.client.blocking import SyncBoundClient, blocking_twin
from headway.types import (
    Checkpoint,
    CustomResult,
    ForwardBackwardResult,
    LossInfo,
    OptimStepResult,
    StepResult,
)
from headway.v1 import training_pb2

__all__ = ["SyncTrainingClient", "TrainingClient"]


class TrainingClient(BoundClient):
    """Trains one model: forward_backward, optim_step, step, custom losses, its head.

    ```python
    trainer = TrainingClient("arith-rl")
    result = await trainer.step(runs, learning_rate=1e-5, group_size=8)
    print(result.step, result.checkpoint, result.sampler_path)
    ```

    `url` defaults to `HEADWAY_URL` (else 127.0.0.1:50051), `api_key` to
    `HEADWAY_API_KEY`. Calls failing with UNAVAILABLE (a gateway or trainer restarting) are
    retried for up to `retry_timeout` seconds (60 by default; `max_retries` also caps the
    count, if set) with exponential backoff from `retry_backoff` seconds up to 10 s, under
    the same request id, so none is applied twice. `timeout` is a per-attempt deadline in
    seconds (None = none).
    `interceptors` are grpc.aio client interceptors (tracing, fault injection in tests).
    `TrainingClient.sync()` / `SyncTrainingClient` is the blocking twin.
    """

    _purpose = "train"

    def sync(self) -> SyncTrainingClient:
        """A blocking client for the same model and settings."""
        return SyncTrainingClient(self.model, **self.settings.options())

    # ----------------------------------------------------------------- training

    async def forward_backward(
        self,
        batch: Sequence[BatchItem],
        loss_fn: str = "importance_sampling",
        loss_fn_config: Mapping[str, float] | None = None,
        group_size: int | None = None,
        reward_scale: float = 1.0,
        num_substeps: int = 1,
        normalize_std: bool = False,
        *,
        partial_groups: str = "drop",
        kl_penalty_coef: float = 0.0,
        kl_reference: str | None = None,
    ) -> ForwardBackwardResult:
        """Accumulate the gradient of a built-in loss over `batch` (applied by optim_step).

        `batch` mixes `Run`s and trace ids; with `group_size` g, each g consecutive items
        are a GRPO group (advantage = reward - group mean, / group std with
        `normalize_std`), computed by the server. `reward_scale` multiplies the rewards of
        inline runs (not allowed with trace ids). `num_substeps` > 1 sends the batch as that
        many ForwardBackward calls, split at group boundaries, whose gradients add up to
        the whole batch's (less memory per call, same update). If a later substep fails,
        the earlier ones' gradient stays accumulated: `set_head(await head())` discards it.

        Errored runs (rollouts that failed, `Run.error`) are left out, and a group that
        lost some is dropped whole, or with `partial_groups="keep"` trained as a smaller
        group (sent after the whole groups); `metrics` counts them (`runs/errored`,
        `groups/dropped`, `groups/partial`), and the result's per-datum logprobs are those
        of the items sent, in that order.

        `kl_penalty_coef` > 0 adds coef·Σ w·k3 to the loss, k3 = exp(ref − lp) − (ref − lp)
        − 1 the estimate of KL(policy ‖ reference) per trained token, with the reference
        `kl_reference`: a checkpoint id of the model, or by default its root (the weights
        it was forked from; for a LoRA fork, its base, adapters off). `metrics["kl/reference"]`
        is the mean k3 (also with coefficient 0 when `kl_reference` is given).
        """
        kl = rpcs.kl_penalty(kl_penalty_coef, kl_reference)
        calls, dropped = batch_calls(
            batch, group_size=group_size or 0, reward_scale=reward_scale,
            num_substeps=num_substeps, partial_groups=partial_groups,
        )  # fmt: skip
        replies = [
            await self._call(
                rpcs.forward_backward(
                    self.model, part, loss_fn, loss_fn_config, g, normalize_std, kl
                )
            )
            for part, g in calls
        ]
        result = forward_backward_result(replies, [part for part, _ in calls])
        result.metrics.update(dropped)
        return result

    async def optim_step(
        self,
        learning_rate: float,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_clip_norm: float = 0.0,
    ) -> OptimStepResult:
        """Apply AdamW to the accumulated gradient, checkpoint it and make it the head.

        Returns once the new head is durable: a sample started after this returns is
        served by it. `grad_clip_norm` 0 = no clipping.
        """
        adam = rpcs.adam(learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm)
        return OptimStepResult.from_proto(await self._call(rpcs.optim_step(self.model, adam)))

    async def step(
        self,
        batch: Sequence[BatchItem],
        learning_rate: float,
        group_size: int | None = None,
        loss_fn: str = "importance_sampling",
        loss_fn_config: Mapping[str, float] | None = None,
        num_substeps: int = 1,
        normalize_std: bool = False,
        *,
        partial_groups: str = "drop",
        reward_scale: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_clip_norm: float = 0.0,
        kl_penalty_coef: float = 0.0,
        kl_reference: str | None = None,
    ) -> StepResult:
        """forward_backward over `batch` then optim_step: one training step.

        Arguments as `forward_backward` (the KL penalty included) and `optim_step`
        (errored runs and their groups included). With one substep this is a single Step
        call (validated whole before anything is applied); with more (or partial groups
        kept), the first are ForwardBackward calls and the last is the Step that applies
        them all.
        """
        kl = rpcs.kl_penalty(kl_penalty_coef, kl_reference)
        calls, dropped = batch_calls(
            batch, group_size=group_size or 0, reward_scale=reward_scale,
            num_substeps=num_substeps, partial_groups=partial_groups,
        )  # fmt: skip
        replies: list[training_pb2.ForwardBackwardResponse] = [
            await self._call(
                rpcs.forward_backward(
                    self.model, part, loss_fn, loss_fn_config, g, normalize_std, kl
                )
            )
            for part, g in calls[:-1]
        ]
        adam = rpcs.adam(learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm)
        last, g = calls[-1]
        reply = await self._call(
            rpcs.step(self.model, last, loss_fn, loss_fn_config, g, normalize_std, adam, kl)
        )
        replies.append(reply.forward_backward)
        fb = forward_backward_result(replies, [part for part, _ in calls])
        fb.metrics.update(dropped)
        opt = OptimStepResult.from_proto(reply.optim_step)
        return StepResult(
            step=opt.step,
            checkpoint=opt.checkpoint,
            sampler_path=opt.sampler_path,
            state_path=opt.state_path,
            metrics=fb.metrics,
            num_datums=fb.num_datums,
            num_tokens=fb.num_tokens,
            checkpoint_info=opt.checkpoint_info,
        )

    async def forward_backward_custom(
        self,
        batch: Sequence[BatchItem],
        loss_fn: Any,
        group_size: int | None = None,
        normalize_std: bool = False,
        *,
        reference: str | None = None,
    ) -> CustomResult:
        """Accumulate the gradient of your own loss, computed client-side with torch.

        `loss_fn(data: list[DatumTensors], logprobs: list[torch.Tensor]) -> (loss,
        metrics)`: `logprobs[i]` is the current policy's logprob of each target token of
        datum i (requires_grad), `data[i]` the datum's arrays (sampling logprobs, mask,
        advantages, reward, group index, see `headway.train.DatumTensors`). The service
        runs the forward, we backpropagate your scalar loss to the logprobs and send
        `-d loss / d logprob` per token back, and the service applies it through the
        model: the accumulated gradient is your loss's. `metrics` (numbers) are recorded
        on the next checkpoint. Needs torch (`pip install 'headway[train]'`). Errored runs
        (`Run.error`) are left out with their whole group, so `data` holds the rest, in
        batch order. With `reference` (a checkpoint id of the model, "" = its root),
        `data[i].reference_logprobs` holds that policy's logprobs, for a KL term of your own.
        """
        # torch is imported here, never at import time: the SDK installs without it.
        from headway.train import compute_weights, datum_tensors, require_torch

        require_torch()  # before ForwardCustom: nothing is left half-done on the trainer
        g = group_size or 0
        # Errored runs left out, a group that lost some dropped whole (one call: one size).
        ((items, _),), _ = batch_calls(batch, group_size=g)
        forward = await self._call(
            rpcs.forward_custom(self.model, items, g, normalize_std, reference)
        )
        data = [datum_tensors(d, i) for i, d in enumerate(forward.data)]
        weights, loss, metrics = compute_weights(data, loss_fn)
        backward = await self._call(
            rpcs.backward_custom(self.model, forward.forward_id, weights, metrics)
        )
        return CustomResult(
            loss=loss,
            metrics=dict(backward.metrics),
            num_datums=backward.num_datums,
            num_tokens=backward.num_tokens,
        )

    # ------------------------------------------------------------ model, tree

    async def available_losses(self) -> list[LossInfo]:
        """The built-in losses the model accepts, with their config keys."""
        reply = await self._call(rpcs.available_losses(self.model))
        return [LossInfo.from_proto(loss) for loss in reply.losses]

    async def checkpoints(self) -> list[Checkpoint]:
        """The model's checkpoint tree, oldest first (`is_head` marks the head)."""
        reply = await self._call(rpcs.list_checkpoints(self.model))
        return [Checkpoint.from_proto(c) for c in reply.checkpoints]

    async def head(self) -> Checkpoint:
        """The model's head checkpoint (what the gateway serves) with its stats."""
        return Checkpoint.from_proto(await self._call(rpcs.get_head(self.model)))

    async def set_head(self, checkpoint: str | Checkpoint) -> Checkpoint:
        """Make `checkpoint` the head (rollback or branch point); returns the new head.

        Gradients accumulated since the last optim_step are discarded; the next optim_step
        continues from that checkpoint's weights and optimizer state.
        """
        ckpt = checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint
        return Checkpoint.from_proto(await self._call(rpcs.set_head(self.model, ckpt)))


@blocking_twin(TrainingClient)
class SyncTrainingClient(SyncBoundClient):
    """The blocking twin of `TrainingClient`: same constructor, same methods, no await.

    `forward_backward_custom`'s loss runs in the SDK's event-loop thread.
    """
