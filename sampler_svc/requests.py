"""From a `SampleRequest` to the engine's `GenerationJob`, and from engine events back to
sequences.

This is the service edge of sampling: it validates the request against the model and the
replica's limits, turns text into ids, builds each row's seeded draw, and, as tokens come
back, decodes text and applies stop strings (which the engine, speaking ids only, cannot;
`stops` does both incrementally).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from headway.errors import InvalidArgument, ResourceExhausted
from headway.modeling import Tokenizer
from headway.store import ModelRecord
from headway.tensors import declared_size
from headway.tensors import tokens as tensor_tokens
from headway.v1 import common_pb2, sampling_pb2
from sampler_svc.config import SamplerConfig
from sampler_svc.engine import GenerationJob
from sampler_svc.sampling import DrawParams
from sampler_svc.stops import IncrementalDecoder, StopScanner


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
    top_logprobs: int = 0  # most likely tokens reported per position


def row_generator(seed: int, row: int) -> torch.Generator:
    """Row `row`'s generator for a request seeded `seed` (independent of batch placement)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + row) % (1 << 63))


def validate(
    request: sampling_pb2.SampleRequest,
    record: ModelRecord,
    tokenizer: Tokenizer,
    config: SamplerConfig,
) -> Spec:
    """Check a request against the model and limits; InvalidArgument / ResourceExhausted.

    Sizes are checked before the work they would cost: the prompt's length from its bytes
    before its ids are read, prompt_text's length before it is tokenized.
    """
    vocab = int(record.arch["vocab_size"])
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
    if not 0 <= p.top_logprobs <= config.max_top_logprobs:
        raise InvalidArgument(
            f"top_logprobs must lie in 0..{config.max_top_logprobs} (0 = none); "
            f"got {p.top_logprobs}"
        )
    stops = _stop_strings(p, config)
    stop_ids = _stop_ids(p, record, config)
    limit = min(int(record.arch["max_context"]), config.max_seq_len)
    prompt = _prompt(request, tokenizer, p.max_tokens, limit, config)
    bad = next((i for i, t in enumerate(prompt) if t >= vocab), None)
    if bad is not None:
        raise InvalidArgument(
            f"prompt_tokens[{bad}] is token id {prompt[bad]}, outside the vocabulary "
            f"(valid ids are 0..{vocab - 1})"
        )
    seed = p.seed if p.HasField("seed") else secrets.randbits(62)
    draw = [DrawParams(temperature, top_p, p.top_k, row_generator(seed, i)) for i in range(n)]
    return Spec(
        prompt, n, p.max_tokens, stops, stop_ids, draw, request.include_prompt_logprobs,
        min(p.top_logprobs, vocab),
    )  # fmt: skip


def _stop_strings(p: common_pb2.SamplingParams, config: SamplerConfig) -> list[str]:
    """The non-empty stop strings, within the count and length limits (InvalidArgument)."""
    if len(p.stop) > config.max_stop_strings:
        raise InvalidArgument(
            f"stop has {len(p.stop)} strings; at most {config.max_stop_strings} are allowed"
        )
    for i, stop in enumerate(p.stop):
        if len(stop) > config.max_stop_string_chars:
            raise InvalidArgument(
                f"stop[{i}] is {len(stop)} characters long; a stop string may have at most "
                f"{config.max_stop_string_chars}"
            )
    return [s for s in p.stop if s]


def _stop_ids(
    p: common_pb2.SamplingParams, record: ModelRecord, config: SamplerConfig
) -> frozenset[int]:
    """stop_token_ids (within the count limit and the vocabulary), plus eos unless ignored."""
    vocab = int(record.arch["vocab_size"])
    if len(p.stop_token_ids) > config.max_stop_token_ids:
        raise InvalidArgument(
            f"stop_token_ids has {len(p.stop_token_ids)} ids; at most "
            f"{config.max_stop_token_ids} are allowed"
        )
    for t in p.stop_token_ids:
        if not 0 <= t < vocab:
            raise InvalidArgument(f"stop_token_ids has {t}, outside the vocabulary")
    stop_ids = set(p.stop_token_ids)
    if not p.ignore_eos:
        stop_ids |= set(record.arch.get("eos_token_ids", []))
    return frozenset(stop_ids)


def _prompt(
    request: sampling_pb2.SampleRequest,
    tokenizer: Tokenizer,
    max_tokens: int,
    limit: int,
    config: SamplerConfig,
) -> list[int]:
    """The prompt's ids, its length checked against the context before it is read."""

    def check(length: int) -> None:
        if length + max_tokens > limit:
            raise ResourceExhausted(
                f"prompt ({length} tokens) + max_tokens ({max_tokens}) is over the "
                f"context of {limit} tokens; shorten the prompt or lower max_tokens"
            )

    kind = request.WhichOneof("prompt")
    if kind == "prompt_tokens":
        check(declared_size(request.prompt_tokens))  # from the byte count: nothing decoded
        prompt = tensor_tokens(request.prompt_tokens, "prompt_tokens").tolist()
    elif kind == "prompt_text":
        chars = len(request.prompt_text)
        if chars > config.max_prompt_text_chars:
            raise ResourceExhausted(
                f"prompt_text is {chars} characters long, over this sampler's limit of "
                f"{config.max_prompt_text_chars}; shorten it"
            )
        prompt = tokenizer.encode(request.prompt_text)
    else:
        prompt = []
    if not prompt:
        raise InvalidArgument("the prompt is empty: give prompt_tokens or prompt_text")
    check(len(prompt))
    return prompt


def logprob_sequences(
    request: sampling_pb2.ComputeLogprobsRequest, record: ModelRecord, config: SamplerConfig
) -> list[list[int]]:
    """The token sequences of a ComputeLogprobs request, checked against the model and the
    per-call token limit (from their byte sizes, before any is decoded)."""
    vocab, context = int(record.arch["vocab_size"]), int(record.arch["max_context"])
    limit = config.max_logprobs_tokens
    if not request.sequences:
        raise InvalidArgument("sequences is empty: give at least one token sequence")
    over = (
        f"over this sampler's limit of {limit} tokens per ComputeLogprobs call; "
        "split the sequences over several calls"
    )
    if 2 * len(request.sequences) > limit:  # each needs ≥ 2 tokens: refused without a scan
        raise ResourceExhausted(f"{len(request.sequences)} sequences of ≥ 2 tokens are {over}")
    sizes = [declared_size(t) for t in request.sequences]
    if sum(sizes) > limit:
        raise ResourceExhausted(f"the sequences hold {sum(sizes)} tokens, {over}")
    seqs = []
    for i, (t, size) in enumerate(zip(request.sequences, sizes, strict=True)):
        if size > context:
            raise ResourceExhausted(
                f"sequences[{i}] has {size} tokens, over the context of {context}"
            )
        ids = tensor_tokens(t, f"sequences[{i}]")
        if len(ids) < 2:
            raise InvalidArgument(f"sequences[{i}] has {len(ids)} tokens; logprobs need ≥ 2")
        if int(ids.max()) >= vocab:
            pos = int(np.argmax(ids >= vocab))
            raise InvalidArgument(
                f"sequences[{i}][{pos}] is token id {int(ids[pos])}, outside "
                f"the vocabulary (valid ids are 0..{vocab - 1})"
            )
        seqs.append(ids.tolist())
    return seqs


class SequenceState:
    """One of the n sequences as it grows: tokens, logprobs, text, why it ended."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.scanner = StopScanner(stops)
        self.logprobs: list[float] = []
        # Per token, its position's most likely (ids, logprobs), when top_logprobs is asked.
        self.tops: list[tuple[list[int], list[float]]] = []
        self._text: list[str] = []  # released pieces
        self.stop_reason = ""  # "" while running, then "stop" or "length"

    @property
    def tokens(self) -> list[int]:
        return self.decoder.tokens

    @property
    def text(self) -> str:
        """The text released so far (all of it once the sequence has ended)."""
        return "".join(self._text)

    def add(
        self, token: int, logprob: float, top: tuple[list[int], list[float]] | None = None
    ) -> tuple[str, bool]:
        """Fold in a token (with its position's most likely tokens, when asked): (text
        released, True if it completed a stop string)."""
        self.logprobs.append(logprob)
        if top is not None:
            self.tops.append(top)
        text, stopped = self.scanner.feed(self.decoder.push(token))
        self._text.append(text)
        if stopped:
            self.stop_reason = "stop"
        return text, stopped

    def end(self, reason: str) -> str:
        """The engine ended the sequence: release the text held back; returns it."""
        text, stopped = self.scanner.feed(self.decoder.flush())
        if not stopped:
            text += self.scanner.finish()
        self._text.append(text)
        self.stop_reason = "stop" if stopped else reason
        return text


@dataclass
class Update:
    """What one engine event changed in a sequence (what a stream sends)."""

    row: int
    token: tuple[int, float] | None  # the token it added, with its logprob
    text: str  # text released by it
    stop_reason: str  # "" unless it ended the sequence
    top: tuple[list[int], list[float]] | None = None  # the position's most likely tokens


Event = tuple[str, int, Any]  # (kind, row, payload), as `GenerationJob.emit` is called


class Collector:
    """Turns a job's engine events into sequences, applying stop strings at the edge.

    Events arrive in batches: the engine emits a token per row per step from its thread,
    and waking the event loop for each (a self-pipe write, a loop turn, a GIL handover
    while the engine's matmul threads want the cores) cost a batch-8 stream a tenth of
    its speed. The engine flushes once a step's events are all emitted (`job.flush`): one
    wake-up carries them, and any emitted before the loop runs it (several steps' when the
    loop is behind). An error, emitted from any thread, wakes the loop at once.

    `live=False` (a unary Sample without stop strings: nobody reads a token before the end,
    and no stop string has to be found as it is made) wakes the loop only for an event
    that ends a sequence (or an error): the replica's event loop then takes no CPU from
    the decoding per step (measured ~0.8 ms of it per step at batch 1 on a 2-core EPYC,
    time the engine's matmul threads wait for a core).

    `interval` (seconds; `SamplerConfig.stream_interval_ms`, given to streams only: a
    unary call with stop strings finds them at every step, so that the engine frees a
    stopped row at once): a live collector wakes the loop at most that often. The first
    tokens and an end the engine reports (a stop token, the length; or an error) wake it at
    once; tokens drawn in between wait at most `interval` (a timer on the loop, whatever
    the engine does meanwhile) and leave together, a chunk per sequence.
    Each wake-up costs the loop a message per sequence, and the loop's thread holds the
    GIL the engine needs between its ops: a batch-8 bf16 stream decoded 12-14 % slower
    woken at every step than woken every fourth (2-core EPYC, `make bench-sampler`).
    """

    def __init__(
        self,
        spec: Spec,
        tokenizer: Tokenizer,
        loop: asyncio.AbstractEventLoop,
        live: bool = True,
        interval: float = 0.0,
    ) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self.live, self.interval = live, interval
        self._ending = False  # an event that ends a sequence (or an error) is pending
        self._next_wake = 0.0  # monotonic time from which a live flush wakes the loop
        self._timer_due = False  # a delayed _deliver is (being) armed and has not run yet
        self._timer: asyncio.TimerHandle | None = None  # that delivery (loop thread only)
        self.sequences = [SequenceState(tokenizer, spec.stop) for _ in range(spec.n)]
        self.prompt_logprobs: list[float] | None = None
        # The prompt positions' most likely (ids, logprobs), with prompt logprobs and top_logprobs.
        self.prompt_top: tuple[list, list] | None = None
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self._loop = loop
        self._lock = threading.Lock()  # emitters: the engine thread, and error paths
        self._pending: list[Event] = []
        self._wake_due = False  # a _deliver is scheduled and has not run yet
        self.job = GenerationJob(
            prompt=spec.prompt,
            n=spec.n,
            max_tokens=spec.max_tokens,
            stop_ids=spec.stop_ids,
            draw=spec.draw,
            prompt_logprobs=spec.prompt_logprobs,
            top_logprobs=spec.top_logprobs,
            emit=self._emit,
            flush=self._flush,
        )

    def _emit(self, *event: Any) -> None:
        """Any thread: queue `event` (until the engine's flush; an error flushes now)."""
        with self._lock:
            self._pending.append(event)  # type: ignore[arg-type]
            self._ending = self._ending or event[0] in ("done", "error")
        if event[0] == "error":
            self._flush()

    def _flush(self) -> None:
        """Any thread: wake the loop to take the queued events, unless a wake-up is due;
        a live collector within its interval since the last one arms a timer instead."""
        now = time.monotonic()
        with self._lock:
            if not self._pending or self._wake_due:
                return
            wake = self._ending or (self.live and now >= self._next_wake)
            timer = not wake and self.live and not self._timer_due
            self._wake_due, self._timer_due = wake, self._timer_due or timer
        if wake:
            self._loop.call_soon_threadsafe(self._deliver)
        elif timer:
            self._loop.call_soon_threadsafe(self._arm, self._next_wake)

    def _arm(self, when: float) -> None:
        """On the loop: deliver at monotonic time `when` (a timer replacing any left)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(max(0.0, when - time.monotonic()), self._deliver)

    def _deliver(self) -> None:
        """On the loop: hand the events gathered so far to the consumer, as one batch; a
        timer still armed is cancelled (the next interval starts now)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            events, self._pending = self._pending, []
            self._wake_due = self._timer_due = self._ending = False
            self._next_wake = time.monotonic() + self.interval
        if events:
            self.queue.put_nowait(events)

    async def next_events(self) -> list[Event]:
        """The events that arrived since the last call (waits for at least one)."""
        events = await self.queue.get()
        while not self.queue.empty():
            events += self.queue.get_nowait()
        return events

    @property
    def done(self) -> bool:
        return all(s.stop_reason for s in self.sequences)

    def apply(self, kind: str, row: int, payload: Any) -> Update | None:
        """Fold one engine event in; what it changed, or None if nothing."""
        if kind == "prompt_logprobs":
            self.prompt_logprobs = payload
            return None
        if kind == "prompt_top":
            self.prompt_top = payload
            return None
        seq = self.sequences[row]
        if seq.stop_reason:  # ended at the edge by a stop string: later tokens are dropped
            return None
        if kind == "done":
            return Update(row, None, seq.end(payload), seq.stop_reason)
        token, lp, *top = payload
        text, stopped = seq.add(token, lp, *top)
        if stopped:
            self.job.stopped_rows.add(row)  # the engine frees the row at its next step
        return Update(row, (token, lp), text, seq.stop_reason, *top)
