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

The forward is the training/scoring one (full causal sequences, right-padded rows: every
mixer is causal, so padding never affects earlier positions). Sampling with per-row
recurrent and conv states is not implemented: `caches` raises `ModelError`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headway.modeling.errors import ModelError
from headway.modeling.model import MLP, Transformer, apply_rope, rope_cos_sin
from headway.modeling.qwen3_5.config import LINEAR, Qwen35Config
from headway.modeling.qwen3_5.delta_rule import chunked_gated_delta_rule

_NOT_SAMPLED = (
    "Qwen3.5 models cannot be sampled yet (their per-row recurrent state is not "
    "implemented); they can be trained and exported"
)


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm scaling by (1 + weight), in fp32, cast back after the scaling (as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """RMSNorm (plain weight) of each head's output, then times SiLU(gate)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (h * F.silu(gate.float())).to(dtype)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # Causal depthwise conv: left-pad by kernel-1 so position t sees t-k+1..t only.
        qkv = self.in_proj_qkv(x).transpose(1, 2)  # [B, conv_dim, T]
        width = self.conv1d.weight.shape[-1]
        qkv = F.silu(F.conv1d(F.pad(qkv, (width - 1, 0)), self.conv1d.weight, groups=qkv.shape[1]))
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
        out, _ = chunked_gated_delta_rule(
            *(t.transpose(1, 2) for t in (q, k, v, g, beta))
        )  # [B, H_v, T, Dv]
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

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = self.rotary_dim
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)  # [B, H, T, D]
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + (self.linear_attn(h) if self.is_linear else self.self_attn(h, cos, sin))
        return x + self.mlp(self.post_attention_layernorm(x))


def partial_rope_inv_freq(config: Qwen35Config) -> torch.Tensor:
    """RoPE inverse frequencies `[rotary_dim // 2]` (fp32) of the rotated part of a head."""
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (config.rope_theta**exponents)


class Qwen35Model(nn.Module):
    """Qwen3.5 language model; `forward` returns logits `[B, T, vocab]` (the `Transformer`
    contract for training and scoring)."""

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

    def new_caches(self, batch: int, max_len: int) -> list:
        """Not yet: sampling Qwen3.5 needs per-row recurrent and conv states."""
        raise ModelError(_NOT_SAMPLED)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        caches: list | None = None,
        rows: torch.Tensor | None = None,
        output_index: torch.Tensor | None = None,
        validate: bool = True,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits for `input_ids` `[B, T]` over positions 0..T-1 (causal, right-padded rows).

        `positions` must be those positions (the linear-attention layers know no others);
        `output_index`, `validate` and `return_hidden` as in `Transformer.forward`.
        """
        if caches is not None or rows is not None:
            raise ModelError(_NOT_SAMPLED)
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if validate:
            self.check_tokens(input_ids)
            if input_ids.shape[1] > self.config.max_context:
                raise ModelError(
                    f"sequence of {T} tokens exceeds the model's context of "
                    f"{self.config.max_context}; shorten the input "
                    "(max_position_embeddings in config.json)"
                )
        x = self.embed_tokens(input_ids)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        if output_index is not None:
            x = x[torch.arange(B, device=x.device), output_index][:, None]
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)
