"""`tiny-arith`: the base Headway builds itself, a small Qwen3 that adds two numbers sometimes.

No weights can be downloaded, so the default base is made here, deterministically from a
seed, in about a minute on two CPU cores:

- **Tokenizer**: character level, trained with the `tokenizers` library over the digits,
  `+` and `=`, plus the chat markers `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`
  (the eos) and `<|pad|>`. Its chat template renders
  `[{"role": "user", "content": "12+7="}]` with the generation prompt as
  `<|user|>12+7=<|end|><|assistant|>`.
- **Model**: a Qwen3-family decoder (hidden 128, 4 layers, 4 heads / 2 kv heads, SwiGLU 384,
  tied embeddings; ~0.8M parameters), our own `headway.modeling.Transformer`.
- **Pretraining**: cross-entropy on exactly the chat-formatted sequences the sampler will see,
  `<|user|>a+b=<|end|><|assistant|>{a+b}<|end|>`, with the loss on the answer and the eos
  only; so a chat completion of the user message `a+b=` is the answer's digits, then eos.
  a, b are uniform in 0..99; fixed sets of held-out and validation pairs (200 each) never
  appear in training. AdamW at 3e-3, batch 64, one thread. Training stops early on
  purpose, once greedy accuracy on the validation pairs reaches 40% (checked every 10
  steps; at most `steps`): when a seed "gets" addition varies from ~350 to ~700 steps and
  the accuracy then climbs fast, so a fixed step count would land anywhere in 5–95%. The
  held-out greedy accuracy then lands around 0.3–0.5 and sampling at T=1 around 0.23–0.31,
  so GRPO groups carry reward spread.
- **GRPO on it** (measured with a plain on-policy loop: 16 prompts × 8 samples,
  importance-sampling loss, AdamW betas (0.9, 0.95)): at lr 1e-4 (seeds 0–2) held-out
  greedy accuracy goes from ~0.42 to ~0.57–0.66 and T=1 accuracy from ~0.28 to ~0.39–0.43
  in 32 steps, at 2e-4 about the same on seed 2; at 3e-4 and above (seed 0) the rise
  drowns in noise. Per-step reward over 128 samples swings by ±0.1 with the
  prompts drawn, so show held-out greedy accuracy beside it.

The output is a Hugging Face directory (`config.json`, `model.safetensors`, `tokenizer.json`,
`tokenizer_config.json`, `generation_config.json`) that `load_model` and transformers both
load, plus `headway_base.json` with the recipe and the measured stats.

`reward`, `parse_problem`, `held_out_problems` and `train_problems` import no torch, so the
SDK's demo taskset can reuse them on a machine without it; the build imports torch lazily.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from headway.modeling import ModelConfig, Transformer
    from headway.modeling.tokenizer import Tokenizer

NAME = "tiny-arith"
# Bump when anything that changes the built files changes: a cached build of another
# recipe is rebuilt by `ensure_tiny_arith`.
RECIPE_VERSION = 1
BUILD_INFO = "headway_base.json"

MAX_OPERAND = 99  # a, b in 0..MAX_OPERAND
HELD_OUT_SIZE = 200  # reported accuracies; never trained on, never used to stop training
VALIDATION_SIZE = 200  # the early stop's problems; never trained on either
_SPLIT_SEED = 20_240_601  # fixed: the split is the same for every build seed

SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
END, PAD, UNK = "<|end|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, UNK, SYSTEM, USER, ASSISTANT, END]
ALPHABET = "0123456789+="

# One line per turn, no whitespace of its own: `<|role|>content<|end|>`, then `<|assistant|>`
# as the generation prompt. Rendered the same by headway.modeling.tokenizer and transformers.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('tiny-arith chats have system, user and assistant turns only') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_PROBLEM = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=?\s*$")
_LEADING_INT = re.compile(r"^\s*([+-]?\d+)")


@dataclass(frozen=True)
class Recipe:
    """Architecture and optimisation of the build (the defaults are `tiny-arith`)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    batch_size: int = 64
    learning_rate: float = 3e-3  # constant after a linear warmup
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    threads: int = 1  # fixed, so the floating-point reductions (and the bytes) never vary
    eval_samples: int = 4  # T=1 samples per held-out problem for the sampled accuracy
    # Early stop: every `eval_every` steps, greedy accuracy on the validation problems (never
    # trained on, disjoint from the held-out ones); training stops once it reaches
    # `target_accuracy`. When a seed "gets" addition varies by hundreds of steps, and the
    # accuracy then rises fast, so a fixed step count lands anywhere from 20% to 95%.
    target_accuracy: float = 0.4
    eval_every: int = 10


# --- problems and reward (no torch) ---------------------------------------------------------


def problem_text(a: int, b: int) -> str:
    """The user message of the problem a + b."""
    return f"{a}+{b}="


def parse_problem(text: str) -> tuple[int, int]:
    """(a, b) of a problem text `"a+b="`; ValueError if it is not one."""
    match = _PROBLEM.match(text)
    if match is None:
        raise ValueError(f"not a tiny-arith problem: {text!r} (expected 'a+b=')")
    return int(match.group(1)), int(match.group(2))


def reward(problem_text: str, completion_text: str) -> float:
    """1.0 if the completion's leading integer is a + b of the problem, else 0.0.

    Leading whitespace is skipped; whatever follows the integer is ignored ("19" and
    "19 apples" both score for 12+7=, "119" and "1 9" do not).
    """
    a, b = parse_problem(problem_text)
    match = _LEADING_INT.match(completion_text)
    return 1.0 if match is not None and int(match.group(1)) == a + b else 0.0


@lru_cache(maxsize=1)
def _splits() -> tuple[tuple[tuple[int, int], ...], ...]:
    """(held-out, validation, train) pairs: a fixed split, the same for every build seed."""
    n = MAX_OPERAND + 1
    picks = random.Random(_SPLIT_SEED).sample(range(n * n), HELD_OUT_SIZE + VALIDATION_SIZE)
    held_out = tuple(divmod(i, n) for i in picks[:HELD_OUT_SIZE])
    validation = tuple(divmod(i, n) for i in picks[HELD_OUT_SIZE:])
    excluded = set(held_out) | set(validation)
    train = tuple((a, b) for a in range(n) for b in range(n) if (a, b) not in excluded)
    return held_out, validation, train


def _held_out_pairs() -> tuple[tuple[int, int], ...]:
    return _splits()[0]


def _validation_pairs() -> tuple[tuple[int, int], ...]:
    return _splits()[1]


def _train_pairs() -> tuple[tuple[int, int], ...]:
    return _splits()[2]


def held_out_problems(n: int = HELD_OUT_SIZE) -> list[tuple[str, int]]:
    """The first `n` (≤ HELD_OUT_SIZE) held-out problems as (text, answer): never trained on."""
    if not 0 <= n <= HELD_OUT_SIZE:
        raise ValueError(f"n must be in 0..{HELD_OUT_SIZE}, got {n}")
    return [(problem_text(a, b), a + b) for a, b in _held_out_pairs()[:n]]


def train_problems(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """`n` problems (text, answer) drawn uniformly, with replacement, from the training pairs.

    The training pairs are all a, b in 0..MAX_OPERAND except the held-out (and validation)
    ones, so a taskset built from these never scores on the held-out problems.
    """
    pairs = _train_pairs()
    rng = random.Random(seed)
    return [(problem_text(a, b), a + b) for a, b in (rng.choice(pairs) for _ in range(n))]


# --- tokenizer ------------------------------------------------------------------------------


def build_tokenizer(max_length: int = Recipe.max_position_embeddings) -> Tokenizer:
    """The character-level tokenizer with the chat template, trained by `tokenizers`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, trainers

    from headway.modeling.tokenizer import Tokenizer

    backend = HFTokenizer(models.BPE(unk_token=UNK))
    backend.decoder = decoders.Fuse()  # characters concatenate back, no spaces between
    # A vocabulary of exactly the specials and the alphabet: no merges, one token per
    # character, so every digit is its own token.
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(ALPHABET),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=list(ALPHABET),
        limit_alphabet=len(ALPHABET),
        show_progress=False,
    )
    corpus = [f"{problem_text(a, b)}{a + b}" for a, b in _train_pairs()]
    backend.train_from_iterator(corpus, trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "padding_side": "right",
    }
    return Tokenizer(
        backend,
        chat_template=CHAT_TEMPLATE,
        special_tokens={"eos_token": END, "pad_token": PAD, "unk_token": UNK},
        config=config,
    )


def chat_messages(problem: str, answer: str | None = None) -> list[dict[str, str]]:
    """The chat of one problem (and its answer, as the assistant turn)."""
    messages = [{"role": "user", "content": problem}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


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


# --- model, training, evaluation ------------------------------------------------------------


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


def complete(
    model: Transformer,
    tokenizer: Tokenizer,
    problems: Sequence[str],
    *,
    temperature: float = 0.0,
    samples: int = 1,
    max_tokens: int = 6,
    seed: int = 0,
) -> list[list[str]]:
    """`samples` completions (text, special tokens skipped) of each problem's chat.

    Greedy at temperature 0, else sampled at `temperature` from a generator seeded by `seed`.
    A completion stops at eos or after `max_tokens` tokens, as the sampler's would.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    eos = torch.tensor(sorted(tokenizer.eos_token_ids))
    pad = tokenizer.token_to_id(PAD) or 0
    prompts = [tokenizer.apply_chat_template(chat_messages(p)) for p in problems]
    rows = [prompt for prompt in prompts for _ in range(samples)]
    if not rows:
        return [[] for _ in problems]
    # Ragged prefill into a KV cache, then one token per row per step, each row at its own
    # position (as the sampler decodes): right padding never reaches a row's own tokens.
    lens = torch.tensor([len(r) for r in rows])
    width = int(lens.max())
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    caches = model.new_caches(len(rows), width + max_tokens)
    positions = torch.arange(width).expand(len(rows), width)
    new: list[torch.Tensor] = []
    done = torch.zeros(len(rows), dtype=torch.bool)
    with torch.no_grad():
        logits = model(ids, positions, caches=caches, output_index=lens - 1)[:, -1]
        pos = lens
        for _ in range(max_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
            else:
                nxt = logits.argmax(-1)
            new.append(torch.where(done, -1, nxt))
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            logits = model(nxt[:, None], pos[:, None], caches=caches, validate=False)[:, -1]
            pos = pos + 1
    out: list[list[str]] = [[] for _ in problems]
    eos_ids = set(eos.tolist())
    for i, row in enumerate(torch.stack(new, dim=1).tolist()):
        kept = [t for t in row if t >= 0 and t not in eos_ids]
        out[i // samples].append(tokenizer.decode(kept, skip_special_tokens=True))
    return out


def accuracy(
    model: Transformer,
    tokenizer: Tokenizer,
    problems: Sequence[tuple[str, int]],
    *,
    temperature: float = 0.0,
    samples: int = 1,
    seed: int = 0,
) -> float:
    """Mean `reward` over `samples` completions of each problem."""
    texts = [text for text, _ in problems]
    completions = complete(
        model, tokenizer, texts, temperature=temperature, samples=samples, seed=seed
    )
    scores = [reward(t, c) for t, cs in zip(texts, completions, strict=True) for c in cs]
    return sum(scores) / max(len(scores), 1)


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


# --- the cache ------------------------------------------------------------------------------


def _is_current(path: Path) -> bool:
    """Whether `path` holds a complete build of this recipe."""
    try:
        info = json.loads((path / BUILD_INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return info.get("recipe_version") == RECIPE_VERSION and all(
        (path / name).is_file() for name in required
    )


def ensure_tiny_arith(
    cache_dir: Path | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """`cache_dir/tiny-arith`, built first if it is missing or of an older recipe.

    The build goes into a temp directory beside it and is renamed into place once complete,
    so an interrupted build leaves no half-written base; if another process publishes the
    base first, its build is kept. `cache_dir` defaults to `headway.bases.default_cache_dir()`.
    """
    from headway.bases import default_cache_dir

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / NAME
    if _is_current(final):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{NAME}-", dir=cache_dir))
    try:
        build_tiny_arith(tmp, progress=progress)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published base is readable
        _fsync_tree(tmp)
        if final.exists():
            if _is_current(final):  # another process won the race
                return final
            stale = Path(tempfile.mkdtemp(prefix=f".stale-{NAME}-", dir=cache_dir))
            os.rename(final, stale / NAME)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if _is_current(final):  # published by another process meanwhile
                return final
            raise
        _fsync(cache_dir)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))
