"""The training arithmetic: forward a batch in chunks, losses, custom-loss backward, AdamW.

Pure torch on a `ModelState`; no gRPC, no store. A batch is processed in chunks of at most
`microbatch_tokens` padded tokens, each chunk backpropagated before the next, so memory is
bounded and, the losses being sums, the accumulated gradient is that of the whole batch.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from headway.errors import FailedPrecondition, InvalidArgument
from headway.modeling.placement import to_device
from trainer_svc.datums import DatumArrays
from trainer_svc.head import head_logprobs
from trainer_svc.kernels import Kernels
from trainer_svc.losses import Loss, TokenInputs
from trainer_svc.precision import FP32, Precision
from trainer_svc.reference import Reference
from trainer_svc.state import ModelState, summed_metric


@dataclass
class Chunk:
    """Datums forwarded together: their indices in the batch, padded to one length."""

    index: list[int]
    ids: torch.Tensor  # [b, n] input tokens, right-padded with 0
    targets: torch.Tensor  # [b, n]
    valid: torch.Tensor  # [b, n] bool: a real position (not padding)
    w: torch.Tensor  # [b, n] weights (0 at padding)
    q: torch.Tensor | None  # [b, n] sampling logprobs, None if any datum lacks them
    a: torch.Tensor | None  # [b, n] advantages

    def to(self, device: torch.device) -> Chunk:
        """The chunk on `device` (itself on its own device). Chunks are built on the CPU
        and moved once per microbatch, through pinned memory on a GPU."""
        if self.ids.device == device:
            return self
        move = functools.partial(to_device, device=device)
        return Chunk(
            self.index,
            move(self.ids),
            move(self.targets),
            move(self.valid),
            move(self.w),
            None if self.q is None else move(self.q),
            None if self.a is None else move(self.a),
        )


def make_chunks(datums: list[DatumArrays], microbatch_tokens: int) -> list[Chunk]:
    """Split the batch, in order, into chunks of at most `microbatch_tokens` padded tokens."""
    groups: list[list[int]] = []
    for i, d in enumerate(datums):
        n = len(d.input_tokens)
        if groups:
            cur = groups[-1]
            longest = max(n, *(len(datums[j].input_tokens) for j in cur))
            if (len(cur) + 1) * longest <= microbatch_tokens:
                cur.append(i)
                continue
        groups.append([i])
    return [_pack([datums[i] for i in g], g) for g in groups]


def _pad(rows: list[np.ndarray], n: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(rows), n, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.from_numpy(np.ascontiguousarray(r)).to(dtype)
    return out


def _pack(datums: list[DatumArrays], index: list[int]) -> Chunk:
    n = max(len(d.input_tokens) for d in datums)
    valid = _pad([np.ones(len(d.input_tokens), bool) for d in datums], n, torch.bool)
    has_q = all(d.sampling_logprobs is not None for d in datums)
    has_a = all(d.advantages is not None for d in datums)
    return Chunk(
        index=index,
        ids=_pad([d.input_tokens for d in datums], n, torch.long),
        targets=_pad([d.target_tokens for d in datums], n, torch.long),
        valid=valid,
        w=_pad([d.weights for d in datums], n, torch.float32),
        q=_pad([d.sampling_logprobs for d in datums], n, torch.float32) if has_q else None,
        a=_pad([d.advantages for d in datums], n, torch.float32) if has_a else None,
    )


@dataclass(frozen=True)
class ComputeMode:
    """How the trainer computes: its precision (--dtype) and the matmul kernels measured
    on this machine (None: torch's own)."""

    precision: Precision = FP32
    kernels: Kernels | None = None

    @contextlib.contextmanager
    def active(self, device_type: str) -> Iterator[None]:
        """The context a forward runs in."""
        with self.precision.autocast(device_type):
            if self.kernels is None or device_type != "cpu":
                yield
            else:
                with self.kernels.active():
                    yield


DEFAULT = ComputeMode()


@dataclass
class ChunkForward:
    """Logprobs of a chunk: `lp` `[b, n]` for every real position (detached), and the
    positions that carry gradient with their logprobs (`grad_lp`, in graph) and entropies."""

    lp: torch.Tensor
    grad_lp: torch.Tensor  # [k] logprobs at the grad positions, with autograd graph
    entropy: torch.Tensor | None  # [k] entropy at the grad positions (None without a graph)


def chunk_forward(
    state: ModelState, chunk: Chunk, grad_mask: torch.Tensor, mode: ComputeMode = DEFAULT
) -> ChunkForward:
    """Forward a chunk in `mode`; only `grad_mask` positions enter the autograd graph.

    The vocabulary projection and its log-softmax are the largest tensors of a step; at
    the positions that carry gradient they are one fused operation (`head_logprobs`), at
    positions that carry no loss (prompts, padding) they are computed without a graph, or
    not at all, so their backward costs nothing.
    """
    weight, kernels = state.module.lm_head.weight, mode.kernels
    with mode.active(weight.device.type):
        hidden = state.module(chunk.ids, validate=False, return_hidden=True)
        grad_lp, ent = head_logprobs(hidden[grad_mask], weight, chunk.targets[grad_mask], kernels)
        lp = torch.zeros(chunk.ids.shape, device=hidden.device)
        lp[grad_mask] = grad_lp.detach()
        rest = chunk.valid & ~grad_mask
        if bool(rest.any()):
            with torch.no_grad():
                lp[rest] = head_logprobs(hidden[rest], weight, chunk.targets[rest], kernels)[0]
    return ChunkForward(lp, grad_lp, ent)


@torch.no_grad()
def reference_logprobs(
    state: ModelState, reference: Reference, chunk: Chunk, mask: torch.Tensor, mode: ComputeMode
) -> torch.Tensor:
    """The reference policy's logprobs of the chunk's targets at the `mask` positions
    (`[k]`, no graph): the same module and kernels, the reference's weights."""
    module, kernels = state.module, mode.kernels
    with reference.active(module), mode.active(module.lm_head.weight.device.type):
        hidden = module(chunk.ids, validate=False, return_hidden=True)
        return head_logprobs(hidden[mask], module.lm_head.weight, chunk.targets[mask], kernels)[0]


@dataclass(frozen=True)
class KlTerm:
    """A call's KL penalty with its reference loaded (`trainer_svc.reference`)."""

    coef: float
    reference: Reference


# Where the reference finds a token e^20 times likelier than the policy does, exp(d)
# would soon overflow fp32 (inf loss, NaN gradient); d is capped there.
MAX_LOG_RATIO = 20.0


def k3(lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per token, exp(d) − d − 1 with d = ref − lp (capped at `MAX_LOG_RATIO`): the k3
    estimate of KL(policy ‖ reference), ≥ 0 and zero where they agree; its gradient flows
    through lp."""
    d = (ref - lp).clamp(max=MAX_LOG_RATIO)
    return torch.exp(d) - d - 1


class Stats:
    """Token-level statistics summed over chunks, turned into the call's metrics."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.sums: dict[str, float] = {}

    def add(self, key: str, value: torch.Tensor | float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def observe(self, chunk: Chunk, lp: torch.Tensor, entropy: torch.Tensor | None) -> None:
        """Ratio, sampler↔trainer KL and entropy over the trained tokens of a chunk."""
        trained = (chunk.w != 0) & chunk.valid
        self.tokens += float(trained.sum())
        lp = lp.detach()
        if chunk.q is not None:
            log_ratio = (lp - chunk.q)[trained]
            self.add("ratio", log_ratio.exp().sum())
            self.add("kl", (-log_ratio).sum())  # k1 estimate of KL(sampler ‖ trainer)
            self.add("kl3", (log_ratio.exp() - 1 - log_ratio).sum())  # k3, always ≥ 0
        if entropy is not None:  # the entropies of exactly the trained positions
            self.add("entropy", entropy.sum())

    def metrics(self) -> dict[str, float]:
        n = max(self.tokens, 1.0)
        out = {"num_tokens": self.tokens}
        names = {
            "ratio": "ratio/mean",
            "kl": "kl/sampler_trainer",
            "kl3": "kl/sampler_trainer_k3",
            "entropy": "entropy/mean",
            "clip": "clip/fraction",
            "klref": "kl/reference",
        }
        for key, name in names.items():
            if key in self.sums:
                out[name] = self.sums[key] / n
        return out


def _datum_logprobs(chunks: list[Chunk], lps: list[torch.Tensor], count: int) -> list[np.ndarray]:
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * count
    for chunk, lp in zip(chunks, lps, strict=True):
        lp = lp.detach().cpu()  # one copy per chunk (none on the CPU), not one per datum
        for row, i in enumerate(chunk.index):
            n = int(chunk.valid[row].sum())
            out[i] = lp[row, :n].detach().numpy().astype(np.float32)
    return out


def check_loss_inputs(datums: list[DatumArrays], loss: Loss) -> None:
    """InvalidArgument, before any work, for a datum lacking what `loss` reads (a batch
    split across ranks is checked whole first: see `ranks.RankedCompute`)."""
    if not loss.needs_sampling:
        return
    for i, d in enumerate(datums):
        if d.sampling_logprobs is None or d.advantages is None:
            raise InvalidArgument(
                f"datum {i} has no sampling_logprobs or advantages, which "
                f"{loss.name} needs (use cross_entropy for supervised data)"
            )


def merge_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of one batch from those of its parts (`forward_backward`'s or
    `backward_custom`'s of each rank's share): num_tokens and the `summed_metric` keys add
    up, every other key is a mean over its part's tokens, so the parts are weighted by them."""
    out = {"num_tokens": sum(p.get("num_tokens", 0.0) for p in parts)}
    for key in dict.fromkeys(k for p in parts for k in p if k != "num_tokens"):
        have = [p for p in parts if key in p]
        if summed_metric(key):
            out[key] = sum(p[key] for p in have)
        else:
            tokens = sum(p.get("num_tokens", 0.0) for p in have)
            out[key] = sum(p[key] * p.get("num_tokens", 0.0) for p in have) / max(tokens, 1.0)
    return out


def forward_backward(
    state: ModelState,
    datums: list[DatumArrays],
    loss: Loss,
    cfg: dict[str, float],
    microbatch_tokens: int,
    mode: ComputeMode = DEFAULT,
    kl: KlTerm | None = None,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Accumulate the gradient of `loss` (plus `kl`'s penalty) over the batch;
    (per-datum logprobs, metrics)."""
    check_loss_inputs(datums, loss)
    chunks = make_chunks(datums, microbatch_tokens)
    stats, loss_sum, lps = Stats(), 0.0, []
    device = _device(state)
    for chunk in chunks:
        chunk = chunk.to(device)
        trained = chunk.valid & (chunk.w != 0)
        fwd = chunk_forward(state, chunk, trained, mode)
        inputs = TokenInputs(
            lp=fwd.grad_lp,
            w=chunk.w[trained],
            q=chunk.q[trained] if chunk.q is not None else None,
            a=chunk.a[trained] if chunk.a is not None else None,
        )
        value, extra = loss.fn(inputs, cfg)
        if kl is not None:
            per_token = k3(
                fwd.grad_lp, reference_logprobs(state, kl.reference, chunk, trained, mode)
            )
            stats.add("klref", per_token.detach().sum())
            if kl.coef:  # weighted as the loss is (a mask, or the caller's normalisation)
                value = value + kl.coef * (inputs.w.abs() * per_token).sum()
        if value.requires_grad:
            value.backward()
        loss_sum += float(value.detach())
        stats.observe(chunk, fwd.lp, fwd.entropy)
        if "clip/fraction" in extra:
            stats.add("clip", extra["clip/fraction"] * float(trained.sum()))
        lps.append(fwd.lp)
    metrics = stats.metrics()
    metrics["loss:sum"] = loss_sum
    return _datum_logprobs(chunks, lps, len(datums)), metrics


@dataclass
class KeptForward:
    """A custom-loss forward awaiting its backward: the chunks and, if kept, their graphs.

    It also holds what a retried ForwardCustom answers with (`logprobs`, the datums) and
    the assembled batch the backward reports on; `nbytes` is all of it in memory.
    """

    datums: list[DatumArrays]
    chunks: list[Chunk]
    graphs: list[torch.Tensor] | None  # logprobs with autograd graph, or None: recompute
    mode: ComputeMode  # of the forward, which a recompute repeats
    logprobs: list[np.ndarray] = field(default_factory=list)  # per datum, as replied
    reference_logprobs: list[np.ndarray] | None = None  # per datum, when asked for
    graph_bytes: int = 0  # activations the kept graphs hold (measured, see SavedBytes)
    batch: Any = None  # the assembled Batch: rewards and group metrics for the backward
    # Across ranks: each rank's [start, stop) of `datums` (rank 0's chunks are its own).
    shares: list[tuple[int, int]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes this forward keeps alive: datum arrays, chunk tensors, logprobs, graphs."""
        return self.input_bytes + self.graph_bytes

    @functools.cached_property
    def input_bytes(self) -> int:
        """Bytes of everything but the graphs (computed once: they never change)."""
        arrays = sum(
            a.nbytes
            for d in self.datums
            for a in (d.input_tokens, d.target_tokens, d.weights, d.sampling_logprobs, d.advantages)
            if a is not None
        )
        tensors = sum(
            t.nelement() * t.element_size()
            for c in self.chunks
            for t in (c.ids, c.targets, c.valid, c.w, c.q, c.a)
            if t is not None
        )
        refs = sum(lp.nbytes for lp in self.reference_logprobs or [])
        return arrays + tensors + refs + sum(lp.nbytes for lp in self.logprobs)

    def drop_graphs(self) -> None:
        """Free the kept graphs: the backward recomputes the forward (same numbers)."""
        self.graphs, self.graph_bytes = None, 0


class SavedBytes:
    """Counts the bytes autograd saves for backward (the activations a kept graph holds),
    each storage once, leaving out the module's own parameters and buffers."""

    def __init__(self, module: torch.nn.Module) -> None:
        owned = itertools.chain(module.parameters(), module.buffers())
        self._skip = {t.untyped_storage().data_ptr() for t in owned}
        self._seen: set[int] = set()
        self.nbytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._skip and ptr not in self._seen:
            self._seen.add(ptr)
            self.nbytes += storage.nbytes()
        return t

    def hooks(self) -> Any:
        """The context in which autograd reports what it saves."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def forward_custom(
    state: ModelState,
    datums: list[DatumArrays],
    microbatch_tokens: int,
    keep_graph_tokens: int,
    mode: ComputeMode = DEFAULT,
    reference: Reference | None = None,
) -> KeptForward:
    """Forward the batch; keep the graph when small enough, else plan a recompute. With
    a `reference`, its logprobs of every datum too (for the client's KL term)."""
    chunks = make_chunks(datums, microbatch_tokens)
    keep = sum(c.ids.numel() for c in chunks) <= keep_graph_tokens
    saved = SavedBytes(state.module)
    lps, graphs, refs = [], [], []
    device = _device(state)
    for chunk in chunks:
        # The client may weigh any real position, so all of them carry gradient.
        on_device = chunk.to(device)
        with torch.set_grad_enabled(keep), saved.hooks():
            fwd = chunk_forward(state, on_device, on_device.valid, mode)
        graphs.append(fwd.grad_lp)
        lps.append(fwd.lp)
        if reference is not None:
            ref = torch.zeros(on_device.ids.shape, device=device)
            ref[on_device.valid] = reference_logprobs(
                state, reference, on_device, on_device.valid, mode
            )
            refs.append(ref)
    return KeptForward(
        datums,
        chunks,
        graphs if keep else None,
        mode,
        logprobs=_datum_logprobs(chunks, lps, len(datums)),
        reference_logprobs=_datum_logprobs(chunks, refs, len(datums)) if refs else None,
        graph_bytes=saved.nbytes if keep else 0,
    )


def backward_custom(
    state: ModelState, kept: KeptForward, weights: list[np.ndarray]
) -> dict[str, float]:
    """Backpropagate −Σ w·logprob through the kept (or recomputed) forward; its metrics."""
    stats = Stats()
    device = _device(state)
    for k, host_chunk in enumerate(kept.chunks):
        chunk = host_chunk.to(device)
        if kept.graphs is not None:
            grad_lp = kept.graphs[k]
        else:  # same inputs, same numbers
            grad_lp = chunk_forward(state, chunk, chunk.valid, kept.mode).grad_lp
        w = torch.zeros_like(host_chunk.w)
        for row, i in enumerate(chunk.index):
            w[row, : len(weights[i])] = torch.from_numpy(weights[i])
        w = to_device(w, device)
        surrogate = -(w[chunk.valid] * grad_lp).sum()
        if surrogate.requires_grad:
            surrogate.backward()
        # Ratio and KL are reported over the positions the client trained (w ≠ 0).
        lp = torch.zeros(chunk.ids.shape, device=device)
        lp[chunk.valid] = grad_lp.detach()
        weighted = Chunk(chunk.index, chunk.ids, chunk.targets, chunk.valid, w, chunk.q, chunk.a)
        stats.observe(weighted, lp, None)
    kept.drop_graphs()
    return stats.metrics()


def _device(state: ModelState) -> torch.device:
    """The device the state's module computes on."""
    return state.module.lm_head.weight.device


def check_adam(lr: float, beta1: float, beta2: float, eps: float, wd: float, clip: float) -> None:
    """InvalidArgument for AdamW hyperparameters that would corrupt the weights."""
    if not (math.isfinite(lr) and lr > 0):
        raise InvalidArgument(f"learning_rate must be a finite number > 0; got {lr}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not (math.isfinite(beta) and 0 <= beta < 1):
            raise InvalidArgument(f"{name} must lie in [0, 1); got {beta}")
    if not (math.isfinite(eps) and eps > 0):
        raise InvalidArgument(f"eps must be a finite number > 0; got {eps}")
    if not (math.isfinite(wd) and wd >= 0):
        raise InvalidArgument(f"weight_decay must be a finite number ≥ 0; got {wd}")
    if not (math.isfinite(clip) and clip >= 0):
        raise InvalidArgument(f"grad_clip_norm must be a finite number ≥ 0 (0 = off); got {clip}")


def optim_step(
    state: ModelState, lr: float, beta1: float, beta2: float, eps: float, wd: float, clip: float
) -> float:
    """Apply AdamW to the accumulated gradient; returns the gradient norm before clipping."""
    if not state.acc.has_grad:
        raise FailedPrecondition(
            "no gradient accumulated since the last optim_step: call forward_backward first"
        )
    return apply_adamw(state, lr, beta1, beta2, eps, wd, clip)


def apply_adamw(
    state: ModelState, lr: float, beta1: float, beta2: float, eps: float, wd: float, clip: float
) -> float:
    """`optim_step` without its precondition: what every rank runs on the summed gradient
    (a rank whose share of the batch was empty accumulated nothing itself)."""
    params = [p for p in state.params.values() if p.grad is not None]
    # The norm is a metric of every step; scaling the gradients (a pass over all of them,
    # ~1/3 of a LoRA fork's AdamW) only happens when clipping is on.
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    for group in state.optimizer.param_groups:
        group.update(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return float(norm)
