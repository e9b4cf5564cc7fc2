"""Which weights serve a checkpoint, and loading them fast.

A checkpoint is served by an engine holding full weights (a base, a full checkpoint, or a
LoRA model's frozen weights) plus, for LoRA models, an adapter in one of that engine's
slots. Full checkpoints are copied straight from the memory-mapped safetensors file into
the engine's preallocated tensors (one copy, no intermediate tensors), so a new head of a
full fork replaces the old one in the time of a memcpy.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import torch

from headway.modeling import LoraConfig, Transformer, build_model, load_model
from headway.modeling.load import hf_name
from headway.store import WEIGHTS_FILE, CheckpointRef, CheckpointStore
from headway.store.weights import adapter_dir, base_config, full_state, read_adapter

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "F64": np.float64}


def content_ref(store: CheckpointStore, model: str, ckpt: str) -> CheckpointRef:
    """The checkpoint whose full weights (model, ckpt) has (following full-fork references)."""
    record = store.get_checkpoint(model, ckpt)
    if record.kind == "full" and record.ref is not None:
        return content_ref(store, record.ref.model, record.ref.checkpoint)
    return CheckpointRef(model, ckpt)


def serving_refs(
    store: CheckpointStore, model: str, ckpt: str
) -> tuple[CheckpointRef, CheckpointRef | None]:
    """(full weights of the engine, adapter checkpoint or None) that serve (model, ckpt)."""
    record = store.get_model(model)
    if record.lora:
        target = store.resolve(model, ckpt)
        frozen = record.frozen
        return content_ref(store, frozen.model, frozen.checkpoint), CheckpointRef(
            target.model, target.id
        )
    return content_ref(store, model, ckpt), None


def load_engine_model(store: CheckpointStore, ref: CheckpointRef) -> Transformer:
    """A fresh model holding the full weights of `ref`."""
    record = store.get_checkpoint(ref.model, ref.checkpoint)
    if record.kind == "base":
        model, _ = load_model(store.get_model(ref.model).path)
        return model
    config = base_config(store, ref.model)
    if record.kind == "full":
        with torch.device("meta"):
            shell = Transformer(config)
        state = {k: torch.empty(v.shape) for k, v in shell.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight")
        model = build_model(config, state)
        copy_full_weights(store, ref, model)
        return model
    return build_model(config, full_state(store, ref.model, ref.checkpoint))  # LoRA, merged


def copy_full_weights(store: CheckpointStore, ref: CheckpointRef, model: Transformer) -> None:
    """Copy a full checkpoint's weights into `model`'s tensors, from the mmap'd file."""
    file = store.files_dir(store.get_checkpoint(ref.model, ref.checkpoint)) / WEIGHTS_FILE
    params = {hf_name(k): v for k, v in model.state_dict().items()}
    # ACCESS_COPY: a private mapping, writable in name only (nothing writes to it), so
    # torch accepts the buffer without a copy.
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        header_len = int.from_bytes(mm[:8], "little")
        header = json.loads(mm[8 : 8 + header_len])
        base = 8 + header_len
        with torch.no_grad():
            for name, info in header.items():
                if name == "__metadata__" or name not in params:
                    continue
                start, end = info["data_offsets"]
                dtype = _NP_DTYPES[info["dtype"]]
                array = np.frombuffer(
                    mm,
                    dtype=dtype,
                    count=(end - start) // np.dtype(dtype).itemsize,
                    offset=base + start,
                ).reshape(info["shape"])
                src = torch.from_numpy(array)
                if info["dtype"] == "BF16":
                    src = src.view(torch.bfloat16)
                params[name].copy_(src)
                del array, src  # release the buffer before the mmap closes


def read_lora(
    store: CheckpointStore, ref: CheckpointRef
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The adapter of a LoRA checkpoint: config and `name.lora_A/B` tensors."""
    return read_adapter(Path(adapter_dir(store, ref.model, ref.checkpoint)))
