"""gRPC `SamplingService` of a sampler replica, thin over `Sampler` and `requests`."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import grpc
import numpy as np

from headway.errors import HeadwayError
from headway.modeling import Tokenizer
from headway.server.grpc import MAPPED_ERRORS, abort_for, maps_errors, team_of
from headway.store import ModelRecord
from headway.tensors import to_tensor
from headway.v1 import common_pb2, sampling_pb2, sampling_pb2_grpc
from sampler_svc.requests import Collector, Update, logprob_sequences, validate
from sampler_svc.sampler import Pending, Sampler

Ctx = grpc.aio.ServicerContext
STOP_REASONS = {"stop": sampling_pb2.STOP_REASON_STOP, "length": sampling_pb2.STOP_REASON_LENGTH}
F32, I32 = common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_INT32


class SamplingServicer(sampling_pb2_grpc.SamplingServiceServicer):
    """Sample, SampleStream, ComputeLogprobs."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.store = sampler.store
        self._tokenizers: dict[str, Tokenizer] = {}

    def _resolve(self, model: str, checkpoint: str, team: str) -> tuple[ModelRecord, str]:
        """The model (if the team sees it) and the checkpoint that serves the request."""
        record = self.store.visible_model(model, team)
        ckpt = checkpoint or self.store.head(model)
        # By id or tag; NotFound for an unknown checkpoint.
        return record, self.store.get_checkpoint(model, ckpt).id

    def _tokenizer(self, record: ModelRecord) -> Tokenizer:
        base = record.base
        if base not in self._tokenizers:
            self._tokenizers[base] = Tokenizer.from_dir(self.store.get_model(base).path)
        return self._tokenizers[base]

    async def _start(
        self, request: sampling_pb2.SampleRequest, context: Ctx, stream: bool
    ) -> tuple[Collector, str]:
        self.sampler.check_alive()  # a dead engine answers at once, so gateways fail over
        record, ckpt = self._resolve(request.model, request.checkpoint, team_of(context))
        tokenizer = self._tokenizer(record)
        spec = validate(request, record, tokenizer, self.sampler.config)
        # A stream sends each step's tokens; stop strings are looked for as text is made
        # (the engine frees a row at its stop); else the events can wait for the end.
        live = stream or bool(spec.stop)
        interval = self.sampler.config.stream_interval_ms / 1e3 if stream else 0.0
        collector = Collector(spec, tokenizer, asyncio.get_running_loop(), live, interval)

        def on_error(error: Exception) -> None:
            collector.job.emit("error", -1, error)

        self.sampler.submit(Pending(request.model, ckpt, collector.job, on_error))
        return collector, ckpt

    @staticmethod
    async def _updates(collector: Collector) -> list[Update]:
        """Fold the job's next engine events (all that have arrived) into `collector`;
        what they changed, in order."""
        updates = []
        for kind, row, payload in await collector.next_events():
            if kind == "error":
                if isinstance(payload, HeadwayError | ValueError):
                    raise payload
                raise RuntimeError(f"sampling failed: {payload}")
            update = collector.apply(kind, row, payload)
            if update is not None:
                updates.append(update)
        return updates

    @maps_errors
    async def Sample(
        self, request: sampling_pb2.SampleRequest, context: Ctx
    ) -> sampling_pb2.SampleResponse:
        collector, ckpt = await self._start(request, context, stream=False)
        try:
            while not collector.done:
                await self._updates(collector)
        finally:
            collector.job.cancelled = not collector.done  # a cancelled call frees its rows
        response = sampling_pb2.SampleResponse(
            model=request.model,
            checkpoint=ckpt,
            prompt_tokens=to_tensor(collector.spec.prompt, I32),
            sequences=[
                sampling_pb2.SampledSequence(
                    tokens=to_tensor(s.tokens, I32),
                    logprobs=to_tensor(s.logprobs, F32),
                    text=s.text,
                    stop_reason=STOP_REASONS[s.stop_reason],
                    **_tops(s.tops, collector.spec.top_logprobs),
                )
                for s in collector.sequences
            ],
        )
        if collector.prompt_logprobs is not None:
            response.prompt_logprobs.CopyFrom(to_tensor(collector.prompt_logprobs, F32))
        _prompt_tops(response, collector)
        return response

    async def SampleStream(
        self, request: sampling_pb2.SampleRequest, context: Ctx
    ) -> AsyncIterator[sampling_pb2.SampleChunk]:
        try:
            collector, ckpt = await self._start(request, context, stream=True)
        except MAPPED_ERRORS as e:
            await abort_for(context, e)
        first = sampling_pb2.SampleChunk(
            checkpoint=ckpt, prompt_tokens=to_tensor(collector.spec.prompt, I32)
        )
        try:
            updates: list[Update] = []
            if collector.spec.prompt_logprobs:  # the job's first event, maybe with tokens
                while collector.prompt_logprobs is None and not collector.done:
                    updates += await self._updates(collector)
                first.prompt_logprobs.CopyFrom(to_tensor(collector.prompt_logprobs or [], F32))
                _prompt_tops(first, collector)
            yield first
            while True:
                # One chunk per sequence and batch of events: when the engine runs ahead
                # of the stream, a chunk carries several tokens (as the contract allows).
                for chunk in _chunks(updates, collector.spec.top_logprobs):
                    yield chunk
                if collector.done:
                    break
                updates = await self._updates(collector)
        except MAPPED_ERRORS as e:
            await abort_for(context, e)
        finally:
            collector.job.cancelled = not collector.done  # the client left: free its rows

    @maps_errors
    async def ComputeLogprobs(
        self, request: sampling_pb2.ComputeLogprobsRequest, context: Ctx
    ) -> sampling_pb2.ComputeLogprobsResponse:
        self.sampler.check_alive()
        record, ckpt = self._resolve(request.model, request.checkpoint, team_of(context))
        seqs = logprob_sequences(request, record, self.sampler.config)
        # Awaited, not run in a thread: the engine thread interleaves it with decode steps,
        # and a caller that leaves cancels the rest of its work.
        result = await asyncio.wrap_future(self.sampler.score(request.model, ckpt, seqs))
        return sampling_pb2.ComputeLogprobsResponse(
            checkpoint=ckpt, logprobs=[to_tensor(lp, F32) for lp in result]
        )


def _tops(tops: list[tuple[list[int], list[float]]], k: int) -> dict[str, common_pb2.Tensor]:
    """SampledSequence / SampleChunk fields of positions' most likely tokens (shape [T, k]);
    none when top_logprobs was not asked."""
    if not k:
        return {}
    ids = np.asarray([t[0] for t in tops], np.int32).reshape(len(tops), k)
    lps = np.asarray([t[1] for t in tops], np.float32).reshape(len(tops), k)
    return {"top_token_ids": to_tensor(ids, I32), "top_logprobs": to_tensor(lps, F32)}


def _prompt_tops(
    message: sampling_pb2.SampleResponse | sampling_pb2.SampleChunk, collector: Collector
) -> None:
    """Set the prompt positions' most likely tokens on `message`, when they were asked."""
    if collector.prompt_top is not None:
        ids, lps = collector.prompt_top
        k = collector.spec.top_logprobs
        message.prompt_top_token_ids.CopyFrom(
            to_tensor(np.asarray(ids, np.int32).reshape(len(ids), k), I32)
        )
        message.prompt_top_logprobs.CopyFrom(
            to_tensor(np.asarray(lps, np.float32).reshape(len(lps), k), F32)
        )


def _chunks(updates: list[Update], top_k: int = 0) -> list[sampling_pb2.SampleChunk]:
    """The stream chunks of `updates`: one per sequence they changed, its tokens (with
    their positions' `top_k` most likely tokens), text and end merged in order."""
    by_row: dict[int, list[Update]] = {}
    for update in updates:
        by_row.setdefault(update.row, []).append(update)
    chunks = []
    for row, ups in by_row.items():
        tokens = [u.token for u in ups if u.token is not None]
        text = "".join(u.text for u in ups)
        stop = next((u.stop_reason for u in ups if u.stop_reason), "")
        if not (tokens or text or stop):
            continue
        chunk = sampling_pb2.SampleChunk(index=row, text=text)
        if tokens:
            # Packed directly (ids the engine drew, logprobs it computed: nothing to check);
            # `to_tensor`'s checks cost ~10x this per chunk, 8 chunks a step at batch 8.
            k = len(tokens)
            ids = struct.pack(f"<{k}i", *(t for t, _ in tokens))
            lps = struct.pack(f"<{k}f", *(lp for _, lp in tokens))
            chunk.tokens.CopyFrom(common_pb2.Tensor(data=ids, dtype=I32, shape=[k]))
            chunk.logprobs.CopyFrom(common_pb2.Tensor(data=lps, dtype=F32, shape=[k]))
            for name, tensor in _tops([u.top for u in ups if u.token is not None], top_k).items():
                getattr(chunk, name).CopyFrom(tensor)
        if stop:
            chunk.stop_reason = STOP_REASONS[stop]
        chunks.append(chunk)
    return chunks
