"""The training matmuls' kernels, chosen per shape by measurement on the machine at hand.

torch's CPU `linear`/`mm` in fp32 run MKL's sgemm. Which library is fastest depends on the
CPU: on an AMD EPYC (Zen 5, AVX-512) MKL reached ~85-100 GFLOP/s per core for the 40M bench
model's shapes where oneDNN's fp32 matmul (the one behind `torch.ops.mkldnn`) reached
120-230, the same numbers to fp32 rounding; on an Intel Xeon MKL is the reference. So each
matmul of a training step — the forward `x @ Wᵀ`, the input gradient `g @ W` and the weight
gradient `gᵀ @ x` — runs the faster of the two for its shape, timed the first time the
shape is seen on this machine (both kernels, interleaved, the best of two runs each) and
kept on disk (`headway.server.kernel_cache`): a restarted trainer computes with the same
kernels, so a model restored from its checkpoint continues bit for bit. Every choice is
logged with its times.

`Kernels.active()` is the context a forward runs in: a `TorchFunctionMode` (thread-local,
so nothing outside the trainer's compute thread is affected) that routes fp32 CPU
`F.linear` calls through `Linear`, whose backward uses the chosen kernels too. Calls in
another dtype (bf16 under autocast, which torch already sends to oneDNN) or on another
device keep torch's own path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from headway.server import kernel_cache
from headway.server.timing import fastest

log = logging.getLogger(__name__)

_ONEDNN: Callable[..., torch.Tensor] | None = None
if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    _ONEDNN = torch.ops.mkldnn._linear_pointwise


def _onednn(a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """a @ btᵀ by oneDNN (`bt` is `[n, k]`, any strides)."""
    assert _ONEDNN is not None
    return _ONEDNN(a, bt, None, "none", [], "")


def _torch(a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """a @ btᵀ by torch's default (MKL on x86 CPUs)."""
    return a @ bt.t()


KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"torch": _torch}
if _ONEDNN is not None:
    KERNELS["onednn"] = _onednn


# Tokens a measurement runs on at most: enough rows for a matmul's steady speed.
PROBE_TOKENS = 512


def _probe(role: str, a: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`a`, `bt` cut to PROBE_TOKENS tokens: rows of `a`, except for the weight gradient
    (`gᵀ @ x`), whose tokens are the inner dimension of both."""
    if role == "grad_weight":
        return a[:, :PROBE_TOKENS], bt[:, :PROBE_TOKENS]
    return a[:PROBE_TOKENS], bt


def _bucket(m: int) -> int:
    """Rows are bucketed by powers of two: a choice holds for a range of chunk sizes."""
    return 1 << max(0, math.ceil(math.log2(max(m, 1))))


class Kernels:
    """The chosen kernel per (role, rows bucket, inner dim, output dim), measured lazily."""

    def __init__(self, candidates: tuple[str, ...] | None = None) -> None:
        self.candidates = tuple(candidates or KERNELS)
        self.chosen: dict[tuple[str, int, int, int], str] = {}
        self.times: dict[tuple[str, int, int, int], dict[str, float]] = {}
        self._lock = threading.Lock()
        self._cached: dict[str, dict] | None = None  # the disk cache, read at the first miss

    def mm(
        self, role: str, a: torch.Tensor, bt: torch.Tensor, shape: tuple[int, int, int]
    ) -> torch.Tensor:
        """`a @ btᵀ` (`bt` `[n, k]`, any strides) by the kernel chosen for `role` of a
        linear map of `shape` (tokens, in features, out features)."""
        m, k, n = shape
        key = (role, _bucket(m), k, n)
        name = self.chosen.get(key)
        if name is not None:
            return KERNELS[name](a, bt)
        if len(self.candidates) == 1:
            self.chosen[key] = self.candidates[0]
            return KERNELS[self.candidates[0]](a, bt)
        name = self._from_disk(key)
        if name is not None:
            return KERNELS[name](a, bt)
        return self._measure(key, a, bt)

    def _cache_key(self, key: tuple[str, int, int, int]) -> str:
        role, m, k, n = key
        machine = kernel_cache.machine_key(
            torch.__version__, torch.get_num_threads(), str(torch.float32)
        )
        return f"trainer|{machine}|{'+'.join(self.candidates)}|{role}|{m}|{k}|{n}"

    def _from_disk(self, key: tuple[str, int, int, int]) -> str | None:
        """The choice an earlier trainer on this machine made for `key`, if any."""
        if self._cached is None:
            self._cached = kernel_cache.read_cache()
        entry = self._cached.get(self._cache_key(key)) or {}
        name = entry.get("kernel")
        if name not in self.candidates or entry.get("disturbed"):
            return None
        with self._lock:
            self.chosen.setdefault(key, name)
        return self.chosen[key]

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`x @ weightᵀ` for a 2-D `x` (the forward role), without autograd."""
        return self.mm("forward", x, weight, (x.shape[0], x.shape[1], weight.shape[0]))

    def _measure(self, key: tuple[str, int, int, int], a: torch.Tensor, bt: torch.Tensor) -> Any:
        """Time every candidate on these inputs — cut to at most PROBE_TOKENS tokens, so a
        long chunk does not pay its full matmul several times — in two interleaved rounds
        (the machine may be shared; rounds another process disturbed do not count: `fastest`),
        keep the fastest, and return its full result."""
        pa, pbt = _probe(key[0], a, bt)
        best = fastest(
            {name: functools.partial(KERNELS[name], pa, pbt) for name in self.candidates},
            rounds=2,
            inner=1,
        )
        name = min(best, key=best.__getitem__)
        with self._lock:
            self.chosen.setdefault(key, name)
            self.times[key] = best
        entry = {"kernel": name, "seconds": dict(best)}
        if best.disturbed:  # measured again by the next trainer that needs it
            entry["disturbed"] = True
        kernel_cache.write_cache({self._cache_key(key): entry})
        role, m, k, n = key
        log.info(
            "matmul %s of a linear %d→%d on ≤%d tokens: %s (%s, on %d tokens)",
            role,
            k,
            n,
            m,
            name,
            ", ".join(f"{c} {t * 1e3:.2f} ms" for c, t in best.items()),
            min(m, PROBE_TOKENS),
        )
        return KERNELS[self.chosen[key]](a, bt)

    def active(self) -> Any:
        """The context a training forward runs in (see the module's docstring)."""
        if self.candidates == ("torch",):
            return contextlib.nullcontext()
        return _Routing(self)


class Linear(torch.autograd.Function):
    """`F.linear` whose three matmuls run the kernels `Kernels` chose for their shapes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kernels: Kernels,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        shape = (x2.shape[0], x2.shape[1], weight.shape[0])
        y = kernels.mm("forward", x2, weight, shape)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2, weight)
        ctx.kernels, ctx.shape, ctx.has_bias, ctx.x_shape = (
            kernels,
            shape,
            bias is not None,
            x.shape,
        )
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x2, weight = ctx.saved_tensors
        kernels: Kernels = ctx.kernels
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = kernels.mm("grad_input", g2, weight.t(), ctx.shape).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = kernels.mm("grad_weight", g2.t(), x2.t(), ctx.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


class _Routing(TorchFunctionMode):
    """Sends fp32 CPU `F.linear` calls to `Linear` (nested calls see no mode: no loop)."""

    def __init__(self, kernels: Kernels) -> None:
        super().__init__()
        self.kernels = kernels

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (
                x.dtype == weight.dtype == torch.float32
                and x.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu")
            ):
                return Linear.apply(x, weight, bias, self.kernels)
        return func(*args, **kwargs)
