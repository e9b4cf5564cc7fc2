"""The decoder: one implementation of the Llama, Qwen2 and Qwen3 families.

Module and parameter names follow Hugging Face's (`layers.N.self_attn.q_proj`, ...) minus
the leading `model.`, so loading is a prefix strip and LoRA keys map to PEFT's directly.
The family differences are `ModelConfig` switches: q/k/v bias (Qwen2), per-head q/k RMSNorm
(Qwen3), Llama-3 RoPE scaling, tied or untied embeddings.

`Transformer.forward` serves training (a full causal forward over right-padded rows) and
sampling (prefill and one-token decode against preallocated `KVCache`s, each row at its own
position). It returns logits only; logprobs come from `headway.modeling.logprobs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from headway.modeling.config import ModelConfig
from headway.modeling.errors import ModelError
from headway.modeling.kv_cache import KVCache


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, exactly as transformers does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm is one op where x.float() * rsqrt(mean(x²) + eps) is six (~10 us
        # less per norm at decode on a 2-core EPYC, 33 norms a step), with the same bits: it
        # normalizes in fp32 and casts back; the weight is applied after the cast, as
        # transformers does, except in fp32, where applying it inside changes nothing.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x, self.weight.shape, None, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies `[head_dim // 2]` (fp32), with Llama-3 scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        # An explicit device: built on the meta device, the model still needs real frequencies.
        config.rope_theta
        ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    )
    spec = config.rope_scaling
    if spec is None:
        return inv_freq
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the middle band
    # interpolated (same arithmetic as transformers' _compute_llama3_parameters).
    factor, low, high = spec["factor"], spec["low_freq_factor"], spec["high_freq_factor"]
    old_len = spec["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[B, 1, T, head_dim]` for integer `positions` `[B, T]`."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of few queries (decode) as plain matmuls, softmax in fp32: q `[B, H, T, D]`,
    k/v `[B, H_kv, L, D]` (H a multiple of H_kv), boolean `mask` `[B, 1, T, L]`.

    The same result as `F.scaled_dot_product_attention(..., enable_gqa=True)` (to float
    rounding); on some CPUs and dtypes (bf16 on CPU: ~6x at 8 rows) much faster for one
    query per row. A serving engine measures both and picks (`KVCache.decode_attention`).
    """
    B, H, T, D = q.shape
    kv = k.shape[1]
    qg = q.reshape(B, kv, (H // kv) * T, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(D))
    scores = scores.view(B, kv, H // kv, T, -1).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(B, kv, (H // kv) * T, -1)
    return torch.matmul(probs, v).view(B, H, T, D)


def checked_positions(
    model: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor | None,
    caches: list | None,
    validate: bool,
) -> torch.Tensor:
    """The forward's positions (0..T-1 per row when None), after checking (`validate`) the
    tokens against the vocabulary and the last position against the context or the cache
    length: the checks every family's forward makes before it computes."""
    B, T = input_ids.shape
    if positions is None:
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
    if validate:
        model.check_tokens(input_ids)
        limit = model.config.max_context if caches is None else caches[0].max_len
        last = int(positions.max()) + 1 if positions.numel() else 0
        if last > limit:
            what = "the model's context" if caches is None else "the cache length"
            raise ModelError(
                f"sequence of {last} tokens exceeds {what} of {limit}; shorten the input"
                + (" (max_position_embeddings in config.json)" if caches is None else "")
            )
    return positions


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, H, T, head_dim]` (the half-split convention of HF checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query self-attention with optional q/k bias and q/k norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # Set by a serving engine: q/k/v as one call (x → (q, k, v), see sampler_svc's
        # fuse_projections); None (training, scoring) runs the three projections.
        self.fused_qkv: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        rows: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fused_qkv is not None:
            q, k, v = self.fused_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = cache.update(positions, k, v, rows)  # [B, H_kv, max_len, D]
            if cache.decode_attention is not None and T == 1:
                out = cache.decode_attention(q, k, v, mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        # Set by a serving engine: gate and up as one call (x → (gate, up)); None runs both.
        self.fused_gate_up: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, *attn_args: object) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only language model; `forward` returns logits `[B, T, vocab]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # The weights are uninitialised until `init_weights` or a checkpoint fills them:
        # nn.Embedding's own normal_() on the meta device (where every service builds its
        # models) runs through torch._refs and imports sympy, 1.5-2 s of every process start.
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # A plain attribute, not a buffer: `.to(bfloat16)` must not round the frequencies.
        self.inv_freq = rope_inv_freq(config)

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random initialisation as transformers does it (normal(0, std), norms at 1)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def new_caches(self, batch: int, max_len: int, spare: int = 0) -> list[KVCache]:
        """One preallocated `KVCache` per layer for `batch` rows of `max_len` positions.

        `spare`: positions allocated past `max_len` that no forward reaches, so that a window
        of the cache never spans all of it (a compiled decode graph keys on that: see
        sampler_svc.compiled)."""
        if max_len > self.config.max_context:
            raise ModelError(
                f"a cache of {max_len} positions exceeds the model's context of "
                f"{self.config.max_context} (max_position_embeddings in config.json)"
            )
        c, p = self.config, self.embed_tokens.weight
        return [
            KVCache(batch, c.num_key_value_heads, max_len + spare, c.head_dim, p.dtype, p.device)
            for _ in range(c.num_hidden_layers)
        ]

    def check_tokens(self, input_ids: torch.Tensor) -> None:
        """Raise `ModelError` naming the first token id outside [0, vocab_size)."""
        bad = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            where = f"row {idx[0]}, position {idx[1]}" if len(idx) == 2 else f"position {idx[0]}"
            raise ModelError(
                f"token id {int(input_ids[idx])} at {where} is out of range: "
                f"the vocabulary has ids 0..{self.config.vocab_size - 1}"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        caches: list[KVCache] | None = None,
        rows: torch.Tensor | None = None,
        output_index: torch.Tensor | None = None,
        validate: bool = True,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits for `input_ids` `[B, T]`.

        Without `caches`: a causal forward over positions 0..T-1 (training, scoring). Rows of
        different lengths are right-padded; padding never affects earlier positions.
        With `caches`: k/v are written at `positions` `[B, T]` (each row its own) into cache
        `rows` (None: all), and each query attends to cache entries at positions ≤ its own:
        prefill is T > 1, decode is T == 1.
        `output_index` `[B]`: compute logits only at that position of each row (`[B, 1, V]`),
        sparing the vocabulary projection of a whole prompt.
        `validate=False` skips the token/context checks (a host sync) on the decode hot path.
        `return_hidden=True` returns the final normed hidden states `[B, T, hidden]` instead,
        for callers that project only the positions they need (training skips the vocabulary
        projection's backward at positions that carry no loss).
        """
        B, T = input_ids.shape
        positions = checked_positions(self, input_ids, positions, caches, validate)
        x = self.embed_tokens(input_ids)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        mask = None
        if caches is not None:
            keys = torch.arange(caches[0].max_len, device=x.device)
            mask = (keys <= positions[..., None])[:, None]  # [B, 1, T, max_len]
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            x = layer(x, cos, sin, positions, cache, rows, mask)
        if output_index is not None:
            x = x[torch.arange(B, device=x.device), output_index][:, None]
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)
