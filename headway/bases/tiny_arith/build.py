"""Building tiny-arith: pretraining a fresh model on the task and saving it as a base.

- **Model**: a Qwen3-family decoder (hidden 128, 4 layers, 4 heads / 2 kv heads, SwiGLU 384,
  tied embeddings; ~0.8M parameters), our own `headway.modeling.Transformer`.
- **Pretraining**: cross-entropy on exactly the chat-formatted sequences the sampler will see,
  `<|user|>a+b=<|end|><|assistant|>{a+b}<|end|>`, with the loss on the answer and the eos
  only; so a chat completion of the user message `a+b=` is the answer's digits, then eos.
  a, b are uniform over the training pairs (`task`). AdamW at 3e-3, batch 64, one thread.
  Training stops early on purpose, once greedy accuracy on the validation pairs reaches
  `Recipe.target_accuracy` (checked every `Recipe.eval_every` steps; at most `steps`): the
  step at which a seed "gets" addition varies by hundreds of steps and the accuracy then
  climbs fast, so a fixed step count would land almost anywhere. The build measures the
  held-out greedy accuracy and the accuracy sampled at T=1 and writes them to
  `headway_base.json`; the README gives the figures measured across seeds.

The output is a Hugging Face directory (`config.json`, `model.safetensors`, `tokenizer.json`,
`tokenizer_config.json`, `generation_config.json`) that `load_model` and transformers both
load, plus `headway_base.json` with the recipe and the measured stats. torch is imported
when a build runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headway.bases.tiny_arith.evaluate import accuracy
from headway.bases.tiny_arith.recipe import BUILD_INFO, NAME, RECIPE_VERSION, Recipe
from headway.bases.tiny_arith.task import (
    _train_pairs,
    _validation_pairs,
    chat_messages,
    held_out_problems,
    problem_text,
)
from headway.bases.tiny_arith.tokenizer import END, PAD, build_tokenizer

if TYPE_CHECKING:
    import torch

    from headway.modeling import ModelConfig, Transformer
    from headway.modeling.tokenizer import Tokenizer


def _encode_examples(
    tokenizer: Tokenizer, pairs: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids `[N, T]` of the full chats and loss weights `[N, T-1]` on the targets.

    Position i predicts token i+1; its weight is 1 on the answer digits and the final eos.
    """
    import torch

    prompts, fulls = [], []
    for a, b in pairs:
        prompts.append(tokenizer.render_chat(chat_messages(problem_text(a, b))))
        fulls.append(
            tokenizer.render_chat(
                chat_messages(problem_text(a, b), str(a + b)), add_generation_prompt=False
            )
        )
    prompt_ids = tokenizer.backend.encode_batch(prompts, add_special_tokens=False)
    full_ids = tokenizer.backend.encode_batch(fulls, add_special_tokens=False)
    width = max(len(f.ids) for f in full_ids)
    pad = tokenizer.token_to_id(PAD)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    weights = torch.zeros((len(pairs), width - 1))
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids, strict=True)):
        if f.ids[: len(p.ids)] != p.ids:
            raise AssertionError("the chat template's prompt is not a prefix of the full chat")
        ids[i, : len(f.ids)] = torch.tensor(f.ids)
        weights[i, len(p.ids) - 1 : len(f.ids) - 1] = 1.0
    return ids, weights


_ROWS_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _training_rows(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """`_encode_examples` of all training pairs, memoised per tokenizer (~1 s of jinja)."""
    key = f"{tokenizer.backend.to_str()}\n{tokenizer.chat_template}"
    if key not in _ROWS_CACHE:
        _ROWS_CACHE.clear()
        _ROWS_CACHE[key] = _encode_examples(tokenizer, _train_pairs())
    return _ROWS_CACHE[key]


def _model_config(recipe: Recipe, tokenizer: Tokenizer) -> ModelConfig:
    from headway.modeling import ModelConfig

    return ModelConfig(
        model_type="qwen3",
        vocab_size=tokenizer.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=recipe.rope_theta,
        tie_word_embeddings=True,
        qk_norm=True,
        eos_token_id=tokenizer.token_to_id(END),
        extra={"pad_token_id": tokenizer.token_to_id(PAD)},
    )


def _lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup to the learning rate, then constant."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    return recipe.learning_rate


def build_tiny_arith(
    out_dir: Path,
    seed: int = 0,
    steps: int = 800,
    progress: Callable[[int, int, float], None] | None = None,
    recipe: Recipe | None = None,
) -> dict[str, Any]:
    """Build `tiny-arith` into `out_dir` (created) and return its stats.

    `steps` is the most optimizer steps; training stops earlier once the validation
    accuracy reaches `recipe.target_accuracy` (see `Recipe`). `progress(step, steps, loss)`
    is called after every optimizer step.

    Same seed, steps and recipe → byte-identical `model.safetensors` on the same kind of CPU:
    the training runs on `recipe.threads` threads with deterministic algorithms and a data
    order drawn from its own seeded generator. The process-wide thread count and
    deterministic-algorithms flag are set for the build and restored after it, and the
    global RNG is left as it was.

    Stats: params, steps trained, train and build seconds, final loss, validation accuracy
    (and its curve), held-out greedy accuracy and held-out sampled accuracy at T=1.
    """
    import torch

    from headway.modeling import save_model

    recipe = recipe or Recipe()
    started = time.perf_counter()
    tokenizer = build_tokenizer(recipe.max_position_embeddings)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(recipe.threads)
        torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, stats = _train(tokenizer, seed, steps, progress, recipe)
            held_out = held_out_problems()
            stats["held_out_problems"] = len(held_out)
            stats["held_out_greedy_accuracy"] = accuracy(model, tokenizer, held_out)
            stats["held_out_sampled_accuracy"] = accuracy(
                model, tokenizer, held_out, temperature=1.0, samples=recipe.eval_samples, seed=seed
            )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    out_dir = Path(out_dir)
    save_model(model, tokenizer, out_dir)
    stats = {
        "name": NAME,
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "max_steps": steps,
        **stats,
        "build_seconds": round(time.perf_counter() - started, 2),
        "recipe": asdict(recipe),
    }
    (out_dir / BUILD_INFO).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _train(
    tokenizer: Tokenizer,
    seed: int,
    steps: int,
    progress: Callable[[int, int, float], None] | None,
    recipe: Recipe,
) -> tuple[Transformer, dict[str, Any]]:
    """Pretrain a fresh model on the chat-formatted training problems; (model, stats)."""
    import torch

    from headway.modeling import Transformer, token_logprobs

    ids, weights = _training_rows(tokenizer)
    validation = [(problem_text(a, b), a + b) for a, b in _validation_pairs()]
    model = Transformer(_model_config(recipe, tokenizer))
    model.init_weights(std=recipe.init_std, seed=seed)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=recipe.learning_rate,
        betas=recipe.betas,
        weight_decay=recipe.weight_decay,
        foreach=False,
    )
    order = torch.Generator().manual_seed(seed)
    curve: list[tuple[int, float]] = []
    loss_value = float("nan")
    trained = 0
    started = time.perf_counter()
    while trained < steps:
        model.train()
        batch = torch.randint(len(ids), (recipe.batch_size,), generator=order)
        x, w = ids[batch], weights[batch]
        # Position i predicts token i+1; the weights keep the answer digits and the eos.
        logprobs = token_logprobs(model(x[:, :-1], validate=False), x[:, 1:])
        loss = -(logprobs * w).sum() / w.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip_norm)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(trained, recipe)
        optimizer.step()
        trained += 1
        loss_value = float(loss.detach())
        if progress is not None:
            progress(trained, steps, loss_value)
        if trained % recipe.eval_every == 0:
            curve.append((trained, accuracy(model.eval(), tokenizer, validation)))
            if curve[-1][1] >= recipe.target_accuracy:
                break
    model.eval()
    stats = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": trained,
        "train_seconds": round(time.perf_counter() - started, 2),
        "final_loss": round(loss_value, 4),
        "validation_accuracy": curve[-1][1] if curve else None,
        "validation_curve": curve,
    }
    return model, stats
