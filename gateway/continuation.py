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

This holds when the template appends: the conversation rendered up to the last assistant
message is a prefix of it rendered whole, so what follows is the template's end of that
turn (found by rendering a stand-in reply) and the new messages. The reply in the
messages must be the one sampled: its text (or, for a tool-calling turn, its calls as the
gateway parsed them) is checked against the sampled tokens decoded, never the other way
(a tokenizer need not give back the text it was fed). A template that rewrites earlier
turns (one that drops past reasoning, say), a reply cut by a stop string, or a client that
edited the reply breaks it: then the conversation is rendered whole as before, and the
reply says so (`prompt_continued: false`).

Gateway code: no torch; runs on a worker thread (it renders and tokenizes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from gateway.tool_calls import HERMES
from headway.errors import ModelError
from headway.modeling.tokenizer import Tokenizer


@dataclass
class Continuation:
    """A continued prompt, or why there is none (`prompt` None)."""

    prompt: list[int] | None
    reason: str = ""


STAND_IN = "\u2042headway-reply\u2042"  # a reply no model writes, to find the turn's end


def digest(text: str) -> str:
    """The digest a turn records of the chat text its prompt stands for (Turn.prompt_digest)."""
    return hashlib.sha256(text.encode()).hexdigest()


def continue_trajectory(
    tok: Tokenizer,
    messages: list[dict[str, Any]],
    prompt: list[int],
    sampled: list[int],
    rendering: dict[str, Any] | None = None,
    opening: str = "",
    prompt_digest: str = "",
) -> Continuation:
    """The prompt that extends the trajectory's last turn (`prompt`, the chat text of
    `prompt_digest`, and the `sampled` completion tokens) with what the chat template
    renders after them for `messages` (`rendering`: the template's other variables, its
    tools; `opening`: text the new reply is started with), or why it cannot."""
    rendering = rendering or {}
    answered = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not answered:
        return Continuation(None, "the messages hold no assistant reply to continue after")
    last = answered[-1]
    if last == len(messages) - 1:
        return Continuation(None, "the last message is the assistant's: nothing follows it")
    if not prompt_digest:
        return Continuation(None, "the trajectory's last turn was not made from messages here")
    reply = messages[last]
    called = [c["function"]["name"] for c in reply.get("tool_calls") or []]
    try:
        asked = tok.render_chat(messages[:last], add_generation_prompt=True, **rendering)
        before = tok.render_chat(messages[: last + 1], add_generation_prompt=False, **rendering)
        full = tok.render_chat(messages, add_generation_prompt=True, **rendering) + opening
        stand_in = [*messages[:last], {"role": "assistant", "content": STAND_IN}]
        shown = tok.render_chat(stand_in, add_generation_prompt=False, **rendering)
    except ModelError as e:
        return Continuation(None, f"the chat template fails on a part of the conversation: {e}")
    # The earlier messages and tools must be those the last prompt was made from (with the
    # call's opening, if the reply was started with one).
    openings = {"", HERMES.opening(""), *(HERMES.opening(name) for name in called[:1])}
    if not any(digest(asked + start) == prompt_digest for start in openings):
        return Continuation(
            None, "the earlier messages or tools are not those the trajectory's last prompt "
            "was made from",
        )  # fmt: skip
    if not _is_reply(tok, reply, sampled):
        return Continuation(
            None, "the last assistant message is not the reply sampled (an edited reply, "
            "or one cut by a stop string)",
        )  # fmt: skip
    if not full.startswith(before) or shown.count(STAND_IN) != 1:
        return Continuation(None, "the chat template renders the earlier turns differently")
    if not called and before != shown.replace(STAND_IN, reply.get("content") or ""):
        return Continuation(None, "the chat template does not show the reply as it was written")
    # The template's end of the assistant's turn; an end-of-turn token the model drew (its
    # eos) is that text's start, already in the trajectory.
    end = shown[shown.index(STAND_IN) + len(STAND_IN) :]
    reply = tok.decode(sampled, skip_special_tokens=True)
    ended = tok.decode(sampled[-1:], skip_special_tokens=False) if sampled else ""
    if ended and not reply.endswith(ended) and end.startswith(ended):
        end = end[len(ended) :]
    rest = end + full[len(before) :]
    return Continuation(prompt + sampled + tok.encode(rest, add_special_tokens=False))


def _is_reply(tok: Tokenizer, message: dict[str, Any], sampled: list[int]) -> bool:
    """Whether an assistant `message` is what the `sampled` tokens say: its text, or for a
    tool-calling turn its calls (name and arguments) as the gateway parses them, with the
    call's opening the gateway may have started the reply with."""
    reply = tok.decode(sampled, skip_special_tokens=True)
    calls = message.get("tool_calls") or []
    if not calls:
        return (message.get("content") or "") == reply
    want = [(c["function"]["name"], _arguments(c["function"].get("arguments"))) for c in calls]
    names = {name for name, _ in want}
    for start in ("", HERMES.opening(""), HERMES.opening(want[0][0])):
        parsed = HERMES.parse(start + reply, names)
        got = [
            (c["function"]["name"], _arguments(c["function"]["arguments"])) for c in parsed.calls
        ]
        # Text around calls compared without its edge whitespace (a stream sends it, the
        # unary reply strips it).
        if got == want and (parsed.content or "").strip() == (message.get("content") or "").strip():
            return True
    return False


def _arguments(value: Any) -> Any:
    """Call arguments compared as values (a JSON string parsed)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
