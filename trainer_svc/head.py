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
from pathlib import Path
from typing import Any

import torch

from headway.modeling import token_logprobs


def _l2_bytes() -> int:
    """This CPU's L2 cache per core (Linux sysfs), 1 MiB where it cannot be read."""
    try:
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 2**10, "M": 2**20}.get(size[-1], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 2**20


# Bytes of logits per row block: half the L2, so a block and its temporary stay in cache
# across the max, exp, sum and dot that sweep it. Not a sensitive choice: on an AMD EPYC
# (1 MiB L2) blocks of 128 KiB to 8 MiB and the whole tensor at once all measured within
# 10% of each other, against ~50% for the unfused ops this replaces.
BLOCK_BYTES = _l2_bytes() // 2


def _block_rows(vocab: int) -> int:
    return max(1, BLOCK_BYTES // (4 * vocab))


def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, entropies, softmax `[k, V]` fp32) of `hidden @ weight.T`."""
    logits = hidden @ weight.t()  # [k, V], the compute dtype
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
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.dtypes = (hidden.dtype, weight.dtype)  # of the inputs as given, for the grads
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # the matmuls in the autocast dtype
            compute = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(compute), weight.to(compute)
        with torch.autocast(device, enabled=False):  # the softmax in fp32, whatever the mode
            lp, ent, probs = _forward(hidden, weight, targets)
        ctx.save_for_backward(hidden, weight, targets, probs)
        ctx.mark_non_differentiable(ent)
        ctx.used = False
        return lp, ent

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_lp: torch.Tensor, grad_ent: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        if ctx.used:
            raise RuntimeError("HeadLogprobs's graph supports one backward pass")
        ctx.used = True
        hidden, weight, targets, probs = ctx.saved_tensors
        # d lp_i / d z_ij = [j = t_i] − p_ij: the softmax buffer becomes the gradient.
        grad = probs.mul_(-grad_lp[:, None])
        k, vocab = grad.shape
        flat = torch.arange(k, device=grad.device) * vocab + targets
        grad.view(-1).index_add_(0, flat, grad_lp)
        grad = grad.to(hidden.dtype)  # the compute dtype (no copy in fp32)
        hidden_dtype, weight_dtype = ctx.dtypes
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = (grad @ weight).to(hidden_dtype) if need_hidden else None
        grad_weight = (grad.t() @ hidden).to(weight_dtype) if need_weight else None
        return grad_hidden, grad_weight, None


def head_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs `[k]` of `targets` under `hidden` `[k, H]` @ `weight.T`, and the entropy
    `[k]` of each row — or None for the entropy when no graph is built (the logprobs alone
    are then computed, without the softmax)."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        lp, ent = HeadLogprobs.apply(hidden, weight, targets)
        return lp, ent
    return token_logprobs(hidden @ weight.t(), targets), None
