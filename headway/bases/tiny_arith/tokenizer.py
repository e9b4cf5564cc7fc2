"""The tiny-arith tokenizer: one token per character of `0123456789+=`, the chat markers
`<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>` (the eos) and `<|pad|>`, and a chat
template rendering `[{"role": "user", "content": "12+7="}]` with the generation prompt
as `<|user|>12+7=<|end|><|assistant|>`. Trained by the `tokenizers` library (imported
when a tokenizer is built)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from headway.bases.tiny_arith.recipe import Recipe
from headway.bases.tiny_arith.task import _train_pairs, problem_text

if TYPE_CHECKING:
    from headway.modeling.tokenizer import Tokenizer

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
