"""`AdapterBank`: many LoRA adapters over one copy of the base weights, chosen per row.

Each targeted projection of the engine's model becomes a `MultiLoRALinear` reading
stacked adapter slots `A [S, R, in]`, `B [S, out, R]` (R the bank's largest rank; smaller
adapters are zero-padded, which adds exact zeros). Before a forward the engine sets the
slot of every row; slot 0 is "no adapter". Rows of different forks of one base therefore
decode in the same batch. A slot is only rewritten when no row uses it, so a reload never
changes the weights under a sequence in flight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headway.modeling import DEFAULT_TARGETS, LoraConfig, ModelError

NO_ADAPTER = 0


class AdapterBank:
    """Adapter slots for one model, and the per-row selection of the current forward."""

    def __init__(self, model: nn.Module, slots: int, max_rank: int) -> None:
        self.slots, self.max_rank = slots + 1, max_rank  # + slot 0, the empty adapter
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.scaling = torch.zeros(self.slots)
        # Per-forward selection: None (no adapter anywhere), an int (one slot for every
        # row: the plain two-matmul path), or a [B] tensor of slots.
        self.active: int | torch.Tensor | None = None
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
        r = config.rank
        with torch.no_grad():
            for key in self.A:
                a, b = tensors.get(f"{key}.lora_A"), tensors.get(f"{key}.lora_B")
                self.A[key][slot].zero_()
                self.B[key][slot].zero_()
                if a is not None and b is not None:
                    self.A[key][slot, :r].copy_(a)
                    self.B[key][slot, :, :r].copy_(b)
        self.scaling[slot] = config.scaling

    def select(self, slots: list[int]) -> None:
        """Set the adapter slot of each row for the next forward."""
        distinct = set(slots)
        if distinct == {NO_ADAPTER}:
            self.active = None
        elif len(distinct) == 1:
            self.active = slots[0]
        else:
            self.active = torch.tensor(slots)


class MultiLoRALinear(nn.Module):
    """A base projection plus the bank's adapter of each row."""

    def __init__(self, base: nn.Linear, bank: AdapterBank, key: str) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.bank, self.key = bank, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        sel = self.bank.active
        if sel is None:
            return out
        A, B = self.bank.A[self.key], self.bank.B[self.key]
        if isinstance(sel, int):  # one adapter for the whole batch: as the trainer computes it
            return out + F.linear(F.linear(x, A[sel]), B[sel]) * float(self.bank.scaling[sel])
        xa = torch.bmm(x, A[sel].transpose(1, 2))  # [B, T, R]
        return out + torch.bmm(xa, B[sel].transpose(1, 2)) * self.bank.scaling[sel][:, None, None]
