"""`AdapterBank`: many LoRA adapters over one copy of the base weights, chosen per row.

Each targeted projection of the engine's model becomes a `MultiLoRALinear` reading
stacked adapter slots `A [S, R, in]`, `B [S, out, R]` (R the bank's largest rank; smaller
adapters are zero-padded, which adds exact zeros). Before a forward the engine sets the
slot of every row; slot 0 is "no adapter". Rows of different forks of one base therefore
decode in the same batch. A slot is only rewritten when no row uses it, so a reload never
changes the weights under a sequence in flight. A reloaded adapter is served in place from a
map of its file (CPU, same dtype) until its slot's stacked copy is made: at the engine
loop's next turn, or by a forward that mixes it with others first.

A forward of a few rows (a decode step, a short prefill) runs its base projections in the
layout measured fastest for its shape and row count (`sampler_svc.kernels`): the engine sets
the table per forward (`AdapterBank.kernels`); ComputeLogprobs keeps F.linear. For those
forwards `fuse_projections` also runs q/k/v and gate/up as one matmul each, over one fused
weight whose slices ARE the q/k/v (gate/up) parameters' storage: a reload that copies into
the parameters updates the fused weight with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from headway.modeling import LoraConfig, ModelError
from headway.modeling.lora import KNOWN_TARGETS
from sampler_svc.kernels import Kernel, Shape, rows_linear

__all__ = ["NO_ADAPTER", "AdapterBank", "MultiLoRALinear", "fuse_projections", "rows_linear"]

NO_ADAPTER = 0


class AdapterBank:
    """Adapter slots for one model, and the per-row selection of the current forward."""

    def __init__(self, model: nn.Module, slots: int, max_rank: int) -> None:
        self.slots, self.max_rank = slots + 1, max_rank  # + slot 0, the empty adapter
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.device = next(model.parameters()).device
        self.scaling = torch.zeros(self.slots, device=self.device)
        # The same scalings as Python floats (the fp32 values), read without a tensor op.
        self.scaling_values = [0.0] * self.slots
        # Columns of each slot that may be nonzero (the rank last loaded there).
        self.extent = [0] * self.slots
        self.views: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        # Per-forward selection: None (no adapter anywhere), an int (one slot for every
        # row: the plain two-matmul path), or a [B] tensor of slots with their scalings.
        self.active: int | torch.Tensor | None = None
        self.active_scaling: torch.Tensor | None = None
        # Set by the engine around a forward of few rows: the layout of each weight shape.
        self.kernels: dict[Shape, Kernel] | None = None
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                # Every projection a LoRA may adapt (Qwen3.5's linear-attention ones too).
                if child_name in KNOWN_TARGETS and isinstance(child, nn.Linear):
                    key = f"{name}.{child_name}" if name else child_name
                    out_f, in_f = child.weight.shape
                    like = dict(dtype=child.weight.dtype, device=child.weight.device)
                    self.A[key] = torch.zeros(self.slots, max_rank, in_f, **like)
                    self.B[key] = torch.zeros(self.slots, out_f, max_rank, **like)
                    setattr(module, child_name, MultiLoRALinear(child, self, key))
        # numpy views of A and B (CPU, a numpy dtype): a load copies into them without
        # torch's per-call dispatch (~10 µs a slice or copy_, ~100 of each per adapter).
        self._arrays = {k: (_array(self.A[k]), _array(self.B[k])) for k in self.A}
        self._ranked: dict[tuple[int, int], tuple[dict, list]] = {}  # see `_rank_views`
        # Slots served in place from their adapter's tensors, not yet stacked: slot → (rank,
        # {projection: (A, B)}) (see `load`).
        self.pending: dict[int, tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}

    def load(
        self,
        slot: int,
        config: LoraConfig,
        tensors: Mapping[str, torch.Tensor],
        keep: bool = False,
    ) -> None:
        """Put an adapter (`name.lora_A` / `name.lora_B` tensors) into `slot`.

        `keep`: nothing changes the tensors (a map of the immutable checkpoint file), so a
        CPU bank of their dtype serves the slot from them in place: the reload copies
        nothing. The slot's stacked copy is made later, by `stack_next` (the engine's loop,
        one slot per turn) or by the first forward that mixes adapters (`select`), after
        which the bank no longer holds the tensors. Otherwise the adapter is copied into the
        slot now."""
        if not 0 < slot < self.slots:
            raise ValueError(f"adapter slot {slot} out of range")
        if config.rank > self.max_rank:
            raise ModelError(
                f"adapter rank {config.rank} exceeds the sampler's max LoRA rank "
                f"{self.max_rank}; restart it with a larger --max-lora-rank"
            )
        pairs = self._pairs(config.rank, tensors)
        self.pending.pop(slot, None)
        if (
            keep
            and self.device.type == "cpu"
            and all(
                t.device.type == "cpu" and t.dtype == self.A[k].dtype
                for k, ab in pairs.items()
                for t in ab
            )  # fmt: skip
        ):
            self.views[slot] = {k: (a.detach(), b.detach()) for k, (a, b) in pairs.items()}
            self.pending[slot] = (config.rank, pairs)
        else:
            self._stack(slot, config.rank, pairs)
        self.scaling_values[slot] = scaling = float(np.float32(config.scaling))
        self.scaling[slot] = scaling

    def _pairs(
        self, r: int, tensors: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{projection: (A, B)} of the adapter's targets, their shapes checked."""
        pairs = {}
        for key, A in self.A.items():
            a, b = tensors.get(f"{key}.lora_A"), tensors.get(f"{key}.lora_B")
            if a is None or b is None:
                continue  # not a target of this adapter: its update is zero
            want_a, want_b = (r, A.shape[2]), (self.B[key].shape[1], r)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ModelError(
                    f"adapter tensors of {key} have shapes {tuple(a.shape)} and "
                    f"{tuple(b.shape)}; rank {r} over this base needs {want_a} and {want_b}"
                )
            pairs[key] = (a, b)
        return pairs

    def _stack(
        self, slot: int, r: int, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Copy an adapter into the slot's rows of the stacked tensors; serve it from them."""
        extent = self.extent[slot]
        views, targets = self._rank_views(slot, r)
        with torch.no_grad():
            for key, dst_a, dst_b in targets:
                start = 0
                if key in pairs:
                    a, b = pairs[key]
                    _copy(dst_a, a)
                    _copy(dst_b, b)
                    start = r
                # Beyond the rank only what an earlier, larger adapter may have left.
                if extent > start:
                    self.A[key][slot, start:extent].zero_()
                    self.B[key][slot, :, start:extent].zero_()
        self.extent[slot] = r
        self.views[slot] = views

    def stack_next(self) -> bool:
        """Make the stacked copy of one slot served in place; whether there was one."""
        if not self.pending:
            return False
        self.stack_pending({next(iter(self.pending))})
        return True

    def stack_pending(self, slots: set[int]) -> None:
        """Make the stacked copies of those of `slots` served in place (`load(...,
        keep=True)`)."""
        for slot in slots & self.pending.keys():
            self._stack(slot, *self.pending.pop(slot))

    def _rank_views(
        self, slot: int, r: int
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[tuple[str, Any, Any]]]:
        """Rank `r` of `slot`, made once per (slot, r): the views forwards read ({key: (A,
        B)}), and the destinations a load copies into ([(key, A, B)]: numpy views where the
        bank has them, so a load is ~100 plain memcpys; torch's per-call dispatch and
        per-copy thread team cost more than the bytes here)."""
        made = self._ranked.get((slot, r))
        if made is None:
            views = {k: (self.A[k][slot, :r], self.B[k][slot, :, :r]) for k in self.A}
            targets = [
                (k, views[k][0] if A_np is None else A_np[slot, :r],
                 views[k][1] if B_np is None else B_np[slot, :, :r])
                for k, (A_np, B_np) in self._arrays.items()
            ]  # fmt: skip
            made = self._ranked[slot, r] = (views, targets)
        return made

    def select(self, slots: list[int]) -> None:
        """Set the adapter slot of each row for the next forward."""
        distinct = set(slots)
        self.active_scaling = None
        if distinct == {NO_ADAPTER}:
            self.active = None
        elif len(distinct) == 1:
            self.active = slots[0]
        else:  # rows of several adapters read the stacked slots
            if self.pending:
                self.stack_pending(distinct)
            self.active = torch.tensor(slots, device=self.device)
            self.active_scaling = self.scaling[self.active][:, None, None]


class MultiLoRALinear(nn.Module):
    """A base projection plus the bank's adapter of each row."""

    def __init__(self, base: nn.Linear, bank: AdapterBank, key: str) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.bank, self.key = bank, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self.bank.kernels
        fn = kernels.get(tuple(self.weight.shape)) if kernels is not None else None
        out = (fn or F.linear)(x, self.weight, self.bias)
        delta = self.delta(x)
        return out if delta is None else out + delta

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The adapters' update of each row for input `x` `[B, T, in]` (None: no adapter)."""
        bank = self.bank
        sel = bank.active
        if sel is None:
            return None
        if isinstance(sel, int):  # one adapter for the whole batch: as the trainer computes it
            pair = bank.views[sel].get(self.key)
            if pair is None:  # not a target of this adapter
                return None
            return F.linear(F.linear(x, pair[0]), pair[1]) * bank.scaling_values[sel]
        A, B = bank.A[self.key], bank.B[self.key]
        xa = torch.bmm(x, A[sel].transpose(1, 2))  # [B, T, R]
        return torch.bmm(xa, B[sel].transpose(1, 2)) * bank.active_scaling


class FusedProjection:
    """Several projections of one input (q/k/v, or gate/up) as one matmul in few-row forwards.

    `weight` `[sum(out), in]` holds the parts' weights back to back, and each part's weight
    parameter is re-pointed (`.data`) at its slice: one storage, so copying new weights
    into the parameters (a reload) is copying them into the fused weight. Outside few-row
    forwards (no kernel table) each part runs on its own, exactly as before fusion.
    """

    def __init__(self, bank: AdapterBank, parts: list[MultiLoRALinear]) -> None:
        self.bank, self.parts = bank, parts
        self.sizes = [p.weight.shape[0] for p in parts]
        w0 = parts[0].weight
        self.weight = torch.empty(sum(self.sizes), w0.shape[1], dtype=w0.dtype, device=w0.device)
        self.bias = None
        if parts[0].bias is not None:
            self.bias = torch.empty(sum(self.sizes), dtype=w0.dtype, device=w0.device)
        start = 0
        with torch.no_grad():
            for p, n in zip(parts, self.sizes, strict=True):
                self.weight[start : start + n].copy_(p.weight)
                p.weight.data = self.weight[start : start + n]
                if self.bias is not None:
                    self.bias[start : start + n].copy_(p.bias)
                    p.bias.data = self.bias[start : start + n]
                start += n
        self.shape: Shape = tuple(self.weight.shape)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kernels = self.bank.kernels
        fn = kernels.get(self.shape) if kernels is not None else None
        if fn is None:
            return tuple(p(x) for p in self.parts)
        outs = fn(x, self.weight, self.bias).split(self.sizes, dim=-1)
        if self.bank.active is None:
            return outs
        deltas = (p.delta(x) for p in self.parts)
        return tuple(o if d is None else o + d for o, d in zip(outs, deltas, strict=True))


def fuse_projections(model: nn.Module, bank: AdapterBank) -> dict[Shape, list[torch.Tensor]]:
    """Fuse each layer's q/k/v and gate/up (wrapped by `bank`) for few-row forwards.

    Sets the model's `Attention.fused_qkv` and `MLP.fused_gate_up` hooks; returns every
    weight a few-row forward multiplies, grouped by shape (what `KernelChoice` times).
    """
    groups: dict[Shape, list[torch.Tensor]] = {}

    def add(w: torch.Tensor) -> None:
        groups.setdefault(tuple(w.shape), []).append(w)

    for module in model.modules():
        names = None
        if hasattr(module, "fused_qkv"):
            names, hook, rest = ("q_proj", "k_proj", "v_proj"), "fused_qkv", "o_proj"
        elif hasattr(module, "fused_gate_up"):
            names, hook, rest = ("gate_proj", "up_proj"), "fused_gate_up", "down_proj"
        if names is None:
            continue
        parts = [getattr(module, n) for n in names]
        if not all(isinstance(p, MultiLoRALinear) for p in parts):
            continue
        fused = FusedProjection(bank, parts)
        setattr(module, hook, fused)
        add(fused.weight)
        add(getattr(module, rest).weight)
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        add(lm_head.weight)
    return groups


def _array(t: torch.Tensor) -> np.ndarray | None:
    """A numpy view of `t` (CPU, a dtype numpy has), else None."""
    if t.device.type != "cpu" or t.dtype == torch.bfloat16:
        return None
    return t.detach().numpy()


def _copy(dst: torch.Tensor | np.ndarray, src: torch.Tensor) -> None:
    """dst[...] = src. Into a numpy view (a CPU bank) in one thread: torch's copy of a
    slot-sized tensor starts an OpenMP team, which costs milliseconds per copy on a busy
    machine (an adapter reload is ~100 of them: 37 vs 7 ms measured on a loaded 2-core
    EPYC). `src` may view a memory map of the adapter file: this copy is then the read."""
    if isinstance(dst, np.ndarray):
        cpu = src.device.type == "cpu" and src.dtype != torch.bfloat16
        arr = src.detach().numpy() if cpu else None
        if arr is not None and arr.dtype == dst.dtype:
            np.copyto(dst, arr)
            return
        dst = torch.from_numpy(dst)
    dst.copy_(src)
