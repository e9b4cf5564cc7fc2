"""Token-exact multi-turn: a chat turn that continues a recorded trajectory.

When a chat request names the `trace_id` of the episode it continues, its prompt is not
the whole conversation rendered and tokenized again: it is the trajectory's tokens so far
(the last turn's prompt and the tokens the model sampled, exactly) followed by the
tokenization of what the chat template adds after them (the end of the assistant's turn,
the new tool or user messages, the generation prompt). Re-rendering would re-tokenize the
model's reply, and a reply sampled as tokens the tokenizer would not produce from its text
(or cut by a stop string, or with a character split over tokens) comes back as other
tokens: the trainer would then score tokens that were never sampled, with logprobs that
belong to others.

This holds when the template appends. The check is made on rendered text, never on the
trajectory's tokens decoded (a tokenizer need not give back the text it was fed): the
conversation before the last reply, rendered with the generation prompt (what the last
prompt was made from), must be a prefix of it rendered with that reply, the reply's text
must follow it as the model wrote it (the sampled tokens decoded, as the gateway returned
them), and all of that must be a prefix of the whole conversation rendered. A template
that rewrites earlier turns (one that drops past reasoning, say), a reply cut by a stop
string, or a client that edited the reply breaks it: then the conversation is rendered
whole as before, and the reply says so (`prompt_continued: false`).

Gateway code: no torch; runs on a worker thread (it renders and tokenizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from headway.modeling.tokenizer import Tokenizer


@dataclass
class Continuation:
    """A continued prompt, or why there is none (`prompt` None)."""

    prompt: list[int] | None
    reason: str = ""


def continue_trajectory(
    tok: Tokenizer, messages: list[dict[str, Any]], prompt: list[int], sampled: list[int]
) -> Continuation:
    """The prompt that extends the trajectory's last turn (`prompt` and the `sampled`
    completion tokens) with what the chat template renders after them for `messages`, or
    why it cannot."""
    answered = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not answered:
        return Continuation(None, "the messages hold no assistant reply to continue after")
    last = answered[-1]
    if last == len(messages) - 1:
        return Continuation(None, "the last message is the assistant's: nothing follows it")
    asked = tok.render_chat(messages[:last], add_generation_prompt=True)
    before = tok.render_chat(messages[: last + 1], add_generation_prompt=False)
    full = tok.render_chat(messages, add_generation_prompt=True)
    reply = tok.decode(sampled, skip_special_tokens=True)
    if messages[last].get("content") != reply:
        return Continuation(
            None, "the last assistant message is not the reply sampled (an edited reply, "
            "or one cut by a stop string)",
        )  # fmt: skip
    if not (before.startswith(asked + reply) and full.startswith(before)):
        return Continuation(None, "the chat template renders the earlier turns differently")
    # What the template puts after the reply's text; an end-of-turn token the model drew
    # (its eos) is that text's start, already in the trajectory.
    rest = full[len(asked) + len(reply) :]
    ended = tok.decode(sampled[-1:], skip_special_tokens=False) if sampled else ""
    if ended and not reply.endswith(ended) and rest.startswith(ended):
        rest = rest[len(ended) :]
    return Continuation(prompt + sampled + tok.encode(rest, add_special_tokens=False))
