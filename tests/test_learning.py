"""GRPO on tiny-arith through the real services raises the reward: the learning test.

The loop is the demo's (a LoRA fork at the trainer's default rank, a fixed taskset of 32
training problems, 8 samples each at T=1, `TrainingClient.step` with the
importance-sampling loss at lr 1e-3), sampled through the gateway's gRPC API with a seed
per request so that a run is reproducible. Ten steps must raise the mean reward of the
last three steps above that of the first three.

`HEADWAY_LEARNING_SEEDS=0,1,2,3,4 pytest tests/test_learning.py -s` repeats it over several
seeds (the problems drawn and the sampling) and prints each run's rewards.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from headway import SamplingClient, TrainingClient
from headway.bases.tiny_arith import chat_messages, reward, train_problems
from headway.modeling.tokenizer import Tokenizer
from headway.types import Run, Turn
from headway.v1 import common_pb2, model_pb2

pytestmark = pytest.mark.slow  # the tiny-arith build and ten GRPO steps

SEEDS = [int(s) for s in os.environ.get("HEADWAY_LEARNING_SEEDS", "0").split(",")]
STEPS, TASKS, GROUP, LEARNING_RATE = 10, 32, 8, 1e-3


async def grpo(url: str, tokenizer: Tokenizer, seed: int) -> list[float]:
    """STEPS GRPO steps on arith-rl; the mean reward of each step's rollouts."""
    problems = [text for text, _ in train_problems(TASKS, seed)]
    prompts = [tokenizer.apply_chat_template(chat_messages(p)) for p in problems]
    trainer = TrainingClient("arith-rl", url=url)
    sampler = SamplingClient("arith-rl", url=url)
    rewards = []
    for step in range(STEPS):
        results = await asyncio.gather(
            *(
                sampler.sample(
                    p, n=GROUP, max_tokens=8, temperature=1.0, seed=seed * 10**6 + step * 1000 + i
                )
                for i, p in enumerate(prompts)
            )
        )
        batch = [
            Run(
                turns=[Turn(r.prompt_tokens, s.tokens, s.logprobs, r.checkpoint)],
                reward=reward(problem, s.text),
            )
            for problem, r in zip(problems, results, strict=True)
            for s in r.sequences
        ]
        rewards.append(sum(run.reward for run in batch) / len(batch))
        result = await trainer.step(batch, learning_rate=LEARNING_RATE, group_size=GROUP)
        assert result.step == step + 1
    await trainer.close()
    await sampler.close()
    return rewards


@pytest.mark.parametrize("seed", SEEDS)
def test_ten_grpo_steps_raise_the_mean_reward(gateway_stack, tiny_arith, seed):
    path, _ = tiny_arith
    stack = gateway_stack
    stack.add_base(path, "tiny-arith")
    request = model_pb2.ForkModelRequest(source="tiny-arith", name="arith-rl")
    request.lora.CopyFrom(common_pb2.LoraConfig(rank=0))  # the default rank, as the CLI forks
    stack.gateway.models.ForkModel(request)

    rewards = asyncio.run(grpo(stack.gateway.server.address, Tokenizer.from_dir(path), seed))
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"seed {seed}: rewards {' '.join(f'{r:.3f}' for r in rewards)}; {first:.3f} → {last:.3f}")
    assert last > first, f"seed {seed}: mean reward {first:.3f} → {last:.3f} ({rewards})"
