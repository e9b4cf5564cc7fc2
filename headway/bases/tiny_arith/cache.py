"""The cached tiny-arith build: `<cache_dir>/tiny-arith`, built once and published whole.

A build goes into a temp directory beside the cached one and is published by the store's
atomic rename (every file fsynced first), so an interrupted build leaves no half-written
base; if another process publishes the base first, its build is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from headway.bases.tiny_arith.recipe import BUILD_INFO, NAME, RECIPE_VERSION
from headway.store.atomic import TMP_PREFIX, publish_dir


def is_current(path: Path) -> bool:
    """Whether `path` holds a complete build of this recipe."""
    try:
        info = json.loads((path / BUILD_INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return info.get("recipe_version") == RECIPE_VERSION and all(
        (path / name).is_file() for name in required
    )


def ensure_cached(cache_dir: Path | None, build: Callable[[Path], object]) -> Path:
    """`cache_dir/tiny-arith`, made first by `build(out_dir)` if it is missing or of an older
    recipe. `cache_dir` defaults to `headway.bases.default_cache_dir()`."""
    from headway.bases import default_cache_dir

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / NAME
    if is_current(final):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{NAME}-", dir=cache_dir))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published base is readable
        if final.exists():
            if is_current(final):  # another process won the race
                return final
            stale = Path(tempfile.mkdtemp(prefix=f".stale-{NAME}-", dir=cache_dir))
            os.rename(final, stale / NAME)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            publish_dir(tmp, final)
        except OSError:  # FileExistsError too: published by another process meanwhile
            if is_current(final):
                return final
            raise
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
