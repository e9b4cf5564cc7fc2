"""Completions and accuracy of a tiny-arith model on problems, decoded as the sampler does
(a ragged prefill into a KV cache, then one token per row per step). torch is imported
when called."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from headway.bases.tiny_arith.task import chat_messages, reward
from headway.bases.tiny_arith.tokenizer import PAD

if TYPE_CHECKING:
    import torch

    from headway.modeling import Transformer
    from headway.modeling.tokenizer import Tokenizer


def complete(
    model: Transformer,
    tokenizer: Tokenizer,
    problems: Sequence[str],
    *,
    temperature: float = 0.0,
    samples: int = 1,
    max_tokens: int = 6,
    seed: int = 0,
) -> list[list[str]]:
    """`samples` completions (text, special tokens skipped) of each problem's chat.

    Greedy at temperature 0, else sampled at `temperature` from a generator seeded by `seed`.
    A completion stops at eos or after `max_tokens` tokens, as the sampler's would.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    eos = torch.tensor(sorted(tokenizer.eos_token_ids))
    pad = tokenizer.token_to_id(PAD) or 0
    prompts = [tokenizer.apply_chat_template(chat_messages(p)) for p in problems]
    rows = [prompt for prompt in prompts for _ in range(samples)]
    if not rows:
        return [[] for _ in problems]
    # Ragged prefill into a KV cache, then one token per row per step, each row at its own
    # position (as the sampler decodes): right padding never reaches a row's own tokens.
    lens = torch.tensor([len(r) for r in rows])
    width = int(lens.max())
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    caches = model.new_caches(len(rows), width + max_tokens)
    positions = torch.arange(width).expand(len(rows), width)
    new: list[torch.Tensor] = []
    done = torch.zeros(len(rows), dtype=torch.bool)
    with torch.no_grad():
        logits = model(ids, positions, caches=caches, output_index=lens - 1)[:, -1]
        pos = lens
        for _ in range(max_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
            else:
                nxt = logits.argmax(-1)
            new.append(torch.where(done, -1, nxt))
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            logits = model(nxt[:, None], pos[:, None], caches=caches, validate=False)[:, -1]
            pos = pos + 1
    out: list[list[str]] = [[] for _ in problems]
    eos_ids = set(eos.tolist())
    for i, row in enumerate(torch.stack(new, dim=1).tolist()):
        kept = [t for t in row if t >= 0 and t not in eos_ids]
        out[i // samples].append(tokenizer.decode(kept, skip_special_tokens=True))
    return out


def accuracy(
    model: Transformer,
    tokenizer: Tokenizer,
    problems: Sequence[tuple[str, int]],
    *,
    temperature: float = 0.0,
    samples: int = 1,
    seed: int = 0,
) -> float:
    """Mean `reward` over `samples` completions of each problem."""
    texts = [text for text, _ in problems]
    completions = complete(
        model, tokenizer, texts, temperature=temperature, samples=samples, seed=seed
    )
    scores = [reward(t, c) for t, cs in zip(texts, completions, strict=True) for c in cs]
    return sum(scores) / max(len(scores), 1)
