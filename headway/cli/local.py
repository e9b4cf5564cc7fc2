"""`headway models export` and `headway models build-base`: the commands that can run torch
here.

`build-base`, and `export --store`, work on this machine's files (the bases cache, a
checkpoint store) and need the `server` extra: torch is imported inside each command, so
that `headway --help` and the client commands of `headway.cli.models` stay free of it.
`export` without `--store` streams the checkpoint through the gateway (no torch).
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
    """Write a checkpoint as a PEFT adapter or a merged HF directory: through the gateway
    (ExportCheckpoint: this machine needs no access to the store, nor torch), or with
    `--store`, from a store on this machine."""
    from pathlib import Path

    out = Path(args.output)
    if not args.store:
        from headway.cli.models import _client

        with _client(args) as client:
            ckpt = client.export(args.model, out, args.format, args.checkpoint)
        print(f"exported {args.model}@{ckpt} ({args.format}) to {out}")
        return 0
    _needs_server()
    from headway.store import CheckpointStore
    from headway.store.export import export_checkpoint

    store = CheckpointStore(args.store, recover=False)
    ckpt = store.get_checkpoint(args.model, args.checkpoint or store.head(args.model)).id
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new directory")
    export_checkpoint(store, args.model, ckpt, args.format, out)
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
    p.add_argument("--checkpoint", default="", help="id or tag (default: the head)")
    p.add_argument(
        "--store",
        default="",
        help="read a store on this machine instead of the gateway (e.g. " + default_store + ")",
    )
    p = command("build-base", build_base, "build (once, cached) a base the project ships")
    p.add_argument("name", choices=("tiny-arith",))
    p.add_argument("--cache", default="", help="cache directory (default $HEADWAY_HOME/bases)")
