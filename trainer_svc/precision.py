"""Training precision (`--dtype`): fp32, or bf16 compute over fp32 master weights.

fp32 (the default) is exact: the trainer's logprobs equal the sampler's fp32 ones to 1e-4
and every loss equals its formula. bf16 runs the forward's matmuls (and so the backward's)
in bf16 under `torch.autocast`, while the weights the optimizer updates, the gradients they
accumulate, the AdamW moments and the checkpoints stay fp32: autocast casts each weight to
bf16 once per forward and the residual stream, the norms, the log-softmax and the losses
stay fp32. Measured on the bench batch (qwen3-40m, 8×128, AMD EPYC with AVX-512 BF16, one
thread): 3.1 s → 1.25-1.5 s per ForwardBackward, logprobs within 3.5e-3 (mean) of fp32.
A pure bf16 copy of the model (bf16 residual stream, weights synced after every step) was
only ~8% faster than autocast and 1.3× further from fp32, so autocast it is. (The fp32
figure above is with MKL's matmuls; with oneDNN's, which `kernels` picks on that CPU,
fp32 takes ~1.8 s and bf16 is ~1.4-1.7× faster.)

bf16 pays only where the hardware multiplies bf16 faster than fp32 (AMX, AVX-512 BF16, any
recent GPU); elsewhere it is emulated and slower. So `choose` measures both on this
machine when the trainer starts (fp32 by its fastest kernel), logs the figures, and
computes in bf16 only when it wins.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from headway.modeling.dtypes import dtype_name
from trainer_svc.kernels import KERNELS

log = logging.getLogger(__name__)

# bf16 compute is chosen when a bf16 matmul is at least this much faster than fp32: the
# casts autocast adds (activations into each matmul, gradients out) cost about a quarter
# of a bf16 step, so a smaller edge would be lost in them.
MIN_SPEEDUP = 1.5

# The probe: a matmul of a training chunk's proportions (tokens × hidden @ hidden × 2·hidden).
_PROBE = (512, 1024, 2048)


@dataclass(frozen=True)
class Precision:
    """The compute dtype of training (weights and optimizer state are always fp32)."""

    compute: torch.dtype = torch.float32
    note: str = "fp32"  # what was asked and measured, for the log and the bench

    @property
    def name(self) -> str:
        return "bf16" if self.compute == torch.bfloat16 else "fp32"

    def autocast(self, device_type: str) -> Any:
        """The context a forward runs in: autocast to the compute dtype, or nothing."""
        if self.compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute)


FP32 = Precision()
BF16 = Precision(torch.bfloat16, "bf16 (forced)")


def matmul_seconds(
    dtype: torch.dtype, device: str = "cpu", kernel: str = "torch", repeats: int = 3
) -> list[float]:
    """Wall times of the probe matmul in `dtype` by `kernel` (after one warm-up run)."""
    m, k, n = _PROBE
    a = torch.randn(m, k, device=device).to(dtype)
    bt = torch.randn(n, k, device=device).to(dtype)
    mm = KERNELS[kernel]
    mm(a, bt)
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        mm(a, bt)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def decide(fp32_s: float, bf16_s: float) -> bool:
    """Whether to compute in bf16, given the probe's fp32 and bf16 times."""
    return fp32_s >= MIN_SPEEDUP * bf16_s


def choose(name: str, device: str = "cpu") -> Precision:
    """The precision for `--dtype name` on `device`: bf16 only where measured faster."""
    if dtype_name(name) == "fp32":
        return FP32
    # Interleaved rounds, medians: the machine may be shared. fp32 by its fastest kernel
    # here (see trainer_svc/kernels.py), bf16 by torch's (oneDNN on x86 CPUs).
    fp32_kernels = list(KERNELS) if device == "cpu" else ["torch"]
    fp32: dict[str, list[float]] = {name: [] for name in fp32_kernels}
    bf16: list[float] = []
    for _ in range(3):
        for name in fp32_kernels:
            fp32[name] += matmul_seconds(torch.float32, device, name)
        bf16 += matmul_seconds(torch.bfloat16, device)
    t32 = min(statistics.median(times) for times in fp32.values())
    t16 = statistics.median(bf16)
    flop = 2 * _PROBE[0] * _PROBE[1] * _PROBE[2]
    figures = (
        f"{'×'.join(map(str, _PROBE))} matmul on {device}, {torch.get_num_threads()} threads: "
        f"fp32 {flop / t32 / 1e9:.0f} GFLOP/s, bf16 {flop / t16 / 1e9:.0f} GFLOP/s"
    )
    if decide(t32, t16):
        log.info("--dtype bf16: bf16 compute over fp32 master weights (%s)", figures)
        return Precision(torch.bfloat16, f"bf16 ({figures})")
    log.warning(
        "--dtype bf16: this machine multiplies bf16 less than %.1f× faster than fp32 (%s); "
        "training computes in fp32",
        MIN_SPEEDUP,
        figures,
    )
    return Precision(torch.float32, f"fp32: bf16 not faster here ({figures})")
