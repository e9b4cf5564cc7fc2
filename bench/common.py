"""Shared pieces of the benchmarks: the bench model on disk, timing, the results table.

Speed is reported as medians of repeats and as ratios against a baseline measured in the
same run, never as absolute targets: machines here are noisy and differ between sessions.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "configs"


def build_bench_model(name: str = "qwen3-40m", seed: int = 0) -> Path:
    """Save a transformers model of `configs/<name>.json` (seeded random weights); its dir."""
    import transformers

    config = transformers.AutoConfig.for_model(**json.loads((CONFIGS / f"{name}.json").read_text()))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = Path(tempfile.mkdtemp(prefix=f"headway-bench-{name}-"))
    model.save_pretrained(path)
    return path


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """A plain aligned table."""
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print(
            "  ".join(
                str(c).rjust(w) if j else str(c).ljust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if value >= 10 else f"{value:.3f}"
    return str(value)
