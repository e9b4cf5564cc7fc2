"""`AdapterBank`: many LoRA adapters over one copy of the base weights, chosen per row.

Each targeted projection of the engine's model becomes a `MultiLoRALinear` reading
stacked adapter slots `A [S, R, in]`, `B [S, out, R]` (R the bank's largest rank; smaller
adapters are zero-padded, which adds exact zeros). Before a forward the engine sets the
slot of every row; slot 0 is "no adapter". Rows of different forks of one base therefore
decode in the same batch. A slot is only rewritten when no row uses it, so a reload never
changes the weights under a sequence in flight.

A forward of a few rows (a decode step, a short prefill) runs its base projections as
`rows_linear`, (W @ xᵀ)ᵀ: for one to a few dozen rows torch's CPU GEMM streams the weights
about twice as fast in that layout as F.linear's x @ Wᵀ (same numbers to ~1e-6). The engine
turns it on per forward (`AdapterBank.rows_layout`); ComputeLogprobs keeps F.linear.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from headway.modeling import DEFAULT_TARGETS, LoraConfig, ModelError

NO_ADAPTER = 0
ROWS_LAYOUT_MAX = 32  # up to this many rows (x ≥ 2 rows) (W @ xᵀ)ᵀ beats F.linear on CPU


def rows_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, weight, bias) computed as (W @ xᵀ)ᵀ, for a few rows of `x` `[..., in]`.

    One row is duplicated: a single column sends torch's mm down a slower matrix-vector
    path, while two columns run the GEMM that reads W at the machine's bandwidth.
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


class AdapterBank:
    """Adapter slots for one model, and the per-row selection of the current forward."""

    def __init__(self, model: nn.Module, slots: int, max_rank: int) -> None:
        self.slots, self.max_rank = slots + 1, max_rank  # + slot 0, the empty adapter
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.scaling = torch.zeros(self.slots)
        # The same scalings as Python floats (the fp32 values), read without a tensor op.
        self.scaling_values = [0.0] * self.slots
        # Columns of each slot that may be nonzero (the rank last loaded there).
        self.extent = [0] * self.slots
        self.views: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        # Per-forward selection: None (no adapter anywhere), an int (one slot for every
        # row: the plain two-matmul path), or a [B] tensor of slots with their scalings.
        self.active: int | torch.Tensor | None = None
        self.active_scaling: torch.Tensor | None = None
        # Set by the engine around a forward of few rows: base projections as rows_linear.
        self.rows_layout = False
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if child_name in DEFAULT_TARGETS and isinstance(child, nn.Linear):
                    key = f"{name}.{child_name}" if name else child_name
                    out_f, in_f = child.weight.shape
                    self.A[key] = torch.zeros(self.slots, max_rank, in_f)
                    self.B[key] = torch.zeros(self.slots, out_f, max_rank)
                    setattr(module, child_name, MultiLoRALinear(child, self, key))

    def load(self, slot: int, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        """Write an adapter (`name.lora_A` / `name.lora_B` tensors) into `slot`."""
        if not 0 < slot < self.slots:
            raise ValueError(f"adapter slot {slot} out of range")
        if config.rank > self.max_rank:
            raise ModelError(
                f"adapter rank {config.rank} exceeds the sampler's max LoRA rank "
                f"{self.max_rank}; restart it with a larger --max-lora-rank"
            )
        r, extent = config.rank, self.extent[slot]
        with torch.no_grad():
            for key in self.A:
                a, b = tensors.get(f"{key}.lora_A"), tensors.get(f"{key}.lora_B")
                A, B = self.A[key][slot], self.B[key][slot]
                if a is not None and b is not None:
                    _copy(A[:r], a)
                    _copy(B[:, :r], b)
                    start = r
                else:
                    start = 0
                # Beyond the rank only what an earlier, larger adapter may have left.
                if extent > start:
                    A[start:extent].zero_()
                    B[:, start:extent].zero_()
        self.extent[slot] = r
        # The adapter's own rank of each projection, as views of the slot.
        self.views[slot] = {k: (self.A[k][slot, :r], self.B[k][slot, :, :r]) for k in self.A}
        self.scaling[slot] = config.scaling
        self.scaling_values[slot] = float(self.scaling[slot])

    def select(self, slots: list[int]) -> None:
        """Set the adapter slot of each row for the next forward."""
        distinct = set(slots)
        self.active_scaling = None
        if distinct == {NO_ADAPTER}:
            self.active = None
        elif len(distinct) == 1:
            self.active = slots[0]
        else:
            self.active = torch.tensor(slots)
            self.active_scaling = self.scaling[self.active][:, None, None]


class MultiLoRALinear(nn.Module):
    """A base projection plus the bank's adapter of each row."""

    def __init__(self, base: nn.Linear, bank: AdapterBank, key: str) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.bank, self.key = bank, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.bank
        if bank.rows_layout:
            out = rows_linear(x, self.weight, self.bias)
        else:
            out = F.linear(x, self.weight, self.bias)
        sel = bank.active
        if sel is None:
            return out
        if isinstance(sel, int):  # one adapter for the whole batch: as the trainer computes it
            a, b = bank.views[sel][self.key]
            return out + F.linear(F.linear(x, a), b) * bank.scaling_values[sel]
        A, B = bank.A[self.key], bank.B[self.key]
        xa = torch.bmm(x, A[sel].transpose(1, 2))  # [B, T, R]
        return out + torch.bmm(xa, B[sel].transpose(1, 2)) * bank.active_scaling


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src; on CPU in one thread (numpy): torch's copy of a slot-sized tensor
    starts an OpenMP team, which costs milliseconds per copy on a busy machine (an adapter
    reload is ~50 of them: 37 vs 7 ms measured on a loaded 2-core EPYC)."""
    cpu = dst.device.type == src.device.type == "cpu"
    if cpu and dst.dtype == src.dtype != torch.bfloat16 and not dst.requires_grad:
        np.copyto(dst.numpy(), src.detach().numpy())
    else:
        dst.copy_(src)
