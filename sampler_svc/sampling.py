"""Choosing the next token of each row, and the logprob reported for it.

The draw is shaped per row by temperature, top-k and top-p and seeded by the row's own
generator (one uniform number per row and step, mapped through the row's cumulative
distribution), so a request's tokens do not depend on which other requests share its batch
(beyond the last-bit differences of batched kernels). The logprob reported is always the
policy's own at temperature 1, from `token_logprobs`, the function the trainer uses too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headway.modeling import token_logprobs


@dataclass
class DrawParams:
    """How one row draws its tokens."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    generator: torch.Generator | None = None


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (−inf) tokens outside each row's top-k and top-p nucleus; [B, V]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    ranks = torch.arange(V)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    drop = ranks[None] >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep a token while the mass before it is below top_p (the first always stays).
    before = probs.cumsum(-1) - probs
    drop |= before >= top_p[:, None]
    masked = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, masked)


def draw(logits: torch.Tensor, params: list[DrawParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], policy logprobs [B]) for next-token `logits` `[B, V]`."""
    logits = logits.float()
    B, V = logits.shape
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    tokens = logits.argmax(-1) if len(sampled) < B or not B else None  # greedy rows
    if sampled:
        rows = None if len(sampled) == B else torch.tensor(sampled)
        scaled = logits if rows is None else logits[rows]
        temps = [params[i].temperature for i in sampled]
        if any(t != 1.0 for t in temps):  # x / 1 is x: temperature 1 skips the division
            scaled = scaled / torch.tensor(temps)[:, None]
        top_k = [params[i].top_k for i in sampled]
        top_p = [params[i].top_p for i in sampled]
        if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
            scaled = _filter(scaled, torch.tensor(top_k), torch.tensor(top_p))
        probs = torch.softmax(scaled, dim=-1)
        # Inverse CDF: the token whose cumulative-probability interval holds u · total, with
        # u ~ U[0, 1) from the row's own generator (one number per row and step). In fp64
        # the cumulative sum stays put across a token of zero probability (outside top-k /
        # top-p), so such a token is never drawn, and u · total stays below the total.
        u = torch.cat(
            [torch.rand(1, generator=params[i].generator, dtype=torch.float64) for i in sampled]
        )
        cdf = probs.double().cumsum(-1)
        total = cdf[:, -1]
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        picked = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=V - 1)
        if tokens is None:
            tokens = picked
        else:
            tokens[rows] = picked
    return tokens, token_logprobs(logits, tokens) if B else torch.zeros(0)
