"""`FrozenPool`: one in-memory copy of each set of frozen weights, shared by LoRA forks.

Every LoRA fork of a base trains an adapter over the same frozen tensors; the pool loads
those tensors once and hands the same storage to each fork's module (see
`headway.modeling.build_model`), releasing them when no loaded fork uses them.
"""

from __future__ import annotations

import threading

import torch

from headway.modeling.placement import to_device
from headway.store import CheckpointRef, CheckpointStore
from headway.store.weights import full_state


class FrozenPool:
    """Reference-counted frozen weights by the checkpoint that holds them."""

    def __init__(
        self, store: CheckpointStore, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        self._store, self._dtype = store, dtype
        self.device = torch.device(device)  # where the frozen tensors (and every module) live
        self._states: dict[CheckpointRef, dict[str, torch.Tensor]] = {}
        self._users: dict[CheckpointRef, int] = {}
        self._lock = threading.Lock()

    def acquire(self, ref: CheckpointRef) -> dict[str, torch.Tensor]:
        """The frozen tensors of `ref` (loaded on first use); pair with `release`."""
        with self._lock:
            if ref not in self._states:
                state = full_state(self._store, ref.model, ref.checkpoint, self._dtype)
                state = {k: to_device(t, self.device) for k, t in state.items()}
                for t in state.values():
                    t.requires_grad_(False)
                self._states[ref] = state
            self._users[ref] = self._users.get(ref, 0) + 1
            return self._states[ref]

    def release(self, ref: CheckpointRef) -> None:
        """One user fewer; the tensors are dropped when none is left."""
        with self._lock:
            self._users[ref] -= 1
            if self._users[ref] == 0:
                del self._users[ref], self._states[ref]

    def __len__(self) -> int:
        return len(self._states)
