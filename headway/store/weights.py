"""Turning a checkpoint into tensors: the one place that knows how lineage maps to weights.

Both services call this, so a sampler and the trainer load exactly the same numbers for a
checkpoint. A checkpoint's content is one of:
- a base's Hugging Face directory (kind "base");
- full weights: its own `weights.safetensors`, or a reference to a base/full checkpoint
  (a full fork's root, copy-on-write);
- a LoRA adapter (its own PEFT files, or a reference to another LoRA checkpoint) applied
  on the model's frozen weights, which are themselves the full content of a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from headway.errors import FailedPrecondition
from headway.modeling import ModelConfig, ModelError, from_hf_names
from headway.modeling.load import empty_model, read_weights
from headway.modeling.lora import LoraConfig, read_adapter_config
from headway.store.records import CheckpointRecord
from headway.store.store import ADAPTER_FILE, WEIGHTS_FILE, CheckpointStore
from headway.store.tensorfile import map_safetensors, read_safetensors


def base_config(store: CheckpointStore, slug: str) -> ModelConfig:
    """Architecture of `slug` (that of the base its lineage starts from)."""
    base = store.get_model(store.get_model(slug).base)
    return ModelConfig.from_file(base.path)


def adapter_dir(store: CheckpointStore, slug: str, ckpt_id: str) -> Path:
    """Directory of the PEFT adapter of a LoRA checkpoint (following references)."""
    target = store.resolve(slug, ckpt_id)
    if target.kind != "lora":
        raise FailedPrecondition(f"checkpoint {slug}/{ckpt_id} holds no LoRA adapter")
    return store.files_dir(target)


def read_adapter(path: Path, mapped: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, {our module name: (A, B)} flattened as name.lora_A / name.lora_B) of a dir:
    tensors viewing one buffer of their own, the file read into it in one call, or with
    `mapped` a private memory map of the file (`map_safetensors`: nothing read yet)."""
    config = read_adapter_config(path)
    file = path / ADAPTER_FILE
    raw = map_safetensors(file)[0] if mapped else read_safetensors(file)
    prefix = "base_model.model.model."
    return config, {k.removeprefix(prefix).removesuffix(".weight"): v for k, v in raw.items()}


def full_state(
    store: CheckpointStore, slug: str, ckpt_id: str, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Every weight of the model at (slug, ckpt_id), our names, on CPU, as `dtype`."""
    record: CheckpointRecord = store.get_checkpoint(slug, ckpt_id)
    model = store.get_model(slug)
    if record.kind == "base":
        config = ModelConfig.from_file(model.path)
        return read_weights(Path(model.path), empty_model(config), dtype, "cpu")
    if record.kind == "full":
        if record.ref is not None:
            return full_state(store, record.ref.model, record.ref.checkpoint, dtype)
        file = store.files_dir(record) / WEIGHTS_FILE
        try:
            tensors = from_hf_names(load_file(str(file)))
        except Exception as e:
            raise ModelError(f"{file}: cannot read checkpoint weights: {e}") from e
        config = base_config(store, slug)
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        return {k: v.to(dtype) for k, v in tensors.items()}
    # LoRA: the frozen weights with this adapter folded in.
    assert model.frozen is not None, f"LoRA model {slug} has no frozen weights"
    state = dict(full_state(store, model.frozen.model, model.frozen.checkpoint, dtype))
    config, adapter = read_adapter(adapter_dir(store, slug, ckpt_id))
    for name in {k.rsplit(".", 1)[0] for k in adapter}:
        a, b = adapter[f"{name}.lora_A"].to(dtype), adapter[f"{name}.lora_B"].to(dtype)
        state[f"{name}.weight"] = state[f"{name}.weight"] + config.scaling * (b @ a)
    return state
