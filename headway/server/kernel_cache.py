"""Kernel choices measured once per machine and kept on disk, for every service.

The trainer and the samplers choose matmul kernels by timing them on the machine at hand
(`trainer_svc/kernels.py`, `sampler_svc/kernels.py`). A choice is cached under a key that
says what it depends on — the CPU model, torch's version, the process's threads, the
dtype, the shape — in one JSON file (`$HEADWAY_KERNEL_CACHE`, default
`~/.cache/headway/kernels.json`), so that:

- a restart costs no measurement;
- a restarted trainer computes with the kernels it computed with before, so a model
  restored from its checkpoint continues bit for bit (two kernels give the same product
  only to float rounding), and a noisy moment cannot flip a choice between runs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import threading
from pathlib import Path

log = logging.getLogger(__name__)
_lock = threading.Lock()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one; read once: every kernel
    cache key names it)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu


def cache_bytes(level: int | None = None) -> int:
    """Bytes of this CPU's cache of `level` (None: its largest), from Linux's sysfs; 0 where
    that cannot be read. A VM may report its host's whole cache (480 MiB on a 2-core Xeon
    guest that behaved as if it had ~64 MB)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if level is not None and (index / "level").read_text().strip() != str(level):
                continue
            size = (index / "size").read_text().strip().upper()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            best = max(best, int(size.rstrip("KMG")) * unit)
        except (OSError, ValueError):
            continue
    return best


def machine_key(torch_version: str, threads: int, dtype: str) -> str:
    """What a measured choice depends on besides the shape: CPU, torch, threads, dtype
    (torch's facts passed in: this module, like the rest of the server layer, imports no
    torch)."""
    return f"{cpu_model()}|torch {torch_version}|threads {threads}|{dtype}"


def cache_path() -> Path:
    """The cache file: `$HEADWAY_KERNEL_CACHE`, else under `$XDG_CACHE_HOME` or ~/.cache."""
    env = os.environ.get("HEADWAY_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "headway/kernels.json"


def read_cache(path: Path | None = None) -> dict[str, dict]:
    """Every cached entry ({} when the file is missing or unreadable)."""
    try:
        return json.loads((path or cache_path()).read_text())
    except (OSError, ValueError):
        return {}


def write_cache(entries: dict[str, dict], path: Path | None = None) -> None:
    """Merge `entries` into the cache file (temp file + rename: never a torn file). A cache
    that cannot be written (a read-only home) is logged: the next start measures again."""
    path = path or cache_path()
    try:
        with _lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = read_cache(path)
            data.update(entries)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(path)
    except OSError as e:
        log.warning("kernel choices not cached (%s): %s", path, e)
