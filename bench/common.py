"""Shared pieces of the benchmarks: the bench model on disk (and a tokenizer for it), timing,
the results table, and cleaning up a run's Redis keys (services, Redis and prefixes come from
`headway.testing`, as the tests' do).

Speed is reported as medians of repeats and as ratios against a baseline measured in the
same run, never as absolute targets: machines here are noisy and differ between sessions.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from headway.testing import clear_prefix

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


def add_tokenizer(path: Path) -> None:
    """A minimal word-level tokenizer: the trainer only needs one to register the base."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, 256)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))


class ChildCalls:
    """An object built in a spawned child process and called by name from this one: a
    baseline kept out of the process that runs ours (`bench.sampler_baseline.HFWorker`
    says why). `target(*args, conn)` builds the object and answers calls (`serve_calls`)."""

    def __init__(self, what: str, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.what = what  # named in the errors the child reports
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, child), daemon=True)
        self.proc.start()
        child.close()

    def call(self, cmd: str, *args: Any) -> Any:
        """The child's answer to `cmd(*args)`; RuntimeError with its error if it failed."""
        self.conn.send((cmd, args))
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(f"{self.what}: {value}")
        return value

    def close(self) -> None:
        """Stop the child (killed if it does not stop: a bench must clean up anyway)."""
        with contextlib.suppress(OSError):  # a child that died: nothing to tell
            self.conn.send(("stop", ()))
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def serve_calls(calls: dict[str, Callable[..., Any]], conn: Any) -> None:
    """In the child of a `ChildCalls`: answer its calls from `calls` until told to stop."""
    while True:
        cmd, args = conn.recv()
        if cmd == "stop":
            return
        try:
            conn.send((True, calls[cmd](*args)))
        except Exception as e:  # reported in the bench process
            conn.send((False, repr(e)))


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


def run_at_once(calls: list[Callable[[], object]]) -> float:
    """Run each call on its own thread, all released together; the wall time until the last
    ends (the first error, if any, is raised here)."""
    barrier = threading.Barrier(len(calls) + 1)
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            call()
        except BaseException as e:  # reported by the calling thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in calls]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return wall


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


def clean_redis(prefix: str) -> None:
    """Remove the keys this run wrote under `prefix` (head mirrors, registry entries)."""
    try:
        clear_prefix(prefix)
    except Exception as e:  # best effort: the keys are namespaced and harmless
        print(f"(could not clean Redis keys {prefix}*: {e})")
