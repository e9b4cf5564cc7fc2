"""Bases Headway builds itself, for machines that cannot download weights.

A built base is an ordinary Hugging Face directory (`config.json`, `model.safetensors`,
`tokenizer.json`, `tokenizer_config.json` with a chat template, `generation_config.json`)
that `headway.modeling.load_model` and transformers both load, cached under
`default_cache_dir()` and added to a store like any other base.

- `tiny-arith` (`headway.bases.tiny_arith`): a ~0.8M-parameter Qwen3-family model with a
  character tokenizer, pretrained on chat-formatted `a+b=` problems until it is right
  sometimes, so GRPO groups have reward spread (its measured held-out accuracy: README).

`BUILDERS` maps a base's name to its `ensure(cache_dir) -> Path` function as an
"module:function" string, imported only when called: importing this package imports
neither torch nor the builders (the CLI imports it on every invocation).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

BUILDERS: dict[str, str] = {"tiny-arith": "headway.bases.tiny_arith:ensure_tiny_arith"}


def default_cache_dir() -> Path:
    """Where built bases are cached: `$HEADWAY_HOME/bases`, else `~/.cache/headway/bases`."""
    home = os.environ.get("HEADWAY_HOME")
    if home:
        return Path(home).expanduser() / "bases"
    return Path.home() / ".cache" / "headway" / "bases"


# ensure(cache_dir, progress=None) -> Path; progress(step, steps, loss) during a build.
Ensure = Callable[..., Path]
Progress = Callable[[int, int, float], None]


def builder(name: str) -> Ensure:
    """The `ensure(cache_dir, progress=None) -> Path` function of the base `name` (imported now)."""
    try:
        target = BUILDERS[name]
    except KeyError:
        raise KeyError(
            f"no built-in base named {name!r}; choose one of {', '.join(sorted(BUILDERS))}"
        ) from None
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def ensure_base(name: str, cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """The directory of the built base `name`, building it into `cache_dir` if missing
    (`progress(step, steps, loss)` is called as the build trains)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return builder(name)(cache, progress=progress)


__all__ = ["BUILDERS", "builder", "default_cache_dir", "ensure_base"]
