"""The tokenizer wrapper encodes, decodes and renders chat templates exactly as transformers."""

from __future__ import annotations

import json

import pytest

from headway.modeling import ModelError, Tokenizer, load_model
from tests.conftest import build_hf_model, train_tokenizer

MESSAGES = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "what is 12 plus 7?"},
    {"role": "assistant", "content": "it is 19."},
    {"role": "user", "content": "what is 3 plus 4?"},
]


@pytest.fixture
def tok_dir(tmp_path):
    return train_tokenizer(tmp_path / "tok")


def test_encode_decode_match_transformers(tok_dir):
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer.from_dir(tok_dir)
    theirs = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    for text in ["what is 12 plus 7? it is 19.", "<|im_start|>user\nhi<|im_end|>", " 3  4 "]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(tok_dir, add_generation_prompt):
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer.from_dir(tok_dir)
    theirs = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    text = ours.render_chat(MESSAGES, add_generation_prompt=add_generation_prompt)
    expected = theirs.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert ours.apply_chat_template(MESSAGES) == ours.encode(
        ours.render_chat(MESSAGES), add_special_tokens=False
    )


def test_template_features_transformers_provides(tmp_path):
    # tojson without HTML escaping, raise_exception, loop controls, trim/lstrip of blocks.
    template = (
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}"
        "{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}\n"
        "  {{ m | tojson }}\n{% endfor %}"
    )
    path = train_tokenizer(tmp_path / "tok")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import PreTrainedTokenizerFast

    ours, theirs = Tokenizer.from_dir(path), PreTrainedTokenizerFast.from_pretrained(path)
    msgs = [{"role": "user", "content": "<b>&"}] * 3
    assert ours.render_chat(msgs, add_generation_prompt=False) == theirs.apply_chat_template(
        msgs, tokenize=False
    )
    with pytest.raises(ModelError, match="no bad roles"):
        ours.render_chat([{"role": "bad", "content": ""}])


def test_eos_ids_come_from_generation_config_and_eos_token(tok_dir):
    ours = Tokenizer.from_dir(tok_dir)
    im_end = ours.token_to_id("<|im_end|>")
    assert ours.eos_token_ids == [0, im_end]


def test_load_model_returns_the_directory_tokenizer(tmp_path):
    path = tmp_path / "m"
    build_hf_model("qwen3").save_pretrained(path)
    train_tokenizer(path)
    model, tok = load_model(path)
    assert tok is not None and tok.vocab_size <= model.config.vocab_size
    assert tok.chat_template


def test_tokenizer_round_trips_through_save(tok_dir, tmp_path):
    ours = Tokenizer.from_dir(tok_dir)
    ours.save(tmp_path / "saved")
    again = Tokenizer.from_dir(tmp_path / "saved")
    assert again.chat_template == ours.chat_template
    assert again.encode("what is 1 plus 2?") == ours.encode("what is 1 plus 2?")
    assert again.special_tokens == ours.special_tokens
