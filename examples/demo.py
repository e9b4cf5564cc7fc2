"""`make demo`: the seed page's story on this machine, on embedded defaults.

1. build the project's own base, `tiny-arith` (once; cached), and start the stack
   (trainer, one sampler, gateway, embedded Redis, a fresh store under `.demo/`);
2. `headway models add-base` it and `headway models fork tiny-arith --name arith-rl`;
3. run `examples/train.py`'s loop (agent with return_token_ids, Job with group 8,
   `TrainingClient.step`) with a progress bar, the mean reward of each step and, beside
   it, the greedy accuracy on 100 held-out problems (per-step reward is noisy);
4. print the checkpoint tree, write the reward plot (`headway models plot`);
5. set the head back to an earlier checkpoint, show that sampling now comes from it,
   and train one step from there: the tree branches.

Everything it shows is also a CLI command, echoed with a `$` before it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train  # noqa: E402  (examples/train.py, beside this file)

from headway import SampleResult, SamplingClient, StepResult  # noqa: E402
from headway.bases.tiny_arith import ensure_tiny_arith, held_out_problems, reward  # noqa: E402
from headway.cli import main as headway_cli  # noqa: E402
from headway.cli.serve import LocalStack, ServeConfig  # noqa: E402
from headway.modeling.tokenizer import Tokenizer  # noqa: E402
from headway.types import Run  # noqa: E402

MODEL = "arith-rl"
HELD_OUT = 100  # problems in the held-out greedy accuracy


def free_port() -> int:
    """A port nothing listens on now (the demo never takes a port a real serve might use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_stack(store: Path) -> LocalStack:
    """`headway serve`'s stack on free ports over `store` (not started), with this
    process's HEADWAY_URL and HEADWAY_HTTP_URL pointing at it, in local mode."""
    ports = {name: free_port() for name in ("gateway", "http", "trainer", "sampler")}
    config = ServeConfig(
        store=store,
        listen=f"127.0.0.1:{ports['gateway']}",
        http=f"127.0.0.1:{ports['http']}",
        trainer_listen=f"127.0.0.1:{ports['trainer']}",
        sampler_port_base=ports["sampler"],
    )
    os.environ["HEADWAY_URL"] = f"127.0.0.1:{ports['gateway']}"
    os.environ["HEADWAY_HTTP_URL"] = f"http://127.0.0.1:{ports['http']}/v1"
    os.environ.pop("HEADWAY_API_KEY", None)  # local mode
    return LocalStack(config)


def shell(*argv: str) -> None:
    """Run a `headway` CLI command in this process, echoed as a user would type it."""
    print(f"\n$ headway {' '.join(argv)}", flush=True)
    code = headway_cli(list(argv))
    if code != 0:
        raise SystemExit(f"demo: `headway {' '.join(argv)}` failed with exit code {code}")


class HeldOut:
    """Greedy accuracy on held-out problems, sampled through the gateway."""

    def __init__(self, base: Path, size: int) -> None:
        tokenizer = Tokenizer.from_dir(base)
        self.problems = held_out_problems(size)
        self.prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": text}])
            for text, _ in self.problems
        ]

    async def measure(self, sampler: SamplingClient) -> tuple[float, set[str]]:
        """(accuracy, the checkpoints that answered)."""
        gate = asyncio.Semaphore(32)  # one decode batch at a time: no queue at the sampler

        async def one(prompt: list[int]) -> SampleResult:
            async with gate:
                return await sampler.sample(prompt, max_tokens=8, temperature=0.0)

        results = await asyncio.gather(*(one(p) for p in self.prompts))
        scores = [
            reward(text, r.sequences[0].text)
            for (text, _), r in zip(self.problems, results, strict=True)
        ]
        return sum(scores) / len(scores), {r.checkpoint for r in results}


async def train_with_progress(args: argparse.Namespace, held_out: HeldOut) -> list[dict]:
    """examples/train.py's loop, with a progress bar and held-out accuracy after each step."""
    sampler = SamplingClient(MODEL)
    before, _ = await held_out.measure(sampler)
    print(f"\nheld-out greedy accuracy of the base: {before:.2f}")
    history: list[dict] = [{"step": 0, "reward": None, "held_out": before}]
    bar = tqdm(total=args.steps, desc="training", unit="step", file=sys.stdout)

    async def on_step(result: StepResult, batch: list[Run]) -> None:
        mean = sum(run.reward or 0.0 for run in batch) / len(batch)
        # Read-your-writes: every sample started after the step is served by its checkpoint.
        accuracy, served = await held_out.measure(sampler)
        assert served == {result.checkpoint}, f"step {result.step} served by {served}"
        history.append(
            {
                "step": result.step,
                "checkpoint": result.checkpoint,
                "reward": mean,
                "held_out": accuracy,
            }
        )
        bar.update(1)
        bar.set_postfix(reward=f"{mean:.3f}", held_out=f"{accuracy:.2f}")

    started = time.monotonic()
    await train.main(
        MODEL,
        steps=args.steps,
        tasks=args.tasks,
        learning_rate=args.learning_rate,
        on_step=on_step,
        max_steps_off_policy=args.off_policy,
    )
    bar.close()
    await sampler.close()
    print(f"\n{args.steps} steps in {time.monotonic() - started:.0f} s")
    print(f"step  mean reward ({args.tasks} tasks x 8)  held-out greedy accuracy")
    for row in history:
        reward_text = "-" if row["reward"] is None else f"{row['reward']:.3f}"
        print(f"{row['step']:>4}  {reward_text:>26}  {row['held_out']:>24.2f}")
    return history


async def roll_back(history: list[dict], held_out: HeldOut) -> None:
    """Set the head to a middle checkpoint; sampling follows; training branches there."""
    back = history[len(history) // 2]
    shell("models", "head", MODEL, "--set", back["checkpoint"])
    shell("models", "head", MODEL)
    sampler = SamplingClient(MODEL)
    accuracy, served = await held_out.measure(sampler)
    print(
        f"\nsampling now comes from {', '.join(sorted(served))} (step {back['step']}): "
        f"held-out greedy accuracy {accuracy:.2f} (it was {back['held_out']:.2f} at step "
        f"{back['step']})"
    )
    await sampler.close()
    print("\none more step from there: the tree branches")
    await train.main(MODEL, steps=1, on_step=lambda r, b: print(f"optim {r.step} → {r.checkpoint}"))
    shell("models", "checkpoints", MODEL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Headway demo: GRPO on tiny-arith, end to end.")
    parser.add_argument("--dir", default=".demo", help="the demo's store, logs and plot")
    parser.add_argument("--steps", type=int, default=12, help="training steps (default 12)")
    parser.add_argument("--learning-rate", type=float, default=train.DEFAULT_LEARNING_RATE)
    parser.add_argument("--lora-rank", type=int, default=0, help="default: the trainer's")
    parser.add_argument("--tasks", type=int, default=32, help="problems in the taskset")
    parser.add_argument("--full", action="store_true", help="full fine-tuning, not LoRA")
    parser.add_argument(
        "--async",
        dest="off_policy",
        action="store_const",
        const=2,
        default=0,
        help="roll out the next two steps while this one trains (headway.rl, 2 steps off policy)",
    )
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the demo rolls the head back to a middle step")
    work = Path(args.dir).resolve()
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)  # a fresh story every run

    print("building the tiny-arith base (once; cached) ...", flush=True)
    build = tqdm(desc="pretraining tiny-arith", unit="step", file=sys.stdout)

    def progress(step: int, total: int, loss: float) -> None:
        build.total = total
        build.n = step
        build.set_postfix(loss=f"{loss:.3f}", refresh=False)
        build.refresh()

    base = ensure_tiny_arith(progress=progress)
    build.close()
    print(f"base at {base}")

    stack = local_stack(store)
    try:
        stack.start()
        print(stack.ready_line())
        shell("models", "add-base", str(base), "--name", "tiny-arith")
        fork = ["models", "fork", "tiny-arith", "--name", MODEL]
        if args.full:
            fork.append("--full")
        elif args.lora_rank:
            fork += ["--lora-rank", str(args.lora_rank)]
        shell(*fork)
        shell("models", "list")
        held_out = HeldOut(base, HELD_OUT)
        history = asyncio.run(train_with_progress(args, held_out))
        first = [r["reward"] for r in history[1:4]]
        last = [r["reward"] for r in history[-3:]]
        print(
            f"\nmean reward, first 3 steps {sum(first) / len(first):.3f} → last 3 steps "
            f"{sum(last) / len(last):.3f}; held-out greedy {history[0]['held_out']:.2f} → "
            f"{history[-1]['held_out']:.2f}"
        )
        shell("models", "checkpoints", MODEL)
        plot = work / "reward.png"
        shell("models", "plot", MODEL, "-o", str(plot))
        asyncio.run(roll_back(history, held_out))
        print(f"\ndone: plot {plot}, store {store}, logs {store / 'logs'}")
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
