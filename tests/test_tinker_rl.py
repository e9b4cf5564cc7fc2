"""The shape of tinker-cookbook's `recipes/rl_loop.py`, with the official SDK against
Headway, on tiny-arith: sample a group per problem with the SDK, score, build Datums
(prompt + completion, the sampler's logprobs, group-centred advantages), forward_backward
with importance_sampling, optim_step, save_weights_and_get_sampling_client; ten steps
raise the mean reward (last three above the first three), seeded as tests/test_learning.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from headway.bases.tiny_arith import chat_messages, reward, train_problems
from headway.modeling.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # the tiny-arith build and ten GRPO steps

STEPS, TASKS, GROUP, LEARNING_RATE, SEED = 10, 32, 8, 1e-3, 0


def datums(prompt: list[int], result: types.SampleResponse, rewards: list[float]) -> list:
    """rl_loop's Datums of one group: advantages centred on the group's mean reward."""
    mean = sum(rewards) / len(rewards)
    out = []
    for seq, r in zip(result.sequences, rewards, strict=True):
        tokens = prompt + list(seq.tokens)
        n_prompt = len(prompt) - 1  # the positions that predict prompt tokens: no signal
        out.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": tokens[1:],
                "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                "advantages": [0.0] * n_prompt + [r - mean] * len(seq.tokens),
            },
        ))  # fmt: skip
    return out


def test_rl_loop_shape_raises_the_reward(gateway_stack, tiny_arith, monkeypatch):
    path, _ = tiny_arith
    gateway_stack.add_base(path, "tiny-arith")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    base_url = gateway_stack.gateway.http_url.removesuffix("/v1")
    service = tinker.ServiceClient(base_url=base_url, api_key="tml-local")
    tokenizer = Tokenizer.from_dir(path)
    try:
        tc = service.create_lora_training_client(base_model="tiny-arith", rank=32).result()
        sampler = tc.save_weights_and_get_sampling_client()
        problems = [text for text, _ in train_problems(TASKS, SEED)]
        prompts = [tokenizer.apply_chat_template(chat_messages(p)) for p in problems]
        rewards = []
        for step in range(STEPS):
            futures = [
                sampler.sample(types.ModelInput.from_ints(p), GROUP, types.SamplingParams(
                    max_tokens=8, temperature=1.0, seed=SEED * 10**6 + step * 1000 + i))
                for i, p in enumerate(prompts)
            ]  # fmt: skip
            batch, scores = [], []
            for problem, prompt, future in zip(problems, prompts, futures, strict=True):
                result = future.result()
                group = [
                    reward(problem, tokenizer.decode(list(s.tokens), skip_special_tokens=True))
                    for s in result.sequences
                ]
                scores += group
                batch += datums(prompt, result, group)
            rewards.append(float(np.mean(scores)))
            fb = tc.forward_backward(batch, "importance_sampling")
            opt = tc.optim_step(types.AdamParams(learning_rate=LEARNING_RATE))
            fb.result()
            opt.result()
            sampler = tc.save_weights_and_get_sampling_client()
    finally:
        service.close("success").result()
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"rewards {' '.join(f'{r:.3f}' for r in rewards)}; {first:.3f} → {last:.3f}")
    assert last > first, f"mean reward {first:.3f} → {last:.3f} ({rewards})"
