"""Per-token logprobs: the one function the sampler and the trainer both call.

Sampler logprobs and trainer logprobs are computed by the same code on the same logits
layout, so the importance ratio exp(trainer − sampler) is exactly 1 for an unchanged
policy (up to the kernel differences of batching), instead of the few-percent drift users
of separate inference and training stacks fight.

Logprobs are always those of the policy at temperature 1: temperature, top-p and top-k
shape which token is drawn, never the logprob reported for it.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for `logits` `[..., V]` and `targets` `[...]`, in fp32.

    Computed as logit[target] − logsumexp(logits), which never materialises the full
    `[..., V]` log-softmax (the vocabulary projection of a long sequence is the largest
    tensor of a training step).
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` most likely tokens of `logits` `[..., V]` and their logprobs, each `[..., k]`,
    most likely first, at temperature 1 (fp32).

    The same arithmetic as `token_logprobs` (logit − logsumexp), so the entry of a token
    that was drawn equals its reported logprob to the bit.
    """
    logits = logits.float()
    values, ids = torch.topk(logits, k, dim=-1)
    return ids, values - torch.logsumexp(logits, dim=-1, keepdim=True)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy `[...]` of the categorical distribution over the last dim of `logits` (fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
