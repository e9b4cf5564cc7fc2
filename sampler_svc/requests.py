"""From a `SampleRequest` to an engine `Job`, and from engine events back to sequences.

This is the service edge of sampling: it validates the request against the model and the
replica's limits, turns text into ids, builds each row's seeded draw, and, as tokens come
back, decodes text and applies stop strings (which the engine, speaking ids only, cannot).
"""

from __future__ import annotations

import asyncio
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from headway.errors import InvalidArgument, ResourceExhausted
from headway.modeling import Tokenizer
from headway.store import ModelRecord
from headway.tensors import tokens as tensor_tokens
from headway.v1 import sampling_pb2
from sampler_svc.config import SamplerConfig
from sampler_svc.engine import Job
from sampler_svc.sampling import DrawParams


@dataclass
class Spec:
    """A validated request."""

    prompt: list[int]
    n: int
    max_tokens: int
    stop: list[str]
    stop_ids: frozenset[int]
    draw: list[DrawParams]
    prompt_logprobs: bool


def row_generator(seed: int, row: int) -> torch.Generator:
    """Row `row`'s generator for a request seeded `seed` (independent of batch placement)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + row) % (1 << 63))


def validate(
    request: sampling_pb2.SampleRequest,
    record: ModelRecord,
    tokenizer: Tokenizer,
    config: SamplerConfig,
) -> Spec:
    """Check a request against the model and limits; InvalidArgument / ResourceExhausted."""
    vocab, context = int(record.arch["vocab_size"]), int(record.arch["max_context"])
    kind = request.WhichOneof("prompt")
    if kind == "prompt_tokens":
        prompt = [int(t) for t in tensor_tokens(request.prompt_tokens, "prompt_tokens")]
    elif kind == "prompt_text":
        prompt = tokenizer.encode(request.prompt_text)
    else:
        prompt = []
    if not prompt:
        raise InvalidArgument("the prompt is empty: give prompt_tokens or prompt_text")
    bad = next((i for i, t in enumerate(prompt) if t >= vocab), None)
    if bad is not None:
        raise InvalidArgument(
            f"prompt_tokens[{bad}] is token id {prompt[bad]}, outside the vocabulary "
            f"(valid ids are 0..{vocab - 1})"
        )
    p = request.params
    temperature = p.temperature if p.HasField("temperature") else 1.0
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidArgument(f"temperature must be ≥ 0 (0 = greedy); got {temperature}")
    if not (0 < top_p <= 1):
        raise InvalidArgument(f"top_p must lie in (0, 1]; got {top_p}")
    if p.top_k < 0:
        raise InvalidArgument(f"top_k must be ≥ 0 (0 = off); got {p.top_k}")
    if p.n < 0:
        raise InvalidArgument(f"n must be ≥ 1; got {p.n}")
    n = p.n or 1
    if n > config.max_n:
        raise ResourceExhausted(f"n = {n} is over this sampler's limit of {config.max_n}")
    if n > config.max_batch:
        raise ResourceExhausted(f"n = {n} is over this sampler's batch of {config.max_batch}")
    if p.max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be ≥ 1; got {p.max_tokens}")
    limit = min(context, config.max_seq_len)
    if len(prompt) + p.max_tokens > limit:
        raise ResourceExhausted(
            f"prompt ({len(prompt)} tokens) + max_tokens ({p.max_tokens}) is over the "
            f"context of {limit} tokens; shorten the prompt or lower max_tokens"
        )
    for t in p.stop_token_ids:
        if not 0 <= t < vocab:
            raise InvalidArgument(f"stop_token_ids has {t}, outside the vocabulary")
    stop_ids = set(p.stop_token_ids)
    if not p.ignore_eos:
        stop_ids |= set(record.arch.get("eos_token_ids", []))
    seed = p.seed if p.HasField("seed") else secrets.randbits(62)
    draw = [DrawParams(temperature, top_p, p.top_k, row_generator(seed, i)) for i in range(n)]
    return Spec(
        prompt,
        n,
        p.max_tokens,
        [s for s in p.stop if s],
        frozenset(stop_ids),
        draw,
        request.include_prompt_logprobs,
    )


@dataclass
class SequenceState:
    """One of the n sequences as it grows: tokens, logprobs, text, why it ended."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    stop_reason: str = ""  # "" while running, then "stop" or "length"


class Collector:
    """Turns a job's engine events into sequences, applying stop strings at the edge."""

    def __init__(self, spec: Spec, tokenizer: Tokenizer, loop: asyncio.AbstractEventLoop) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self.sequences = [SequenceState() for _ in range(spec.n)]
        self.prompt_logprobs: list[float] | None = None
        self.queue: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
        self.job = Job(
            prompt=spec.prompt,
            n=spec.n,
            max_tokens=spec.max_tokens,
            stop_ids=spec.stop_ids,
            draw=spec.draw,
            prompt_logprobs=spec.prompt_logprobs,
            emit=lambda *event: loop.call_soon_threadsafe(self.queue.put_nowait, event),
        )

    @property
    def done(self) -> bool:
        return all(s.stop_reason for s in self.sequences)

    def apply(self, kind: str, row: int, payload: Any) -> tuple[int, str] | None:
        """Fold one event in; returns (row, new text) for a token event that counted."""
        if kind == "prompt_logprobs":
            self.prompt_logprobs = payload
            return None
        seq = self.sequences[row]
        if seq.stop_reason:  # ended at the edge by a stop string: later tokens are dropped
            return None
        if kind == "done":
            seq.stop_reason = payload
            return None
        token, lp = payload
        seq.tokens.append(token)
        seq.logprobs.append(lp)
        full = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        cut = self._stop_at(full, len(seq.text))
        if cut is not None:
            full = full[:cut]
            seq.stop_reason = "stop"
            self.job.stopped_rows.add(row)  # the engine frees the row at its next step
        delta = full[len(seq.text) :] if full.startswith(seq.text) else ""
        seq.text = full
        return row, delta

    def _stop_at(self, text: str, seen: int) -> int | None:
        """Index where the earliest stop string starts, searching only new text."""
        best = None
        for stop in self.spec.stop:
            at = text.find(stop, max(0, seen - len(stop) + 1))
            if at != -1 and (best is None or at < best):
                best = at
        return best


def as_array(values: list[int] | list[float], dtype: Any) -> np.ndarray:
    return np.asarray(values, dtype=dtype)
