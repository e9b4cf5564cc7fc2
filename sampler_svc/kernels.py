"""Matmul layouts of few-row forwards (decode steps, short prefills), chosen by measurement.

A decode step is a chain of `[rows, in] × [out, in]ᵀ` products with few rows. Which way
of asking torch for it is fastest depends on the CPU, the BLAS torch was built with, the
shape and the number of rows: on one Xeon `(W @ xᵀ)ᵀ` streamed the weights twice as fast as
`F.linear`, on an EPYC F.linear was twice as fast at one row. No constant can be right on
every machine, so an engine times the candidates (`layout_names`) on its own weights, for each
weight shape and each batch bucket (1, 2, 4, ... rows), and keeps the fastest.

The measurement runs once per (CPU model, torch version, threads, dtype, shape, bucket) and
is cached on disk (`headway.server.kernel_cache`, the file the trainer's choices share), so
a restart on the same machine costs nothing; the choice is logged. Every layout computes
the same product (to float rounding): the tests check each gives the same logits.

Candidates: `linear` (F.linear, x @ Wᵀ), `rows` ((W @ xᵀ)ᵀ, one row duplicated to two so
torch's mm runs its GEMM rather than its matrix-vector path), `onednn` (oneDNN's inner
product on the same weight storage: for fp32 not MKL's sgemm, which F.linear and `rows`
both call), and `packed` (oneDNN's inner product on a copy of the weight in oneDNN's own
blocked layout, `PackedWeights`: given a plain weight oneDNN re-lays it out on every call,
which in bf16 costs more than the product). `packed` costs memory (a second copy of the
weights it is chosen for) and a pass over them after a reload, so it must win its place by
measurement like the others. A pre-transposed contiguous copy of W (x @ Wᵀᵀ) was left
out: it costs the same memory and wins nothing `packed` does not.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from headway.modeling.dtypes import dtype_name
from headway.modeling.model import grouped_attention
from headway.server import kernel_cache
from headway.server.timing import Timings, fastest

log = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
Shape = tuple[int, int]  # (out, in) of a weight


def rows_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, weight, bias) computed as (W @ xᵀ)ᵀ, for a few rows of `x` `[..., in]`.

    One row is duplicated: a single column sends torch's mm down a matrix-vector path,
    while two columns run the GEMM (faster on some CPUs, slower on others: measured).
    """
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n == 1:
        rows = torch.cat((rows, rows))
    out = torch.mm(weight, rows.T).T[:n].contiguous()
    if bias is not None:
        out += bias
    return out.view(*lead, out.shape[-1])


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, weight, bias) by oneDNN's inner product, on the weight as it is stored.

    For fp32, torch's F.linear calls MKL's sgemm, which on some CPUs (AMD: MKL dispatches by
    vendor) runs few-row products far below what the memory allows (measured on a Zen 4:
    8 rows × the gate/up weights 2-4x slower than this); oneDNN picks its kernels by the
    CPU's features. Not on CUDA or a torch built without oneDNN: F.linear there.
    """
    if x.device.type != "cpu" or not onednn_runs(x.dtype):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's inner product and weight packing run for `dtype` on this CPU,
    probed once on tiny tensors: its bf16 path needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT
    (a Zen 3 has neither: "could not create a primitive descriptor"), which no flag of
    torch's reports directly."""
    if not _ONEDNN:
        return False
    w, x = torch.ones(16, 16, dtype=dtype), torch.ones(2, 16, dtype=dtype)
    try:
        with torch.inference_mode():
            plain = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            blocked = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
            packed = torch.ops.mkldnn._linear_pointwise(x, blocked, None, "none", [], "")
    except RuntimeError as e:
        log.info("oneDNN layouts are not candidates for %s on this CPU: %s", dtype, e)
        return False
    return bool(torch.equal(plain, packed) and torch.equal(plain, F.linear(x, w)))


# The row count a packed weight is laid out for. oneDNN's blocked layout for 8 rows served
# 1 to 300 rows within a few percent of the layout made for each (measured on a Zen 4, fp32
# and bf16, gate/up and vocabulary shapes), so one copy serves every bucket and a prefill.
PACK_ROWS = 8

# The stateless layouts; `packed` (a `PackedWeights` of the engine's) is added where oneDNN
# can pack: `layout_names`.
LAYOUTS: dict[str, Kernel] = {"linear": F.linear, "rows": rows_linear, "onednn": onednn_linear}
PACKED = "packed"


def packing_available(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> bool:
    """Whether `packed` is a candidate for `dtype` weights on `device`: a CPU whose oneDNN
    runs that dtype (`onednn_runs`)."""
    return torch.device(device).type == "cpu" and onednn_runs(dtype)


def layout_names(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> list[str]:
    """Every layout an engine of `dtype` weights on `device` chooses among."""
    onednn = packing_available(device, dtype)
    return [name for name in LAYOUTS if onednn or name != "onednn"] + ([PACKED] if onednn else [])


class PackedWeights:
    """oneDNN-blocked copies of some of an engine's weights: the `packed` layout.

    A copy is looked up by the plain weight it was made from (its storage address and
    shape), so the model keeps calling kernels with its own parameters. A weight without a
    current copy is multiplied by `onednn_linear` from its plain storage: never a stale
    copy. Whoever changes weights in place (a full reload) calls `invalidate`; `repack`
    makes the copies again, a few at a time between decode steps (see `Engine.repack`).
    """

    def __init__(self) -> None:
        self._weights: list[torch.Tensor] = []
        self._packed: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        # Stale copies, freed one at a time as `repack` replaces them: freeing them all at
        # once (hundreds of MB of pages) would lengthen the reload that made them stale.
        self._stale: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    @staticmethod
    def _key(weight: torch.Tensor) -> tuple[int, tuple[int, ...]]:
        return weight.data_ptr(), tuple(weight.shape)

    def track(self, weights: list[torch.Tensor]) -> None:
        """Keep packed copies of `weights` (replacing what was tracked); packs them now."""
        # Once each (a weight listed twice would never count as packed: see `missing`).
        self._weights = list({self._key(w): w for w in weights}.values())
        self._packed.clear()
        self._stale.clear()
        self.repack()

    @property
    def nbytes(self) -> int:
        """Memory the tracked weights' copies take (when all are packed)."""
        return sum(w.numel() * w.element_size() for w in self._weights)

    def invalidate(self) -> None:
        """The tracked weights changed in place: their copies are stale (until `repack`)."""
        self._stale.update(self._packed)
        self._packed = {}

    def missing(self) -> int:
        """Tracked weights without a current copy."""
        return len(self._weights) - len(self._packed)

    def repack(self, limit: int | None = None) -> int:
        """Pack up to `limit` (None: all) tracked weights that have no copy; how many."""
        if not self.missing():  # the sampler loop asks every turn: the usual answer, at once
            return 0
        done = 0
        with torch.inference_mode():
            for w in self._weights:
                if limit is not None and done >= limit:
                    break
                key = self._key(w)
                if key not in self._packed:
                    self._stale.pop(key, None)  # freed before its successor is made
                    self._packed[key] = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
                    done += 1
        return done

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """F.linear(x, weight, bias) from `weight`'s packed copy (plain oneDNN without one)."""
        packed = self._packed.get(self._key(weight))
        if packed is None:
            return onednn_linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


MAX_BUCKET = 64  # forwards of more rows (long prefills) use F.linear, the model's own path
TIMED_BYTES = 256 << 20  # weights of one shape a layout is timed on (see `time_layouts`)
UNKNOWN_CACHE = 256 << 20  # bytes swept where the CPU's last-level cache size is not known


def last_level_cache() -> int:
    """Bytes of this CPU's largest cache (`UNKNOWN_CACHE` where it cannot be read)."""
    return kernel_cache.cache_bytes() or UNKNOWN_CACHE


class Evictor:
    """Reads other tensors between timed rounds, so a candidate is timed with the caches
    as a decode step leaves them, not holding the very weights it multiplies.

    A decode step reads every weight once: when a model's weights outgrow the last-level
    cache, each product streams its weights from memory. Timed alone and repeated, a shape
    whose weights fit the cache (a 65 MB vocabulary on a 480 MB-L3 Xeon) reads them from the
    cache instead, and the layouts rank differently there: on that Xeon, 8 rows × the
    vocabulary took 3.3 ms as `rows` and 2.0 ms `packed` from the cache, but 6.3 and 3.4 ms
    from memory — the engine chose `rows`, and its step spent 7.0 ms there. Reading the
    rest of the model (up to the cache's size: more evicts nothing more) in between puts the
    caches where the step has them; a model smaller than the cache stays in it, as it does
    in the step.
    """

    def __init__(self, tensors: Iterable[torch.Tensor], limit: int | None = None) -> None:
        limit = last_level_cache() if limit is None else limit
        self.tensors: list[torch.Tensor] = []
        size = 0
        for t in tensors:
            if size >= limit:
                break
            self.tensors.append(t)
            size += t.numel() * t.element_size()
        self.nbytes = size

    def __call__(self) -> None:
        with torch.inference_mode():
            for t in self.tensors:
                t.sum()


def buckets(max_rows: int) -> list[int]:
    """Row counts timed: powers of two up to the first ≥ `max_rows` (at most MAX_BUCKET)."""
    out = [1]
    while out[-1] < min(max_rows, MAX_BUCKET):
        out.append(out[-1] * 2)
    return out


def bucket_of(rows: int) -> int:
    """The timed bucket a forward of `rows` rows runs as (the next power of two)."""
    return 1 << max(rows - 1, 0).bit_length()


def machine_key(dtype: torch.dtype) -> str:
    """What a measured choice depends on besides the shape: CPU, torch, threads, dtype."""
    return kernel_cache.machine_key(torch.__version__, torch.get_num_threads(), str(dtype))


def time_layouts(
    weights: list[torch.Tensor],
    rows: int,
    rounds: int = 5,
    inner: int = 1,
    names: list[str] | None = None,
    evict: Evictor | None = None,
) -> Timings:
    """Seconds of one pass over `weights` (all of one shape) per layout (`names`, default
    every layout of their device), at `rows`.

    The layouts run interleaved, each keeping its fastest round (`fastest`); `evict` (the
    model's other weights) runs before each round, as the rest of a step runs between two
    passes over these weights.

    `packed` needs copies of the weights it is timed on; so that measuring never costs
    more than `TIMED_BYTES` of extra memory (a 7B model's gate/up weights are GBs), every
    layout is timed on the first weights up to that size (at least one: still far more
    than the caches hold), the time scaled to the whole group.
    """
    w0 = weights[0]
    names = names if names is not None else layout_names(w0.device, w0.dtype)
    timed, size = [], 0
    for w in weights:
        size += w.numel() * w.element_size()
        if timed and size > TIMED_BYTES:
            break
        timed.append(w)
    scale = len(weights) / len(timed)
    weights = timed
    x = torch.randn(rows, w0.shape[1], dtype=w0.dtype, device=w0.device)
    layouts = {name: fn for name, fn in LAYOUTS.items() if name in names}
    if PACKED in names:
        packed = PackedWeights()
        packed.track(weights)  # packing is a reload's cost, not the product's: not timed
        layouts[PACKED] = packed.linear

    def one_pass(fn: Kernel) -> None:
        for w in weights:
            fn(x, w, None)
        if w0.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        times = fastest(
            {name: functools.partial(one_pass, fn) for name, fn in layouts.items()},
            rounds,
            inner,
            reset=evict,
        )
    out = Timings({name: t * scale for name, t in times.items()})
    out.disturbed = times.disturbed
    return out


def grouped_fp32_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """`grouped_attention` on fp32 copies of a bf16 engine's q/k/v (the window of the cache:
    a few hundred KB a layer), cast back: torch's bf16 matmuls of these small shapes cost
    more than the casts (131 vs 86 µs a layer at 8 rows over 96 positions, Zen 4). For an
    fp32 engine it is `grouped_attention` itself."""
    if q.dtype == torch.float32:
        return grouped_attention(q, k, v, mask)
    return grouped_attention(q.float(), k.float(), v.float(), mask).to(q.dtype)


ATTENTIONS: dict[str, Callable[..., torch.Tensor] | None] = {
    "sdpa": None,  # torch's scaled_dot_product_attention (the model's default)
    "grouped": grouped_attention,  # plain matmuls, query heads grouped per kv head
    "grouped_fp32": grouped_fp32_attention,  # the same in fp32 (for bf16 engines)
}


def time_attention(
    heads: tuple[int, int, int], rows: int, dtype: torch.dtype, length: int, rounds: int = 5
) -> Timings:
    """Seconds of one decode attention (one query per row over `length` cached positions)
    per way of computing it (`fastest`)."""
    H, kv, D = heads
    q = torch.randn(rows, H, 1, D, dtype=dtype)
    k, v = torch.randn(2, rows, kv, length, D, dtype=dtype)
    mask = (torch.arange(length) < length - 3)[None, None, None].expand(rows, 1, 1, length)
    fns = {
        name: (lambda f=f: f(q, k, v, mask))
        if f is not None
        else (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
        for name, f in ATTENTIONS.items()
    }
    with torch.inference_mode():
        return fastest(fns, rounds, inner=4)


def pick(times: dict[str, float], margin: float = 0.05) -> str:
    """The fastest; the model's own way (F.linear, SDPA, the eager decode forward) unless
    another beats it by `margin`."""
    best = min(times, key=times.get)
    for default in ("linear", "sdpa", "eager"):
        if default in times and times[best] > (1 - margin) * times[default]:
            return default
    return best


def cache_entry(times: Timings) -> dict:
    """A cache entry of measured times (marked when disturbed: measured again next start)."""
    return {"times": dict(times), **({"disturbed": True} if times.disturbed else {})}


def usable_entry(entry: dict | None, names: Iterable[str]) -> bool:
    """Whether a cached entry times exactly `names`, undisturbed."""
    return (
        entry is not None
        and not entry.get("disturbed")
        and set(entry.get("times", {})) == set(names)
    )


# Ends the kernel-cache keys of timings taken with the caches as a step leaves them
# (`Evictor`): entries timed otherwise are measured again.
FROM_MEMORY = "from memory"


def layout_key(dtype: torch.dtype, shape: Shape, count: int, bucket: int) -> str:
    """The kernel-cache key of the layouts' times for `count` weights of `shape` at `bucket`
    rows."""
    return f"{machine_key(dtype)}|{shape[0]}x{shape[1]}x{count}|rows {bucket}|{FROM_MEMORY}"


# The key `KernelChoice.times` holds decode attention's timings under, beside the weights'
# shapes: (ATTENTION, bucket).
ATTENTION: tuple[str, int] = ("attention", 0)


class KernelChoice:
    """The measured layout for each (weight shape, batch bucket) of one engine's forwards."""

    def __init__(
        self,
        weights: dict[Shape, list[torch.Tensor]],
        max_rows: int,
        force: str | None = None,
        heads: tuple[int, int, int] | None = None,
        length: int = 128,
        packed: PackedWeights | None = None,
    ) -> None:
        """`weights`: the engine's decode weights grouped by shape; `heads` (query heads,
        kv heads, head dim): also time decode attention over `length` positions. `force`
        (or $HEADWAY_KERNELS) = a layout name: that layout everywhere, SDPA, nothing
        measured. `packed`: the engine's store of packed copies (None: `packed` is not a
        candidate); it is given the weights of the shapes that chose it."""
        self.buckets = buckets(max_rows)
        w0 = next(iter(weights.values()))[0]
        names = [n for n in layout_names(w0.device, w0.dtype) if n != PACKED or packed is not None]
        self.heads, self.length = heads, length
        self.choice: dict[tuple[Shape, int], str] = {}
        self.attention: dict[int, str] = {b: "sdpa" for b in self.buckets}
        self.times: dict[tuple[Shape, int], dict[str, float]] = {}  # seconds per layout
        self.cached = 0
        forced = force or os.environ.get("HEADWAY_KERNELS", "")
        if forced:
            if forced not in names:
                raise ValueError(f"kernel layout {forced!r}: choose among {', '.join(names)}")
            for shape in weights:
                for b in self.buckets:
                    self.choice[shape, b] = forced
        else:
            self._measure(weights, names)
        kernels: dict[str, Kernel] = dict(LAYOUTS)
        if packed is not None:
            kernels[PACKED] = packed.linear
            chosen = {s for (s, _), name in self.choice.items() if name == PACKED}
            packed.track([w for s in weights if s in chosen for w in weights[s]])
            if packed.nbytes:
                log.info("packed copies for oneDNN: %.0f MB", packed.nbytes / 1e6)
        self._tables: dict[int, dict[Shape, Kernel]] = {
            b: {s: kernels[self.choice[s, b]] for s in weights} for b in self.buckets
        }

    def _measure(self, weights: dict[Shape, list[torch.Tensor]], names: list[str]) -> None:
        dtype = next(iter(weights.values()))[0].dtype
        machine = machine_key(dtype)
        cached, fresh = kernel_cache.read_cache(), {}
        started = time.perf_counter()
        for shape, ws in weights.items():
            others = Evictor(w for s, group in weights.items() if s != shape for w in group)
            for b in self.buckets:
                key = layout_key(dtype, shape, len(ws), b)
                entry = cached.get(key)
                if not usable_entry(entry, names):
                    times = time_layouts(ws, b, names=names, evict=others)
                    entry = fresh[key] = cache_entry(times)
                else:
                    self.cached += 1
                times = entry["times"]
                self.times[shape, b] = times
                self.choice[shape, b] = pick(times)
        if self.heads is not None:
            H, kv, D = self.heads
            for b in self.buckets:
                key = f"{machine}|attention {H}/{kv}x{D} over {self.length}|rows {b}"
                entry = cached.get(key)
                if not usable_entry(entry, ATTENTIONS):
                    times = time_attention(self.heads, b, dtype, self.length)
                    entry = fresh[key] = cache_entry(times)
                else:
                    self.cached += 1
                self.times[ATTENTION, b] = entry["times"]
                self.attention[b] = pick(entry["times"])
        if fresh:
            kernel_cache.write_cache(fresh)
        log.info(
            "decode kernels (%s; %d measured in %.1f s, %d from %s): %s",
            machine,
            len(fresh),
            time.perf_counter() - started,
            self.cached,
            kernel_cache.cache_path(),
            self.describe(),
        )

    def table(self, rows: int) -> dict[Shape, Kernel] | None:
        """Shape → layout for a forward of `rows` rows; None beyond the largest bucket."""
        b = bucket_of(rows)
        return self._tables.get(b)

    def graph_attention(self, buckets: list[int]) -> str:
        """The decode attention a compiled graph (one for every row count) traces: the way
        with the least measured time summed over `buckets` (SDPA where not measured)."""
        times = [self.times.get((ATTENTION, b)) for b in buckets]
        if not buckets or None in times:
            return "sdpa"
        total = {name: sum(t[name] for t in times) for name in times[0]}
        return pick(total)

    def attend(self, rows: int) -> Callable[..., torch.Tensor] | None:
        """The decode attention for `rows` rows (None: SDPA)."""
        return ATTENTIONS[self.attention.get(bucket_of(rows), "sdpa")]

    def describe(self) -> str:
        """The choice per bucket: "b1: 768x512 linear, ..., attention sdpa; b2: ..."."""
        parts = []
        for b in self.buckets:
            picks = ", ".join(
                f"{o}x{i} {self.choice[(o, i), b]}" for (o, i), bb in self.choice if bb == b
            )
            parts.append(f"b{b}: {picks}, attention {self.attention[b]}")
        return "; ".join(parts)


def cuda_layout(device: torch.device) -> str | None:
    """The layout forced on a CUDA device (F.linear, and SDPA for attention), else None
    (measured). The layouts here are CPU BLAS questions (matrix-vector vs GEMM paths); on a
    GPU cuBLAS picks its own kernels, and the timings above would have to synchronise the
    device per call to mean anything."""
    return "linear" if device.type == "cuda" else None


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # by headway.modeling.dtypes name


def bf16_units(device: str = "cpu") -> bool:
    """Whether bf16 matmuls run on bf16 hardware here (AVX-512 BF16 or AMX; any CUDA GPU)."""
    if device.startswith("cuda"):
        return True
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def engine_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """The dtype of engine weights for the `--dtype` setting (`name`), checked against the
    hardware: bf16 without bf16 units would be slower than fp32, so it falls back (logged)."""
    dtype = TORCH_DTYPES[dtype_name(name)]
    if dtype == torch.bfloat16:
        if not bf16_units(device):
            log.warning(
                "--dtype bf16: this CPU (%s) has no bf16 units (AVX-512 BF16 / AMX); "
                "serving in fp32",
                kernel_cache.cpu_model(),
            )
            return torch.float32
        log.info("serving in bf16 (bf16 units: %s)", torch.backends.cpu.get_cpu_capability())
    return dtype
