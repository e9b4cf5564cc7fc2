"""`tiny-arith`, the base Headway builds itself: format, loading, determinism, accuracy window.

A short build (60 steps, seconds) is shared by the format and loading tests; one test runs
the full default build (about a minute on two cores) and checks the held-out accuracy lands
in the window that gives GRPO groups reward spread.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headway.bases import BUILDERS, builder, default_cache_dir
from headway.bases import tiny_arith as ta
from headway.modeling import Tokenizer, load_model

SHORT_STEPS = 60


@pytest.fixture(scope="module")
def short_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("tiny-arith") / "short"
    calls: list[tuple[int, int, float]] = []
    stats = ta.build_tiny_arith(
        path, seed=0, steps=SHORT_STEPS, progress=lambda *a: calls.append(a)
    )
    assert [c[0] for c in calls] == list(range(1, stats["steps"] + 1))
    assert all(c[1] == SHORT_STEPS for c in calls)
    return path, stats


@pytest.mark.slow
def test_directory_is_a_qwen3_base_with_chat_template_and_eos(short_build):
    path, stats = short_build
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"]
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == ta.END and tok_config["chat_template"] == ta.CHAT_TEMPLATE
    tokenizer = Tokenizer.from_dir(path)
    end = tokenizer.token_to_id(ta.END)
    assert tokenizer.eos_token_ids == [end]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [end]
    assert config["eos_token_id"] == end
    assert 500_000 < stats["params"] < 2_000_000
    assert json.loads((path / ta.BUILD_INFO).read_text())["steps"] == stats["steps"]


@pytest.mark.slow
def test_chat_template_renders_the_training_format(short_build):
    path, _ = short_build
    tokenizer = Tokenizer.from_dir(path)
    messages = [{"role": "user", "content": "12+7="}]
    assert tokenizer.render_chat(messages) == "<|user|>12+7=<|end|><|assistant|>"
    ids = tokenizer.apply_chat_template(messages)
    tokens = [tokenizer.backend.id_to_token(i) for i in ids]
    assert tokens == ["<|user|>", "1", "2", "+", "7", "=", "<|end|>", "<|assistant|>"]
    full = messages + [{"role": "assistant", "content": "19"}]
    full_ids = tokenizer.apply_chat_template(full, add_generation_prompt=False)
    assert full_ids == ids + [tokenizer.token_to_id("1"), tokenizer.token_to_id("9")] + [
        tokenizer.token_to_id(ta.END)
    ]
    assert tokenizer.decode(full_ids[len(ids) :], skip_special_tokens=True) == "19"

    # The training rows are exactly these chats, with the loss on the answer and eos only.
    rows, weights = ta._encode_examples(tokenizer, [(12, 7)])
    assert rows[0, : len(full_ids)].tolist() == full_ids
    targets = rows[0, 1:][weights[0] > 0].tolist()
    assert targets == full_ids[len(ids) :]


@pytest.mark.slow
def test_loads_in_transformers_with_the_same_logits_and_chat(short_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = short_build
    ours, tokenizer = load_model(path)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(path)
    assert hf_tok.eos_token_id == tokenizer.token_to_id(ta.END)
    for text, answer in ta.held_out_problems(6):
        messages = ta.chat_messages(text, str(answer))
        rendered = hf_tok.apply_chat_template(messages, tokenize=False)
        assert rendered == tokenizer.render_chat(messages, add_generation_prompt=False)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        assert hf_tok(rendered, add_special_tokens=False)["input_ids"] == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            diff = (ours(x) - theirs(x).logits).abs().max().item()
        assert diff <= 1e-4, diff

    # Greedy completions agree too, and stop at eos.
    problems = [text for text, _ in ta.held_out_problems(8)]
    mine = ta.complete(ours, tokenizer, problems)
    for text, [completion] in zip(problems, mine, strict=True):
        prompt = torch.tensor([tokenizer.apply_chat_template(ta.chat_messages(text))])
        out = theirs.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1] :]
        assert hf_tok.decode(out, skip_special_tokens=True) == completion


@pytest.mark.slow
def test_same_seed_gives_identical_weights(short_build, tmp_path):
    path, stats = short_build
    again = ta.build_tiny_arith(tmp_path / "again", seed=0, steps=SHORT_STEPS)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        path / "model.safetensors"
    ).read_bytes()
    assert again["held_out_greedy_accuracy"] == stats["held_out_greedy_accuracy"]
    assert again["held_out_sampled_accuracy"] == stats["held_out_sampled_accuracy"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (path / name).read_bytes()


@pytest.mark.slow
def test_other_seed_other_weights_and_process_settings_restored(tmp_path):
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ta.build_tiny_arith(tmp_path / "five", seed=5, steps=2)
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    ta.build_tiny_arith(tmp_path / "six", seed=6, steps=2)
    assert (tmp_path / "five" / "model.safetensors").read_bytes() != (
        tmp_path / "six" / "model.safetensors"
    ).read_bytes()


def test_reward_hand_worked_cases():
    assert ta.reward("12+7=", "19") == 1.0
    assert ta.reward("12+7=", " 19") == 1.0
    assert ta.reward("12+7=", "19 apples") == 1.0
    assert ta.reward("12+7=", "19\n20") == 1.0
    assert ta.reward("0+0=", "0") == 1.0
    assert ta.reward("99+99=", "198") == 1.0
    assert ta.reward("12+7=", "18") == 0.0
    assert ta.reward("12+7=", "119") == 0.0
    assert ta.reward("12+7=", "1 9") == 0.0
    assert ta.reward("12+7=", "") == 0.0
    assert ta.reward("12+7=", "nineteen") == 0.0
    assert ta.reward("12+7=", "-19") == 0.0
    assert ta.reward(" 12 + 7 = ", "19") == 1.0
    with pytest.raises(ValueError, match="not a tiny-arith problem"):
        ta.reward("12-7=", "5")


def test_problem_sets_are_fixed_and_disjoint():
    held = ta.held_out_problems()
    assert len(held) == ta.HELD_OUT_SIZE == len(set(held))
    assert held == ta.held_out_problems()
    assert ta.held_out_problems(10) == held[:10]
    for text, answer in held:
        a, b = ta.parse_problem(text)
        assert 0 <= a <= ta.MAX_OPERAND and 0 <= b <= ta.MAX_OPERAND and answer == a + b
        assert text == f"{a}+{b}="
    train = ta.train_problems(5000, seed=3)
    assert train == ta.train_problems(5000, seed=3) != ta.train_problems(5000, seed=4)
    assert not {t for t, _ in train} & {t for t, _ in held}
    validation = {ta.problem_text(a, b) for a, b in ta._validation_pairs()}
    assert not validation & {t for t, _ in held}
    assert not validation & {ta.problem_text(a, b) for a, b in ta._train_pairs()}
    assert len(ta._train_pairs()) + 2 * ta.HELD_OUT_SIZE == (ta.MAX_OPERAND + 1) ** 2
    with pytest.raises(ValueError):
        ta.held_out_problems(ta.HELD_OUT_SIZE + 1)


@pytest.mark.slow
def test_ensure_builds_once_atomically(tmp_path, monkeypatch):
    real = ta.build_tiny_arith
    builds: list[Path] = []

    def quick(out_dir: Path, **kwargs):
        builds.append(Path(out_dir))
        return real(out_dir, steps=3)

    monkeypatch.setattr(ta, "build_tiny_arith", quick)
    cache = tmp_path / "cache"
    path = ta.ensure_tiny_arith(cache)
    assert path == cache / "tiny-arith" and (path / "model.safetensors").is_file()
    assert builds[0].parent == cache and builds[0] != path  # built beside, then renamed
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-arith"]
    load_model(path)
    assert ta.ensure_tiny_arith(cache) == path and len(builds) == 1  # cached

    # A build of an older recipe is replaced; an interrupted one (no build info) too.
    info = json.loads((path / ta.BUILD_INFO).read_text())
    (path / ta.BUILD_INFO).write_text(json.dumps({**info, "recipe_version": 0}))
    assert ta.ensure_tiny_arith(cache) == path and len(builds) == 2
    (path / ta.BUILD_INFO).unlink()
    assert ta.ensure_tiny_arith(cache) == path and len(builds) == 3
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-arith"]

    # A failed build leaves nothing behind.
    def broken(out_dir: Path, **kwargs):
        (Path(out_dir) / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(ta, "build_tiny_arith", broken)
    with pytest.raises(RuntimeError, match="boom"):
        ta.ensure_tiny_arith(tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


def test_registry_and_cache_dir(monkeypatch, tmp_path):
    assert BUILDERS == {"tiny-arith": "headway.bases.tiny_arith:ensure_tiny_arith"}
    assert builder("tiny-arith") is ta.ensure_tiny_arith
    with pytest.raises(KeyError, match="tiny-arith"):
        builder("nope")
    monkeypatch.setenv("HEADWAY_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "bases"
    monkeypatch.delenv("HEADWAY_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "headway" / "bases"


def test_registry_and_reward_import_no_torch():
    code = (
        "import sys, headway.bases, headway.bases.tiny_arith as ta\n"
        "assert ta.reward('1+2=', '3') == 1.0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_full_default_build_is_right_sometimes(tiny_arith):
    """The default build: held-out greedy accuracy in [0.2, 0.6], sampling gives spread."""
    path, stats = tiny_arith
    print(
        f"tiny-arith seed 0: {stats['steps']} steps, {stats['params']} params, "
        f"build {stats['build_seconds']} s, greedy {stats['held_out_greedy_accuracy']:.3f}, "
        f"T=1 {stats['held_out_sampled_accuracy']:.3f}"
    )
    assert 0.2 <= stats["held_out_greedy_accuracy"] <= 0.6
    assert 0.1 <= stats["held_out_sampled_accuracy"] <= 0.6
    # The saved model scores what the build measured, and its completions are answers.
    model, tokenizer = load_model(path)
    held = ta.held_out_problems()
    assert ta.accuracy(model, tokenizer, held) == stats["held_out_greedy_accuracy"]
    completions = ta.complete(model, tokenizer, [t for t, _ in held])
    assert sum(c.isdigit() for [c] in completions) >= 0.9 * len(held)
