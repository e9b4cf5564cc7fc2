"""Shared fixtures: tiny random Hugging Face models of each family, and a trained tokenizer.

The reference models are built with transformers itself, every parameter (biases and norm
weights included) randomised so that a missed bias or norm shows up in the logits, then
saved to disk in Hugging Face format for our loader to read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

# The sampler's measured kernel choices (sampler_svc/kernels.py) go to a cache of this run
# (services started by tests inherit it): choices timed on a loaded test machine must not
# land in the user's ~/.cache, and every run measures afresh.
os.environ["HEADWAY_KERNEL_CACHE"] = str(
    Path(tempfile.mkdtemp(prefix="headway-kernels-")) / "kernels.json"
)

# The suite is the CPU's, on any machine: services it starts as processes (their --device
# twin) and in this process (tests/stack.py) compute on the CPU unless a test names a
# device. A GPU machine would otherwise default them to cuda in bf16, where the fp32 parity
# tests do not hold; the `gpu` tests (tests/test_devices.py) ask for cuda themselves.
os.environ["HEADWAY_DEVICE"] = "cpu"

# Samplers the suite starts decode eagerly: compiling the decode step costs tens of seconds
# per new shape; tests/test_compiled.py tests the compiled step and its choice.
os.environ["HEADWAY_COMPILE"] = "off"

VOCAB = 96


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu`-marked tests, saying why, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    built = "with" if torch.backends.cuda.is_built() else "without"
    reason = (
        f"needs a CUDA device: torch {torch.__version__} (built {built} CUDA) sees none here; "
        "run `make gpu-check` on a machine with a GPU"
    )
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


# Small but complete: GQA (4 heads / 2 kv), explicit head_dim, several layers.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)

FAMILIES = {
    "qwen3": dict(head_dim=24, tie_word_embeddings=True, rope_theta=1_000_000.0),
    "qwen2": dict(tie_word_embeddings=False, rope_theta=10_000.0),
    "llama": dict(
        tie_word_embeddings=False,
        attention_bias=True,
        rope_theta=500_000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
}

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_hf_model(family: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A transformers model of `family` with every parameter randomised."""
    import transformers

    cls_name = {"qwen3": "Qwen3", "qwen2": "Qwen2", "llama": "Llama"}[family]
    config_cls = getattr(transformers, f"{cls_name}Config")
    model_cls = getattr(transformers, f"{cls_name}ForCausalLM")
    config = config_cls(**{**_COMMON, **FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def hf_dir(family: str, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """(transformers model, its saved directory) for each family."""
    model = build_hf_model(family)
    path = tmp_path / family
    model.save_pretrained(path)
    return model, path


def train_tokenizer(
    path: Path,
    corpus: list[str] | None = None,
    vocab_size: int = VOCAB,
    chat_template: str = CHATML,
    across_words: bool = False,
) -> Path:
    """Train a small byte-level BPE with the `tokenizers` library and save HF files in `path`
    (by default on arithmetic questions, with a ChatML template; `across_words`: merges
    may span words, so a few long texts compress far)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not across_words)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # The alphabet is what the corpus uses, so the whole vocabulary fits the tiny models.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    if corpus is None:
        corpus = [f"what is {a} plus {b}? it is {a + b}." for a in range(30) for b in range(30)]
    tok.train_from_iterator(corpus, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": chat_template,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    return path


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    """A tiny Qwen3 base directory made by our own code (weights + trained tokenizer)."""
    from tests.stack import make_tiny_base

    return make_tiny_base(tmp_path / "tiny-base")


@pytest.fixture
def trainer_stack(tmp_path: Path, tiny_base: Path):
    """A trainer gRPC server on a loopback port, real Redis, the base "tiny" registered."""
    from tests.stack import TrainerStack

    stack = TrainerStack(tmp_path / "store")
    stack.add_base(tiny_base, "tiny")
    yield stack
    stack.stop()


@pytest.fixture
def sampling_stack(trainer_stack):
    """The trainer stack plus one sampler replica on the same store and Redis prefix."""
    from tests.stack import SamplerReplica

    replica = SamplerReplica(trainer_stack.config.store, trainer_stack.prefix, max_seq_len=256)
    trainer_stack.sampler = replica
    yield trainer_stack
    replica.stop()


@pytest.fixture
def gateway_stack(sampling_stack):
    """Trainer + one sampler + a gateway (gRPC and HTTP) in front, base "tiny" registered."""
    from tests.stack import GatewayNode

    stack = sampling_stack
    node = GatewayNode(stack.config.store, stack.prefix, stack.server.address)
    stack.gateway = node
    yield stack
    node.stop()


@pytest.fixture
def secured_stack(tmp_path: Path):
    """A deployment with auth on and the internal token (see tests/helpers_auth.py)."""
    from tests.helpers_auth import SecuredStack

    stack = SecuredStack(tmp_path)
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def tiny_arith(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The default `tiny-arith` build (seed 0; about a minute), once per test session:
    (its directory, the build's stats). Shared by the build test, the learning test, the
    example and the demo tests, so the suite pays for one build."""
    from headway.bases import tiny_arith as ta

    path = tmp_path_factory.mktemp("bases") / ta.NAME
    stats = ta.build_tiny_arith(path)
    return path, stats
