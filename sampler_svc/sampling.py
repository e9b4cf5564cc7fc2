"""Choosing the next token of each row, and the logprob reported for it.

The draw is shaped per row by temperature, top-k and top-p and seeded by the row's own
generator (one uniform number per row and step, mapped through the row's cumulative
distribution), so a request's tokens do not depend on which other requests share its batch
(beyond the last-bit differences of batched kernels). The logprob reported is always the
policy's own at temperature 1, from `token_logprobs`, the function the trainer uses too.

Top-k / top-p keep the same tokens as sorting the whole vocabulary would, without sorting
it for every row: the `CANDIDATES` largest logits (or k, if larger) are taken with topk and
the nucleus is cut among them; only a row whose nucleus reaches past them (a flat
distribution, or top-k above the candidates together with top-p) is sorted in full.
A `DrawPlan` holds a set of rows' settings as tensors, built once per set of rows, on the
device of the logits. Each row's generator is a CPU one on every device (see draw_planned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headway.modeling import token_logprobs
from headway.modeling.placement import to_device


@dataclass
class DrawParams:
    """How one row draws its tokens."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    generator: torch.Generator | None = None


CANDIDATES = 64  # logits taken by topk before a top-p cut; rows needing more are sorted


def _filter_sorted(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (−inf) tokens outside each row's top-k and top-p nucleus, sorting all of `[B, V]`."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    ranks = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    drop = ranks[None] >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep a token while the mass before it is below top_p (the first always stays).
    before = probs.cumsum(-1) - probs
    drop |= before >= top_p[:, None]
    masked = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, masked)


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`_filter_sorted`'s mask from the top candidates of each row; rows whose cut falls
    beyond them (rare) go through the full sort."""
    B, V = logits.shape
    k = torch.where((top_k > 0) & (top_k < V), top_k, torch.full_like(top_k, V))
    C = min(V, max(CANDIDATES, int(k[k < V].max()) if bool((k < V).any()) else 0))
    vals, idx = logits.topk(C, dim=-1)  # sorted, largest first
    ranks = torch.arange(C, device=logits.device)
    in_k = ranks[None] < k[:, None]
    # Each candidate's probability renormalised over the row's top-k (all of V if no k):
    # within the candidates when k ≤ C, else over the whole row.
    small_k = k <= C
    lse_k = torch.logsumexp(vals.masked_fill(~in_k, float("-inf")), dim=-1)
    lse_all = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(vals - torch.where(small_k, lse_k, lse_all)[:, None]).masked_fill(~in_k, 0)
    before = probs.cumsum(-1) - probs
    keep = in_k & (before < top_p[:, None])
    # Exact when the top-k lies among the candidates, or the nucleus closes before the last
    # candidate of an uncut row (then every later token has even more mass before it).
    unfiltered = (k == V) & (top_p >= 1)
    exact = small_k | ((k == V) & (before[:, -1] >= top_p)) | unfiltered
    out = torch.full_like(logits, float("-inf"))
    out.scatter_(-1, idx, vals.masked_fill(~keep, float("-inf")))
    if bool(unfiltered.any()):
        out[unfiltered] = logits[unfiltered]
    if not bool(exact.all()):
        rest = (~exact).nonzero()[:, 0]
        out[rest] = _filter_sorted(logits[rest], top_k[rest], top_p[rest])
    return out


BLOCK = 256  # tokens per block of the two-level cumulative sum


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row whose cumulative-probability interval holds u · total.

    `probs` `[R, V]`, u `[R]` ~ U[0, 1) (fp64, one per row from its own generator). The
    cumulative sum is two-level: over blocks of BLOCK tokens, then within the one block
    that holds the target, instead of over the whole vocabulary (~10x less work at 32K).
    In fp64 a cumulative sum stays put across a token of zero probability (outside top-k /
    top-p), and each target is kept below its (block's) total, so such a token is never
    drawn.
    """
    R, V = probs.shape
    blocks = -(-V // BLOCK)
    p = probs.double()
    if blocks * BLOCK != V:
        p = F.pad(p, (0, blocks * BLOCK - V))
    per_block = p.view(R, blocks, BLOCK)
    cdf = per_block.sum(-1).cumsum(-1)  # [R, blocks]
    zero = torch.zeros(R, dtype=torch.float64, device=probs.device)
    total = cdf[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, zero))
    j = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=blocks - 1)
    before = torch.where(j > 0, cdf.gather(1, (j - 1).clamp(min=0)[:, None])[:, 0], zero)
    inner = per_block[torch.arange(R, device=probs.device), j].cumsum(-1)  # [R, BLOCK]
    local = torch.minimum(target - before, torch.nextafter(inner[:, -1], zero))
    k = torch.searchsorted(inner, local[:, None], right=True)[:, 0]
    return (j * BLOCK + k).clamp_(max=V - 1)


class DrawPlan:
    """The draw settings of a set of rows as tensors (on the logits' `device`) and lists,
    built once for that set."""

    def __init__(self, params: list[DrawParams], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.n = len(params)
        sampled = [i for i, p in enumerate(params) if p.temperature > 0]
        self.sampled = sampled
        self.greedy = len(sampled) < self.n  # some rows take the argmax
        self.rows = (
            None
            if len(sampled) == self.n
            else torch.tensor(sampled, dtype=torch.long, device=device)
        )
        temps = [params[i].temperature for i in sampled]
        # x / 1 is x: temperature 1 skips the division.
        self.temps = (
            torch.tensor(temps, device=device)[:, None] if any(t != 1.0 for t in temps) else None
        )
        top_k = [params[i].top_k for i in sampled]
        top_p = [params[i].top_p for i in sampled]
        self.filtered = any(k > 0 for k in top_k) or any(p < 1 for p in top_p)
        self.top_k = torch.tensor(top_k, device=device)
        self.top_p = torch.tensor(top_p, device=device)
        self.generators = [params[i].generator for i in sampled]


def draw(logits: torch.Tensor, params: list[DrawParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], policy logprobs [B]) for next-token `logits` `[B, V]`."""
    return draw_planned(logits, DrawPlan(params, logits.device))


def draw_planned(logits: torch.Tensor, plan: DrawPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw` with the rows' settings prepared (`DrawPlan`)."""
    logits = logits.float()
    B, V = logits.shape
    assert plan.n == B
    # Greedy rows. max's indices are argmax's (the first largest, NaN first), in a third of
    # its time over a 32K vocabulary on CPU (48 vs 23 µs a row, 190 vs 61 µs at 8 rows).
    tokens = logits.max(-1).indices if plan.greedy or not B else None
    if plan.sampled:
        rows = plan.rows
        scaled = logits if rows is None else logits[rows]
        if plan.temps is not None:
            scaled = scaled / plan.temps
        if plan.filtered:
            scaled = _filter(scaled, plan.top_k, plan.top_p)
        probs = torch.softmax(scaled, dim=-1)
        # Inverse CDF with u ~ U[0, 1) from each row's own generator (one number per step).
        # The generators are CPU ones on every device: a seed draws the same numbers on a
        # CPU and a GPU, and the few numbers cross to the device in one pinned,
        # non-blocking copy (no sync).
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in plan.generators])
        u = to_device(u, logits.device)
        picked = _inverse_cdf(probs, u)
        if tokens is None:
            tokens = picked
        else:
            tokens[rows] = picked
    return tokens, token_logprobs(logits, tokens) if B else torch.zeros(0, device=logits.device)
