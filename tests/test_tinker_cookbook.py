"""tinker-cookbook's RL training entry point (`tinker_cookbook.rl.train.main`), unchanged,
against Headway: a custom environment on tiny-arith's problems and reward, a few steps.

The cookbook (0.6.1, the version for tinker 0.38) is installed by `make install` without
its dependency `tml-renderers>=0.4.1`, which PyPI here does not hold (its newest is 0.2.1;
the cookbook uses it only for Inkling models and the `tml_v0` renderer). Offline: the
tokenizer is tiny-arith's own directory, registered under the base's name; the pricing
table 0.6.1 fetches over HTTPS is not fetched.
"""

from __future__ import annotations

import asyncio
import json
import random
from functools import partial

import pytest

cookbook = pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is not installed")

import tinker  # noqa: E402
from tinker_cookbook import renderers  # noqa: E402
from tinker_cookbook.renderers.base import (  # noqa: E402
    ParseTermination,
    RenderedMessage,
    ensure_text,
)
from tinker_cookbook.rl import train  # noqa: E402
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder  # noqa: E402
from tinker_cookbook.rl.types import RLDataset, RLDatasetBuilder  # noqa: E402
from tinker_cookbook.tokenizer_utils import get_tokenizer, register_tokenizer  # noqa: E402

from headway.bases.tiny_arith import reward, train_problems  # noqa: E402

pytestmark = pytest.mark.slow  # the tiny-arith build and a few RL steps

STEPS, BATCH, GROUP = 3, 4, 4


class TinyArithRenderer(renderers.Renderer):
    """tiny-arith's chat format (`<|role|>content<|end|>`, as its chat template), written
    against the cookbook's Renderer interface, so its policy answers as it was trained."""

    END = "<|end|>"

    def render_message(self, message, ctx):
        def chunk(text: str) -> tinker.types.EncodedTextChunk:
            return tinker.types.EncodedTextChunk(
                tokens=self.tokenizer.encode(text, add_special_tokens=False)
            )

        return RenderedMessage(
            header=chunk(f"<|{message['role']}|>"),
            output=[chunk(ensure_text(message["content"]) + self.END)],
        )

    def get_stop_sequences(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(self.END)]

    def parse_response(self, response: list[int]):
        ended = bool(response) and response[-1] in self.get_stop_sequences()
        text = self.tokenizer.decode(response[:-1] if ended else response)
        termination = ParseTermination.STOP_SEQUENCE if ended else ParseTermination.MALFORMED
        return renderers.Message(role="assistant", content=text), termination


class ArithEnv(ProblemEnv):
    """One tiny-arith problem, scored by tiny-arith's own reward."""

    def __init__(self, problem: str, renderer: renderers.Renderer) -> None:
        super().__init__(renderer, format_coef=0.0)
        self.problem = problem

    def get_question(self) -> str:
        return self.problem

    def check_answer(self, sample_str: str) -> bool:
        return reward(self.problem, sample_str) > 0

    def check_format(self, sample_str: str) -> bool:
        return True

    def get_reference_answer(self) -> str:
        return ""


class ArithDataset(RLDataset):
    def __init__(self, renderer: renderers.Renderer) -> None:
        self.renderer = renderer
        self.problems = [text for text, _ in train_problems(STEPS * BATCH, 0)]

    def get_batch(self, index: int) -> list[ProblemGroupBuilder]:
        rng = random.Random(index)
        chosen = rng.sample(self.problems, BATCH)
        return [
            ProblemGroupBuilder(partial(ArithEnv, p, self.renderer), num_envs=GROUP,
                                dataset_name="tiny-arith")
            for p in chosen
        ]  # fmt: skip

    def __len__(self) -> int:
        return STEPS


def test_the_cookbooks_rl_entry_point_trains_on_headway(
    gateway_stack, tiny_arith, tmp_path, monkeypatch
):
    path, _ = tiny_arith
    gateway_stack.add_base(path, "tiny-arith")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("TINKER_API_KEY", "tml-local")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(train, "fetch_model_pricing", lambda *a, **k: None, raising=False)
    from transformers import AutoTokenizer

    register_tokenizer("tiny-arith", lambda: AutoTokenizer.from_pretrained(str(path)))
    renderers.register_renderer("headway/tiny-arith", lambda tok, _: TinyArithRenderer(tok))

    @dataclass_builder
    class Builder(RLDatasetBuilder):
        async def __call__(self) -> tuple[RLDataset, None]:
            tokenizer = get_tokenizer("tiny-arith")
            return ArithDataset(renderers.get_renderer("headway/tiny-arith", tokenizer)), None

    log_path = tmp_path / "run"
    config = train.Config(
        learning_rate=1e-3, model_name="tiny-arith", recipe_name="headway_test",
        max_tokens=8, dataset_builder=Builder(), renderer_name="headway/tiny-arith",
        log_path=str(log_path), base_url=gateway_stack.gateway.http_url.removesuffix("/v1"),
        lora_rank=8, save_every=0, eval_every=0, num_groups_to_log=0,
    )  # fmt: skip
    asyncio.run(train.main(config))

    metrics = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    steps = {m["step"] for m in metrics if "step" in m}
    assert steps >= set(range(STEPS)), steps
    rewards = [m["env/all/reward/total"] for m in metrics if "env/all/reward/total" in m]
    # The policy answers some problems in its own chat format: the steps trained on a signal.
    assert len(rewards) >= STEPS and max(rewards) > 0, rewards
    # Every step an optim_step: a checkpoint of the run's fork in Headway's tree.
    store = gateway_stack.gateway.gateway.store
    runs = [m for m in store.list_models() if m.slug.startswith("tk-") and m.base == "tiny-arith"]
    assert runs, "the cookbook's training run is not a Headway fork"
    assert max(len(store.list_checkpoints(m.slug)) for m in runs) >= STEPS + 1


def dataclass_builder(cls: type) -> type:
    """The cookbook's builders are chz classes."""
    import chz

    return chz.chz(cls)
