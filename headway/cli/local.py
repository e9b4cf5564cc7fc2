"""`headway models export` and `headway models build-base`: the commands that run torch here.

They work on this machine's files (the checkpoint store, the bases cache), not through the
gateway, and need the `server` extra: torch is imported inside each command, so that
`headway --help` and the client commands of `headway.cli.models` stay free of it.
"""

from __future__ import annotations

import argparse
import sys

from headway.cli.models import CommandFactory


def _needs_server() -> None:
    """ValueError (one line, exit 2) when the torch-side modules a command runs are missing."""
    from headway.cli import missing_extra

    if message := missing_extra("server"):
        raise ValueError(message)


def export(args: argparse.Namespace) -> int:
    """Write a checkpoint of the local store as a PEFT adapter or a merged HF directory."""
    _needs_server()
    import shutil
    from pathlib import Path

    from headway.store import CheckpointStore

    store = CheckpointStore(args.store, recover=False)
    record = store.get_model(args.model)
    ckpt = args.checkpoint or store.head(args.model)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new directory")
    if args.format == "peft":
        if not record.lora:
            raise ValueError(f"{args.model} is not a LoRA model: export it with --format hf")
        from headway.store.weights import adapter_dir

        shutil.copytree(adapter_dir(store, args.model, ckpt), out, dirs_exist_ok=True)
    else:  # merged full weights plus the base's tokenizer: a plain HF directory
        from headway.modeling import ModelConfig, build_model, save_model
        from headway.modeling.tokenizer import Tokenizer
        from headway.store.weights import full_state

        base = store.get_model(record.base)
        model = build_model(ModelConfig.from_file(base.path), full_state(store, args.model, ckpt))
        save_model(model, Tokenizer.from_dir(base.path), out)
    print(f"exported {args.model}@{ckpt} ({args.format}) to {out}")
    return 0


def build_base(args: argparse.Namespace) -> int:
    """Build (once, cached) a base the project ships; print its path on stdout."""
    _needs_server()
    from pathlib import Path

    from tqdm import tqdm

    from headway.bases import ensure_base

    # The bar goes to stderr, so stdout is the path alone: BASE=$(headway models build-base ...)
    bar = tqdm(desc=f"building {args.name}", unit="step", file=sys.stderr)

    def progress(step: int, steps: int, loss: float) -> None:
        bar.total = steps
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(step - bar.n)

    try:
        path = ensure_base(args.name, Path(args.cache) if args.cache else None, progress)
    finally:
        bar.close()
    print(path)
    return 0


def add_commands(command: CommandFactory, default_store: str) -> None:
    """Register `export` and `build-base` under `headway models` (`command` is its factory)."""
    p = command("export", export, "write a checkpoint as a PEFT adapter or a merged HF model")
    p.add_argument("model")
    p.add_argument("--format", choices=("peft", "hf"), required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--checkpoint", default="", help="default: the head")
    p.add_argument("--store", default=default_store)
    p = command("build-base", build_base, "build (once, cached) a base the project ships")
    p.add_argument("name", choices=("tiny-arith",))
    p.add_argument("--cache", default="", help="cache directory (default $HEADWAY_HOME/bases)")
