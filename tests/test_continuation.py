"""`gateway.continuation` on the trained test tokenizer and its ChatML template: a later
turn's prompt keeps the trajectory's tokens and adds the template's rest; where the rest
cannot be found the reason is given (the gateway then renders the conversation anew)."""

from __future__ import annotations

import pytest

from gateway.continuation import continue_trajectory, digest
from headway.modeling.tokenizer import Tokenizer
from tests.stack import make_tiny_base

ASK = [{"role": "user", "content": "what is 1 plus 2?"}]
MORE = {"role": "user", "content": "and 2 plus 2?"}


def ASKED(tok: Tokenizer) -> str:  # noqa: N802 - reads as the constant it stands for
    """The digest the first turn's prompt records (the question rendered for a reply)."""
    return digest(tok.render_chat(ASK))


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(make_tiny_base(tmp_path_factory.mktemp("base") / "tiny"))


def test_a_reply_ended_by_eos_continues_as_the_template_renders_it(tok):
    """Sampled tokens that are how the tokenizer writes the reply, ended by the model's
    eos (<|im_end|>, which the template also closes the turn with): the continued prompt
    is the whole conversation as the template renders it, token for token."""
    prompt = tok.apply_chat_template(ASK)
    sampled = tok.encode(" it is 3.", add_special_tokens=False) + [tok.token_to_id("<|im_end|>")]
    conversation = [*ASK, {"role": "assistant", "content": " it is 3."}, MORE]
    out = continue_trajectory(tok, conversation, prompt, sampled, prompt_digest=ASKED(tok))
    assert out.prompt == tok.apply_chat_template(conversation)


def test_sampled_tokens_are_kept_where_the_text_would_tokenize_otherwise(tok):
    """The reply " it is 3." drawn one character at a time (not how the tokenizer splits
    it) and cut by max_tokens (no eos): its tokens stay, and the template's end of turn
    follows them."""
    prompt = tok.apply_chat_template(ASK)
    sampled = [t for ch in " it is 3." for t in tok.encode(ch, add_special_tokens=False)]
    assert sampled != tok.encode(" it is 3.", add_special_tokens=False)
    conversation = [*ASK, {"role": "assistant", "content": " it is 3."}, MORE]
    out = continue_trajectory(tok, conversation, prompt, sampled, prompt_digest=ASKED(tok))
    assert out.prompt[: len(prompt) + len(sampled)] == prompt + sampled
    rest = tok.render_chat(conversation)[len(tok.render_chat(ASK)) + len(" it is 3.") :]
    assert out.prompt[len(prompt) + len(sampled) :] == tok.encode(rest, add_special_tokens=False)
    rerendered = tok.apply_chat_template(conversation)
    assert rerendered[: len(prompt) + len(sampled)] != prompt + sampled  # what it avoids


@pytest.mark.parametrize(
    ("conversation", "reason"),
    [
        ([*ASK, {"role": "assistant", "content": " it is 4."}, MORE], "not the reply sampled"),
        ([*ASK, MORE], "no assistant reply"),
        ([*ASK, {"role": "assistant", "content": " it is 3."}], "nothing follows it"),
    ],
    ids=["edited reply", "no reply", "reply last"],
)
def test_what_cannot_be_continued_says_why(tok, conversation, reason):
    prompt = tok.apply_chat_template(ASK)
    sampled = tok.encode(" it is 3.", add_special_tokens=False)
    out = continue_trajectory(tok, conversation, prompt, sampled, prompt_digest=ASKED(tok))
    assert out.prompt is None and reason in out.reason


def test_a_template_that_rewrites_earlier_turns_cannot_be_continued(tok):
    """A template that shows an assistant reply only while it is the last message (as
    templates that drop past reasoning do): the earlier turn renders differently once a
    message follows, so the prompt cannot keep the sampled tokens."""
    import copy

    rewriting = copy.copy(tok)
    rewriting.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    prompt = rewriting.apply_chat_template(ASK)
    sampled = tok.encode(" it is 3.", add_special_tokens=False)
    conversation = [*ASK, {"role": "assistant", "content": " it is 3."}, MORE]
    out = continue_trajectory(
        rewriting, conversation, prompt, sampled, prompt_digest=digest(rewriting.render_chat(ASK))
    )
    assert out.prompt is None and "renders the earlier turns differently" in out.reason


def test_earlier_messages_that_changed_or_a_turn_not_made_here_are_not_continued(tok):
    """The last prompt's digest is of the text it was made from: a client that changed an
    earlier message (or the tools) since, or a turn recorded without one, gets the
    conversation rendered anew."""
    prompt = tok.apply_chat_template(ASK)
    sampled = tok.encode(" it is 3.", add_special_tokens=False)
    changed = [{"role": "user", "content": "what is 1 plus 3?"},
               {"role": "assistant", "content": " it is 3."}, MORE]  # fmt: skip
    out = continue_trajectory(tok, changed, prompt, sampled, prompt_digest=ASKED(tok))
    assert out.prompt is None and "earlier messages or tools" in out.reason
    same = [*ASK, {"role": "assistant", "content": " it is 3."}, MORE]
    out = continue_trajectory(tok, same, prompt, sampled)
    assert out.prompt is None and "not made from messages here" in out.reason


def test_a_template_that_rewrites_every_reply_cannot_be_continued(tok):
    """A template that trims replies (as some do) shows each one otherwise than written:
    keeping the sampled tokens would give the model a conversation its template never
    shows, so the turn is rendered anew."""
    import copy

    trimming = copy.copy(tok)
    trimming.chat_template = tok.chat_template.replace(
        "message['content']", "message['content'] | trim"
    )
    prompt = trimming.apply_chat_template(ASK)
    sampled = tok.encode(" it is 3.", add_special_tokens=False)
    conversation = [*ASK, {"role": "assistant", "content": " it is 3."}, MORE]
    out = continue_trajectory(
        trimming, conversation, prompt, sampled, prompt_digest=digest(trimming.render_chat(ASK))
    )
    assert out.prompt is None and "does not show the reply as it was written" in out.reason
