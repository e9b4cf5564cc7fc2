"""The Python SDK's gRPC clients: `TrainingClient`, `SamplingClient`, `TraceClient`, and
their blocking twins.

Every client talks to the gateway (`HEADWAY_URL`, default 127.0.0.1:50051) with the API
key in `HEADWAY_API_KEY` (none in local mode), over grpc.aio. What they add to the bare
stubs:

* **Retries without double application.** Each logical training call gets one request id
  (uuid4), reused by every retry of it; a call that fails with UNAVAILABLE is retried with
  exponential backoff for up to `retry_timeout` seconds (a trainer restarting after a
  crash is waited for), and the trainer returns the first reply for a request id it has
  seen, so a retry after a lost reply never applies a batch or a step twice.
* **Errors as exceptions.** A failed call raises the `headway.errors.HeadwayError`
  subclass of its status (`NotFound`, `InvalidArgument`, ...) with the server's message.
* **Batches of runs.** A batch is a list of `Run`s (sent inline as trajectories) and trace
  ids (resolved by the gateway), mixed; GRPO grouping and advantages are the server's
  (`group_size`, `normalize_std`), the SDK checks the batch shape before sending anything.

Layering: this module imports the contract (`headway.v1`), `headway.tensors`,
`headway.errors` and `headway.server.grpc.CHANNEL_OPTIONS`;
never torch (only `forward_backward_custom` imports it, through `headway.train`) and never
service code.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from headway.channels import CHANNEL_OPTIONS
from headway.errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    HeadwayError,
    Internal,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
    Unimplemented,
    from_status,
    pushback_ms,
)
from headway.tensors import floats, to_tensor
from headway.types import (
    Checkpoint,
    CustomResult,
    ForwardBackwardResult,
    LossInfo,
    OptimStepResult,
    Run,
    SampleResult,
    StepResult,
    Turn,
)
from headway.v1 import (
    common_pb2,
    model_pb2,
    model_pb2_grpc,
    sampling_pb2,
    sampling_pb2_grpc,
    trace_pb2,
    trace_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

__all__ = [
    "DEFAULT_URL",
    "Aborted",
    "Cancelled",
    "DeadlineExceeded",
    "Internal",
    "PermissionDenied",
    "SamplingClient",
    "SyncSamplingClient",
    "SyncTraceClient",
    "SyncTrainingClient",
    "TraceClient",
    "TrainingClient",
    "Unavailable",
    "Unimplemented",
    "error_from_rpc",
]

T = TypeVar("T")

DEFAULT_URL = "127.0.0.1:50051"
# How long a call failing with UNAVAILABLE is retried by default: long enough for a
# service restarted by its supervisor (`headway serve`) to come back.
DEFAULT_RETRY_TIMEOUT = 60.0
MAX_RETRY_DELAY = 10.0  # the exponential backoff between attempts stops growing here

# A batch element: a Run (inline), a trace id, or a ready Trajectory message.
BatchItem = Run | str | common_pb2.Trajectory


def error_from_rpc(e: grpc.RpcError) -> HeadwayError:
    """The `HeadwayError` subclass of a failed call's status, with the server's message."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = (e.details() if hasattr(e, "details") else "") or name
    # At capacity (a pushback) is retryable, unlike a request over a limit.
    return from_status(name, details, pushback_ms(e) if name == "RESOURCE_EXHAUSTED" else None)


# ------------------------------------------------------------------------ connection


def _target(url: str) -> tuple[str, bool]:
    """(host:port, use TLS) from "host:port", "grpc://...", "grpcs://..." or "https://..."."""
    for prefix, secure in (
        ("grpcs://", True),
        ("https://", True),
        ("grpc://", False),
        ("http://", False),
    ):
        if url.startswith(prefix):
            return url[len(prefix) :].rstrip("/"), secure
    return url, False


class _Connection:
    """A grpc.aio channel to the gateway, with auth metadata, retries and error mapping.

    grpc.aio channels belong to the event loop they were created on, so the channel is
    made lazily inside the running loop and remade when a later call runs on another loop
    (e.g. two `asyncio.run`s in one script).
    """

    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        *,
        max_retries: int | None,
        retry_backoff: float,
        retry_timeout: float,
        timeout: float | None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None,
    ) -> None:
        self.url = url or os.environ.get("HEADWAY_URL") or DEFAULT_URL
        self.api_key = api_key if api_key is not None else os.environ.get("HEADWAY_API_KEY", "")
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.retry_timeout = retry_timeout
        self.timeout = timeout
        self.interceptors = list(interceptors or [])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[type, Any] = {}

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    def stub(self, cls: type[T]) -> T:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            target, secure = _target(self.url)
            kwargs: dict[str, Any] = {
                "options": CHANNEL_OPTIONS,
                "interceptors": self.interceptors or None,
            }
            if secure:
                channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), **kwargs)
            else:
                channel = grpc.aio.insecure_channel(target, **kwargs)
            # A channel of a previous loop cannot be closed from this one; it is dropped.
            self._channel, self._loop, self._stubs = channel, loop, {}
        if cls not in self._stubs:
            self._stubs[cls] = cls(self._channel)
        return self._stubs[cls]

    async def call(self, stub_cls: type, method: str, request: Any, *, retry: bool = True) -> Any:
        """Call `stub_cls.method(request)`, retrying UNAVAILABLE, raising `HeadwayError`.

        Only requests that are safe to send twice may be retried: reads, and writes whose
        request_id makes the server apply them at most once. The request object (and so
        its request_id) is the same on every attempt. Retries stop `retry_timeout` seconds
        after the first attempt (and after `max_retries` retries, if set).
        """
        attempt = 0
        give_up = time.monotonic() + self.retry_timeout
        while True:
            try:
                rpc = getattr(self.stub(stub_cls), method)
                return await rpc(request, metadata=self.metadata, timeout=self.timeout)
            except grpc.aio.AioRpcError as e:
                # A server at capacity refused the call before doing anything (it says
                # when to come back): always safe to send again.
                pushback = (
                    pushback_ms(e) if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                )
                retryable = pushback is not None or (
                    retry and e.code() == grpc.StatusCode.UNAVAILABLE
                )
                left = give_up - time.monotonic()
                if self.max_retries is not None and attempt >= self.max_retries:
                    left = 0.0
                if retryable and left > 0:
                    delay = min(self.retry_backoff * 2**attempt, MAX_RETRY_DELAY)
                    if pushback is not None:
                        delay = max(delay, pushback / 1000)
                    # Jitter keeps many clients from retrying a restarted server in lockstep.
                    await asyncio.sleep(min(delay * (0.5 + random.random() / 2), left))
                    attempt += 1
                    continue
                raise error_from_rpc(e) from e

    async def close(self) -> None:
        if self._channel is not None and self._loop is asyncio.get_running_loop():
            await self._channel.close()
        self._channel, self._loop, self._stubs = None, None, {}


def _request_id() -> str:
    """A fresh idempotency key for one logical call (shared by its retries)."""
    return f"sdk-{uuid.uuid4().hex}"


# -------------------------------------------------------------------------- batches


def _check_batch(batch: Sequence[BatchItem]) -> list[BatchItem]:
    # A lone run or id would otherwise be iterated (a string char by char): refuse it.
    if isinstance(batch, Run | str | common_pb2.Trajectory):
        raise InvalidArgument("batch must be a list of runs and trace ids, not a single item")
    items = list(batch)
    if not items:
        raise InvalidArgument("batch is empty: pass at least one run or trace id")
    return items


def training_items(
    batch: Sequence[BatchItem], *, group_size: int, reward_scale: float = 1.0
) -> list[common_pb2.TrainingItem]:
    """Validate a batch and turn it into `TrainingItem`s, before anything is sent.

    Runs become inline trajectories (their reward times `reward_scale`), strings are
    trace ids. Raises `InvalidArgument` for an empty batch, a length that is not a
    multiple of `group_size`, an unscored or unrecorded run, or a `reward_scale` other
    than 1 with trace ids (their rewards live on the server and cannot be scaled here:
    scale them when you call `TraceClient.set_reward`, or send the runs inline).
    """
    items = _check_batch(batch)
    if group_size < 0:
        raise InvalidArgument(
            f"group_size is {group_size}: it must be >= 0 (None or 0 = no grouping)"
        )
    if group_size and len(items) % group_size:
        raise InvalidArgument(
            f"batch has {len(items)} runs and trace ids but group_size is {group_size}: "
            f"its length must be a multiple of group_size (each group is {group_size} "
            "consecutive rollouts of one task)"
        )
    if not math.isfinite(reward_scale):
        raise InvalidArgument(f"reward_scale is {reward_scale}: it must be finite")
    out = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, str):
                if not item:
                    raise InvalidArgument("empty trace id")
                if reward_scale != 1.0:
                    raise InvalidArgument(
                        f"reward_scale is {reward_scale} but this item is trace id {item!r}, "
                        "whose reward is stored on the server and cannot be scaled by the "
                        "client: send the Run itself, or set the scaled reward on the trace"
                    )
                out.append(common_pb2.TrainingItem(trace_id=item))
            elif isinstance(item, Run):
                out.append(common_pb2.TrainingItem(trajectory=item.to_trajectory(reward_scale)))
            elif isinstance(item, common_pb2.Trajectory):
                trajectory = common_pb2.Trajectory()
                trajectory.CopyFrom(item)
                trajectory.reward = item.reward * reward_scale
                out.append(common_pb2.TrainingItem(trajectory=trajectory))
            else:
                raise InvalidArgument(
                    f"got a {type(item).__name__}: batch items are Runs, trace id strings or "
                    "Trajectory messages"
                )
        except InvalidArgument as e:
            raise InvalidArgument(f"batch[{i}]: {e.message}") from None
    return out


def split_substeps(
    items: list[common_pb2.TrainingItem], group_size: int, num_substeps: int
) -> list[list[common_pb2.TrainingItem]]:
    """Split a batch into `num_substeps` consecutive parts, each a whole number of groups.

    GRPO advantages are computed per group, so a split at group boundaries gives every run
    the advantage it has in the whole batch and the summed gradient of the parts equals
    the batch's. Parts differ by at most one group. Raises `InvalidArgument` when there
    are fewer groups than substeps.
    """
    if num_substeps < 1:
        raise InvalidArgument(f"num_substeps is {num_substeps}: it must be >= 1")
    unit = group_size or 1
    groups = len(items) // unit
    if num_substeps > groups:
        raise InvalidArgument(
            f"num_substeps is {num_substeps} but the batch has only {groups} "
            f"{'groups' if group_size else 'items'}: each substep needs at least one whole "
            f"{'group of ' + str(group_size) if group_size else 'item'}"
        )
    base, extra = divmod(groups, num_substeps)
    parts, start = [], 0
    for k in range(num_substeps):
        size = (base + (k < extra)) * unit
        parts.append(items[start : start + size])
        start += size
    return parts


def merge_metrics(parts: Sequence[tuple[Mapping[str, float], int, int]]) -> dict[str, float]:
    """Merge the metrics of several calls: (metrics, trained tokens, items) per call.

    As the trainer merges them into a checkpoint's stats: ":sum" and "groups/" keys (and
    "num_tokens") add up, "reward/mean" is weighted by items, the rest by trained tokens.
    """
    if len(parts) == 1:
        return dict(parts[0][0])
    sums: dict[str, float] = {}
    weighted: dict[str, tuple[float, float]] = {}
    for metrics, tokens, count in parts:
        for key, value in metrics.items():
            if key == "num_tokens" or key.endswith(":sum") or key.startswith("groups/"):
                sums[key] = sums.get(key, 0.0) + value
            else:
                weight = float(count if key == "reward/mean" else max(tokens, 1))
                total, norm = weighted.get(key, (0.0, 0.0))
                weighted[key] = (total + value * weight, norm + weight)
    sums.update({k: total / norm for k, (total, norm) in weighted.items() if norm})
    return sums


def _adam(
    learning_rate: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_clip_norm: float,
) -> common_pb2.AdamParams:
    return common_pb2.AdamParams(
        learning_rate=learning_rate,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        grad_clip_norm=grad_clip_norm,
    )


def _fb_result(
    replies: Sequence[training_pb2.ForwardBackwardResponse], counts: Sequence[int]
) -> ForwardBackwardResult:
    return ForwardBackwardResult(
        metrics=merge_metrics(
            [(r.metrics, r.num_tokens, n) for r, n in zip(replies, counts, strict=True)]
        ),
        num_datums=sum(r.num_datums for r in replies),
        num_tokens=sum(r.num_tokens for r in replies),
        logprobs=[floats(t, "logprobs").tolist() for r in replies for t in r.logprobs],
    )


# ------------------------------------------------------------------- async clients


class _Client:
    """Connection plumbing shared by the async clients."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        max_retries: int | None = None,
        retry_backoff: float = 0.25,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        timeout: float | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        self._conn = _Connection(
            url,
            api_key,
            max_retries=max_retries,
            retry_backoff=retry_backoff,
            retry_timeout=retry_timeout,
            timeout=timeout,
            interceptors=interceptors,
        )

    @property
    def url(self) -> str:
        """The gateway address the client talks to."""
        return self._conn.url

    def _settings(self) -> dict[str, Any]:
        c = self._conn
        return {
            "url": c.url,
            "api_key": c.api_key,
            "max_retries": c.max_retries,
            "retry_backoff": c.retry_backoff,
            "retry_timeout": c.retry_timeout,
            "timeout": c.timeout,
            "interceptors": c.interceptors,
        }

    async def close(self) -> None:
        """Close the channel (a later call opens a new one)."""
        await self._conn.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _ModelClient(_Client):
    """A client bound to one model slug."""

    _purpose = "use"  # finishes "give the slug of the model to ..." in the error

    def __init__(
        self,
        model: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        max_retries: int | None = None,
        retry_backoff: float = 0.25,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        timeout: float | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        if not model:
            raise InvalidArgument(f"model is empty: give the slug of the model to {self._purpose}")
        super().__init__(
            url,
            api_key,
            max_retries=max_retries,
            retry_backoff=retry_backoff,
            retry_timeout=retry_timeout,
            timeout=timeout,
            interceptors=interceptors,
        )
        self.model = model


class TrainingClient(_ModelClient):
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
        return SyncTrainingClient(self.model, **self._settings())

    async def _train(self, method: str, request: Any) -> Any:
        return await self._conn.call(training_pb2_grpc.TrainingServiceStub, method, request)

    async def _models(self, method: str, request: Any) -> Any:
        return await self._conn.call(model_pb2_grpc.ModelServiceStub, method, request)

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
    ) -> ForwardBackwardResult:
        """Accumulate the gradient of a built-in loss over `batch` (applied by optim_step).

        `batch` mixes `Run`s and trace ids; with `group_size` g, each g consecutive items
        are a GRPO group (advantage = reward - group mean, / group std with
        `normalize_std`), computed by the server. `reward_scale` multiplies the rewards of
        inline runs (not allowed with trace ids). `num_substeps` > 1 sends the batch as that
        many ForwardBackward calls, split at group boundaries, whose gradients add up to
        the whole batch's (less memory per call, same update). If a later substep fails,
        the earlier ones' gradient stays accumulated: `set_head(await head())` discards it.
        """
        g = group_size or 0
        items = training_items(batch, group_size=g, reward_scale=reward_scale)
        parts = split_substeps(items, g, num_substeps)
        replies = []
        for part in parts:
            request = training_pb2.ForwardBackwardRequest(
                model=self.model,
                data=part,
                loss_fn=loss_fn,
                loss_fn_config=dict(loss_fn_config or {}),
                group_size=g,
                normalize_std=normalize_std,
                request_id=_request_id(),
            )
            replies.append(await self._train("ForwardBackward", request))
        return _fb_result(replies, [len(p) for p in parts])

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
        request = training_pb2.OptimStepRequest(
            model=self.model,
            adam=_adam(learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm),
            request_id=_request_id(),
        )
        return OptimStepResult.from_proto(await self._train("OptimStep", request))

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
        reward_scale: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_clip_norm: float = 0.0,
    ) -> StepResult:
        """forward_backward over `batch` then optim_step: one training step.

        Arguments as `forward_backward` and `optim_step`. With one substep this is a
        single Step call (validated whole before anything is applied); with more, the
        first substeps are ForwardBackward calls and the last is the Step that applies
        them all.
        """
        g = group_size or 0
        items = training_items(batch, group_size=g, reward_scale=reward_scale)
        parts = split_substeps(items, g, num_substeps)
        config = dict(loss_fn_config or {})
        replies = []
        for part in parts[:-1]:
            request = training_pb2.ForwardBackwardRequest(
                model=self.model,
                data=part,
                loss_fn=loss_fn,
                loss_fn_config=config,
                group_size=g,
                normalize_std=normalize_std,
                request_id=_request_id(),
            )
            replies.append(await self._train("ForwardBackward", request))
        step_request = training_pb2.StepRequest(
            model=self.model,
            data=parts[-1],
            loss_fn=loss_fn,
            loss_fn_config=config,
            group_size=g,
            normalize_std=normalize_std,
            adam=_adam(learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm),
            request_id=_request_id(),
        )
        reply = await self._train("Step", step_request)
        replies.append(reply.forward_backward)
        fb = _fb_result(replies, [len(p) for p in parts])
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
    ) -> CustomResult:
        """Accumulate the gradient of your own loss, computed client-side with torch.

        `loss_fn(data: list[DatumTensors], logprobs: list[torch.Tensor]) -> (loss,
        metrics)`: `logprobs[i]` is the current policy's logprob of each target token of
        datum i (requires_grad), `data[i]` the datum's arrays (sampling logprobs, mask,
        advantages, reward, group index, see `headway.train.DatumTensors`). The service
        runs the forward, we backpropagate your scalar loss to the logprobs and send
        `-d loss / d logprob` per token back, and the service applies it through the
        model: the accumulated gradient is your loss's. `metrics` (numbers) are recorded
        on the next checkpoint. Needs torch (`pip install 'headway[train]'`).
        """
        from headway.train import compute_weights, datum_tensors, require_torch

        require_torch()  # before ForwardCustom: nothing is left half-done on the trainer
        g = group_size or 0
        items = training_items(batch, group_size=g)
        forward = await self._train(
            "ForwardCustom",
            training_pb2.ForwardCustomRequest(
                model=self.model,
                data=items,
                group_size=g,
                normalize_std=normalize_std,
                request_id=_request_id(),
            ),
        )
        data = [datum_tensors(d, i) for i, d in enumerate(forward.data)]
        weights, loss, metrics = compute_weights(data, loss_fn)
        backward = await self._train(
            "BackwardCustom",
            training_pb2.BackwardCustomRequest(
                model=self.model,
                forward_id=forward.forward_id,
                weights=[to_tensor(w, common_pb2.DTYPE_FLOAT32) for w in weights],
                metrics=metrics,
                request_id=_request_id(),
            ),
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
        reply = await self._train(
            "AvailableLosses", training_pb2.AvailableLossesRequest(model=self.model)
        )
        return [LossInfo.from_proto(loss) for loss in reply.losses]

    async def checkpoints(self) -> list[Checkpoint]:
        """The model's checkpoint tree, oldest first (`is_head` marks the head)."""
        reply = await self._models(
            "ListCheckpoints", model_pb2.ListCheckpointsRequest(model=self.model)
        )
        return [Checkpoint.from_proto(c) for c in reply.checkpoints]

    async def head(self) -> Checkpoint:
        """The model's head checkpoint (what the gateway serves) with its stats."""
        return Checkpoint.from_proto(
            await self._models("GetHead", model_pb2.GetHeadRequest(model=self.model))
        )

    async def set_head(self, checkpoint: str | Checkpoint) -> Checkpoint:
        """Make `checkpoint` the head (rollback or branch point); returns the new head.

        Gradients accumulated since the last optim_step are discarded; the next optim_step
        continues from that checkpoint's weights and optimizer state.
        """
        ckpt = checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint
        return Checkpoint.from_proto(
            await self._models(
                "SetHead", model_pb2.SetHeadRequest(model=self.model, checkpoint=ckpt)
            )
        )


class SamplingClient(_ModelClient):
    """Samples one model through the gateway, with token ids and per-token logprobs.

    Settings as `TrainingClient`. Without `checkpoint`, a sample is served by the model's
    head as of the call (never an older one).
    """

    _purpose = "sample"

    def sync(self) -> SyncSamplingClient:
        """A blocking client for the same model and settings."""
        return SyncSamplingClient(self.model, **self._settings())

    async def sample(
        self,
        prompt: str | Sequence[int],
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        checkpoint: str | None = None,
        *,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
    ) -> SampleResult:
        """Sample `n` completions of `prompt` (text as is, or token ids).

        Text is tokenized by the model's tokenizer without a chat template. Each sequence
        has its tokens, their logprobs under the policy at temperature 1 (whatever the
        temperature of the draw), its text and stop reason ("stop" or "length"). The same
        `seed` and request give the same tokens.
        """
        params = common_pb2.SamplingParams(
            max_tokens=max_tokens,
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=[stop] if isinstance(stop, str) else list(stop or []),
            stop_token_ids=list(stop_token_ids or []),
            ignore_eos=ignore_eos,
        )
        if seed is not None:
            params.seed = seed
        request = sampling_pb2.SampleRequest(
            model=self.model, params=params, checkpoint=checkpoint or ""
        )
        if isinstance(prompt, str):
            request.prompt_text = prompt
        else:
            ids = np.asarray(list(prompt), dtype=np.int64)
            request.prompt_tokens.CopyFrom(to_tensor(ids, common_pb2.DTYPE_INT32))
        # Sampling changes nothing on the server: always safe to retry.
        reply = await self._conn.call(sampling_pb2_grpc.SamplingServiceStub, "Sample", request)
        return SampleResult.from_proto(reply)


class TraceClient(_Client):
    """The traces the gateway holds: attach rewards, read them back.

    The OpenAI-compatible endpoint records a trace per completion requested with
    `return_token_ids`; a trace with a reward can be trained on by its id.
    """

    def sync(self) -> SyncTraceClient:
        """A blocking client with the same settings."""
        return SyncTraceClient(**self._settings())

    async def set_reward(self, trace_id: str, reward: float) -> None:
        """Attach `reward` to a trace (replacing any previous one)."""
        await self._conn.call(
            trace_pb2_grpc.TraceServiceStub,
            "SetReward",
            trace_pb2.SetRewardRequest(trace_id=trace_id, reward=float(reward)),
        )

    async def get_trace(self, trace_id: str) -> Run:
        """A trace as a `Run` (turns, trace id, model; reward None when it has none)."""
        trace = await self._conn.call(
            trace_pb2_grpc.TraceServiceStub,
            "GetTrace",
            trace_pb2.GetTraceRequest(trace_id=trace_id),
        )
        return Run(
            turns=[Turn.from_proto(t) for t in trace.turns],
            reward=trace.reward if trace.has_reward else None,
            trace_id=trace.trace_id,
            model=trace.model,
        )


# ----------------------------------------------------------------- blocking twins


class _LoopThread:
    """One event loop in a daemon thread that runs the blocking clients' coroutines.

    A private loop (rather than `asyncio.run` per call) keeps the grpc.aio channel alive
    between calls and works even when the caller is itself inside a running loop.
    """

    _lock = threading.Lock()
    _shared: _LoopThread | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="headway-sdk", daemon=True
        )
        self.thread.start()

    @classmethod
    def shared(cls) -> _LoopThread:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                "a blocking Headway client was called from inside its own event loop; use "
                "the async client there"
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class _SyncClient:
    def __init__(self, client: _Client) -> None:
        self._client = client
        self._runner = _LoopThread.shared()

    def _run(self, coro: Awaitable[T]) -> T:
        return self._runner.run(coro)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        return self._client.url

    def close(self) -> None:
        """Close the channel."""
        self._run(self._client.close())

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SyncModelClient(_SyncClient):
    """A blocking twin of a model-bound client (`_async`): the same constructor."""

    _async: type[_ModelClient]

    def __init__(
        self,
        model: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(self._async(model, url=url, api_key=api_key, **settings))
        self.model = model


class SyncTrainingClient(_SyncModelClient):
    """The blocking twin of `TrainingClient`: same constructor, same methods, no await."""

    _async = TrainingClient

    @property
    def aio(self) -> TrainingClient:
        """The async client underneath (bound to the blocking client's private loop)."""
        return self._client  # type: ignore[return-value]

    def forward_backward(
        self,
        batch: Sequence[BatchItem],
        loss_fn: str = "importance_sampling",
        loss_fn_config: Mapping[str, float] | None = None,
        group_size: int | None = None,
        reward_scale: float = 1.0,
        num_substeps: int = 1,
        normalize_std: bool = False,
    ) -> ForwardBackwardResult:
        """See `TrainingClient.forward_backward`."""
        return self._run(
            self.aio.forward_backward(
                batch,
                loss_fn,
                loss_fn_config,
                group_size,
                reward_scale,
                num_substeps,
                normalize_std,
            )
        )

    def optim_step(
        self,
        learning_rate: float,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_clip_norm: float = 0.0,
    ) -> OptimStepResult:
        """See `TrainingClient.optim_step`."""
        return self._run(
            self.aio.optim_step(learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm)
        )

    def step(
        self,
        batch: Sequence[BatchItem],
        learning_rate: float,
        group_size: int | None = None,
        loss_fn: str = "importance_sampling",
        loss_fn_config: Mapping[str, float] | None = None,
        num_substeps: int = 1,
        normalize_std: bool = False,
        **kwargs: float,
    ) -> StepResult:
        """See `TrainingClient.step` (keyword extras: reward_scale and the AdamW ones)."""
        return self._run(
            self.aio.step(
                batch,
                learning_rate,
                group_size,
                loss_fn,
                loss_fn_config,
                num_substeps,
                normalize_std,
                **kwargs,
            )
        )

    def forward_backward_custom(
        self,
        batch: Sequence[BatchItem],
        loss_fn: Any,
        group_size: int | None = None,
        normalize_std: bool = False,
    ) -> CustomResult:
        """See `TrainingClient.forward_backward_custom` (the loss runs in the SDK's thread)."""
        return self._run(
            self.aio.forward_backward_custom(batch, loss_fn, group_size, normalize_std)
        )

    def available_losses(self) -> list[LossInfo]:
        """See `TrainingClient.available_losses`."""
        return self._run(self.aio.available_losses())

    def checkpoints(self) -> list[Checkpoint]:
        """See `TrainingClient.checkpoints`."""
        return self._run(self.aio.checkpoints())

    def head(self) -> Checkpoint:
        """See `TrainingClient.head`."""
        return self._run(self.aio.head())

    def set_head(self, checkpoint: str | Checkpoint) -> Checkpoint:
        """See `TrainingClient.set_head`."""
        return self._run(self.aio.set_head(checkpoint))


class SyncSamplingClient(_SyncModelClient):
    """The blocking twin of `SamplingClient`."""

    _async = SamplingClient

    @property
    def aio(self) -> SamplingClient:
        """The async client underneath."""
        return self._client  # type: ignore[return-value]

    def sample(self, prompt: str | Sequence[int], *args: Any, **kwargs: Any) -> SampleResult:
        """See `SamplingClient.sample` (same arguments)."""
        return self._run(self.aio.sample(prompt, *args, **kwargs))


class SyncTraceClient(_SyncClient):
    """The blocking twin of `TraceClient`."""

    def __init__(
        self, *, url: str | None = None, api_key: str | None = None, **settings: Any
    ) -> None:
        super().__init__(TraceClient(url=url, api_key=api_key, **settings))

    @property
    def aio(self) -> TraceClient:
        """The async client underneath."""
        return self._client  # type: ignore[return-value]

    def set_reward(self, trace_id: str, reward: float) -> None:
        """See `TraceClient.set_reward`."""
        self._run(self.aio.set_reward(trace_id, reward))

    def get_trace(self, trace_id: str) -> Run:
        """See `TraceClient.get_trace`."""
        return self._run(self.aio.get_trace(trace_id))
