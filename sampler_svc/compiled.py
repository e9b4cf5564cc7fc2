"""Compiled decode steps: the layers of a one-token forward as one inductor graph.

Why: at a few rows, a decode step of a small model spends about as long in PyTorch's
per-op dispatch (norms, RoPE, cache writes, residual adds, views: ~30 ops a layer, a few
µs each) as in its matmuls; torch.compile fuses those ops into a few C++ loops. Whether
that pays depends on the machine and the model, so, like the matmul layouts
(`sampler_svc.kernels`), it is measured: `DecodeCompiler` times the engine's decode forward
eager and compiled for each row bucket and keeps the faster (`--compile auto`, the
default), or compiles every bucket (`on`) or none (`off`).

What is compiled: `decode_hidden`, the model's forward for one new token per row over a
window of the KV cache, for rows without a LoRA adapter (bases, full forks). In the graph
each projection (q/k/v and gate/up fused) is one call of `headway::decode_linear`, an op
inductor does not look into, which runs the layout the engine measured for the call's row
count (`decode(layouts=)`): the graph's matmuls are the eager forward's, oneDNN's packed
copies included (an opaque oneDNN tensor cannot be a graph input). Attention is traced, so
it fuses: the way (SDPA or grouped matmuls) the engine measured fastest over its row
buckets (`KernelChoice.graph_attention`). The vocabulary projection, the largest, stays
outside in its measured layout. Rows with adapters decode eagerly (the adapters' slots
and ranks change with every reload: a graph over them would recompile).

The weights are graph inputs, not constants: a reload copies new weights into the same
parameters and the graph serves them, and engines of one configuration share it. Two
sizes are dynamic (marked): the row count and the window length, so one graph serves 2 to
max_batch rows and any window; one row would be a graph of its own (torch specialises
sizes of 1), so the engine runs one row as two (see `Engine._decode_compiled`). Every other
size is static: the weights' and the whole caches' (an engine's max_batch and max_seq_len:
a graph per engine configuration). As symbols (`dynamic=True`) they made dynamo reason
about a window's strides over a cache of symbolic size at every view of the attention:
twice the compile (57 vs 27 s, bf16, 2-core EPYC) and slower code. Compiling costs
tens of seconds on a small CPU, paid at engine start (`warm`), before the replica serves;
inductor keeps the compiled code on disk beside the kernel cache (`cache_dir`), so a
restart re-traces in seconds. A compile that fails (no C++ compiler, an unsupported op)
leaves the engine eager, logged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from headway.modeling import KVCache
from headway.server import kernel_cache
from headway.server.timing import Timings, fastest
from sampler_svc.kernels import (
    FROM_MEMORY,
    Kernel,
    Shape,
    cache_entry,
    machine_key,
    pick,
    usable_entry,
)

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
WAYS = ("eager", "compiled")  # what a bucket's timing compares


# The user's choice, read before torch's compiler sets the variable to its own default.
_USER_CACHE_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def cache_dir() -> Path:
    """Where inductor keeps compiled code: `$TORCHINDUCTOR_CACHE_DIR`, else beside the
    kernel cache (so a restart, and every replica of the machine, reuses it)."""
    if _USER_CACHE_DIR:
        return Path(_USER_CACHE_DIR)
    return kernel_cache.cache_path().parent / "inductor"


def decode_hidden(
    model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, caches: list[KVCache]
) -> torch.Tensor:
    """Final hidden states `[B, 1, hidden]` of one token per row (`ids`, `positions` `[B,
    1]`) over cache windows (the engine's few-row forward, without the vocabulary)."""
    return model(ids, positions, caches=caches, validate=False, return_hidden=True)


# The layouts `headway::decode_linear` runs in during the current compiled call: set by
# `decode` and emptied after it (it would hold the engine's packed copies alive). A
# replica drives all its engines from one thread (`Sampler`), so calls never overlap.
_layouts: dict[Shape, Kernel] = {}

_ops = torch.library.Library("headway", "DEF")
_ops.define("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`headway::decode_linear` on real tensors: F.linear's result, in the layout measured
    for this call's rows and the weight's shape."""
    return _layouts[tuple(weight.shape)](x, weight, bias)


_ops.impl("decode_linear", _decode_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("headway::decode_linear")
def _decode_linear_shape(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


DECODE_LINEAR: Kernel = torch.ops.headway.decode_linear.default


_decode: Callable[..., torch.Tensor] | None = None


def decode(
    model: torch.nn.Module,
    ids: torch.Tensor,
    positions: torch.Tensor,
    caches: list[KVCache],
    layouts: dict[Shape, Kernel],
    guards: bool = True,
) -> torch.Tensor:
    """`decode_hidden`, compiled, its projections (`DECODE_LINEAR`, `graph_layouts`) run in
    `layouts` (weight shape → kernel: the engine's measured table for these rows). One
    compiled function for the process: its graphs are keyed by sizes, dtypes and
    constants, not by the model object, so engines of one configuration (model shape,
    dtype, cache size, graph attention) share one graph. Made at its first call
    (importing torch's compiler takes seconds that a replica with --compile off should not
    pay).

    `guards=False`: dynamo checks only the guards that tell its compiled graphs apart, not
    every guard of the one it runs (~100 parameters' and caches' dtypes, shapes, strides,
    the model's Python constants: 0.3-0.5 ms of a 5-9 ms step on a 2-core Xeon,
    `torch.compiler.set_stance`'s `skip_guard_eval_unsafe`). Only for a call whose engine,
    row count and window length passed the full guards before (`Engine._decode_compiled`).
    That is safe because every configuration that fails a guard compiles a graph of its own
    (which is when dynamo updates the guards that tell graphs apart): a call that would need
    a graph once dynamo's recompile limit is reached raises instead of running eagerly
    (`fail_on_recompile_limit_hit`), and the engine decodes eagerly from then on."""
    global _decode
    if _decode is None:
        # Without duck sizing: by default sizes equal when a graph is made share a symbol,
        # so rows and window lengths that happen to be equal would be tied in the graph
        # (the process's only compiled code is this; the setting is global).
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False
        # No silent eager fallback at the recompile limit: it would leave the guards that
        # tell graphs apart without the new configuration (see `guards` above).
        import torch._dynamo.config as dynamo_config

        dynamo_config.fail_on_recompile_limit_hit = True
        # Static means static: by default a size that fails a guard (another engine's
        # cache length) is made a symbol in the next graph, which then also serves the
        # configurations before it, slower (see the module's docstring).
        dynamo_config.automatic_dynamic_shapes = False
        # A graph per engine configuration (model shape, dtype, cache size): a sampler
        # serving many bases needs more than dynamo's default 8.
        dynamo_config.recompile_limit = 64
        # Python floats (the norms' eps, the attention scale) as constants: traced as
        # symbols (dynamo's default in a dynamic graph), inductor's pass that turns them
        # into tensors gave up and dynamo traced and lowered the whole model again (a
        # third of the compile: 10 of 41 s on a 2-core EPYC, bf16). A model with another
        # eps fails the guard and gets a graph of its own, as one of another shape does.
        dynamo_config.specialize_float = True
        # Inductor reads (and pins) its cache directory at its first compile.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())
        _decode = torch.compile(decode_hidden, dynamic=None)  # static but what is marked
    _layouts.update(layouts)
    try:
        if guards:
            for t in (ids, positions, *(c.span for c in caches)):  # rows, window length
                torch._dynamo.mark_dynamic(t, 0)
            return _decode(model, ids, positions, caches)
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return _decode(model, ids, positions, caches)
    finally:
        _layouts.clear()


def describe_model(model: torch.nn.Module) -> str:
    """The shape facts a decode graph and its timing depend on (a kernel-cache key)."""
    c = model.config
    return (
        f"{c.model_type} h{c.hidden_size} i{c.intermediate_size} L{c.num_hidden_layers} "
        f"heads {c.num_attention_heads}/{c.num_key_value_heads}x{c.head_dim} v{c.vocab_size}"
    )


Forward = Callable[[torch.Tensor, torch.Tensor, list[KVCache]], torch.Tensor]


def graph_layouts(shapes: list[Shape]) -> dict[Shape, Kernel]:
    """The layout table a compiled decode is traced with: `DECODE_LINEAR` for every
    projection (which runs the layouts `decode` is given)."""
    return {s: DECODE_LINEAR for s in shapes}


class DecodeCompiler:
    """Which row buckets of one engine decode through the compiled graph.

    The engine gives its two decode forwards of (ids, positions, caches) → hidden: `eager`
    (its measured layouts) and `compiled` (`decode`, with `graph_layouts`), and
    `caches(rows, length, graph)`, its cache windows for either (measured before the engine
    has rows: a forward writes only its own position). Built after the engine's matmul
    layouts. Only models whose every layer keeps a KV cache are compiled: a recurrent state
    (Qwen3.5's linear attention) carries its window length as a Python int, which would
    key a new graph at every window.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mode: str,
        buckets: list[int],
        eager: Forward,
        compiled: Forward,
        caches: Callable[[int, int, bool], list[KVCache]],
        length: int,
        max_rows: int,
        kv_only: bool,
        graph_floor: Callable[[int], float | None] = lambda bucket: None,
        evict: Callable[[], object] | None = None,
        variant: Callable[[int], str] = lambda bucket: "",
    ) -> None:
        """`graph_floor(bucket)`: seconds the graph cannot go below at that bucket (its
        projections in the measured layouts and its attention, from the engine's layout
        measurements; None: unknown); `auto` compiles nothing where that floor is over
        95 % of the eager forward at every bucket (`_cannot_pay`). `evict`: run before each
        timed forward, as the rest of a step (the vocabulary's product) runs between two
        (`kernels.Evictor`). `variant(bucket)`: what else the graph's time at that bucket
        depends on (its attention, the layouts it runs, the caches' size), in the timings'
        cache keys."""
        if mode not in MODES:
            raise ValueError(f"compile mode {mode!r}: choose among {', '.join(MODES)}")
        self.model, self.mode, self.caches, self.length = model, mode, caches, length
        self.max_rows = max_rows
        self.eager, self.compiled_forward = eager, compiled
        self.evict = evict
        self.compiled: set[int] = set()  # buckets that decode compiled
        self.times: dict[int, dict[str, float]] = {}  # bucket → seconds per forward, each way
        self.error = ""  # why compiling failed, if it did
        # bucket → (eager seconds, graph floor seconds), when measured before compiling.
        self._precheck: dict[int, tuple[float, float]] = {}
        device = next(model.parameters()).device
        if mode == "off" or device.type != "cpu" or not kv_only:
            # CUDA would need CUDA graphs as well to pay; never measured here: off.
            return
        dtype = next(model.parameters()).dtype
        # bf16 is measured like fp32: on a 2-core EPYC the graph won <= 10 % at 2-4 rows and
        # lost at 8-16 (its matmuls are aten's, not the packed oneDNN layouts), on a Xeon
        # with AMX aten's bf16 matmuls are oneDNN's own; the machine at hand decides.
        machine = machine_key(dtype)
        keys = {
            b: f"{machine}|decode compiled {describe_model(model)}, {variant(b)}|rows {b}|"
            f"{FROM_MEMORY}"
            for b in buckets
        }
        cached = kernel_cache.read_cache()
        if mode == "auto" and all(usable_entry(cached.get(keys[b]), WAYS) for b in buckets):
            self.times = {b: cached[keys[b]]["times"] for b in buckets}
            if all(pick(t) == "eager" for t in self.times.values()):
                log.info("decode compiled: no bucket (cached timings: %s)", self.describe())
                return
        if mode == "auto" and not self.times and self._cannot_pay(buckets, graph_floor):
            return
        started = time.perf_counter()
        try:
            if mode == "auto" and not self.times and self._precheck:
                # The most promising graph first (each costs half a minute of a small
                # CPU's start): if it does not pay where it promises most, neither is kept.
                best = min(buckets, key=lambda b: self._precheck[b][1] / self._precheck[b][0])
                rows = min(best, max_rows)
                self.warm(only=[1] if rows == 1 else [min(2, max_rows)])
                first = self._time(rows)
                if pick(first) != "compiled":
                    self.times = {b: {"eager": e, "graph floor": f}
                                  for b, (e, f) in self._precheck.items()}  # fmt: skip
                    self.times[best] = dict(first)
                    kernel_cache.write_cache({keys[best]: cache_entry(first)})
                    log.info(
                        "decode compiled: no bucket (the most promising, %d rows, does not "
                        "pay; the other graph not compiled: %s; %.1f s)",
                        best, self.describe(), time.perf_counter() - started,
                    )  # fmt: skip
                    return
            self.warm()
            if mode == "auto" and not self.times:
                self.times = {b: self._time(min(b, max_rows)) for b in buckets}
                kernel_cache.write_cache({keys[b]: cache_entry(self.times[b]) for b in buckets})
        except Exception as e:  # a failed compile must not take the replica down
            self.failed(e)
            return
        if mode == "on":
            self.compiled = set(buckets)
        else:
            # Compiled only where it beats eager by 5 % (`pick`'s margin for the model's way).
            self.compiled = {b for b, t in self.times.items() if pick(t) == "compiled"}
        log.info(
            "decode compiled for rows %s (%s; compile and timing %.1f s, code in %s)",
            sorted(self.compiled) or "none",
            self.describe(),
            time.perf_counter() - started,
            cache_dir(),
        )

    def _cannot_pay(self, buckets: list[int], graph_floor: Callable[[int], float | None]) -> bool:
        """Whether the graph cannot beat eager at any bucket, known before compiling it:
        its matmuls are the eager forward's, and where those and its attention alone
        (measured with the layouts) take longer than 95 % of the whole eager forward, no
        fusion of the rest (norms, RoPE, cache writes) wins that back. Compiling costs half
        a minute of a small CPU's start. Then `times` holds the eager forward and the
        graph's floor per bucket."""
        floors = {b: graph_floor(b) for b in buckets}
        if any(f is None for f in floors.values()):
            return False
        with torch.inference_mode():
            eager = {b: self._time_eager(min(b, self.max_rows)) for b in buckets}
        self._precheck = {b: (eager[b], floors[b]) for b in buckets}
        # Compiled is chosen only where 5 % faster than eager (`pick`).
        if any(floors[b] < 0.95 * eager[b] for b in buckets):
            return False
        self.times = {b: {"eager": eager[b], "graph floor": floors[b]} for b in buckets}
        log.info(
            "decode compiled: no bucket, not compiled (the graph's matmuls and attention "
            "alone outlast the eager forward: %s)",
            self.describe(),
        )
        return True

    def _time_eager(self, rows: int) -> float:
        ids, positions = self._inputs(rows)
        caches = self.caches(rows, self.length, False)
        eager = {"eager": lambda: self.eager(ids, positions, caches)}
        return fastest(eager, inner=1, reset=self.evict)["eager"]

    def failed(self, error: Exception) -> None:
        """Decode eagerly from now on, logging why (a compile or a recompile that failed)."""
        self.compiled = set()
        self.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        log.warning("decode compile failed, decoding eagerly: %s", self.error)

    def warm(self, only: list[int] | None = None) -> None:
        """Compile the graphs now (not at a first request; `only`: those row counts'),
        checking each against the eager forward; raises if one fails or differs. The
        engine runs one row as two where it can (`Engine._decode_compiled`), so one
        many-row graph serves every row count; a one-row graph is made only for an engine
        of one row."""
        for rows in sorted(set(only or {1, min(2, self.max_rows)})):
            with torch.inference_mode():  # as decode steps run (guards check it)
                ids, positions = self._inputs(rows)
                graph = self.caches(rows, self.length, True)
                got = self.compiled_forward(ids, positions, graph)
                want = self.eager(ids, positions, self.caches(rows, self.length, False))
            # Relative to the states' size: the two compute the same sums in another
            # order, which moves low-precision states by a few roundings (1/128 of a value
            # each in bf16) over the layers: 2.3 % measured at one row (bf16, 8 layers,
            # EPYC), which a 2 % bound refused. A broken graph is off by far more.
            err = float((got - want).float().norm() / want.float().norm())
            low = 8 * torch.finfo(want.dtype).eps  # bf16: 6.3 %
            if err > (1e-4 if want.dtype == torch.float32 else low):
                raise RuntimeError(
                    f"compiled decode differs from eager by {err:.3g} (relative) at {rows} rows"
                )

    def _inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and positions of a decode forward at `rows` rows, at the last position
        of the window (new caches hold zeros before it: only the arithmetic matters)."""
        device = next(self.model.parameters()).device
        ids = torch.ones(rows, 1, dtype=torch.long, device=device)
        positions = torch.full((rows, 1), self.length - 1, dtype=torch.long, device=device)
        return ids, positions

    def _time(self, rows: int) -> Timings:
        with torch.inference_mode():
            ids, positions = self._inputs(rows)
            eager, graph = (self.caches(rows, self.length, g) for g in (False, True))
            return fastest(
                {
                    "eager": lambda: self.eager(ids, positions, eager),
                    "compiled": lambda: self.compiled_forward(ids, positions, graph),
                },
                inner=1,  # each forward after `evict`
                reset=self.evict,
            )

    def runs(self, bucket: int) -> bool:
        """Whether decode steps of row bucket `bucket` run compiled."""
        return bucket in self.compiled

    def describe(self) -> str:
        """ "b1: eager 5.10 / compiled 3.90 ms; ..." (the timings behind the choice)."""
        return "; ".join(
            f"b{b}: " + " / ".join(f"{k} {v * 1e3:.2f}" for k, v in t.items()) + " ms"
            for b, t in sorted(self.times.items())
        )
