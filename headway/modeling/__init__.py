"""The model core: one decoder for the Llama, Qwen2 and Qwen3 families, and what surrounds it.

- `families.py`  the registry: `model_type` → its config reader and model class
- `config.py`    `ModelConfig`, read from / written to HF `config.json`
- `model.py`     the decoder (`Transformer`), RoPE, attention, MLP
- `kv_cache.py`  the static per-layer KV cache used by prefill and decode
- `logprobs.py`  the single per-token logprob function shared by sampler and trainer
- `lora.py`      LoRA adapters in PEFT's on-disk format, merge for export
- `load.py`      `load_model` / `save_model` for Hugging Face directories
- `tokenizer.py` the `tokenizers` wrapper with HF chat templates (no torch)
- `dtypes.py`    the `--dtype` names the services and `headway serve` accept (no torch)

torch is imported lazily: `from headway.modeling import Transformer` loads it, while the
gateway's `from headway.modeling.tokenizer import Tokenizer` (and `ModelConfig`,
`ModelError`) do not, so the gateway stays free of torch. Imports nothing of the services.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Public name → the submodule that defines it (imported on first use: PEP 562).
_EXPORTS = {
    "SUPPORTED_MODEL_TYPES": "config",
    "ModelConfig": "config",
    "ModelError": "errors",
    "Tokenizer": "tokenizer",
    "KVCache": "kv_cache",
    "round_up": "kv_cache",
    "build_model": "load",
    "empty_model": "load",
    "from_hf_names": "load",
    "hf_state_dict": "load",
    "load_model": "load",
    "save_model": "load",
    "entropy": "logprobs",
    "token_logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "DEFAULT_TARGETS": "lora",
    "LoraConfig": "lora",
    "LoRALinear": "lora",
    "apply_lora": "lora",
    "load_adapter": "lora",
    "lora_state_dict": "lora",
    "merge_lora": "lora",
    "save_adapter": "lora",
    "Transformer": "model",
}

# Literal, for linters: the same names as _EXPORTS (a test checks).
__all__ = [
    "DEFAULT_TARGETS",
    "KVCache",
    "LoRALinear",
    "LoraConfig",
    "ModelConfig",
    "ModelError",
    "SUPPORTED_MODEL_TYPES",
    "Tokenizer",
    "Transformer",
    "apply_lora",
    "build_model",
    "empty_model",
    "entropy",
    "from_hf_names",
    "hf_state_dict",
    "load_adapter",
    "load_model",
    "lora_state_dict",
    "merge_lora",
    "round_up",
    "save_adapter",
    "save_model",
    "token_logprobs",
    "top_logprobs",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'headway.modeling' has no attribute {name!r}")
    value = getattr(import_module(f"headway.modeling.{module}"), name)
    globals()[name] = value  # next time: a plain attribute
    return value


if TYPE_CHECKING:  # what type checkers and editors see
    from headway.modeling.config import SUPPORTED_MODEL_TYPES, ModelConfig
    from headway.modeling.errors import ModelError
    from headway.modeling.kv_cache import KVCache, round_up
    from headway.modeling.load import (
        build_model,
        empty_model,
        from_hf_names,
        hf_state_dict,
        load_model,
        save_model,
    )
    from headway.modeling.logprobs import entropy, token_logprobs, top_logprobs
    from headway.modeling.lora import (
        DEFAULT_TARGETS,
        LoraConfig,
        LoRALinear,
        apply_lora,
        load_adapter,
        lora_state_dict,
        merge_lora,
        save_adapter,
    )
    from headway.modeling.model import Transformer
    from headway.modeling.tokenizer import Tokenizer
