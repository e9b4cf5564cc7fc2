"""Where tensors live: the device a service computes on, and moving tensors to and from it.

`resolve_device` turns a `--device` name (`headway.modeling.devices`) into a torch device
that exists here, or a ValueError that says why not, before anything is loaded. The
copies below are what every path uses to cross between host and device:

- `to_device`: host → device. On CUDA through pinned (page-locked) memory with a
  non-blocking copy, so the host goes on queueing work; on the CPU the tensor itself,
  no copy.
- `to_host`: device → host, for what must be read on the CPU (safetensors writes from
  memory, numpy views): CUDA tensors are copied into pinned buffers, all of them before
  one synchronisation; CPU tensors are returned as they are.

Everything here is a no-op on the CPU, so the CPU path (the one the tests run) pays
nothing for being device-agnostic.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from headway.modeling.devices import device_name, is_cuda, resolve_dtype


def resolve_device(name: str) -> torch.device:
    """The torch device for `--device name` ("" = cuda when available, else cpu);
    ValueError naming the device and what is wrong (a bad name, no CUDA, no such GPU)."""
    canonical = device_name(name)
    if not canonical:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if is_cuda(canonical):
        if not torch.cuda.is_available():
            built = "with" if torch.backends.cuda.is_built() else "without"
            raise ValueError(
                f"device {canonical!r}: CUDA is not available on this machine (torch "
                f"{torch.__version__}, built {built} CUDA, sees no GPU); use --device cpu"
            )
        device = torch.device(canonical)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {canonical!r}: this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
        return device
    return torch.device("cpu")


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`: a host tensor goes to a GPU through pinned memory, non-blocking
    (the copy is ordered before any kernel that reads it); on its own device, itself."""
    device = torch.device(device)
    if t.device == device or device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors with the values of `tensors` (detached), for reading on the host.

    Device tensors are copied into pinned host buffers, every copy queued before one
    synchronisation; CPU tensors are returned as they are (no copy)."""
    out: dict[str, torch.Tensor] = {}
    devices = set()
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type == "cpu":
            out[name] = t
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        out[name] = host
        devices.add(t.device)
    for device in devices:
        torch.cuda.synchronize(device)
    return out


def host_lists(*tensors: torch.Tensor) -> list[list]:
    """Each tensor's values as a Python list, read with at most one host synchronisation.

    On the CPU each is `.tolist()`; on a device they are copied into one host buffer (as
    float64, exact for token ids below 2^53 and for fp32 logprobs) in a single transfer, so
    a decode step's tokens and logprobs cost one sync, not one per tensor or row."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.tolist() for t in tensors]
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).cpu()
    out, start = [], 0
    for t in tensors:
        part = flat[start : start + t.numel()]
        start += t.numel()
        out.append(part.to(t.dtype).view(t.shape).tolist())
    return out


def settle(device: str, dtype: str) -> tuple[str, str]:
    """A service's (`--device`, `--dtype`) checked before anything loads: the device
    canonical and present on this machine ("" resolved: cuda when available, else cpu),
    the dtype canonical ("" = the device's default: bf16 on a GPU, fp32 on a CPU).
    ValueError naming the flag and what is wrong."""
    try:
        resolved = resolve_device(device)
    except ValueError as e:
        raise ValueError(f"--device: {e}") from None
    name = str(resolved)
    try:
        return name, resolve_dtype(dtype, name)
    except ValueError as e:
        raise ValueError(f"--dtype: {e}") from None
