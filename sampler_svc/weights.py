"""Which weights serve a checkpoint, and loading them fast.

A checkpoint is served by an engine holding full weights (a base, a full checkpoint, or a
LoRA model's frozen weights) plus, for LoRA models, an adapter in one of that engine's
slots. Full checkpoints are copied straight from a memory map of the safetensors file into
the engine's preallocated tensors (one memcpy from the page cache, no intermediate tensors,
split over the process's torch threads), so a new head of a full fork replaces the old one
in the time of a memcpy: the trainer writes the file in one `writev`, which lets the page
cache hold it in large folios that map in a few faults. (`os.preadv` into the tensors, the
kernel's copy, ran ~2x slower on a 2-core EPYC VM.) A tensor whose dtype or layout differs
from the file's (a bf16 engine, a fp32 file) is converted by torch from the same map.
An adapter is mapped the same way and a CPU engine of its dtype serves it from the map
until its loop copies it into the slot (not on a reload's path: `AdapterBank.load`). An engine on a
GPU reads each full-weights tensor from the map into a pinned host buffer and copies it to
the device from there (`copy_to_device`): one host read, one DMA, no pageable staging by the
driver.
"""

from __future__ import annotations

import json
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from headway.modeling import LoraConfig, Transformer, build_model, load_model
from headway.modeling.load import empty_model, hf_name
from headway.store import WEIGHTS_FILE, CheckpointRef, CheckpointStore
from headway.store.tensorfile import TORCH_DTYPES, map_raw_header, mapped_tensors
from headway.store.weights import base_config, full_state, read_adapter

_MAX_READERS = 4  # threads copying one weights file (at most the process's torch threads)
_SPLIT_BYTES = 8 << 20  # below this, one thread copies it all
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
        # No plan kept: the engine made of it moves and re-points these tensors.
        copy_full_weights(store, ref, model, keep_plan=False)
        return model
    return build_model(config, full_state(store, ref.model, ref.checkpoint))  # LoRA, merged


def copy_full_weights(
    store: CheckpointStore, ref: CheckpointRef, model: Transformer, keep_plan: bool = True
) -> None:
    """Copy a full checkpoint's weights into `model`'s tensors, read from the file (see
    `copy_weights_file` for `keep_plan`)."""
    copy_weights_file(
        store.files_dir(store.get_checkpoint(ref.model, ref.checkpoint)) / WEIGHTS_FILE,
        model,
        keep_plan,
    )


@dataclass
class _CopyPlan:
    """Where each tensor of a weights file goes in one model: made from the file's header
    and the model's tensors, and kept while both stay the same (every checkpoint of a model
    has the same header; an engine's tensors keep their memory across reloads). Walking
    the model's state dict and the header took ~1.2 ms of each full reload (2-core EPYC)."""

    header: bytes  # the raw JSON header it was made for
    members: tuple[torch.Tensor, ...]  # the model's parameters then (the same objects)
    direct: list[tuple[torch.Tensor, int, np.ndarray, int, int]]  # dst, its data_ptr, its
    # bytes, the file's data offsets: copied byte for byte
    converted: dict[str, torch.Tensor]  # of another dtype or layout: torch converts
    device: dict[str, torch.Tensor]  # on a device: staged through pinned memory

    def current(self, header: bytes, model: Transformer) -> bool:
        """Whether it still holds for `model` and a file of `header`: the same header, the
        same parameter objects (none replaced), none re-pointed (`.data`). ~0.1 ms."""
        members = tuple(model.parameters())
        return (
            header == self.header
            and len(members) == len(self.members)
            and all(a is b for a, b in zip(members, self.members, strict=True))
            and all(t.data_ptr() == p for t, p, *_ in self.direct)
        )


_PLANS: weakref.WeakKeyDictionary[Transformer, _CopyPlan] = weakref.WeakKeyDictionary()


def _copy_plan(model: Transformer, raw_header: bytes) -> _CopyPlan:
    # The parameters themselves, not the state dict's detached views: a parameter whose
    # memory is re-pointed later (`.data`, as fusing q/k/v does) then shows it.
    live = dict(model.named_parameters(remove_duplicate=False))
    live.update(model.named_buffers(remove_duplicate=False))
    params = {hf_name(k): live.get(k, v) for k, v in model.state_dict().items()}
    plan = _CopyPlan(raw_header, tuple(model.parameters()), [], {}, {})
    for name, info in json.loads(raw_header).items():
        dst = params.get(name)
        if dst is None:
            continue
        if dst.device.type != "cpu":
            plan.device[name] = dst
        elif _same_layout(dst, info):
            start, end = info["data_offsets"]
            plan.direct.append((dst, dst.data_ptr(), _raw(dst), start, end))
        else:
            plan.converted[name] = dst
    return plan


def copy_weights_file(file: Path, model: Transformer, keep_plan: bool = True) -> None:
    """Copy the weights of a safetensors file (Hugging Face names) into `model`'s tensors,
    converting those whose dtype differs. `keep_plan`: keep where each tensor went for the
    model's next reload (a serving engine's model); False for a model about to be moved or
    fused (a plan holds the tensors it copied into, and would keep their memory alive)."""
    data, raw_header, base = map_raw_header(file)
    plan = _PLANS.get(model)
    if plan is None or not plan.current(raw_header, model):
        plan = _copy_plan(model, raw_header)
        if keep_plan:
            _PLANS[model] = plan
        else:
            _PLANS.pop(model, None)
    pairs = [(dst, data[base + start : base + end]) for _, _, dst, start, end in plan.direct]
    _copy_all(pairs)
    sources: dict[str, torch.Tensor] = {}
    if plan.converted or plan.device:  # views of the same map, not a second one
        sources = mapped_tensors(data, json.loads(raw_header), base)
        with torch.no_grad():
            for name, dst in plan.converted.items():
                dst.copy_(sources[name])
            if plan.device:
                copy_to_device(plan.device, sources)
    # Unmapping 160 MB is ~0.5-1 ms the reload need not wait for: the last views of the
    # map go to a reader thread, which drops them.
    _readers().submit(_drop, [data, pairs, sources])
    del data, pairs, sources


def _drop(views: list) -> None:
    views.clear()


def copy_to_device(dsts: dict[str, torch.Tensor], sources: dict[str, torch.Tensor]) -> None:
    """dsts[name] = sources[name] for device tensors, from host tensors (a file's map):
    each source is read once into a pinned host buffer, from which the device copies it
    without blocking (converting the dtype there), all copies queued before one sync."""
    staged = []
    for name, dst in dsts.items():
        src = sources[name]
        host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        host.copy_(src)
        dst.copy_(host, non_blocking=True)
        staged.append(host)  # alive until the device has read it
    for dev in {d.device for d in dsts.values()}:
        torch.cuda.synchronize(dev)


def _same_layout(dst: torch.Tensor, info: dict) -> bool:
    """Whether the file's bytes of `info` are exactly `dst`'s memory (dtype, shape)."""
    return (
        dst.device.type == "cpu"
        and dst.is_contiguous()
        and TORCH_DTYPES.get(info["dtype"]) == dst.dtype
        and list(dst.shape) == info["shape"]
    )


def _raw(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a flat uint8 array (a view)."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def _copy_all(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Copy each (destination, source) pair of byte arrays, the bytes split evenly over
    threads. numpy's memcpy releases the GIL, and one user-space copy from the mapped page
    cache beats the kernel's copy of `preadv` (measured ~2x on a 2-core EPYC VM)."""
    total = sum(d.nbytes for d, _ in pairs)
    workers = max(1, min(torch.get_num_threads(), _MAX_READERS))
    if workers == 1 or total < _SPLIT_BYTES:
        _copy_pairs(pairs)
        return
    share, parts, current, size = -(-total // workers), [], [], 0
    for dst, src in pairs:
        while dst.nbytes:
            take = min(dst.nbytes, share - size)
            current.append((dst[:take], src[:take]))
            dst, src, size = dst[take:], src[take:], size + take
            if size == share:
                parts.append(current)
                current, size = [], 0
    if current:
        parts.append(current)
    list(_readers().map(_copy_pairs, parts))


def _copy_pairs(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for dst, src in pairs:
        np.copyto(dst, src)


def _readers() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_MAX_READERS, thread_name_prefix="weights-read")
    return _POOL


def read_lora(
    store: CheckpointStore, ref: CheckpointRef
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The adapter of a LoRA checkpoint: config and `name.lora_A/B` tensors viewing a map
    of its file (nothing read yet: `AdapterBank.load` serves them in place, and the
    engine's loop copies them into the slot at its next turn, which drops the map: a mapped
    file deleted or changed under a sampler on a shared store would kill it with SIGBUS, so
    the map lives for a few ms, as a full reload's does). `ref` is the adapter checkpoint
    `serving_refs` gives, already resolved: its own directory holds the files (no second
    walk of the store's references on a reload's path)."""
    return read_adapter(store.checkpoint_dir(ref.model, ref.checkpoint), mapped=True)
