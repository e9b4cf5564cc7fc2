"""`ModelState`: one model's training state in memory, restored from and saved to the store.

The state is the module (an adapter over shared frozen weights, or a full copy), the AdamW
optimizer with its moments, the gradient accumulated since the last step (in `.grad`), the
statistics of that accumulation, and the custom-loss forwards awaiting their backward.
Everything here is reproducible from the head checkpoint alone (weights + optimizer state),
which is what makes eviction, restarts and SetHead rollbacks exact.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from headway.modeling import (
    LoraConfig,
    Transformer,
    apply_lora,
    build_model,
    empty_model,
    hf_state_dict,
    lora_state_dict,
)
from headway.modeling.lora import peft_config
from headway.modeling.placement import to_device, to_host
from headway.store import (
    ADAPTER_FILE,
    OPTIMIZER_FILE,
    WEIGHTS_FILE,
    CheckpointRecord,
    CheckpointStore,
    DeferredFile,
    ModelRecord,
)
from headway.store.pages import SpareChoice
from headway.store.tensorfile import (
    TensorFilePlan,
    plan_safetensors,
    safetensors_header,
    write_plan,
    write_plan_direct,
)
from headway.store.weights import adapter_dir, base_config, full_state, read_adapter
from trainer_svc.pool import FrozenPool
from trainer_svc.spares import SpareWriter


def summed_metric(key: str) -> bool:
    """Whether metric `key` adds up over parts of a batch (":sum" and "groups/" keys);
    every other metric is a mean over trained tokens."""
    return key.endswith(":sum") or key.startswith("groups/")


@dataclass
class Accumulation:
    """What the forward/backward calls since the last OptimStep added up to."""

    loss_fns: list[str] = field(default_factory=list)
    num_datums: int = 0
    num_tokens: int = 0
    loss_sum: float = 0.0
    rewards: list[float] = field(default_factory=list)
    # Token-weighted sums of mean metrics, and plain sums of ":sum" metrics.
    weighted: dict[str, float] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    has_grad: bool = False

    def add(
        self, loss_fn: str, num_datums: int, rewards: list[float], metrics: dict[str, float]
    ) -> None:
        """Fold one call's metrics in (":sum" keys add up, others are token-weighted)."""
        tokens = int(metrics.get("num_tokens", 0))
        if loss_fn not in self.loss_fns:
            self.loss_fns.append(loss_fn)
        self.num_datums += num_datums
        self.num_tokens += tokens
        self.loss_sum += metrics.get("loss:sum", 0.0)
        self.rewards.extend(rewards)
        self.has_grad = True
        for key, value in metrics.items():
            if key == "num_tokens":
                continue
            if summed_metric(key):
                self.sums[key] = self.sums.get(key, 0.0) + value
            else:
                self.weighted[key] = self.weighted.get(key, 0.0) + value * max(tokens, 1)

    def stats(self, learning_rate: float) -> dict[str, Any]:
        """CheckpointStats of the step that applies this accumulation."""
        n = len(self.rewards)
        mean = sum(self.rewards) / n if n else 0.0
        std = math.sqrt(sum((r - mean) ** 2 for r in self.rewards) / n) if n else 0.0
        metrics = dict(self.sums)
        metrics.update({k: v / max(self.num_tokens, 1) for k, v in self.weighted.items()})
        return {
            "loss_fn": ",".join(self.loss_fns),
            "num_datums": self.num_datums,
            "num_tokens": self.num_tokens,
            "loss": self.loss_sum,
            "reward_mean": mean,
            "reward_std": std,
            "learning_rate": learning_rate,
            "metrics": metrics,
        }


@dataclass
class ModelState:
    """A model ready to train: module, optimizer, accumulated gradient, pending forwards."""

    record: ModelRecord
    head: CheckpointRecord
    module: Transformer
    params: dict[str, torch.nn.Parameter]  # the trained parameters by name
    optimizer: torch.optim.AdamW
    frozen_ref: Any = None  # the FrozenPool key this state holds, to release on eviction
    reference: Any = None  # the last KL reference it used (trainer_svc.reference)
    acc: Accumulation = field(default_factory=Accumulation)
    forwards: dict[str, Any] = field(default_factory=dict)  # forward_id → KeptForward
    # The weights (or adapter) file laid out over the parameters' memory, and the addresses
    # it was laid out at (see `weights_plan`).
    saved_layout: tuple[list[int], TensorFilePlan] | None = None
    # Whether each of its checkpoint files is written faster over a spare (timed on its
    # own writes: trainer_svc.spares), by file name.
    spare_choices: dict[str, SpareChoice] = field(default_factory=dict)
    # Which load of the model this is (a process-wide count): the other ranks of a
    # distributed trainer hold a replica of this very load, and reload when it changes.
    load_id: int = field(default_factory=lambda: next_load_id())

    @property
    def on_cpu(self) -> bool:
        """Whether the trained parameters live in host memory (not on a device)."""
        return next(iter(self.params.values())).device.type == "cpu"

    @property
    def busy(self) -> bool:
        """True while it holds work that exists nowhere else (gradient, kept forwards)."""
        return self.acc.has_grad or bool(self.forwards)

    def reset_accumulation(self) -> None:
        """Drop the accumulated gradient, its statistics and pending forwards."""
        self.optimizer.zero_grad(set_to_none=True)
        self.acc = Accumulation()
        self.forwards.clear()


_LOADS = itertools.count(1)


def next_load_id() -> int:
    """A load id no state of this process has had (see `ModelState.load_id`)."""
    return next(_LOADS)


def _new_optimizer(params: dict[str, torch.nn.Parameter]) -> torch.optim.AdamW:
    # Hyperparameters are set per OptimStep; these are placeholders. fused=True: torch's
    # one-kernel AdamW, ~5x faster than the per-tensor loop on CPU (an OptimStep of a LoRA
    # fork is mostly this and the save); tests compare with torch's AdamW, same setting.
    return torch.optim.AdamW(
        list(params.values()), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True
    )


def load_state(
    store: CheckpointStore, pool: FrozenPool, slug: str, dtype: torch.dtype, at: str = ""
) -> ModelState:
    """Restore `slug` at its head (or at checkpoint `at`): weights and, when the checkpoint
    has it, optimizer state, on the pool's device."""
    device = pool.device
    record = store.get_model(slug)
    head = store.get_checkpoint(slug, at) if at else store.head_checkpoint(slug)
    config = base_config(store, slug)
    frozen_ref = None
    if record.lora:
        frozen_ref = record.frozen
        module = build_model(config, pool.acquire(frozen_ref))
        lora = LoraConfig(**record.lora)
        apply_lora(module, lora)
        _, adapter = read_adapter(adapter_dir(store, slug, head.id))
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(adapter[name])
    else:
        state = {k: _own(v, device) for k, v in full_state(store, slug, head.id, dtype).items()}
        module = build_model(config, state)
        params = dict(module.named_parameters())  # tied weights appear once
        for p in params.values():
            p.requires_grad_(True)
    module.train()
    optimizer = _new_optimizer(params)
    if head.has_optimizer:
        # A fork's root may continue the state of the checkpoint it references.
        owner = store.resolve(slug, head.id)
        store.wait_deferred(owner.model, owner.id)  # it may still be being written
        _load_optimizer(optimizer, params, store.files_dir(owner) / OPTIMIZER_FILE)
    return ModelState(record, head, module, params, optimizer, frozen_ref)


def _own(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor of `t`'s values on `device` that nothing else shares (a fresh copy)."""
    return t.clone() if device.type == "cpu" else to_device(t, device)


def _load_optimizer(
    optimizer: torch.optim.AdamW, params: dict[str, torch.nn.Parameter], file: Path
) -> None:
    with safe_open(str(file), framework="pt") as f:
        names = json.loads(f.metadata()["params"])
        if names != list(params):
            raise ValueError(f"{file}: optimizer state is for other parameters")
        steps, exp_avg, exp_avg_sq = (f.get_tensor(k) for k in ("step", "exp_avg", "exp_avg_sq"))
    sizes = [p.numel() for p in params.values()]
    moments = zip(exp_avg.split(sizes), exp_avg_sq.split(sizes), strict=True)
    for k, (p, (m, v)) in enumerate(zip(params.values(), moments, strict=True)):
        # On the parameter's device (the fused AdamW keeps its step counts there too).
        optimizer.state[p] = {
            "step": to_device(steps[k], p.device),
            "exp_avg": to_device(m.view_as(p), p.device),
            "exp_avg_sq": to_device(v.view_as(p), p.device),
        }


@dataclass(frozen=True)
class OptimizerFile:
    """The optimizer state of one step as the store's file: the parameters that have AdamW
    state (in file order) and each one's state (its tensors, which the next AdamW changes in
    place: the file must be written before, see `Trainer._apply_and_save`). Three
    safetensors tensors (step counts, first and second moments, in parameter order), the
    moments written from their per-parameter parts, never concatenated in memory; three
    flat tensors instead of three per parameter: writing hundreds of small tensors costs
    more than the bytes themselves for a LoRA adapter."""

    names: list[str]
    per: list[dict[str, torch.Tensor]]

    @classmethod
    def of(cls, state: ModelState) -> OptimizerFile:
        names = [n for n, p in state.params.items() if state.optimizer.state.get(p)]
        return cls(names, [state.optimizer.state[state.params[n]] for n in names])

    @property
    def metadata(self) -> dict[str, str]:
        return {"format": "pt", "params": json.dumps(self.names)}

    def size(self) -> int:
        """The file's size from the parameters' shapes alone: a few µs per parameter where
        gathering the tensors costs ~50 (a LoRA fork's OptimStep, 112 parameters, replied
        ~5 ms later with that on its path)."""
        total = sum(s["exp_avg"].numel() for s in self.per)
        dtype = self.per[0]["exp_avg"].dtype if self.per else torch.float32
        layout = {
            "step": (torch.float32, [len(self.names)]),
            "exp_avg": (dtype, [total]),
            "exp_avg_sq": (dtype, [total]),
        }
        return safetensors_header(layout, self.metadata)[1]

    def tensors(self) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """The file's tensors: host tensors (the CPU's own, or pinned copies of a device's,
        one sync for all)."""
        moments = to_host(
            {f"{k}.{i}": s[k] for i, s in enumerate(self.per) for k in ("exp_avg", "exp_avg_sq")}
        )
        steps = [s["step"].detach().float().reshape(()) for s in self.per]
        return {
            "step": to_host({"step": torch.stack(steps)})["step"],
            "exp_avg": [moments[f"exp_avg.{i}"] for i in range(len(self.per))],
            "exp_avg_sq": [moments[f"exp_avg_sq.{i}"] for i in range(len(self.per))],
        }


def weights_plan(state: ModelState) -> TensorFilePlan:
    """The state's adapter (LoRA) or weights (full) file, laid out over the tensors' memory.

    On the CPU the layout is made once and kept: AdamW changes the parameters in place, so
    the same views hold the next step's bytes (for a LoRA fork's 112 tensors, gathering
    and laying them out cost ~3 ms of each OptimStep). It is made again when a parameter
    no longer lives where it did (new tensors: a reload); a device's tensors are copied
    to the host at every save."""
    on_cpu = state.on_cpu
    where = [p.data_ptr() for p in state.params.values()] if on_cpu else []
    if on_cpu and state.saved_layout is not None and state.saved_layout[0] == where:
        return state.saved_layout[1]
    if state.record.lora:
        tensors = to_host(lora_state_dict(state.module))
    else:
        tensors = to_host(hf_state_dict(state.module))
    plan = plan_safetensors(tensors, {"format": "pt"})
    state.saved_layout = (where, plan) if on_cpu else None
    return plan


def weights_file(state: ModelState) -> str:
    """The name of the file holding the state's trained weights in its checkpoints."""
    return ADAPTER_FILE if state.record.lora else WEIGHTS_FILE


def checkpoint_writers(
    state: ModelState, spares: SpareWriter | None = None, direct_bytes: int = 0
) -> tuple[Callable[[Path], None], DeferredFile]:
    """How to write the state's checkpoint, straight from the tensors' memory
    (`headway.store.tensorfile`): a function writing the weights (or adapter) into a
    directory, and the optimizer state as a `DeferredFile` (its size known now; on the CPU
    its tensors gathered when it is written), which the caller writes with them or leaves
    to the store's background queue. With `spares`, each file goes through it (over a
    spare made ahead, where that is faster), and the optimizer state's write, the last,
    has the next checkpoint's spares made. An optimizer state of at least `direct_bytes` (> 0)
    is written around the page cache where the filesystem allows (`write_plan_direct`:
    only a restore reads it back), else like the weights."""
    base_path = state.record.base

    def put(name: str, path: Path, plan: TensorFilePlan) -> int:
        return spares.write(name, path, plan) if spares else write_plan(path, plan)

    def write(directory: Path) -> None:
        name = weights_file(state)
        put(name, directory / name, weights_plan(state))
        if state.record.lora:
            config = peft_config(LoraConfig(**state.record.lora), base_path)
            (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))

    optimizer = OptimizerFile.of(state)  # the state's tensors, not the ModelState
    # On the CPU gathered when written (views of its own tensors: nothing that can fail); a
    # device's copied to the host now, so a device error fails the OptimStep, not a later
    # write.
    gathered = None if state.on_cpu else optimizer.tensors()

    def write_optimizer(path: Path) -> int:
        tensors = optimizer.tensors() if gathered is None else gathered
        plan = plan_safetensors(tensors, optimizer.metadata)
        size = None
        if 0 < direct_bytes <= plan.size:
            size = write_plan_direct(path, plan)  # None: no direct I/O here
            if size is not None and spares is not None:
                spares.discard(OPTIMIZER_FILE)  # one made before it went direct
        if size is None:
            size = put(OPTIMIZER_FILE, path, plan)
        if spares is not None:
            spares.prepare_next()
        return size

    return write, DeferredFile(OPTIMIZER_FILE, optimizer.size(), write_optimizer)


def fresh_adapter_writer(config: Any, lora: LoraConfig, base_model: str, seed: int) -> Any:
    """A function writing a new adapter (random A, zero B) for a LoRA fork's root."""

    def write(directory: Path) -> None:

        shell = empty_model(config)  # the family's model on the meta device: shapes only
        apply_lora(shell, lora)
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        for key, p in lora_state_dict(shell).items():
            if "lora_A" in key:
                # PEFT's init: kaiming_uniform(a=√5) = U(−1/√in, 1/√in).
                bound = 1 / math.sqrt(p.shape[1])
                tensors[key] = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
            else:
                tensors[key] = torch.zeros(p.shape)
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        (directory / "adapter_config.json").write_text(
            json.dumps(peft_config(lora, base_model), indent=2)
        )

    return write


def full_weights_writer(state: dict[str, torch.Tensor]) -> Any:
    """A function writing full weights (a merged LoRA model) as a checkpoint's files."""
    from safetensors.torch import save_file

    from headway.modeling.load import hf_name
    from headway.store import WEIGHTS_FILE

    def write(directory: Path) -> None:
        tensors = {hf_name(k): v.contiguous() for k, v in state.items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    return write
