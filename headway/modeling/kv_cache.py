"""`KVCache`: a preallocated key/value store for one attention layer.

Shape `[B, kv_heads, max_len, head_dim]`, allocated once and written in place at each
row's own positions (rows of a batch sit at different positions: ragged prompts, rows that
joined the batch later). Nothing is grown or concatenated while decoding, so a decode step
has static shapes. Entries past a row's current position may hold garbage from padding;
attention masks them out and the next write at that position overwrites them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class KVCache(torch.nn.Module):
    """Keys and values of one layer for `batch` rows of up to `max_len` positions."""

    # How one-token (decode) forwards attend over this cache: None = torch's SDPA, else a
    # function like `model.grouped_attention` (set by a serving engine on its windows).
    decode_attention: Callable[..., torch.Tensor] | None = None

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        like = dict(dtype=dtype, device=device)  # made where it is used, never copied there
        self.register_buffer("k", torch.zeros(shape, **like), persistent=False)
        self.register_buffer("v", torch.zeros(shape, **like), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def window(self, batch: int, length: int) -> KVCache:
        """A view of the first `batch` rows and `length` positions (shared storage).

        Decoding attends over the window of positions in use, not the whole preallocation,
        so a step's attention cost follows the live sequences, not the configured maximum.
        """
        view = KVCache.__new__(KVCache)
        torch.nn.Module.__init__(view)
        view.k, view.v = self.k[:batch, :, :length], self.v[:batch, :, :length]
        return view

    def copy_row(self, src: int, dst: slice, length: int) -> None:
        """Copy row `src`'s first `length` positions into rows `dst`: a prompt's prefill
        shared by its n rows, a live row moved into a freed one (a serving engine's row
        operations; `LinearAttentionState` has the same)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]

    def update(
        self,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v `[B, kv_heads, T, head_dim]` at `positions` `[B, T]`.

        `rows` `[B]` picks the cache rows written and read (None: the first B rows).
        Returns the keys and values attention reads, `[B, kv_heads, max_len, head_dim]`.
        """
        B = k.shape[0]
        r = torch.arange(B, device=k.device) if rows is None else rows
        # Advanced indices separated by a slice put their broadcast dims first: [B, T, H, D].
        self.k[r[:, None], :, positions] = k.transpose(1, 2)
        self.v[r[:, None], :, positions] = v.transpose(1, 2)
        if rows is None:  # the first B rows: a view, no copy
            return self.k[:B], self.v[:B]
        return self.k[rows], self.v[rows]


class CacheWindow(KVCache):
    """The first `length` positions of a `KVCache`, for a compiled decode step.

    `update` writes the new keys and values into the whole cache and returns the first
    rows' `length` positions. A `KVCache.window` view as a compiled graph's input is
    strided (its positions are a slice of the cache's), and inductor writes into such an
    input by copying it out, writing and copying it back: the whole window of every layer
    at every step (16 MB a step at 8 rows over 128 positions of a small model). The
    whole cache is contiguous and is written in place. The length is the shape of a
    tensor (`span`), not an int, so that one graph with a dynamic size serves every window.
    """

    def __init__(self, cache: KVCache, length: int) -> None:
        torch.nn.Module.__init__(self)
        self.k, self.v = cache.k, cache.v  # the cache's own tensors, not views
        self.span = torch.empty(length, dtype=torch.int8, device=cache.k.device)

    @property
    def max_len(self) -> int:
        return self.span.shape[0]

    def update(
        self,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`KVCache.update` of the first B rows (`rows` must be None), returning their
        window's keys and values `[B, kv_heads, length, head_dim]`."""
        assert rows is None, "a cache window serves the first rows"
        B, length = k.shape[0], self.span.shape[0]
        super().update(positions, k, v)
        return self.k[:B, :, :length], self.v[:B, :, :length]


def round_up(n: int, multiple: int = 8) -> int:
    """`n` rounded up to a multiple (cache lengths are multiples of 8, as in gpt-fast)."""
    return (n + multiple - 1) // multiple * multiple
