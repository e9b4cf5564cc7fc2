"""The family registry: `model_type` → the code that reads its config and builds its model.

A family is two names, each `"module:attribute"`, imported only when first needed:
- `config`: a function `(raw config.json dict, source) -> ModelConfig` (or a subclass). It
  must not import torch: the gateway reads configs without it.
- `model`: the `nn.Module` class built from that config on the meta device. It follows the
  `Transformer` contract: `embed_tokens`, `lm_head`, `config`, `init_weights`,
  `forward(input_ids, ..., validate=, return_hidden=)` returning logits, parameter names
  those of Hugging Face minus the leading `model.`.

Adding a family is one module (or a small package) and one line in `FAMILIES`.
This module imports neither torch nor any family.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

from headway.modeling.errors import ModelError

if TYPE_CHECKING:
    from headway.modeling.config import ModelConfig


@dataclass(frozen=True)
class Family:
    """Where one architecture's config reader and model class live."""

    config: str  # "module:function" reading config.json (torch-free)
    model: str  # "module:Class" of the model


_DENSE = Family("headway.modeling.config:read_dense_config", "headway.modeling.model:Transformer")
_QWEN3_5 = Family(
    "headway.modeling.qwen3_5.config:read_config", "headway.modeling.qwen3_5.model:Qwen35Model"
)

FAMILIES: dict[str, Family] = {
    "llama": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "qwen3_5": _QWEN3_5,  # the released multimodal snapshot: its language model only
    "qwen3_5_text": _QWEN3_5,
}

# Known model types we refuse, with what to do instead (the generic message lists FAMILIES).
_REFUSED = {
    "qwen3_5_moe": "the Qwen3.5 mixture-of-experts variants are not supported yet; "
    "use a dense Qwen3.5 model",
    "qwen3_5_moe_text": "the Qwen3.5 mixture-of-experts variants are not supported yet; "
    "use a dense Qwen3.5 model",
    "qwen3_5_vision": "a vision encoder alone is not a language model; "
    "use a Qwen3.5 model directory (model_type qwen3_5 or qwen3_5_text)",
}


def family(model_type: Any, source: str = "config.json") -> Family:
    """The registered family of `model_type`; `ModelError` naming what is supported otherwise."""
    found = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if found is not None:
        return found
    hint = _REFUSED.get(model_type) if isinstance(model_type, str) else None
    raise ModelError(
        f"{source}: model_type {model_type!r} is not supported"
        + (f": {hint}" if hint else f"; use one of {', '.join(FAMILIES)}")
    )


def _resolve(spec: str) -> Any:
    module, _, attribute = spec.partition(":")
    return getattr(import_module(module), attribute)


def read_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The config of any registered family, from a parsed `config.json`."""
    return _resolve(family(raw.get("model_type"), source).config)(raw, source)


def model_class(model_type: str) -> type:
    """The model class of a registered family (imports torch)."""
    return _resolve(family(model_type).model)
