"""Choosing the next token of each row, and the logprob reported for it.

The draw is shaped per row by temperature, top-k and top-p and seeded by the row's own
generator, so a request's tokens do not depend on which other requests share its batch
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
    B = logits.shape[0]
    tokens = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        rows = torch.tensor(sampled)
        temps = torch.tensor([params[i].temperature for i in sampled])
        scaled = logits[rows] / temps[:, None]
        top_k = torch.tensor([params[i].top_k for i in sampled])
        top_p = torch.tensor([params[i].top_p for i in sampled])
        if bool((top_k > 0).any() or (top_p < 1).any()):
            scaled = _filter(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        # Exponential race (Gumbel-max): argmax p/E with E ~ Exp(1) is a draw from p;
        # each row's noise comes from its own generator.
        noise = torch.stack(
            [
                torch.empty(logits.shape[-1]).exponential_(generator=params[i].generator)
                for i in sampled
            ]
        )
        tokens[rows] = (probs / noise).argmax(-1)
    return tokens, token_logprobs(logits, tokens) if B else torch.zeros(0)
