"""Which weights serve a checkpoint, and loading them fast.

A checkpoint is served by an engine holding full weights (a base, a full checkpoint, or a
LoRA model's frozen weights) plus, for LoRA models, an adapter in one of that engine's
slots. Full checkpoints are read straight from the safetensors file into the engine's
preallocated tensors (`os.preadv` into their memory: one kernel copy from the page cache,
no mapping to fault in, no intermediate tensors, split over the process's torch threads),
so a new head of a full fork replaces the old one in the time of a memcpy. A tensor whose
dtype or layout differs from the file's (a bf16 engine, a fp32 file) is converted from a
memory map instead.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from headway.modeling import LoraConfig, Transformer, build_model, load_model
from headway.modeling.load import empty_model, hf_name
from headway.store import WEIGHTS_FILE, CheckpointRef, CheckpointStore
from headway.store.tensorfile import TORCH_DTYPES, read_header, tensor_bytes
from headway.store.weights import adapter_dir, base_config, full_state, read_adapter

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "F64": np.float64}
_MAX_READERS = 4  # threads reading one weights file (at most the process's torch threads)
_SPLIT_BYTES = 8 << 20  # below this, one thread reads it all
_POOL: ThreadPoolExecutor | None = None


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
        shell = empty_model(config)  # the family's model on the meta device: shapes only
        state = {k: torch.empty(v.shape) for k, v in shell.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight")
        model = build_model(config, state)
        copy_full_weights(store, ref, model)
        return model
    return build_model(config, full_state(store, ref.model, ref.checkpoint))  # LoRA, merged


def copy_full_weights(store: CheckpointStore, ref: CheckpointRef, model: Transformer) -> None:
    """Copy a full checkpoint's weights into `model`'s tensors, read from the file."""
    file = store.files_dir(store.get_checkpoint(ref.model, ref.checkpoint)) / WEIGHTS_FILE
    params = {hf_name(k): v for k, v in model.state_dict().items()}
    with open(file, "rb", buffering=0) as f:
        header, base = read_header(f)
        segments, converted = [], {}
        for name, info in header.items():
            if name == "__metadata__" or name not in params:
                continue
            dst = params[name]
            start, end = info["data_offsets"]
            if _readable_into(dst, info, end - start):
                segments.append((base + start, tensor_bytes(dst)))
            else:
                converted[name] = info
        _pread_all(f.fileno(), segments)
    if converted:
        _copy_converted(file, base, converted, params)


def _readable_into(dst: torch.Tensor, info: dict, nbytes: int) -> bool:
    """Whether the file's bytes for `info` are exactly `dst`'s memory (dtype, shape)."""
    return (
        dst.device.type == "cpu"
        and dst.is_contiguous()
        and TORCH_DTYPES.get(info["dtype"]) == dst.dtype
        and list(dst.shape) == list(info["shape"])
        and dst.numel() * dst.element_size() == nbytes
    )


def _pread_all(fd: int, segments: list[tuple[int, memoryview]]) -> None:
    """Read each (file offset, destination) segment, the bytes split evenly over threads."""
    total = sum(v.nbytes for _, v in segments)
    workers = max(1, min(torch.get_num_threads(), _MAX_READERS))
    if workers == 1 or total < _SPLIT_BYTES:
        _pread_segments(fd, segments)
        return
    share, parts, current, size = -(-total // workers), [], [], 0
    for offset, view in segments:
        while view.nbytes:
            take = min(view.nbytes, share - size)
            current.append((offset, view[:take]))
            offset, view, size = offset + take, view[take:], size + take
            if size == share:
                parts.append(current)
                current, size = [], 0
    if current:
        parts.append(current)
    list(_readers().map(lambda part: _pread_segments(fd, part), parts))


def _pread_segments(fd: int, segments: list[tuple[int, memoryview]]) -> None:
    for offset, view in segments:
        while view.nbytes:
            chunk = view[: 1 << 30]
            n = os.preadv(fd, [chunk], offset)
            if n <= 0:
                raise OSError(f"weights file ended early at byte {offset}")
            offset, view = offset + n, view[n:]


def _readers() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_MAX_READERS, thread_name_prefix="weights-read")
    return _POOL


def _copy_converted(file: Path, base: int, header: dict, params: dict[str, torch.Tensor]) -> None:
    """Copy (converting dtype) the tensors of `header` from a memory map of `file`."""
    # ACCESS_COPY: a private mapping, writable in name only (nothing writes to it), so
    # torch accepts the buffer without a copy.
    with (
        open(file, "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm,
        torch.no_grad(),
    ):
        for name, info in header.items():
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
