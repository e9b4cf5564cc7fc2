"""The gated delta rule, Gated DeltaNet's token mixer: a recurrent form and a chunked form.

Per head, a state S `[Dk, Dv]` (a fast-weight memory from keys to values) is, at each token t,
decayed by exp(g_t) (g_t ≤ 0), then corrected towards v_t by the delta rule with learning
rate β_t, and read by the query:

    S ← exp(g_t) · S
    u_t = β_t · (v_t − k_tᵀ S)          the part of v_t the memory does not yet predict
    S ← S + k_t u_tᵀ
    o_t = q_tᵀ S

`recurrent_gated_delta_rule` runs that loop (one token at a time: decoding, and the
reference). `chunked_gated_delta_rule` computes the same outputs a chunk of C tokens at a
time with matmuls (training): inside a chunk, with Γ_t = exp(g_1 + … + g_t) and S₀ the state
at the chunk's start, the u_t solve a unit lower-triangular system

    u_t + Σ_{s<t} β_t (Γ_t/Γ_s)(k_t·k_s) u_s = β_t v_t − β_t Γ_t k_tᵀ S₀

(the "WY"/UT form of DeltaNet), and then

    o_t = Γ_t q_tᵀ S₀ + Σ_{s≤t} (Γ_t/Γ_s)(q_t·k_s) u_s
    S_C = Γ_C S₀ + Σ_s (Γ_C/Γ_s) k_s u_sᵀ.

Both take fp32 tensors laid out `[B, H, T, D]` (q and k already L2-normalised, q scaled,
heads already matched to v's), so they are plain autograd graphs: the chunked form's
backward is torch's through `solve_triangular`. They stay in fp32 under autocast (the
trainer's bf16 mode): the state accumulates over the whole sequence and the triangular
solve amplifies rounding, so only the projections around them run in bf16.
"""

from __future__ import annotations

import torch


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs `[B, H, T, Dv]`, final state `[B, H, Dk, Dv]`) token by token.

    q, k `[B, H, T, Dk]`; v `[B, H, T, Dv]`; g (log decay), beta `[B, H, T]`; `state` the
    state before the first token (None: zeros).
    """
    B, H, T, Dk = k.shape
    if state is None:
        state = k.new_zeros(B, H, Dk, v.shape[-1])
    outs = []
    for t in range(T):
        state = state * g[:, :, t].exp()[..., None, None]
        predicted = torch.einsum("bhk,bhkv->bhv", k[:, :, t], state)
        u = beta[:, :, t, None] * (v[:, :, t] - predicted)
        state = state + k[:, :, t, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    return torch.stack(outs, dim=2), state


def chunked_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as `recurrent_gated_delta_rule`, `chunk_size` tokens per step (the last chunk
    may be shorter: no padding)."""
    with torch.autocast(k.device.type, enabled=False):
        return _chunked(q, k, v, g, beta, state, chunk_size)


def _chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    if state is None:
        state = k.new_zeros(B, H, Dk, Dv)
    outs = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (x[:, :, start : start + chunk_size] for x in (q, k, v))
        gc, bc = (x[:, :, start : start + chunk_size] for x in (g, beta))
        n = kc.shape[2]
        log_gamma = gc.cumsum(-1)  # [B, H, n]: log Γ_t
        causal = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()
        # decay[t, s] = Γ_t / Γ_s for s ≤ t, 0 above (masked before exp: Γ_t/Γ_s > 1 there).
        decay = (log_gamma[..., :, None] - log_gamma[..., None, :]).masked_fill(~causal, -torch.inf)
        decay = decay.exp()  # [B, H, n, n]
        eye = torch.eye(n, dtype=k.dtype, device=k.device)
        system = eye + (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * decay).tril(-1)
        gamma = log_gamma.exp()
        rhs = torch.cat((bc[..., None] * vc, (bc * gamma)[..., None] * kc), dim=-1)
        solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        u = solved[..., :Dv] - solved[..., Dv:] @ state  # [B, H, n, Dv]
        outs.append((qc * gamma[..., None]) @ state + ((qc @ kc.transpose(-1, -2)) * decay) @ u)
        to_end = (log_gamma[..., -1:] - log_gamma).exp()  # Γ_C / Γ_s
        state = gamma[..., -1, None, None] * state + (kc * to_end[..., None]).transpose(-1, -2) @ u
    return torch.cat(outs, dim=2), state


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One token of the rule for every row (a decode step), updating `state` in place.

    q, k `[B, H, Dk]`; v `[B, H, Dv]`; g, beta `[B, H]`; `state` `[B, H, Dk, Dv]`
    (contiguous, fp32). Returns the outputs `[B, H, Dv]`. The same arithmetic as one
    iteration of `recurrent_gated_delta_rule`, as batched matmuls over B·H heads and with
    no new state tensor: a decode step writes the row's state where it lives.
    """
    B, H, Dk, Dv = state.shape
    state.mul_(g.exp()[..., None, None])
    flat = state.view(B * H, Dk, Dv)
    predicted = torch.bmm(k.reshape(B * H, 1, Dk), flat)  # kᵀS [BH, 1, Dv]
    u = beta.reshape(B * H, 1, 1) * (v.reshape(B * H, 1, Dv) - predicted)
    flat.baddbmm_(k.reshape(B * H, Dk, 1), u)  # S += k uᵀ
    return torch.bmm(q.reshape(B * H, 1, Dk), flat).view(B, H, Dv)
