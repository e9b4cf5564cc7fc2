"""`LinearAttentionState`: the per-row sampling state of one Gated DeltaNet layer.

Where a full-attention layer keeps every past key and value (`KVCache`), a linear-attention
layer needs only two fixed-size tensors per row, whatever the row's length:
- `recurrent` `[rows, v_heads, key_dim, value_dim]`: the delta rule's state S after the
  row's last token (fp32 always: it accumulates over the whole sequence, as in training);
- `conv` `[rows, channels, kernel - 1]`: the last kernel-1 inputs of the causal depthwise
  conv (the q/k/v projections before the conv), in the model's dtype.

It offers what a serving engine does with a `KVCache` (`window` views of the first rows,
`copy_row` to share a prompt's prefill with its n rows or move a live row into a freed
one, `max_len`), so the engine drives both kinds of layer alike. A row's state is used
only from its second forward on: a forward whose row starts at position 0 begins from zeros
(`read`), so a row reused by a new prompt needs no reset.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class LinearAttentionState(torch.nn.Module):
    """Recurrent and conv state of one linear-attention layer for `batch` rows."""

    # Set by a serving engine on every cache view (a `KVCache` attribute); unused here.
    decode_attention: Callable[..., torch.Tensor] | None = None

    def __init__(
        self,
        batch: int,
        max_len: int,
        heads: int,
        key_dim: int,
        value_dim: int,
        channels: int,
        kernel: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        # The positions a row may reach (no storage depends on it: a `KVCache`'s field).
        self.max_len = max_len
        self.register_buffer(
            "recurrent",
            torch.zeros(batch, heads, key_dim, value_dim, dtype=torch.float32),
            persistent=False,
        )
        self.register_buffer(
            "conv", torch.zeros(batch, channels, kernel - 1, dtype=dtype), persistent=False
        )

    def window(self, batch: int, length: int) -> LinearAttentionState:
        """A view of the first `batch` rows (shared storage) for rows up to `length` long."""
        view = LinearAttentionState.__new__(LinearAttentionState)
        torch.nn.Module.__init__(view)
        view.max_len = length
        view.recurrent, view.conv = self.recurrent[:batch], self.conv[:batch]
        return view

    def copy_row(self, src: int, dst: slice, length: int) -> None:
        """Copy row `src`'s state into rows `dst` (`length`, the positions it holds, does
        not matter here: the state summarises them all)."""
        self.recurrent[dst] = self.recurrent[src]
        self.conv[dst] = self.conv[src]

    def read(
        self, rows: torch.Tensor | None, batch: int, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv state, recurrent state) of `rows` (None: the first `batch`), zero for
        rows whose `keep` `[B]` (bool) is False (a sequence starting at position 0).

        With `rows` None the recurrent state is the cache's own storage (a view), so a
        decode step updates it in place; with `rows` both are copies (`write` stores them).
        """
        conv = self.conv[:batch] if rows is None else self.conv[rows]
        conv = conv * keep[:, None, None].to(conv.dtype)
        if rows is None:
            recurrent = self.recurrent[:batch]
            recurrent.mul_(keep[:, None, None, None])
        else:
            recurrent = self.recurrent[rows] * keep[:, None, None, None]
        return conv, recurrent

    def write(self, rows: torch.Tensor | None, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        """Store the state after a forward for `rows` (None: the first rows)."""
        if rows is None:
            B = conv.shape[0]
            self.conv[:B].copy_(conv)
            if recurrent.data_ptr() != self.recurrent.data_ptr():  # not updated in place
                self.recurrent[:B].copy_(recurrent)
        else:
            self.conv[rows] = conv
            self.recurrent[rows] = recurrent
