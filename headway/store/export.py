"""A checkpoint written out as files another tool loads: a PEFT adapter (a LoRA
checkpoint's own directory: `peft` and vLLM load it onto the base) or a merged Hugging
Face model (full weights, the base's config and tokenizer). What `headway models export`
writes, here on the store's machine or streamed through the API (ExportCheckpoint)."""

from __future__ import annotations

import shutil
from pathlib import Path

from headway.errors import FailedPrecondition, InvalidArgument
from headway.store.store import CheckpointStore

FORMATS = ("peft", "hf")


def check_format(slug: str, lora: bool, fmt: str) -> None:
    """InvalidArgument for an unknown format, FailedPrecondition for peft of a model
    that has no adapter."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"export format {fmt!r}: choose peft (LoRA models) or hf")
    if fmt == "peft" and not lora:
        raise FailedPrecondition(f"{slug} is not a LoRA model: export it with format hf")


def export_checkpoint(store: CheckpointStore, slug: str, ckpt: str, fmt: str, out: Path) -> None:
    """Write checkpoint `ckpt` (an id or a tag) of `slug` into the empty or new directory
    `out` in format `fmt` (see `check_format`)."""
    record = store.get_model(slug)
    check_format(slug, bool(record.lora), fmt)
    ckpt = store.get_checkpoint(slug, ckpt).id
    if fmt == "peft":
        from headway.store import ADAPTER_FILE
        from headway.store.weights import adapter_dir

        source = adapter_dir(store, slug, ckpt)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", ADAPTER_FILE):  # what peft loads, nothing else
            shutil.copyfile(source / name, out / name)
        return
    # Merged full weights plus the base's config and tokenizer: a plain HF directory.
    from headway.modeling import ModelConfig, build_model, save_model
    from headway.modeling.tokenizer import Tokenizer
    from headway.store.weights import full_state

    base = store.get_model(record.base)
    model = build_model(ModelConfig.from_file(base.path), full_state(store, slug, ckpt))
    save_model(model, Tokenizer.from_dir(base.path), out)
