"""The reference policy of a KL penalty: which checkpoint it is, and its weights.

A reference is a checkpoint of the trained model; by default its root (step 0), the
weights it was forked from. Its forward runs on the trained module itself, with the
reference's tensors in place of the parameters for the duration (`Reference.active`), so
no second module is built:

- a LoRA fork whose reference adapter is all zeros (a new adapter's root) runs with its
  adapters switched off: the base's forward, no copy of anything;
- another LoRA reference swaps in that checkpoint's adapter (a few MB);
- a full fork's reference swaps in the full weights of that checkpoint, from the
  `FrozenPool`: one copy in memory, shared with every LoRA fork over the same weights.

A state keeps the last reference it used (`ModelState.reference`) until another one is
asked for or the state is dropped (`release_reference`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from headway.errors import FailedPrecondition, InvalidArgument
from headway.modeling.lora import adapters_off
from headway.store import CheckpointRef, CheckpointStore
from headway.store.weights import adapter_dir, read_adapter
from trainer_svc.pool import FrozenPool
from trainer_svc.state import ModelState


@dataclass(frozen=True)
class KlPenalty:
    """A KL penalty of a call, its reference resolved to a checkpoint id (it crosses to
    the other ranks of a distributed trainer, which load the reference themselves)."""

    coef: float
    checkpoint: str


@dataclass
class Reference:
    """The weights of a reference checkpoint, as tensors over a state's module."""

    checkpoint: str
    tensors: dict[str, torch.Tensor]  # parameter name → the reference's tensor
    lora_off: bool = False  # a LoRA fork's base: adapters skipped, `tensors` empty
    pool_ref: CheckpointRef | None = None  # the FrozenPool entry `tensors` come from

    @contextlib.contextmanager
    def active(self, module: torch.nn.Module) -> Iterator[None]:
        """Within the block, `module` computes as the reference policy."""
        with contextlib.ExitStack() as stack:
            if self.lora_off:
                stack.enter_context(adapters_off(module))
            stack.enter_context(_swapped(module, self.tensors))
            yield


def check_coef(coef: float) -> None:
    """InvalidArgument for a coefficient that is not a finite number ≥ 0."""
    if not (coef == coef and abs(coef) != float("inf") and coef >= 0):
        raise InvalidArgument(
            f"kl_penalty.coef must be a finite number >= 0 (0 = no penalty); got {coef}"
        )


def resolve_reference(store: CheckpointStore, slug: str, reference: str) -> str:
    """The checkpoint id `reference` names for model `slug` ("" = its root); NotFound for
    an id the model does not have."""
    if not reference:
        return store.root_checkpoint(slug).id
    return store.get_checkpoint(slug, reference).id


def load_reference(
    store: CheckpointStore, pool: FrozenPool, state: ModelState, ckpt: str
) -> Reference:
    """The reference at checkpoint `ckpt` of `state`'s model, kept on the state."""
    kept: Reference | None = state.reference
    if kept is not None and kept.checkpoint == ckpt:
        return kept
    release_reference(pool, state)
    slug = state.record.slug
    # Weights and adapters are complete once their checkpoint is visible (only the
    # optimizer state is written after): nothing to wait for.
    owner = store.resolve(slug, ckpt)
    if state.record.lora:
        _, tensors = read_adapter(adapter_dir(store, slug, ckpt))
        if not any(bool(t.any()) for k, t in tensors.items() if k.endswith("lora_B")):
            reference = Reference(ckpt, {}, lora_off=True)
        else:
            device = next(iter(state.params.values())).device
            reference = Reference(ckpt, {k: t.to(device) for k, t in tensors.items()})
    else:
        key = CheckpointRef(owner.model, owner.id)
        reference = Reference(ckpt, pool.acquire(key), pool_ref=key)
    missing = [n for n in state.params if n not in reference.tensors]
    if missing and not reference.lora_off:
        if reference.pool_ref is not None:
            pool.release(reference.pool_ref)
        raise FailedPrecondition(
            f"checkpoint {ckpt!r} of model {slug!r} lacks {len(missing)} of the trained "
            f"tensors (e.g. {missing[0]!r}): it cannot serve as the KL reference"
        )
    state.reference = reference
    return reference


def release_reference(pool: FrozenPool, state: ModelState) -> None:
    """Forget the state's reference (its pool entry released)."""
    kept: Reference | None = state.reference
    state.reference = None
    if kept is not None and kept.pool_ref is not None:
        pool.release(kept.pool_ref)


@contextlib.contextmanager
def _swapped(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """`module`'s parameters named in `tensors` replaced by those tensors for the block.

    Matched by identity, so a tied parameter (the output head sharing the embedding) is
    replaced under every name it has, as `torch.func.functional_call` does."""
    by_id = {id(p): tensors[n] for n, p in module.named_parameters() if n in tensors}
    saved = [
        (m, name, p)
        for m in module.modules()
        for name, p in m._parameters.items()
        if p is not None and id(p) in by_id
    ]
    for m, name, p in saved:
        m._parameters[name] = by_id[id(p)]
    try:
        yield
    finally:
        for m, name, p in saved:
            m._parameters[name] = p
