"""The Qwen3.5 decoder (text): Gated DeltaNet and gated-attention blocks, and `Qwen35Model`.

Each layer is pre-norm like the dense decoder's, its token mixer chosen by `layer_types`:
- `linear_attn` (Gated DeltaNet): q/k/v through a causal depthwise conv and SiLU, q and k
  L2-normalised, a per-head decay g = −exp(A_log)·softplus(a + dt_bias) and rate β =
  sigmoid(b) driving the gated delta rule (`delta_rule.py`), the output normed per head and
  gated by SiLU(z) (`GatedRMSNorm`), then `out_proj`;
- `self_attn`: grouped-query softmax attention whose `q_proj` also yields a per-head output
  gate (sigmoid), with q/k RMSNorm and RoPE on the first `rotary_dim` dims only.
The other RMSNorms (layer norms, final norm, q/k norms) scale by (1 + weight): their weights
are stored zero-centred. Parameter names are Hugging Face's minus the leading `model.`.

Without caches the forward is the training/scoring one (full causal sequences, right-padded
rows: every mixer is causal, so padding never affects earlier positions). With the caches of
`new_caches` it samples as the dense decoder does, each row at its own position: a
`KVCache` per full-attention layer and a `LinearAttentionState` (recurrent and conv state)
per linear-attention layer, prefill continuing a row's state a chunk at a time (the chunked
rule) and decode one token per row (the recurrent rule, in place).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from headway.modeling.errors import ModelError
from headway.modeling.kv_cache import KVCache
from headway.modeling.model import (
    MLP,
    Transformer,
    apply_rope,
    checked_positions,
    rope_cos_sin,
)
from headway.modeling.qwen3_5.config import LINEAR, Qwen35Config
from headway.modeling.qwen3_5.delta_rule import chunked_gated_delta_rule, gated_delta_step
from headway.modeling.qwen3_5.state import LinearAttentionState


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm scaling by (1 + weight), in fp32, cast back after the scaling (as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.weight.float()  # fp32: one op, transformers' bits
        return F.rms_norm(x.float(), scale.shape, scale, self.eps).type_as(x)


class GatedRMSNorm(nn.Module):
    """RMSNorm (plain weight) of each head's output, then times SiLU(gate)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = self.weight * F.rms_norm(x, self.weight.shape, None, self.eps)  # see RMSNorm
        return (h * F.silu(gate.float())).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|² + eps) over the last dim (eps inside the root, as the reference kernels)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(nn.Module):
    """Linear attention by the gated delta rule over a causal depthwise convolution."""

    def __init__(self, config: Qwen35Config) -> None:
        super().__init__()
        self.n_k, self.n_v = config.linear_num_key_heads, config.linear_num_value_heads
        self.dk, self.dv = config.linear_key_head_dim, config.linear_value_head_dim
        key_dim, value_dim = self.n_k * self.dk, self.n_v * self.dv
        self.split = (key_dim, key_dim, value_dim)
        conv_dim, h = 2 * key_dim + value_dim, config.hidden_size
        self.in_proj_qkv = nn.Linear(h, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(h, value_dim, bias=False)  # output gate
        self.in_proj_b = nn.Linear(h, self.n_v, bias=False)  # β (write strength) per v head
        self.in_proj_a = nn.Linear(h, self.n_v, bias=False)  # decay input per v head
        k = config.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, k, groups=conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.n_v))
        self.A_log = nn.Parameter(torch.zeros(self.n_v))
        self.norm = GatedRMSNorm(self.dv, config.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        state: LinearAttentionState | None = None,
        rows: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mix `x` `[B, T, hidden]`. Without `state` every row starts from nothing (training);
        with it each row continues from its stored state (`state.read`: rows `rows`, zeros
        where `keep` `[B]` is False) and the state after its last token is stored. With a
        state every row's T tokens are real (no padding: it would enter the state)."""
        B, T, _ = x.shape
        qkv = self.in_proj_qkv(x).transpose(1, 2)  # [B, conv_dim, T]
        width = self.conv1d.weight.shape[-1]
        if state is None:
            # Causal depthwise conv: left-pad by kernel-1 so position t sees t-k+1..t only.
            padded, recurrent = F.pad(qkv, (width - 1, 0)), None
        else:  # the row's previous kernel-1 inputs stand in for the padding
            conv, recurrent = state.read(rows, B, keep)
            padded = torch.cat((conv, qkv), dim=-1)
        if state is not None and T == 1:
            # Decode: one output per channel, a multiply-add over its kernel-wide window.
            # The same sum as the conv; oneDNN's depthwise conv costs ~4-10x more per call
            # for a single position (measured: 107-295 vs 23-25 µs, 1024 channels, 1 row).
            # Accumulated in fp32, as the conv does (a bf16 sum of bf16 products would not).
            window = padded.float() * self.conv1d.weight[:, 0].float()
            mixed = window.sum(-1, keepdim=True).to(padded.dtype)
        else:
            mixed = F.conv1d(padded, self.conv1d.weight, groups=qkv.shape[1])
        qkv = F.silu(mixed)
        q, k, v = qkv.transpose(1, 2).split(self.split, dim=-1)
        # [B, T, heads, dim] → [B, H_v, T, dim] in fp32; each q/k head serves n_v/n_k
        # consecutive v heads.
        rep = self.n_v // self.n_k
        q, k = (t.reshape(B, T, self.n_k, self.dk).repeat_interleave(rep, dim=2) for t in (q, k))
        q, k = l2_normalize(q.float()), l2_normalize(k.float())
        q = q * self.dk**-0.5
        v = v.reshape(B, T, self.n_v, self.dv).float()
        beta = torch.sigmoid(self.in_proj_b(x)).float()  # [B, T, H_v]
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        if state is not None and T == 1:  # decode: the recurrent form, state updated in place
            out = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], recurrent)
            out, final = out[:, :, None], recurrent  # [B, H_v, 1, Dv]
        else:
            out, final = chunked_gated_delta_rule(
                *(t.transpose(1, 2) for t in (q, k, v, g, beta)), state=recurrent
            )  # [B, H_v, T, Dv]
        if state is not None:
            state.write(rows, padded[..., padded.shape[-1] - (width - 1) :], final)
        out = out.transpose(1, 2).to(x.dtype)  # [B, T, H_v, Dv]
        z = self.in_proj_z(x).view(B, T, self.n_v, self.dv)
        return self.out_proj(self.norm(out, z).reshape(B, T, -1))


class GatedAttention(nn.Module):
    """Grouped-query causal attention with a sigmoid output gate and partial RoPE."""

    def __init__(self, config: Qwen35Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.rotary_dim = config.head_dim, config.rotary_dim
        q_dim, kv_dim, h = (
            self.n_heads * self.head_dim,
            self.n_kv * self.head_dim,
            config.hidden_size,
        )
        # q_proj yields, per head, the query followed by its output gate.
        self.q_proj = nn.Linear(h, 2 * q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, h, bias=config.o_bias)
        self.q_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)
        # Set by a serving engine: q(+gate)/k/v as one call, as `Attention.fused_qkv`.
        self.fused_qkv: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = self.rotary_dim
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend causally over `x` `[B, T, hidden]`, or, with `cache`, over each row's cached
        positions ≤ its own (`mask`), k/v written at `positions` (as `Attention`)."""
        B, T, _ = x.shape
        if self.fused_qkv is not None:
            q, k, v = self.fused_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, gate = q.view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)  # [B, H, T, D]
        k = self.k_norm(k.view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = cache.update(positions, k, v, rows)  # [B, H_kv, max_len, D]
            if cache.decode_attention is not None and T == 1:
                out = cache.decode_attention(q, k, v, mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate.reshape(B, T, -1))
        return self.o_proj(out)


class Qwen35Block(nn.Module):
    """Pre-norm block: a Gated DeltaNet or gated-attention mixer, then the SwiGLU MLP."""

    def __init__(self, config: Qwen35Config, layer_type: str) -> None:
        super().__init__()
        self.is_linear = layer_type == LINEAR
        self.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = GatedAttention(config)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | LinearAttentionState | None = None,
        positions: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.is_linear:
            h = self.linear_attn(h, cache, rows, keep)
        else:
            h = self.self_attn(h, cos, sin, cache, positions, rows, mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


def partial_rope_inv_freq(config: Qwen35Config) -> torch.Tensor:
    """RoPE inverse frequencies `[rotary_dim // 2]` (fp32) of the rotated part of a head."""
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (config.rope_theta**exponents)


class Qwen35Model(nn.Module):
    """Qwen3.5 language model; `forward` returns logits `[B, T, vocab]` (the `Transformer`
    contract for training, scoring and sampling with `new_caches`)."""

    def __init__(self, config: Qwen35Config) -> None:
        super().__init__()
        self.config = config
        shape = (config.vocab_size, config.hidden_size)
        # Uninitialised until init_weights or a checkpoint (see Transformer.__init__).
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(Qwen35Block(config, kind) for kind in config.layer_types)
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = partial_rope_inv_freq(config)  # a plain attribute, as Transformer's

    check_tokens = Transformer.check_tokens

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random initialisation as transformers does it: normal(0, std) projections and
        conv, zero-centred norms at 0, gated norms and dt_bias at 1, A in [1, 16)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear | nn.Embedding | nn.Conv1d):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, ZeroCenteredRMSNorm):
                    module.weight.zero_()
                elif isinstance(module, GatedRMSNorm):
                    module.weight.fill_(1.0)
                elif isinstance(module, GatedDeltaNet):
                    module.dt_bias.fill_(1.0)
                    a = torch.rand(module.A_log.shape, generator=gen) * 15 + 1
                    module.A_log.copy_(a.log())

    def new_caches(
        self, batch: int, max_len: int, spare: int = 0
    ) -> list[KVCache | LinearAttentionState]:
        """Per layer, for `batch` rows of up to `max_len` positions (and `spare` more, as
        `Transformer.new_caches`): a preallocated `KVCache` (full attention) or a
        `LinearAttentionState` (linear attention)."""
        c, p = self.config, self.embed_tokens.weight
        if max_len > c.max_context:
            raise ModelError(
                f"a cache of {max_len} positions exceeds the model's context of "
                f"{c.max_context} (max_position_embeddings in config.json)"
            )
        caches: list[KVCache | LinearAttentionState] = []
        for layer in self.layers:
            if layer.is_linear:
                mixer = layer.linear_attn
                cache = LinearAttentionState(
                    batch,
                    max_len + spare,
                    mixer.n_v,
                    mixer.dk,
                    mixer.dv,
                    sum(mixer.split),
                    mixer.conv1d.weight.shape[-1],
                    p.dtype,
                )
            else:
                cache = KVCache(batch, c.num_key_value_heads, max_len + spare, c.head_dim, p.dtype)
            caches.append(cache.to(p.device))
        return caches

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        caches: list[KVCache | LinearAttentionState] | None = None,
        rows: torch.Tensor | None = None,
        output_index: torch.Tensor | None = None,
        validate: bool = True,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits for `input_ids` `[B, T]`.

        Without `caches`: a causal forward over positions 0..T-1 (training, scoring; rows
        right-padded); `positions`, if given, must be those.
        With `caches` (from `new_caches`): each row continues its own sequence at `positions`
        `[B, T]` (consecutive, starting where its previous forward ended, or at 0 for a new
        sequence) in cache `rows` (None: the first B rows): prefill is T > 1 (a prompt whole
        or in chunks), decode T == 1. Every row's T tokens are real (the linear-attention
        state would take in padding).
        `output_index`, `validate` and `return_hidden` as in `Transformer.forward`.
        """
        B, T = input_ids.shape
        positions = checked_positions(self, input_ids, positions, caches, validate)
        x = self.embed_tokens(input_ids)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        mask = keep = None
        if caches is not None:
            keys = torch.arange(caches[0].max_len, device=x.device)
            mask = (keys <= positions[..., None])[:, None]  # [B, 1, T, max_len]
            keep = positions[:, 0] > 0  # rows continuing a sequence (else: from zero state)
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            x = layer(x, cos, sin, cache, positions, rows, mask, keep)
        if output_index is not None:
            x = x[torch.arange(B, device=x.device), output_index][:, None]
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)
