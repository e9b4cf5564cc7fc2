"""LoRA adapters: low-rank updates on chosen projections, saved in PEFT's format.

`LoRALinear` keeps the base projection's own `weight`/`bias` parameters (the same tensor
objects, never copies, so many forks share one base in memory) and adds `lora_A` `[r, in]`
and `lora_B` `[out, r]`; `lora_B` starts at zero, so a fresh adapter leaves the logits
exactly those of the base. On disk an adapter is PEFT's `adapter_config.json` +
`adapter_model.safetensors` with PEFT's key names, so `peft` and vLLM load it as is.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from headway.modeling.errors import ModelError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Qwen3.5's linear-attention (Gated DeltaNet) projections, under transformers' (and so PEFT's)
# names; a family's default targets are its config's `lora_targets`.
LINEAR_ATTENTION_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
KNOWN_TARGETS = DEFAULT_TARGETS + LINEAR_ATTENTION_TARGETS
_PEFT_PREFIX = "base_model.model.model."  # PEFT wraps the HF model, whose body is `model.`


@dataclass
class LoraConfig:
    """Shape of an adapter."""

    rank: int = 32  # r: inner dimension of the update B @ A
    alpha: float = 0.0  # the update is scaled by alpha / rank; 0 → alpha = rank (scale 1)
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)  # projection names

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ModelError(f"LoRA rank must be ≥ 1, got {self.rank}")
        if self.alpha <= 0:
            self.alpha = float(self.rank)
        unknown = set(self.target_modules) - set(KNOWN_TARGETS)
        if unknown or not self.target_modules:
            raise ModelError(
                f"LoRA target_modules {sorted(unknown) or '[]'} not valid; "
                f"choose among {', '.join(KNOWN_TARGETS)}"
            )
        self.target_modules = tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """y = x Wᵀ + b + (alpha/r) · x Aᵀ Bᵀ, with W and b the base projection's parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.weight = base.weight  # shared with the base, not copied
        self.bias = base.bias
        self.scaling = alpha / rank
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's initialisation
        self.adapter_off = False  # see `adapters_off`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_off:
            return F.linear(x, self.weight, self.bias)
        return (
            F.linear(x, self.weight, self.bias)
            + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        )

    def merged(self) -> nn.Linear:
        """A plain projection with the update folded in (a new tensor; the base is untouched)."""
        out = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        with torch.no_grad():
            out.weight = nn.Parameter(self.weight + self.scaling * self.lora_B @ self.lora_A)
            if self.bias is not None:
                out.bias = nn.Parameter(self.bias.detach().clone())
        return out.to(self.weight.device)


def _projections(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every targeted projection."""
    found = []
    for _, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in targets and isinstance(child, nn.Linear | LoRALinear):
                found.append((module, child_name))
    return found


def apply_lora(model: nn.Module, config: LoraConfig, seed: int | None = None) -> None:
    """Wrap the targeted projections of `model` in fresh adapters (base weights frozen)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ModelError("the model already carries a LoRA adapter")
    if seed is not None:
        torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name in _projections(model, config.target_modules):
        setattr(parent, name, LoRALinear(getattr(parent, name), config.rank, config.alpha))
    model.lora_config = config


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Within the block, `model` computes as its base: every adapter is skipped (not
    multiplied by zero), so a forward costs the base's work and no copy of its weights."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.adapter_off = True
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_off = False


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names."""
    return {
        f"{_PEFT_PREFIX}{name}.weight": p.detach()
        for name, p in model.named_parameters()
        if name.endswith(("lora_A", "lora_B"))
    }


def save_adapter(model: nn.Module, path: str | Path, base_model: str = "") -> None:
    """Write the adapter of `model` as PEFT's `adapter_config.json` + safetensors."""
    config: LoraConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ModelError("the model carries no LoRA adapter to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(peft_config(config, base_model), indent=2))


def peft_config(config: LoraConfig, base_model: str = "") -> dict[str, object]:
    """PEFT's `adapter_config.json` content for `config`."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }


def read_adapter_config(path: str | Path) -> LoraConfig:
    """The `LoraConfig` of a PEFT adapter directory."""
    file = Path(path) / "adapter_config.json"
    if not file.is_file():
        raise ModelError(f"{file}: not found; an adapter directory needs adapter_config.json")
    raw = json.loads(file.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{file}: peft_type {raw['peft_type']!r} is not LORA")
    if raw.get("use_rslora") or raw.get("use_dora"):
        raise ModelError(f"{file}: rsLoRA/DoRA adapters are not supported")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        raise ModelError(f"{file}: target_modules must be a list of projection names")
    return LoraConfig(int(raw["r"]), float(raw.get("lora_alpha", raw["r"])), tuple(targets))


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Apply (if needed) and load the PEFT adapter at `path` into `model`."""
    path = Path(path)
    config = read_adapter_config(path)
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, config)
    elif model.lora_config != config:
        raise ModelError(f"{path}: adapter shape {config} differs from the model's adapter")
    file = path / "adapter_model.safetensors"
    try:
        saved = load_file(str(file))
    except Exception as e:
        raise ModelError(f"{file}: cannot read adapter weights (missing or truncated?): {e}") from e
    # PEFT may save with an adapter name ("...lora_A.default.weight"); accept both.
    saved = {k.replace(".default.weight", ".weight"): v for k, v in saved.items()}
    params = dict(model.named_parameters())
    for key, param in lora_state_dict(model).items():
        if key not in saved:
            raise ModelError(f"{file}: missing tensor {key}")
        if saved[key].shape != param.shape:
            raise ModelError(
                f"{file}: tensor {key} has shape {list(saved[key].shape)}, "
                f"the model needs {list(param.shape)}"
            )
        name = key[len(_PEFT_PREFIX) : -len(".weight")]
        with torch.no_grad():
            params[name].copy_(saved[key])


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into plain projections (for export as full weights)."""
    for parent, name in _projections(model, KNOWN_TARGETS):
        child = getattr(parent, name)
        if isinstance(child, LoRALinear):
            setattr(parent, name, child.merged())
    model.lora_config = None
