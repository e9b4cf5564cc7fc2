"""Who may register which directory as a base, and whether it loads.

Registering a base makes the trainer (and every sampler) read a directory of its machine,
so it is an admin action, limited to the trainer's base roots:

- a caller whose key is not an admin key is refused (PERMISSION_DENIED) before the path is
  even looked at, so the answer tells nothing about the server's filesystem;
- the path is resolved (symlinks followed) and must lie under one of the configured roots
  (`--base-root`, HEADWAY_BASE_ROOTS);
- with no root configured, only local mode may register (auth off: the local caller, the
  gateway of `headway serve` on loopback), and anywhere; a deployment with keys must
  configure roots first.

Then the directory must load: config, weight names and shapes, tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from headway.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from headway.modeling import ModelConfig, Tokenizer
from headway.modeling.load import empty_model, read_weights
from headway.server.auth import LOCAL, Caller

NOT_ADMIN = "registering a base is an admin action: use an admin key (headway keys create --admin)"


def base_directory(path: str, caller: Caller, roots: list[Path]) -> Path:
    """The directory `caller` may register for `path` (resolved); a HeadwayError otherwise.

    Nothing on disk is touched before the caller is known to be an admin.
    """
    if not caller.admin:
        raise PermissionDenied(NOT_ADMIN)
    if not path:
        raise InvalidArgument("path is empty: give the base's directory on the trainer's machine")
    if not Path(path).expanduser().is_absolute():
        raise InvalidArgument(f"base path {path!r} is relative: give an absolute path")
    directory = Path(path).expanduser().resolve()
    if roots:
        resolved = [root.expanduser().resolve() for root in roots]
        if not any(directory.is_relative_to(root) for root in resolved):
            shown = ", ".join(str(r) for r in resolved)
            raise PermissionDenied(
                f"base path {path!r} is outside this trainer's base roots ({shown}): put the "
                "model under one of them, or start the trainer with another --base-root"
            )
    elif caller != LOCAL:
        raise FailedPrecondition(
            "this trainer has no base roots, so bases can be registered only in local mode: "
            "start it with --base-root DIR (or HEADWAY_BASE_ROOTS) to let admin keys register "
            "bases under DIR"
        )
    if not directory.is_dir():
        raise InvalidArgument(f"base path {path!r} is not a directory on the trainer's machine")
    return directory


def validate_base(directory: Path) -> dict[str, Any]:
    """Check a base directory loads (config, weight names and shapes, tokenizer); its
    architecture summary for the model record."""
    config = ModelConfig.from_file(directory)
    read_weights(directory, empty_model(config), torch.float32, "cpu", load=False)
    if not (directory / "tokenizer.json").is_file():
        raise InvalidArgument(
            f"{directory}: no tokenizer.json; a base needs its tokenizer to sample text"
        )
    tokenizer = Tokenizer.from_dir(directory)
    eos = tokenizer.eos_token_ids
    if not eos and config.eos_token_id is not None:
        eos = [config.eos_token_id] if isinstance(config.eos_token_id, int) else config.eos_token_id
    return {
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "max_context": config.max_context,
        "eos_token_ids": list(eos),
    }
