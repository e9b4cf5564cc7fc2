"""The model core: one decoder for the Llama, Qwen2 and Qwen3 families, and what surrounds it.

- `config.py`   `ModelConfig`, read from / written to HF `config.json`
- `model.py`    the decoder (`Transformer`), RoPE, attention, MLP
- `kv_cache.py` the static per-layer KV cache used by prefill and decode
- `logprobs.py` the single per-token logprob function shared by sampler and trainer
- `lora.py`     LoRA adapters in PEFT's on-disk format, merge for export
- `load.py`     `load_model` / `save_model` for Hugging Face directories
- `headway.tokenizer` (re-exported): the `tokenizers` wrapper with HF chat templates

Imports torch and nothing else of ours.
"""

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
from headway.modeling.logprobs import entropy, token_logprobs
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
from headway.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_TARGETS",
    "SUPPORTED_MODEL_TYPES",
    "KVCache",
    "LoRALinear",
    "LoraConfig",
    "ModelConfig",
    "ModelError",
    "Tokenizer",
    "Transformer",
    "apply_lora",
    "build_model",
    "empty_model",
    "from_hf_names",
    "entropy",
    "hf_state_dict",
    "load_adapter",
    "load_model",
    "lora_state_dict",
    "merge_lora",
    "round_up",
    "save_adapter",
    "save_model",
    "token_logprobs",
]
