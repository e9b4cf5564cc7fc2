"""What a new fork is made of: its record, its step-0 checkpoint and the files it owns.

Copy-on-write: a fork references its source's files wherever it can. A full fork of a
full model or a base, and a LoRA fork continuing its source's adapter (same config),
reference the source's head (or the checkpoint asked for), optimizer state included when
asked; a full fork of an adapter model owns the merged weights
(there is no file to reference), and a LoRA fork with a new adapter owns a fresh one over
the source's head as frozen weights. Nothing here writes: the trainer creates the model
from the plan (`CheckpointStore.create_model`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from headway.errors import InvalidArgument
from headway.store import CheckpointRecord, CheckpointRef, CheckpointStore, ModelRecord
from headway.store.weights import base_config, full_state
from trainer_svc import adapters
from trainer_svc.adapters import LoraRequest
from trainer_svc.state import fresh_adapter_writer, full_weights_writer


@dataclass
class ForkPlan:
    """A fork ready to be created: `writer` writes the files it owns (None: it owns none)."""

    record: ModelRecord
    root: CheckpointRecord
    writer: Any = None


def plan_fork(
    store: CheckpointStore,
    src: ModelRecord,
    name: str,
    team: str,
    ask: LoraRequest | None,
    full: bool,
    max_lora_rank: int,
    checkpoint: str = "",
    with_optimizer: bool = False,
) -> ForkPlan:
    """The fork `name` of `team` from `src`'s head (or its `checkpoint`): full, or LoRA
    (`ask`'s config, else the source's adapter, else the default one); continuing that
    checkpoint's optimizer state if `with_optimizer`, for a fork that references its
    weights. Blocking (it may merge weights): run it on the trainer's torch thread.
    InvalidArgument for a LoRA config the server refuses or an optimizer state it cannot
    continue, NotFound for an unknown checkpoint."""
    source = src.slug
    lora = None
    if ask is not None and not full:
        lora = adapters.lora_config(ask, max_lora_rank, base_config(store, source))
    src_head = (
        store.get_checkpoint(source, checkpoint) if checkpoint else store.head_checkpoint(source)
    )
    now = time.time()
    root = CheckpointRecord(
        id=store.new_checkpoint_id(0),
        model=name,
        kind="full" if full else "lora",
        step=0,
        created=now,
        parent_id=src_head.id,
        parent_model=source,
    )
    record = ModelRecord(
        slug=name,
        team=team,
        is_base=False,
        base=src.base,
        created=now,
        source=source,
        arch=dict(src.arch),
    )
    plan = ForkPlan(record, root)
    if with_optimizer and (src.lora is None) != full:
        raise InvalidArgument(
            "with_optimizer continues the source's optimizer state, so the fork must train "
            "the same weights: a full fork of a full model, or a LoRA fork of a LoRA model "
            "keeping its adapter"
        )
    # The referenced checkpoint's optimizer state, if it has any (a step-0 one has none).
    continued = with_optimizer and src_head.has_optimizer
    if full:
        if src.lora:
            # A full fork of an adapter model owns the merged weights: there is no file
            # to reference. Every other full fork references its source's files.
            plan.writer = full_weights_writer(full_state(store, source, src_head.id))
        else:
            root.ref = CheckpointRef(source, src_head.id)
            root.has_optimizer = continued
        return plan
    if src.lora is not None and (lora is None or adapters.lora_dict(lora) == src.lora):
        # Continue the source's adapter over the same frozen weights.
        record.lora, record.frozen = dict(src.lora), src.frozen
        root.ref = CheckpointRef(source, src_head.id)
        root.has_optimizer = continued
        return plan
    if with_optimizer:
        raise InvalidArgument(
            "with_optimizer: this fork trains a new adapter (its LoRA config differs from "
            "the source's), which has no optimizer state to continue; fork without it"
        )
    config = base_config(store, source)
    lora = lora or adapters.lora_config(LoraRequest(), max_lora_rank, config)
    record.lora = adapters.lora_dict(lora)
    record.frozen = CheckpointRef(source, src_head.id)
    plan.writer = fresh_adapter_writer(config, lora, src.base, secrets.randbits(62))
    return plan
