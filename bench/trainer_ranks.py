"""The trainer as 1 process × 2 threads against 2 processes × 1 thread (torchrun, gloo).

Both trainers run as real processes at once (`python -m trainer_svc --threads 2`, and
`python -m torch.distributed.run --nproc-per-node 2 -m trainer_svc --threads 1`), each on
its own store with the same base, a full fork and a LoRA fork; rounds of `block` Steps on
each, interleaved, after a warmup Step. On 2 cores no gain is expected: the two ranks
split the batch but also the cores, and add the gradient all-reduce (every trained
parameter's gradient crosses the group once per step). The table also gives those bytes.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from headway.testing import HANG_SECONDS, ServiceProcess
from headway.v1 import common_pb2, model_pb2, model_pb2_grpc, training_pb2, training_pb2_grpc

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node")


class Trainer:
    """A trainer process (or torchrun group) with a full and a LoRA fork of `base`."""

    def __init__(self, base: Path, procs: int, threads: int, prefix: str, lora_rank: int) -> None:
        self.store = Path(tempfile.mkdtemp(prefix=f"headway-bench-ranks{procs}-"))
        launcher = (*TORCHRUN, str(procs)) if procs > 1 else ()
        args = ["--store", str(self.store), "--device", "cpu", "--threads", str(threads),
                "--log-level", "WARNING"]  # fmt: skip
        self.service = ServiceProcess(
            f"trainer×{procs}", "trainer_svc", args, self.store / "trainer.log",
            f"{prefix}-{procs}", threads=str(threads), launcher=launcher,
        )  # fmt: skip
        self.service.wait_ready(time.monotonic() + HANG_SECONDS)
        models = model_pb2_grpc.ModelServiceStub(self.service.channel)
        self.train = training_pb2_grpc.TrainingServiceStub(self.service.channel)
        models.AddBase(model_pb2.AddBaseRequest(path=str(base), name="base"))
        models.ForkModel(model_pb2.ForkModelRequest(source="base", name="full", full=True))
        lora = common_pb2.LoraConfig(rank=lora_rank, alpha=2 * lora_rank)
        models.ForkModel(model_pb2.ForkModelRequest(source="base", name="lora", lora=lora))

    def step(self, model: str, items: list[common_pb2.TrainingItem], lr: float) -> Any:
        req = training_pb2.StepRequest(
            model=model, data=items, loss_fn="importance_sampling",
            adam=common_pb2.AdamParams(learning_rate=lr),
        )  # fmt: skip
        return self.train.Step(req, timeout=HANG_SECONDS)

    def trained_bytes(self, model: str) -> int:
        """Bytes of the fork's trained parameters (fp32): what its gradient all-reduce sums."""
        ckpt = self.store / "models" / model / "checkpoints"
        latest = max(ckpt.iterdir(), key=lambda d: d.stat().st_mtime)
        files = [f for f in latest.rglob("*.safetensors") if f.name != "optimizer.safetensors"]
        return sum(f.stat().st_size for f in files)

    def close(self) -> None:
        self.service.stop()
        shutil.rmtree(self.store, ignore_errors=True)


def measure_ranks(
    base: Path, items: list[common_pb2.TrainingItem], tokens: int, prefix: str, *,
    lora_rank: int, lr: float, repeats: int = 3, block: int = 2,
) -> tuple[list[list[object]], float]:  # fmt: skip
    """Rows of Step tokens/s (full and LoRA fork) for 1×2 and 2×1, and the full fork's
    2×1 / 1×2 ratio."""
    trainers = {}
    try:
        for procs, threads in ((1, 2), (2, 1)):
            trainers[procs] = Trainer(base, procs, threads, prefix, lora_rank)
        seconds: dict[tuple[int, str], list[float]] = {}
        for model in ("full", "lora"):
            for t in trainers.values():
                t.step(model, items, lr)  # warmup: loads the state, measures kernels
        for _ in range(repeats):
            for procs, t in trainers.items():
                for model in ("full", "lora"):
                    start = time.perf_counter()
                    for _ in range(block):
                        t.step(model, items, lr)
                    seconds.setdefault((procs, model), []).append(
                        (time.perf_counter() - start) / block
                    )
        volume = {m: trainers[1].trained_bytes(m) for m in ("full", "lora")}
    finally:
        for t in trainers.values():
            t.close()

    def tps(procs: int, model: str) -> float:
        return tokens / statistics.median(seconds[procs, model])

    rows: list[list[object]] = []
    for model in ("full", "lora"):
        one, two = tps(1, model), tps(2, model)
        rows.append([f"Step tok/s {model} fork: 2 procs × 1 thread / 1 × 2", two, one, two / one])
        # Each rank sends and receives 2(N−1)/N of these bytes (a ring all-reduce).
        rows.append([f"  gradient summed across ranks per step, {model} (MB)",
                     f"{volume[model] / 1e6:.1f}", "", ""])  # fmt: skip
    return rows, tps(2, "full") / tps(1, "full")
