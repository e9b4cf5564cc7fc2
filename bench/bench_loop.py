"""`make bench-loop`: wall time per step of the demo's RL loop, asynchronous (the next two
steps' rollouts run while this one trains, `headway.rl`, max_steps_off_policy=2, the
demo's `--async`) against synchronous, on the same machine in the same run.

The stack is `headway serve`'s (trainer, one sampler, gateway, embedded Redis) on a fresh
store; the base is the project's tiny-arith (built once, cached). Two LoRA forks of one
fork of it start from the same weights, and each trains the same steps on the same
taskset (same problems, same group size, same learning rate), one synchronously, one
asynchronously, in turn. Reported: seconds per step of each (the whole run's wall time
over its steps), their ratio, and both reward curves: the asynchronous loop must still
learn (the mean reward of its last three steps above that of its first three).

Last line: `async_vs_sync=<sync s per step / async s per step> async_learns=<yes|no>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import demo  # noqa: E402  (examples/demo.py: its stack)
import train  # noqa: E402  (examples/train.py: the demo's taskset and agent)

from bench.common import print_table  # noqa: E402
from headway import ModelClient, SamplingClient  # noqa: E402
from headway.bases.tiny_arith import ensure_tiny_arith  # noqa: E402
from headway.rl import StepReport, rl_loop  # noqa: E402


async def run(model: str, args: argparse.Namespace, bound: int) -> list[StepReport]:
    agent = train.arith_agent(model)
    reports = await rl_loop(
        model, train.arith_taskset(args.tasks, seed=0), agent, steps=args.steps,
        group=args.group, learning_rate=args.learning_rate, max_steps_off_policy=bound,
    )  # fmt: skip
    await agent.close()
    return reports


async def forks() -> None:
    async with ModelClient() as models:
        await models.fork("tiny-arith", "start")
        for name in ("sync", "async"):  # both continue start's adapter: the same weights
            await models.fork("start", name)
    # Each served once before anything is timed: the sampler's first use of the base
    # builds its engine (kernel layouts measured, decode compiled where it pays).
    for name in ("sync", "async"):
        async with SamplingClient(name) as sampler:
            await sampler.sample("1 + 1 =", max_tokens=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=16, help="problems per step")
    parser.add_argument("--group", type=int, default=8, help="rollouts per problem")
    parser.add_argument("--learning-rate", type=float, default=train.DEFAULT_LEARNING_RATE)
    parser.add_argument(
        "--ahead", type=int, default=2, help="the async loop's max_steps_off_policy"
    )
    args = parser.parse_args()
    base = ensure_tiny_arith()
    work = Path(tempfile.mkdtemp(prefix="headway-bench-loop-"))
    stack = demo.local_stack(work / "store")
    started = time.monotonic()
    try:
        stack.start()

        async def register() -> None:
            async with ModelClient() as models:
                await models.add_base(str(base), "tiny-arith")

        asyncio.run(register())
        asyncio.run(forks())
        reports = {
            name: asyncio.run(run(name, args, bound))
            for name, bound in (("sync", 0), ("async", args.ahead))
        }
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)

    # The whole run over its steps: a pipeline's first step waits for rollouts alone and
    # its last ones have none left to overlap, so a median of steps would flatter it.
    per_step = {n: sum(r.seconds for r in rs) / len(rs) for n, rs in reports.items()}
    waited = {n: statistics.median(r.waited for r in rs[1:]) for n, rs in reports.items()}
    trained = {n: statistics.median(r.trained for r in rs[1:]) for n, rs in reports.items()}
    # Perfect overlap on idle cores: a step lasts the longer of its rollouts and training.
    ideal = (waited["sync"] + trained["sync"]) / max(waited["sync"], trained["sync"])
    curves = {n: [r.reward_mean for r in rs] for n, rs in reports.items()}
    ratio = per_step["sync"] / per_step["async"]
    stale = sum(n for r in reports["async"] for b, n in r.staleness.items() if b)
    total = sum(sum(r.staleness.values()) for r in reports["async"])
    print(
        f"RL loop on tiny-arith: {args.steps} steps of {args.tasks} tasks x {args.group} "
        f"rollouts, LoRA; async: max_steps_off_policy {args.ahead}; CPU threads {os.cpu_count()}"
    )
    print_table(
        "wall time per step (ratio: sync / async, > 1 = async faster)",
        ["metric", "async", "sync", "ratio"],
        [
            [
                "s per step (all steps' wall time / steps)",
                per_step["async"],
                per_step["sync"],
                ratio,
            ],
            ["  waiting for the step's rollouts (median)", waited["async"], waited["sync"], ""],
            ["  in the training calls (median)", trained["async"], trained["sync"], ""],
            ["runs sampled off policy (async)", stale, "", f"{stale}/{total}"],
        ],
    )
    print(
        f"overlap bound: (sync rollouts + training) / the longer of the two = {ideal:.2f} "
        "(what one batch ahead could reach were the two not sharing these cores; two "
        "batches ahead also decode as one larger batch)"
    )
    print("step  reward sync  reward async")
    for k, (a, b) in enumerate(zip(curves["sync"], curves["async"], strict=True), start=1):
        print(f"{k:>4}  {a:>11.3f}  {b:>12.3f}")

    def learns(curve: list[float]) -> bool:
        return sum(curve[-3:]) / 3 > sum(curve[:3]) / 3

    print(
        f"goal: async_vs_sync >= 1.3 on 2 cores, and async still learns; "
        f"bench took {time.monotonic() - started:.0f} s"
    )
    print(
        f"async_vs_sync={ratio:.2f} async_learns={'yes' if learns(curves['async']) else 'no'} "
        f"sync_learns={'yes' if learns(curves['sync']) else 'no'}"
    )


if __name__ == "__main__":
    main()
