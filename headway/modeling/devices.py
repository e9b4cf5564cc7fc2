"""The device names a service's `--device` accepts, checked once for the trainer, the
samplers and `headway serve` (no torch here: the CLI checks the flag before starting any
service; each service then checks the device exists, `headway.modeling.placement`).

A name is `cpu`, `cuda` (the current CUDA device, index 0 unless CUDA_VISIBLE_DEVICES
says otherwise) or `cuda:N`; "" means "choose": `cuda` when torch sees a GPU, else `cpu`.
"""

from __future__ import annotations

import re

from headway.modeling.dtypes import dtype_name

_CUDA = re.compile(r"cuda(?::(\d+))?")

DEVICE_HELP = "cpu, cuda or cuda:N (N a GPU index: 0, 1, ...)"


def device_name(name: str) -> str:
    """The canonical device name for `name` ("", "cpu", "cuda", "cuda:N"); ValueError
    naming what is accepted otherwise. Case and surrounding blanks are ignored."""
    canonical = name.strip().lower()
    if canonical in ("", "cpu"):
        return canonical
    match = _CUDA.fullmatch(canonical)
    if match is None:
        raise ValueError(f"device must be {DEVICE_HELP}; got {name!r}")
    index = match.group(1)
    # cuda:01 and cuda:1 are one device: keep one spelling.
    return "cuda" if index is None else f"cuda:{int(index)}"


def is_cuda(name: str) -> bool:
    """Whether a canonical device name is a CUDA device."""
    return name.startswith("cuda")


def default_dtype(device: str) -> str:
    """The `--dtype` a device computes in when none is given: bf16 on a GPU (its tensor
    cores; sampler logprobs still agree with the trainer's in the dtype both use), fp32 on
    a CPU (exact, and not every CPU has bf16 units)."""
    return "bf16" if is_cuda(device) else "fp32"


def resolve_dtype(dtype: str, device: str) -> str:
    """The canonical `--dtype` for `dtype` on `device` ("" = the device's default);
    ValueError for an unknown dtype name."""
    return dtype_name(dtype) if dtype else default_dtype(device)
