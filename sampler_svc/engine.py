"""`Engine`: batched decoding for one set of weights, on token ids only.

The engine owns a model (one set of full weights, optionally with an `AdapterBank`) and a
static KV cache of `max_batch` rows × `max_seq_len` positions. Live rows are kept packed at
the front of the cache: a request joins at a step boundary (its prompt is prefilled once
and the cache row copied into its n rows), every step decodes all live rows together, and
a finished or cancelled row leaves by moving the last live row into its place. Attention
reads only the window of positions in use. Text, chat templates and protobuf live at the
service edge; the engine sees ids and reports per-row events.

A decode step (and the prefill of a short prompt whose logprobs are not asked for) runs
every projection, the vocabulary's included, in the layout measured fastest on this
machine for its shape and row count (`sampler_svc.kernels`, chosen when the engine is
built, cached on disk), with q/k/v and gate/up fused into one matmul each
(`multilora.fuse_projections`); the model's own F.linear path, the trainer's, serves prompt
logprobs and ComputeLogprobs (`score`, a piece at a time). Where it measures faster, a
decode step of rows without adapters runs its layers as one compiled graph instead
(`sampler_svc.compiled`). What a step does besides the
matmuls is kept per step, not per row: the rows' positions, last tokens, adapter slots and
draw settings are tensors or lists rebuilt only when the set of rows changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from headway.modeling import KVCache, Transformer, token_logprobs, top_logprobs
from headway.modeling.kv_cache import CacheWindow
from headway.modeling.placement import host_lists
from sampler_svc import compiled
from sampler_svc.kernels import (
    ATTENTION,
    ATTENTIONS,
    Evictor,
    KernelChoice,
    PackedWeights,
    bucket_of,
    cuda_layout,
    packing_available,
)
from sampler_svc.multilora import NO_ADAPTER, AdapterBank, fuse_projections
from sampler_svc.sampling import DrawParams, DrawPlan, draw_planned

WINDOW = 64  # attention windows grow in steps of this many positions (few distinct shapes)


@dataclass
class GenerationJob:
    """A sampling request as the engine sees it: one prompt continued n times (rows).

    Work for the engine thread, like `scoring.ScoringJob`; not the SDK's rollout session
    (`headway.eval.Job`).
    """

    prompt: list[int]
    n: int
    max_tokens: int
    stop_ids: frozenset[int]
    draw: list[DrawParams]  # one per row (its own generator)
    slot: int = NO_ADAPTER  # adapter slot of the checkpoint that serves it
    prompt_logprobs: bool = False
    top_logprobs: int = 0  # the k most likely tokens to report per position (0 = none)
    # Called on the engine thread: ("prompt_top", -1, (ids, logprobs)) once if prompt
    # logprobs and top_logprobs are asked, then ("prompt_logprobs", -1, list) once if asked,
    # then ("token", row, (token, logprob)) per token ((token, logprob, (ids, logprobs))
    # with top_logprobs), ("done", row, "stop" | "length").
    emit: Callable[[str, int, object], None] = lambda *_: None
    # Called on the engine thread once the events of an admission or a step are all
    # emitted: a consumer on another thread takes them in one hand-over.
    flush: Callable[[], None] = lambda: None
    cancelled: bool = False
    stopped_rows: set[int] = field(default_factory=set)  # rows ended from outside (stop strings)
    live_rows: int = 0


@dataclass
class Row:
    job: GenerationJob
    index: int  # which of the job's n sequences
    pos: int  # position at which `last` is fed to the model at the next step
    last: int  # the last token drawn
    generated: int = 0


class Engine:
    """Decode loop state for one weight set."""

    def __init__(
        self,
        model: Transformer,
        bank: AdapterBank | None,
        max_batch: int,
        max_seq_len: int,
        *,
        layout: str | None = None,
        compile: str = "off",
    ) -> None:
        """`layout`: one of `kernels.LAYOUTS` for every few-row matmul, SDPA for attention
        (None: both measured). `compile`: whether decode steps run compiled, one of
        `compiled.MODES` ("auto": where measured faster)."""
        if bank is None:  # no adapter slots: still the bank's fused, measured projections
            bank = AdapterBank(model, slots=0, max_rank=1)
        self.model, self.bank = model, bank
        self.device = next(model.parameters()).device  # every step's tensors are made there
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        # 8 spare positions: a window never spans a whole cache (compiled.py's graphs).
        self.caches: list[KVCache] = model.new_caches(max_batch, max_seq_len, spare=8)
        self.rows: list[Row] = []
        self.mixed_steps = 0  # steps that decoded rows of different adapters together
        self.tokens = 0  # tokens drawn (each admission's first ones and every step's)
        c = model.config
        # oneDNN-blocked copies of the weights whose shapes measure fastest that way.
        dtype = next(model.parameters()).dtype
        self.packed = PackedWeights() if packing_available(self.device, dtype) else None
        shapes = fuse_projections(model, bank)
        self.kernels = KernelChoice(
            shapes,
            max(max_batch, 32),
            force=layout or cuda_layout(self.device),
            heads=(c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            length=min(2 * WINDOW, max_seq_len),
            packed=self.packed,
        )
        self._windows: dict[tuple[int, int, bool], list[KVCache]] = {}
        # (rows, window) of compiled decodes whose guards have passed once (`_decode_compiled`).
        self._guarded: set[tuple[int, int]] = set()
        # Per set of rows (None = stale): their slots, draw plan, whether slots differ, the
        # most likely tokens to report (the most any row asks).
        self._plan: tuple[list[int], DrawPlan, bool, int] | None = None
        self._graph_layouts = compiled.graph_layouts(list(shapes))
        buckets = [b for b in self.kernels.buckets if b <= bucket_of(max_batch)]
        self._graph_attention = self.kernels.graph_attention(
            sorted({self._graph_bucket(b) for b in buckets})
        )
        # Last: it times the decode forward, which needs the layouts and the caches.
        self.compiler = compiled.DecodeCompiler(
            model,
            compile,
            buckets,
            eager=lambda ids, positions, caches: self._forward_few(ids, positions, caches=caches),
            compiled=self._decode_compiled,
            caches=self._window,
            # The window the graph is compiled and timed at: the first one a request uses.
            length=min(WINDOW, max_seq_len),
            max_rows=max_batch,
            kv_only=all(type(c) is KVCache for c in self.caches),
            graph_floor=self._graph_floor,
            evict=Evictor([model.lm_head.weight]),
            variant=self._graph_variant,
        )

    def _graph_bucket(self, bucket: int) -> int:
        """The row bucket whose layouts the compiled decode runs for rows of `bucket`: one
        row runs as two where the engine has a second row (`_decode_compiled`)."""
        return 2 if bucket == 1 and self.max_batch > 1 else bucket

    def _graph_variant(self, bucket: int) -> str:
        """What the compiled decode's time at `bucket` depends on besides the model and the
        machine: its attention, the layouts its projections run, the caches' size."""
        b = self._graph_bucket(bucket)
        picks = ",".join(name for (_, bb), name in sorted(self.kernels.choice.items()) if bb == b)
        return (
            f"attention {self._graph_attention}, layouts {picks}, "
            f"cache {self.max_batch}x{self.max_seq_len}"
        )

    def _graph_floor(self, bucket: int) -> float | None:
        """Seconds a compiled decode forward cannot go below at `bucket`: its layers'
        projections in their chosen layouts and the graph's attention, as measured (None
        where they were not: forced layouts)."""
        vocab = tuple(self.model.lm_head.weight.shape)
        k, bucket = self.kernels, self._graph_bucket(bucket)
        times = [t[k.choice[shape, b]] for (shape, b), t in k.times.items()
                 if b == bucket and shape not in (vocab, ATTENTION)]  # fmt: skip
        attention = k.times.get((ATTENTION, bucket), {}).get(self._graph_attention)
        if not times or attention is None:
            return None
        return sum(times) + attention * self.model.config.num_hidden_layers

    def weights_changed(self) -> None:
        """The model's weights were copied anew in place (a full reload into this idle
        engine): its packed copies are stale. Until `repack` makes them again, those
        products read the plain weights (correct, slower)."""
        if self.packed is not None:
            self.packed.invalidate()

    def repack(self, limit: int | None = None) -> int:
        """Re-make up to `limit` (None: all) stale packed copies; how many were made."""
        return self.packed.repack(limit) if self.packed is not None else 0

    @property
    def repacking(self) -> bool:
        """Whether packed copies are still stale after a reload."""
        return self.packed is not None and self.packed.missing() > 0

    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.rows)

    def slots_in_use(self) -> set[int]:
        return {r.job.slot for r in self.rows}

    def _select(self, slots: list[int]) -> None:
        self.bank.select(slots)

    def _forward_few(
        self, ids: torch.Tensor, positions: torch.Tensor, **kw: object
    ) -> torch.Tensor | None:
        """Final hidden states of a forward of few rows in the measured layouts (fused
        q/k/v, gate/up); None when it has more rows than the largest measured bucket."""
        table = self.kernels.table(ids.numel())
        if table is None:
            return None
        self.bank.kernels = table
        try:
            return self.model(ids, positions, validate=False, return_hidden=True, **kw)
        finally:
            self.bank.kernels = None

    def _decode_compiled(
        self, ids: torch.Tensor, positions: torch.Tensor, caches: list[KVCache]
    ) -> torch.Tensor:
        """Final hidden states of a decode step of rows without adapters, compiled.

        One row runs as two, the second a copy of it in the cache's free row 1: torch
        specialises sizes of 1, so one row would need a graph of its own, a second
        compile (25 s of a 2-core Xeon's start, measured) for a step ~7 % faster. The copy
        writes its keys at the row's position in row 1, which no live row reads (a row is
        admitted at row 1 later writes each position before attending to it, and the
        mask hides the positions past its own). The graph's guards run in full the first
        time a row count and window length reach it; after that only the guards that tell
        graphs apart (`compiled.decode`'s `guards`).
        """
        rows = ids.shape[0]
        if self._graph_bucket(rows) > rows:  # one row, run as two
            ids, positions = ids.repeat(2, 1), positions.repeat(2, 1)
            caches = self._window(2, caches[0].max_len, True)
        shape = (ids.shape[0], caches[0].max_len)
        layouts = self.kernels.table(shape[0])
        assert layouts is not None  # compiled buckets are measured ones
        self.bank.kernels = self._graph_layouts
        try:
            hidden = compiled.decode(
                self.model, ids, positions, caches, layouts, guards=shape not in self._guarded
            )
        finally:
            self.bank.kernels = None
        self._guarded.add(shape)
        return hidden[:rows]

    def _vocab(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[N, V]` of hidden states `[N, hidden]` (few rows)."""
        weight = self.model.lm_head.weight
        table = self.kernels.table(hidden.shape[0])
        fn = table.get(tuple(weight.shape)) if table is not None else None
        return fn(hidden, weight, None) if fn is not None else hidden @ weight.T

    def _window(self, batch: int, length: int, graph: bool = False) -> list[KVCache]:
        """Views of the caches' first rows and positions (made once per shape). `graph`:
        for the compiled decode, which attends one way at every row count (one graph) and
        writes into the whole caches (`CacheWindow`: in place in the graph)."""
        key = (batch, length, graph)
        views = self._windows.get(key)
        if views is None:
            if graph:  # compiled only where every layer keeps a KV cache (`kv_only`)
                assert all(type(c) is KVCache for c in self.caches)
                views = [CacheWindow(c, length) for c in self.caches]
                for view in views:
                    view.decode_attention = ATTENTIONS[self._graph_attention]
            else:
                views = [c.window(batch, length) for c in self.caches]
                for view in views:
                    view.decode_attention = self.kernels.attend(batch)
            self._windows[key] = views
        return views

    @torch.inference_mode()
    def admit(self, job: GenerationJob) -> None:
        """Prefill `job`'s prompt once, share it across its n rows, draw their first tokens."""
        assert job.n <= self.free_rows
        T, first = len(job.prompt), len(self.rows)
        dev = self.device
        ids = torch.tensor([job.prompt], device=dev)
        self._select([job.slot])
        rows = torch.tensor([first], device=dev)
        positions = torch.arange(T, device=dev)[None]
        hidden = None
        if job.prompt_logprobs:  # logits of every position, computed as the trainer does
            logits = self.model(ids, positions, caches=self.caches, rows=rows, validate=False)
            lp = token_logprobs(logits[0, :-1], ids[0, 1:])
            if job.top_logprobs:
                top = top_logprobs(logits[0, :-1], job.top_logprobs)
                job.emit("prompt_top", -1, tuple(host_lists(*top)))
            job.emit("prompt_logprobs", -1, lp.tolist())
        else:
            last_index = torch.tensor([T - 1], device=dev)
            hidden = self._forward_few(
                ids, positions, caches=self.caches, rows=rows, output_index=last_index
            )
            if hidden is not None:
                logits = self._vocab(hidden[:, 0])[:, None]
            else:
                logits = self.model(
                    ids, positions, caches=self.caches, rows=rows, output_index=last_index,
                    validate=False,
                )  # fmt: skip
        for c in self.caches:  # the prompt's cache (or state), copied into the job's other rows
            c.copy_row(first, slice(first + 1, first + job.n), T)
        last = logits[:, -1].expand(job.n, -1)
        tokens, lps = draw_planned(last, DrawPlan(job.draw, dev))
        job.live_rows = job.n
        new_rows = [Row(job, i, T, 0) for i in range(job.n)]
        self.rows.extend(new_rows)
        self._plan = None
        self._record(new_rows, *self._host(job.top_logprobs, last, tokens, lps))

    def _rows_plan(self) -> tuple[list[int], DrawPlan, bool, int]:
        """The live rows' adapter slots, draw settings and top logprobs (rebuilt when the
        rows change)."""
        if self._plan is None:
            slots = [r.job.slot for r in self.rows]
            plan = DrawPlan([r.job.draw[r.index] for r in self.rows], self.device)
            top_k = max(r.job.top_logprobs for r in self.rows)
            self._plan = slots, plan, len(set(slots)) > 1, top_k
        return self._plan

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every live row."""
        self.retire()  # rows cancelled or stopped from outside since the last step
        if not self.rows:
            return
        B = len(self.rows)
        pos = [r.pos for r in self.rows]
        window = min(self.max_seq_len, -(-(max(pos) + 1) // WINDOW) * WINDOW)
        caches = self._window(B, window)
        slots, plan, mixed, top_k = self._rows_plan()
        self.mixed_steps += mixed
        self._select(slots)
        ids = torch.tensor([r.last for r in self.rows], device=self.device)[:, None]
        positions = torch.tensor(pos, device=self.device)[:, None]
        hidden = None
        if self.bank.active is None and self.compiler.runs(bucket_of(B)):
            try:
                hidden = self._decode_compiled(ids, positions, self._window(B, window, True))
            except Exception as e:  # a recompile that fails: this step and the rest eager
                self.compiler.failed(e)
        if hidden is None:
            hidden = self._forward_few(ids, positions, caches=caches)
        if hidden is not None:
            logits = self._vocab(hidden[:, 0])
        else:
            out = self.model(ids, positions, caches=caches, validate=False, return_hidden=True)
            logits = out[:, 0] @ self.model.lm_head.weight.T
        tokens, lps = draw_planned(logits, plan)
        for r in self.rows:
            r.pos += 1  # where the token just drawn will be fed
        self._record(list(self.rows), *self._host(top_k, logits, tokens, lps))

    @staticmethod
    def _host(
        k: int, logits: torch.Tensor, tokens: torch.Tensor, lps: torch.Tensor
    ) -> tuple[list[int], list[float], list | None]:
        """The step's one host sync: its tokens and logprobs, and each row's `k` most
        likely tokens with their logprobs (k: the most any row asks; None when 0), read
        together."""
        if not k:
            return (*host_lists(tokens, lps), None)
        ids, top = top_logprobs(logits, k)
        tokens_l, lps_l, ids_l, top_l = host_lists(tokens, lps, ids, top)
        return tokens_l, lps_l, list(zip(ids_l, top_l, strict=True))

    def _record(
        self, rows: list[Row], tokens: list[int], lps: list[float], tops: list | None = None
    ) -> None:
        """Append each row's new token, emit it (with its row's most likely tokens, if its
        job asks), and retire rows that are done; then flush each job's events (an
        admission's prompt logprobs included: it ends here too)."""
        jobs: dict[int, GenerationJob] = {}
        self.tokens += len(rows)
        for i, (row, token, lp) in enumerate(zip(rows, tokens, lps, strict=True)):
            job = jobs.setdefault(id(row.job), row.job)
            row.last, row.generated = token, row.generated + 1
            if tops is not None and job.top_logprobs:
                ids, top = tops[i]
                k = job.top_logprobs
                job.emit("token", row.index, (token, lp, (ids[:k], top[:k])))
            else:
                job.emit("token", row.index, (token, lp))
            if token in job.stop_ids:
                self._finish(row, "stop")
            elif row.generated >= job.max_tokens or row.pos >= self.max_seq_len:
                self._finish(row, "length")
        self.retire()
        for job in jobs.values():
            job.flush()

    def _finish(self, row: Row, reason: str) -> None:
        row.job.emit("done", row.index, reason)
        row.job.stopped_rows.add(row.index)

    def retire(self) -> None:
        """Remove rows that finished or were cancelled, keeping live rows packed."""
        i = 0
        while i < len(self.rows):
            row = self.rows[i]
            if row.job.cancelled or row.index in row.job.stopped_rows:
                row.job.live_rows -= 1
                last = len(self.rows) - 1
                if i != last:  # move the last row into this cache row
                    moved = self.rows[last]
                    for c in self.caches:
                        c.copy_row(last, slice(i, i + 1), moved.pos)
                    self.rows[i] = moved
                self.rows.pop()
                self._plan = None
            else:
                i += 1

    @torch.inference_mode()
    def score(
        self, ids: list[int], start: int, end: int, caches: list[KVCache] | None, slot: int
    ) -> np.ndarray:
        """log p(ids[i+1] | ids[..i]) for positions i in [start, end) (the last has none).

        Without `caches`, the whole sequence in one causal forward (start 0, end len(ids)),
        as the trainer computes it. With `caches` (one row of ≥ len(ids) positions, from
        `model.new_caches`) only positions start..end-1 run, attending to the earlier ones
        cached by the previous pieces: a long sequence is scored in pieces that each cost
        about the same, so decode steps can run in between.
        """
        self._select([slot])
        piece = torch.tensor([ids[start:end]], device=self.device)
        if caches is None:
            assert start == 0 and end == len(ids)
            logits = self.model(piece, validate=False)
        else:
            positions = torch.arange(start, end, device=self.device)[None]
            logits = self.model(piece, positions, caches=caches, validate=False)
        targets = torch.tensor(ids[start + 1 : end + 1], device=self.device)
        lp = token_logprobs(logits[0, : len(targets)], targets)
        return lp.cpu().numpy().astype(np.float32)
