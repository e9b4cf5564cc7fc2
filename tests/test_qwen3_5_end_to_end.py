"""A Qwen3.5 base from `add-base` to export, as a user drives it, for each layout.

A directory made by transformers (text-only, and the multimodal snapshot with its vision
tower and MTP weights beside the language model) is added with the CLI, forked with LoRA and
full, sampled through the gateway with the SDK (gRPC), trained with every built-in loss and
a custom one, rolled back with `headway models head --set`, sampled again (SDK, and the
`openai` client over HTTP) and exported. The sampled tokens' logprobs equal transformers'
forward of the exported directory, and the LoRA export loads in `peft` with the same logits:
what the gateway served is the checkpoint the head names, whatever the layout.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from headway import SamplingClient, TrainingClient
from headway.cli import main as cli_main
from headway.train import DatumTensors
from tests.helpers_sdk import PROMPT, sampled_runs, url
from tests.stack import GatewayNode, SamplerReplica, TrainerStack
from tests.test_qwen3_5_trainer import qwen35_base
from tests.test_trainer_training import LOSS_CONFIGS

TOL = 1e-4
REWARDS = [1.0, 0.0, 0.5, 0.0]  # one GRPO group: advantages that are not all zero


@pytest.fixture(params=["text", "multimodal"])
def q35(request: pytest.FixtureRequest, tmp_path: Path):
    """A trainer, a sampler replica and a gateway with no base registered; the layout's
    directory made by transformers at `stack.base_dir`."""
    base_dir = qwen35_base(tmp_path / "base", request.param)
    stack = TrainerStack(tmp_path / "store")
    try:
        stack.base_dir = base_dir
        stack.sampler = SamplerReplica(stack.config.store, stack.prefix, max_seq_len=128)
        try:
            stack.gateway = GatewayNode(stack.config.store, stack.prefix, stack.server.address)
            try:
                yield stack
            finally:
                stack.gateway.stop()
        finally:
            stack.sampler.stop()
    finally:
        stack.stop()


def is_loss(data: list[DatumTensors], logprobs: list[torch.Tensor]):
    """A custom loss: importance sampling written in the client's torch."""
    loss = logprobs[0].new_zeros(())
    for d, lp in zip(data, logprobs, strict=True):
        ratio = torch.exp(lp - torch.tensor(d.sampling_logprobs))
        loss = loss - (ratio * torch.tensor(d.advantages) * torch.tensor(d.mask)).sum()
    return loss, {"custom/datums": len(data)}


async def train_every_loss(stack, model: str) -> list[str]:
    """One step per built-in loss, then one with the custom loss, each on runs sampled
    from the head of the moment: the checkpoint ids from the fork's step 0 on."""
    trainer = TrainingClient(model, url=url(stack))
    ids = [(await trainer.head()).id]  # the fork's step 0
    for i, (loss_fn, cfg) in enumerate(sorted(LOSS_CONFIGS.items())):
        runs = await sampled_runs(stack, model, REWARDS, seed=i)
        assert runs[0].turns[0].checkpoint == ids[-1]
        step = await trainer.step(
            runs, learning_rate=2e-2, group_size=4, loss_fn=loss_fn, loss_fn_config=cfg
        )
        assert step.checkpoint_info.stats.loss_fn == loss_fn and "loss:sum" in step.metrics
        ids.append(step.checkpoint)
    runs = await sampled_runs(stack, model, REWARDS, seed=99)
    custom = await trainer.forward_backward_custom(runs, is_loss, group_size=4)
    assert custom.num_datums == 4 and custom.metrics["custom/datums"] == 4
    opt = await trainer.optim_step(learning_rate=2e-2)
    assert opt.checkpoint_info.stats.loss_fn == "custom"
    ids.append(opt.checkpoint)
    tree = await trainer.checkpoints()
    assert [c.id for c in tree] == ids and tree[-1].is_head
    await trainer.close()
    return ids


def transformers_logprobs(directory: Path, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' logprob of each of `tokens` after `prompt`, from `directory`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.tensor([prompt + tokens])
    with torch.inference_mode():
        lp = model(ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
    return lp.gather(-1, ids[0, 1:, None])[len(prompt) - 1 :, 0]


def test_add_fork_sample_train_roll_back_and_export(q35, tmp_path, monkeypatch, capsys):
    import openai

    stack = q35
    monkeypatch.setenv("HEADWAY_URL", url(stack))

    def cli(*argv: str) -> str:
        code = cli_main(list(argv))
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    out = cli("models", "add-base", str(stack.base_dir), "--name", "q35")
    assert "registered base q35 (qwen3_5" in out
    cli("models", "fork", "q35", "--name", "lora", "--lora-rank", "4")
    cli("models", "fork", "q35", "--name", "full", "--full")
    for model in ("lora", "full"):
        ids = asyncio.run(train_every_loss(stack, model))
        assert len(set(ids)) == len(LOSS_CONFIGS) + 2

        # Roll back to the second step's checkpoint: the head, the next samples and the
        # export all follow it.
        back = ids[2]
        assert back in cli("models", "head", model, "--set", back)
        assert cli("models", "head", model).startswith(f"▶ {back}")
        reply = SamplingClient(model, url=url(stack)).sync().sample(
            PROMPT, n=2, max_tokens=10, temperature=1.0, seed=5, stop_token_ids=[],
            ignore_eos=True,
        )  # fmt: skip
        assert reply.checkpoint == back
        client = openai.OpenAI(base_url=stack.gateway.http_url, api_key="local")
        chat = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "what is 1 plus 2?"}],
            max_tokens=10,
            seed=6,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )

        exported = tmp_path / f"{model}-hf"
        store = str(stack.config.store)
        out = cli(
            "models", "export", model, "--format", "hf", "-o", str(exported), "--store", store
        )
        assert f"{model}@{back}" in out
        for seq in reply.sequences:
            expected = transformers_logprobs(exported, PROMPT, list(seq.tokens))
            assert (torch.tensor(seq.logprobs) - expected).abs().max() <= TOL
        # Not the base's logprobs: the two steps up to `back` did move the weights.
        untrained = transformers_logprobs(stack.base_dir, PROMPT, list(seq.tokens))
        assert (expected - untrained).abs().max() > 1e-3
        choice = chat.choices[0]
        assert len(choice.token_ids) == 10
        expected = transformers_logprobs(exported, list(chat.prompt_token_ids), choice.token_ids)
        got = torch.tensor([t.logprob for t in choice.logprobs.content])
        assert (got - expected).abs().max() <= TOL

        if model == "lora":
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            adapter = tmp_path / "lora-peft"
            cli("models", "export", model, "--format", "peft", "-o", str(adapter), "--store", store)
            ids_t = torch.tensor([PROMPT + list(reply.sequences[0].tokens)])
            base = AutoModelForCausalLM.from_pretrained(stack.base_dir).eval()
            merged = AutoModelForCausalLM.from_pretrained(exported).eval()
            with torch.inference_mode():
                peft_logits = PeftModel.from_pretrained(base, adapter).eval()(ids_t).logits
                assert (peft_logits - merged(ids_t).logits).abs().max() <= TOL
