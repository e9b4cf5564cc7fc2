"""The `logprobs` of OpenAI-compatible replies, from a sampler's tokens and logprobs.

Two shapes, as OpenAI defines them (and vLLM serves them):

- chat (`/v1/chat/completions`, `logprobs: true`, `top_logprobs: k`): `{"content": [...]}`,
  one entry per token with its text, logprob, UTF-8 bytes and its position's k most likely
  tokens (`top_logprobs`, most likely first; the drawn token may not be among them);
- legacy text completions (`/v1/completions`, `logprobs: k`): parallel arrays `tokens`,
  `token_logprobs`, `top_logprobs` (per position a `{token: logprob}` object of the k most
  likely tokens and the drawn one, so up to k + 1 entries) and `text_offset` (where each
  token's text starts in the choice's text). With `echo` the prompt's tokens come first;
  the first prompt token, predicted by nothing, has null for its logprob and top logprobs.

Every logprob is the policy's at temperature 1 (the sampler's), whatever drew the token.
Gateway code: no torch. A unary reply's run on the worker threads (every token is
decoded); a stream's, chunk by chunk as they arrive (a few tokens each).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from headway.modeling.tokenizer import Tokenizer
from headway.v1 import common_pb2

# Per position: (the k most likely ids, their logprobs), or None when not asked.
Tops = list[tuple[list[int], list[float]]] | None


def tops_of(ids: common_pb2.Tensor, lps: common_pb2.Tensor) -> Tops:
    """The per-position most likely tokens of a reply's [T, k] tensors (None if unset)."""
    if len(ids.shape) != 2:
        return None
    shape = tuple(ids.shape)
    top_ids = np.frombuffer(ids.data, np.int32).reshape(shape).tolist()
    top_lps = np.frombuffer(lps.data, np.float32).reshape(shape).tolist()
    return list(zip(top_ids, top_lps, strict=True))


class Pieces:
    """Token texts, each decoded once per reply (top logprobs repeat the same tokens)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.seen = tok, {}

    def __call__(self, token: int) -> str:
        piece = self.seen.get(token)
        if piece is None:
            piece = self.seen[token] = self.tok.decode([token])
        return piece


def chat_logprobs(pieces: Pieces, ids: list[int], lps: list[float], tops: Tops) -> dict[str, Any]:
    """A chat choice's (or stream delta's) `logprobs`."""
    content = []
    for i, (token, lp) in enumerate(zip(ids, lps, strict=True)):
        piece = pieces(token)
        entry = {"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []}
        if tops is not None:
            entry["top_logprobs"] = [
                {"token": pieces(t), "logprob": v, "bytes": list(pieces(t).encode())}
                for t, v in zip(*tops[i], strict=True)
            ]
        content.append(entry)
    return {"content": content}


class LegacyLogprobs:
    """A text completion choice's `logprobs`, built position by position (a stream adds
    each chunk's tokens and sends what they added)."""

    def __init__(self, pieces: Pieces, top_k: int) -> None:
        self.pieces, self.top_k = pieces, top_k
        self.offset = 0  # characters of text so far

    def add(
        self, ids: list[int], lps: list[float | None], tops: Tops, first_unscored: bool = False
    ) -> dict[str, Any]:
        """The arrays for tokens `ids` (`first_unscored`: the first is a prompt's first
        token, which has no logprob)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}  # fmt: skip
        for i, (token, lp) in enumerate(zip(ids, lps, strict=True)):
            piece = self.pieces(token)
            out["tokens"].append(piece)
            out["text_offset"].append(self.offset)
            self.offset += len(piece)
            if first_unscored and i == 0:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(lp)
            top: dict[str, float] = {}
            if tops is not None:
                index = i - 1 if first_unscored else i
                for t, v in zip(*tops[index], strict=True):
                    top.setdefault(self.pieces(t), v)
            top.setdefault(piece, lp)  # the drawn token's, as OpenAI adds it
            out["top_logprobs"].append(top)
        return out


def legacy_logprobs(
    pieces: Pieces,
    top_k: int,
    ids: list[int],
    lps: list[float],
    tops: Tops,
    echo: tuple[list[int], list[float], Tops] | None = None,
) -> dict[str, Any]:
    """A whole text completion choice's `logprobs`; `echo`: the prompt's ids, logprobs
    (one fewer than ids) and most likely tokens, which come first."""
    built = LegacyLogprobs(pieces, top_k)
    if echo is None:
        return built.add(ids, lps, tops)
    p_ids, p_lps, p_tops = echo
    head = built.add(p_ids, [None, *p_lps], p_tops, first_unscored=True)
    tail = built.add(ids, lps, tops)
    return {key: head[key] + tail[key] for key in head}
