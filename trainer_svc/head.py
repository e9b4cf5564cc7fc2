"""The vocabulary projection fused with its log-softmax: per-token logprobs and entropy.

The `[tokens, vocab]` logits of a training chunk are its largest tensor by far (896 × 32000
fp32 is 115 MB, 8192 × 151936 would be 5 GB). Written as separate torch ops — logits,
`logsumexp`, `gather`, an entropy over a `log_softmax`, and autograd's backward of each —
every step allocates and sweeps that tensor about ten times, each fresh allocation paying
its page faults. `HeadLogprobs` allocates it once: the matmul writes the logits, a pass
over row blocks (each small enough to stay in cache) turns them in place into the softmax
while taking the log-normaliser and the entropy, and the backward turns the same buffer
into the logits' gradient (softmax·(−g), +g at each target) before the two matmuls. The
logprobs are bit for bit those of `headway.modeling.token_logprobs` (the same max, exp
and sum kernels on the same rows), which the sampler reports.

Compute in another dtype (bf16 under autocast) leaves the logits in that dtype; they are
widened to fp32 before the softmax, as the sampler does, and the gradient narrowed back
for the matmuls.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from headway.modeling import token_logprobs
from headway.server import kernel_cache
from trainer_svc.kernels import Kernels

# Bytes of logits per row block: a quarter of the last-level cache, so a block and its
# temporary stay in cache across the max, exp, sum and dot that sweep it, in blocks few
# enough that each op stays large. Measured on an AMD EPYC (32 MiB L3, 2 threads, loaded
# machine): 128-512 KiB blocks 2.6-3.4 s per head fwd+bwd (each small op a parallel
# region that waits for a descheduled thread), 4-16 MiB 1.4-1.7 s, the whole tensor at
# once 1.6 s; one thread, anything from 128 KiB to all within 10%.
BLOCK_BYTES = (kernel_cache.cache_bytes(3) or 32 * 2**20) // 4


def _block_rows(vocab: int) -> int:
    return max(1, BLOCK_BYTES // (4 * vocab))


def _matmul(
    kernels: Kernels | None, role: str, a: torch.Tensor, bt: torch.Tensor, shape: Any
) -> torch.Tensor:
    """a @ btᵀ: by the measured kernels in fp32 on CPU, else torch's own (bf16, GPUs)."""
    device = a.device.type
    if (
        kernels is not None
        and a.dtype == torch.float32
        and device == "cpu"
        and not torch.is_autocast_enabled(device)
    ):
        return kernels.mm(role, a, bt, shape)
    return a @ bt.t()


def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kernels: Kernels | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, entropies, softmax `[k, V]` fp32) of `hidden @ weight.T`."""
    shape = (hidden.shape[0], hidden.shape[1], weight.shape[0])
    logits = _matmul(kernels, "forward", hidden, weight, shape)  # [k, V], the compute dtype
    probs = logits if logits.dtype == torch.float32 else logits.float()
    del logits
    k, vocab = probs.shape
    picked = probs.gather(1, targets[:, None])[:, 0]
    lse = torch.empty(k, device=probs.device)
    ent = torch.empty(k, device=probs.device)
    rows = _block_rows(vocab)
    for r in range(0, k, rows):
        z = probs[r : r + rows]
        # logsumexp's own arithmetic (max, exp(z − max), sum, log + max), so the
        # logprobs equal token_logprobs' bit for bit.
        m = z.amax(-1, keepdim=True)
        m.masked_fill_(m.abs() == math.inf, 0)
        d = z - m
        torch.exp(d, out=z)
        s = z.sum(-1, keepdim=True)
        # H = −Σ p·log p with p = e/s and log p = d − log s: log s − Σ e·d / s.
        dot = torch.linalg.vecdot(z, d)
        log_s = s.log()
        lse[r : r + rows] = (log_s + m)[:, 0]
        ent[r : r + rows] = log_s[:, 0] - dot / s[:, 0]
        z.div_(s)
    return picked - lse, ent, probs


class HeadLogprobs(torch.autograd.Function):
    """(logprob of each target, entropy of each row) of `hidden @ weight.T`, fp32.

    The entropy carries no gradient. The saved softmax buffer becomes the gradient in the
    backward, so the graph supports one backward pass (as every graph of the trainer).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        kernels: Kernels | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.dtypes = (hidden.dtype, weight.dtype)  # of the inputs as given, for the grads
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # the matmuls in the autocast dtype
            compute = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(compute), weight.to(compute)
        with torch.autocast(device, enabled=False):  # the softmax in fp32, whatever the mode
            lp, ent, probs = _forward(hidden, weight, targets, kernels)
        ctx.save_for_backward(hidden, weight, targets, probs)
        ctx.kernels = kernels
        ctx.mark_non_differentiable(ent)
        ctx.used = False
        return lp, ent

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_lp: torch.Tensor, grad_ent: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        if ctx.used:
            raise RuntimeError("HeadLogprobs's graph supports one backward pass")
        ctx.used = True
        hidden, weight, targets, probs = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        k = probs.shape[0]
        # Rows whose logprob gets no gradient (prompt positions a custom loss leaves at 0,
        # the datums of a GRPO group without signal) are moved out before the matmuls.
        rows = _gradient_rows(grad_lp)
        if rows is not None:
            if rows.numel() == 0:  # zeros, not None: AdamW must still see a gradient
                zero_hidden = torch.zeros_like(hidden, dtype=hidden_dtype) if need_hidden else None
                zero_weight = torch.zeros_like(weight, dtype=weight_dtype) if need_weight else None
                return zero_hidden, zero_weight, None, None
            probs = _compact(probs, rows)
            grad_lp, targets, hidden = grad_lp[rows], targets[rows], hidden[rows]
        # d lp_i / d z_ij = [j = t_i] − p_ij: the softmax buffer becomes the gradient.
        grad = probs.mul_(-grad_lp[:, None])
        n, vocab = grad.shape
        flat = torch.arange(n, device=grad.device) * vocab + targets
        grad.view(-1).index_add_(0, flat, grad_lp)
        grad = grad.to(hidden.dtype)  # the compute dtype (no copy in fp32)
        shape = (n, hidden.shape[1], vocab)
        grad_hidden = grad_weight = None
        if need_hidden:
            grad_hidden = _matmul(ctx.kernels, "grad_input", grad, weight.t(), shape)
            grad_hidden = grad_hidden.to(hidden_dtype)
            if rows is not None:
                full = grad_hidden.new_zeros(k, grad_hidden.shape[1])
                grad_hidden = full.index_copy_(0, rows, grad_hidden)
        if need_weight:
            grad_weight = _matmul(ctx.kernels, "grad_weight", grad.t(), hidden.t(), shape)
            grad_weight = grad_weight.to(weight_dtype)
        return grad_hidden, grad_weight, None, None


def _gradient_rows(grad_lp: torch.Tensor) -> torch.Tensor | None:
    """The rows with a non-zero gradient, or None to keep every row.

    Skipping a row saves its share of one or two `[rows, V] × [V, H]` matmuls (~2·H flops
    per element each); moving a row to close the gap costs a copy (8 bytes per element),
    some 6-12× less for any real hidden size. So rows are dropped when the zero rows are
    at least an eighth of the rows that would move.
    """
    nonzero = grad_lp != 0
    zeros = int(nonzero.numel() - nonzero.sum())
    if zeros == 0:
        return None
    rows = nonzero.nonzero()[:, 0]
    first_zero = int((~nonzero).nonzero()[0, 0])
    moved = int((rows > first_zero).sum())
    return rows if 8 * zeros >= moved else None


def _compact(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`buffer[rows]` (`rows` ascending) moved in place to `buffer[:len(rows)]`: copies of
    runs of rows, each in pieces that do not overlap their destination."""
    dst = 0
    for src, length in _runs(rows.tolist()):
        while length and src != dst:
            step = min(length, src - dst)
            buffer[dst : dst + step].copy_(buffer[src : src + step])
            src, dst, length = src + step, dst + step, length - step
        dst += length  # a run already in place
    return buffer[: len(rows)]


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive row indices."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][0] + runs[-1][1] == r:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((r, 1))
    return runs


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    kernels: Kernels | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs `[k]` of `targets` under `hidden` `[k, H]` @ `weight.T`, and the entropy
    `[k]` of each row — or None for the entropy when no graph is built (the logprobs alone
    are then computed, without the softmax)."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        lp, ent = HeadLogprobs.apply(hidden, weight, targets, kernels)
        return lp, ent
    shape = (hidden.shape[0], hidden.shape[1], weight.shape[0])
    return token_logprobs(_matmul(kernels, "forward", hidden, weight, shape), targets), None
