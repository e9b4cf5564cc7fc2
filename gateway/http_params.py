"""The HTTP API's requests: parsing the body, checking each parameter, building the prompt.

Every parameter is checked for its type and range here, so a wrong one is a 400 naming it
(`param`), never a 500 from deep inside: `max_tokens: Infinity`, `n: 1.5`, `trace_id: 5`,
`stop: 7`, `seed: "x"`, a message without a string role. JSON's non-finite extensions
(`NaN`, `Infinity`, and numbers too large for a float) are refused anywhere in the body.
Integers may be written as whole floats (`2.0`), as pydantic-based servers accept them.

The functions here are CPU work proportional to the request and run on the gateway's
worker threads (`gateway.workers`), never on the event loop; each lets go of the GIL as it
goes, or threads would not help:

- bodies up to `FAST_PARSE_BYTES` parse with json's C scanner (fast, but it holds the GIL
  for the whole parse: ~25 ms per MiB here); larger ones walk objects and arrays in Python
  and parse each scalar in C (several times slower, but the loop gets the GIL between
  values);
- text is tokenized with tokenizers' batch encode, which releases the GIL (its plain
  `encode` does not), and only text short enough to fit the model's context is tokenized;
- replies are encoded with json's pure-Python encoder for the same reason.

Gateway code: no torch.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from gateway.continuation import Continuation, continue_trajectory, digest
from gateway.http_errors import HTTPError
from gateway.tool_calls import HermesCalls, ToolSpec, check_tools, parser_for, template_messages
from headway.errors import ResourceExhausted
from headway.modeling.tokenizer import Tokenizer
from headway.tensors import to_tensor
from headway.v1 import common_pb2

FAST_PARSE_BYTES = 1024 * 1024
INT32_MAX = 2**31 - 1
INT64 = (-(2**63), 2**63 - 1)
DEFAULT_MAX_TOKENS = 1024
MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's limit (the sampler's default too)
# Prompt text over context × (longest token's characters) × TEXT_SLACK cannot fit the
# context; the slack covers normalizers that shorten text before it is tokenized.
TEXT_SLACK = 2


# ------------------------------------------------------------------------------ body


def _no_constant(name: str) -> Any:
    raise HTTPError(400, f"the body contains {name}: JSON numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise HTTPError(400, f"the body contains {text}, too large for a number: use a finite one")
    return value


class _InterruptibleDecoder(json.JSONDecoder):
    """Objects and arrays walked in Python (json's own pure-Python JSONObject/JSONArray),
    each scalar parsed by the C scanner: several times slower than the C scanner alone,
    but Python bytecode runs between values, so the event loop's thread gets the GIL
    while a large body parses."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        scalar = json.scanner.c_make_scanner(self) if json.scanner.c_make_scanner else None
        scalar = scalar or json.scanner.py_make_scanner(self)
        strict, hook, pairs_hook, memo = self.strict, self.object_hook, self.object_pairs_hook, {}

        def scan_once(s: str, idx: int) -> tuple[Any, int]:
            char = s[idx : idx + 1]
            if char == "{":
                return json.decoder.JSONObject(
                    (s, idx + 1), strict, scan_once, hook, pairs_hook, memo
                )
            if char == "[":
                return json.decoder.JSONArray((s, idx + 1), scan_once)
            return scalar(s, idx)

        self.scan_once = scan_once


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; 400 if it is not one (or holds NaN/Infinity)."""
    cls = json.JSONDecoder if len(raw) <= FAST_PARSE_BYTES else _InterruptibleDecoder
    try:
        body = json.loads(raw, cls=cls, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise HTTPError(400, "request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, too many digits
        raise HTTPError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return body


def render_json(value: Any) -> bytes:
    """`value` as JSON bytes, with json's pure-Python encoder (it yields the GIL)."""
    encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return "".join(encoder.iterencode(value)).encode()


# ------------------------------------------------------------------------ parameters


def _shown(value: Any) -> str:
    """A short rendering of a client's value for a message (bounded work, whatever it is)."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    text = json.dumps(value[:40] if isinstance(value, str) else value)
    return text if len(text) <= 40 else text[:37] + "..."


def required_str(body: dict[str, Any], name: str) -> str:
    """A non-empty string parameter."""
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise HTTPError(400, f"{name} is required (a string)", param=name)
    return value


def optional_str(body: dict[str, Any], name: str) -> str:
    """A string parameter; "" when absent or null."""
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise HTTPError(400, f"{name} must be a string; got {_shown(value)}", param=name)
    return value


def flag(body: dict[str, Any], name: str) -> bool:
    """A boolean parameter; False when absent or null."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HTTPError(400, f"{name} must be true or false; got {_shown(value)}", param=name)
    return value


def logprobs_asked(body: dict[str, Any], *, chat: bool, implied: bool = False) -> tuple[bool, int]:
    """(whether logprobs are returned, how many most likely tokens per position).

    Chat: `logprobs` true/false and `top_logprobs` 0..20, which needs `logprobs` true
    (or `implied`: return_token_ids returns logprobs anyway). Text completions (the legacy
    API): `logprobs` = that count, 0..20 (null = none).
    """
    if not chat:
        value = body.get("logprobs")
        if value is None:
            return False, 0
        if isinstance(value, bool):  # chat's form, taken here too: true = the token's own
            return value, 0
        return True, integer(body, "logprobs", low=0, high=MAX_TOP_LOGPROBS) or 0
    asked = flag(body, "logprobs")
    top = integer(body, "top_logprobs", low=0, high=MAX_TOP_LOGPROBS, default=0) or 0
    if top and not (asked or implied):
        raise HTTPError(
            400, "top_logprobs needs logprobs: true; set it, or drop top_logprobs",
            param="top_logprobs",
        )  # fmt: skip
    return asked, top


def integer(
    body: dict[str, Any], name: str, *, low: int, high: int = INT32_MAX, default: int | None = None
) -> int | None:
    """An integer parameter in [low, high] (a whole float is taken); `default` if absent."""
    value = body.get(name)
    if value is None:
        return default
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise HTTPError(400, f"{name} must be an integer; got {_shown(value)}", param=name)
    if not low <= value <= high:
        raise HTTPError(
            400, f"{name} must be between {low} and {high}; got {_shown(value)}", param=name
        )
    return int(value)


def number(body: dict[str, Any], name: str) -> float | None:
    """A number parameter (finite: the parser refused the others); None if absent."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HTTPError(400, f"{name} must be a number; got {_shown(value)}", param=name)
    return float(value)


def stops(body: dict[str, Any]) -> list[str]:
    """`stop`: a string, a list of strings, or null."""
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise HTTPError(
            400, f"stop must be a string or a list of strings; got {_shown(value)}", param="stop"
        )
    return value


def token_list(value: Any, name: str) -> list[int]:
    """A non-empty list of token ids (integers in [0, 2^31))."""
    ok = isinstance(value, list) and value
    if ok:
        ok = all(type(t) is int and 0 <= t <= INT32_MAX for t in value)
    if not ok:
        raise HTTPError(
            400, f"{name} must be a non-empty list of token ids (integers >= 0)", param=name
        )
    return value


def messages(value: Any) -> list[dict[str, Any]]:
    """Chat messages, each an object with a string role and text content (a string, null,
    or a list of parts whose text parts are kept), ready for the chat template."""
    if not isinstance(value, list) or not value:
        raise HTTPError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise HTTPError(
                400, f"messages[{i}] must be an object with a string role", param="messages"
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
                raise HTTPError(
                    400,
                    f"messages[{i}].content parts must be objects with a string text",
                    param="messages",
                )
            content = "".join(p.get("text", "") for p in content)
        elif content is not None and not isinstance(content, str):
            raise HTTPError(
                400,
                f"messages[{i}].content must be a string, a list of parts or null",
                param="messages",
            )
        entry = {**m, "content": content if content is not None else ""}
        if m.get("tool_calls") is not None:
            _check_tool_calls(m["tool_calls"], i)
        if m["role"] == "tool" and not isinstance(m.get("tool_call_id", ""), str):
            raise HTTPError(400, f"messages[{i}].tool_call_id must be a string", param="messages")
        out.append(entry)
    return out


def _check_tool_calls(calls: Any, i: int) -> None:
    """An assistant message's `tool_calls`: OpenAI's {id, type: function, function: {name,
    arguments}} entries (arguments a JSON string, or an object)."""
    ok = isinstance(calls, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments", "{}"), str | dict)
        for c in calls
    )
    if not ok:
        raise HTTPError(
            400, f"messages[{i}].tool_calls must be a list of {{id, type: function, function: "
            "{name, arguments}}", param="messages",
        )  # fmt: skip


def sampling_params(
    body: dict[str, Any],
    prompt_len: int,
    context: int,
    default_max_tokens: int | None = None,
    least: int = 1,
) -> common_pb2.SamplingParams:
    """The SamplingParams of a completion request (ranges the sampler checks are its own).
    Without max_tokens: `default_max_tokens`, else what the context leaves (at most 1024).
    `least`: the smallest max_tokens taken (0 where echo scores the prompt alone)."""
    max_tokens = integer(body, "max_completion_tokens", low=1)
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", low=least, default=default_max_tokens)
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, context - prompt_len))
    params = common_pb2.SamplingParams(
        max_tokens=max_tokens, n=integer(body, "n", low=1, default=1), stop=stops(body)
    )
    for name in ("temperature", "top_p"):
        value = number(body, name)
        if value is not None:
            setattr(params, name, value)
    # vLLM's -1 means "off", which is our 0.
    params.top_k = max(0, integer(body, "top_k", low=-1, default=0) or 0)
    seed = integer(body, "seed", low=INT64[0], high=INT64[1])
    if seed is not None:
        params.seed = seed
    params.ignore_eos = flag(body, "ignore_eos")
    return params


# -------------------------------------------------------------------------- requests


@dataclass
class Completion:
    """A checked chat or text completion request."""

    model: str
    prompt: list[int]
    prompt_tokens: common_pb2.Tensor  # the prompt, packed for the sampler
    params: common_pb2.SamplingParams
    checkpoint: str  # a pinned checkpoint, "" = the head
    trace_id: str  # the trace a recorded turn continues, "" = a new one
    stream: bool
    return_token_ids: bool  # return ids and logprobs, and record the turn in a trace
    logprobs: bool
    top_logprobs: int = 0  # most likely tokens per position, in the logprobs returned
    echo: bool = False  # text completions: the prompt comes back before the completion
    prompt_text: str | None = None  # the prompt as the client wrote it (text prompts)
    drop_last: bool = False  # max_tokens 0 with echo: one token is drawn, none returned
    tools: Tools | None = None  # chat: the tools offered, their call format
    prompt_digest: str = ""  # chat: of the text the prompt stands for (Turn.prompt_digest)
    # A chat turn of a recorded trajectory: whether its prompt continues the trajectory's
    # tokens exactly (None: not a continuation), and why not.
    continued: bool | None = None
    rerendered_because: str = ""


def completion_requests(
    tok: Tokenizer,
    body: dict[str, Any],
    model: str,
    context: int,
    *,
    chat: bool,
    vocab: int | None = None,
    so_far: tuple[list[int], list[int], str] | None = None,
) -> list[Completion]:
    """Check every parameter of a completion request and build its prompts (worker thread:
    rendering and tokenizing take time): one per prompt of a text completion's list (as
    lm-eval's local-completions batches them), else one. Prompts of a list are checked
    against the vocabulary and the context here, all before any is sampled. `so_far`: the
    trajectory a chat turn continues (its trace's last prompt and completion tokens, and
    that prompt's digest)."""
    record = flag(body, "return_token_ids")
    logprobs, top = logprobs_asked(body, chat=chat, implied=record)
    echo = flag(body, "echo")
    if echo and chat:
        raise HTTPError(400, "echo is a /v1/completions parameter; drop it", param="echo")
    stream = flag(body, "stream")
    if echo and stream:
        raise HTTPError(
            400, "echo is answered without streaming: drop stream, or echo", param="echo"
        )
    continuation, prompt_digest = None, ""
    tools = chat_tools(tok, body) if chat else None
    if not chat and body.get("tools") is not None:
        raise HTTPError(400, "tools are a /v1/chat/completions parameter", param="tools")
    if chat:
        prompt, continuation, prompt_digest = chat_prompt(tok, body, context, so_far, tools)
        prompts: list[tuple[list[int], str | None]] = [(prompt, None)]
    else:
        prompts = completion_prompts(tok, body, context)
    if stream and len(prompts) > 1:
        raise HTTPError(
            400, f"a stream takes one prompt; got {len(prompts)}: send them as separate requests",
            param="prompt",
        )  # fmt: skip
    several = len(prompts) > 1
    if several and record:
        raise HTTPError(
            400, f"return_token_ids records one turn per request; got {len(prompts)} prompts: "
            "send them as separate requests", param="prompt",
        )  # fmt: skip
    trace_id = optional_str(body, "trace_id")
    out = []
    for i, (prompt, text) in enumerate(prompts):
        if several:
            _check_prompt(prompt, f"prompt[{i}]", vocab, context, body)
        params = sampling_params(
            body, len(prompt), context, default_max_tokens=None if chat else 16,
            least=0 if echo else 1,
        )  # fmt: skip
        if record and trace_id and params.n != 1:
            raise HTTPError(400, "trace_id continues one trajectory: use it with n = 1", param="n")
        drop_last = params.max_tokens == 0  # echo alone: score the prompt, draw nothing
        if drop_last and record:
            raise HTTPError(
                400, "return_token_ids records a sampled turn: max_tokens must be ≥ 1",
                param="max_tokens",
            )  # fmt: skip
        params.max_tokens = max(params.max_tokens, 1)
        params.top_logprobs = top
        out.append(
            Completion(
                model=model,
                prompt=prompt,
                prompt_tokens=to_tensor(prompt, common_pb2.DTYPE_INT32),
                params=params,
                checkpoint=optional_str(body, "checkpoint"),
                trace_id=trace_id,
                stream=stream,
                return_token_ids=record,
                logprobs=logprobs or record,
                top_logprobs=top,
                echo=echo,
                prompt_text=text,
                drop_last=drop_last,
                tools=tools,
                prompt_digest=prompt_digest,
                continued=None if continuation is None else continuation.prompt is not None,
                rerendered_because=continuation.reason if continuation is not None else "",
            )
        )
    return out


# -------------------------------------------------------------------------- prompts


@lru_cache(maxsize=64)
def _longest_token(tok: Tokenizer) -> int:
    """Characters of the longest token string: no token covers more of a prompt's text."""
    return max((len(t) for t in tok.backend.get_vocab(with_added_tokens=True)), default=1)


def _check_fits(tok: Tokenizer, chars: int, context: int) -> None:
    """Refuse text that cannot fit `context` tokens before spending time tokenizing it."""
    if chars > context * _longest_token(tok) * TEXT_SLACK:
        raise ResourceExhausted(
            f"the prompt is {chars} characters: more than the model's context of {context} "
            "tokens can hold, whatever they are; shorten it"
        )


def encode(tok: Tokenizer, text: str, context: int, *, special: bool) -> list[int]:
    """Token ids of `text`, refused unread if it cannot fit `context` tokens. Batch encode
    releases the GIL; the tokenizer's plain encode holds it throughout."""
    _check_fits(tok, len(text), context)
    return tok.backend.encode_batch([text], add_special_tokens=special)[0].ids


@dataclass
class Tools:
    """A chat request's tools: checked (`tool_calls.check_tools`), the model's call format,
    and the opening appended to the prompt when a call is required ("" otherwise)."""

    spec: ToolSpec
    format: HermesCalls
    opening: str = ""


def chat_tools(tok: Tokenizer, body: dict[str, Any]) -> Tools | None:
    """The request's tools for this model (400 if they are wrong or its chat template
    renders or writes tool calls in no form Headway parses); None without tools."""
    spec = check_tools(body)
    if spec is None:
        return None
    form = parser_for(tok.chat_template)
    if form is None:
        raise HTTPError(
            400, "this model's chat template has no tool-call format Headway parses (the "
            "<tool_call>{json}</tool_call> form of Qwen and Hermes templates): drop tools",
            param="tools",
        )  # fmt: skip
    forced = spec.choice in ("required", "function")
    return Tools(spec, form, form.opening(spec.forced) if forced else "")


def chat_prompt(
    tok: Tokenizer,
    body: dict[str, Any],
    context: int,
    so_far: tuple[list[int], list[int], str] | None = None,
    tools: Tools | None = None,
) -> tuple[list[int], Continuation | None, str]:
    """The prompt of a chat request: `prompt_token_ids` when given, else the chat template
    applied to `messages` and tokenized; with `so_far` (the tokens of the trajectory the
    request continues), those tokens and the rendered rest when the template allows
    (`gateway.continuation`; `so_far`: its last turn's prompt and sampled tokens, and that
    prompt's digest). Then the continuation tried (None: none was), and the digest of the
    chat text the prompt stands for ("" for prompt_token_ids)."""
    if body.get("prompt_token_ids") is not None:
        return token_list(body["prompt_token_ids"], "prompt_token_ids"), None, ""
    chat = template_messages(messages(body.get("messages")))
    _check_fits(tok, sum(len(m["content"]) for m in chat), context)
    spec = tools.spec if tools is not None else None
    rendering = {"tools": spec.tools} if spec is not None else {}
    opening = tools.opening if tools is not None else ""
    try:
        text = tok.render_chat(chat, add_generation_prompt=True, **rendering) + opening
        if so_far:
            prompt, sampled, prompt_digest = so_far
            continued = continue_trajectory(
                tok, chat, prompt, sampled, rendering, opening, prompt_digest
            )
            if continued.prompt is not None:
                return continued.prompt, continued, digest(text)
    except TypeError as e:  # a template that meets a value of an unexpected type
        raise HTTPError(
            400, f"the chat template cannot render these messages: {e}", param="messages"
        ) from None
    return encode(tok, text, context, special=False), continued if so_far else None, digest(text)


MAX_PROMPTS = 64  # prompts of one text completion request (a batch, as lm-eval sends)


def _check_prompt(
    prompt: list[int], name: str, vocab: int | None, context: int, body: dict[str, Any]
) -> None:
    """One prompt of a list, checked as the sampler would check it (so a bad one refuses
    the request before any other is sampled), the message naming which."""
    if vocab is not None:
        bad = next((j for j, t in enumerate(prompt) if t >= vocab), None)
        if bad is not None:
            raise HTTPError(
                400, f"{name}[{bad}] is token id {prompt[bad]}, outside the vocabulary "
                f"(valid ids are 0..{vocab - 1})", param="prompt",
            )  # fmt: skip
    wanted = max(1, integer(body, "max_tokens", low=0, default=16) or 0)
    if len(prompt) + wanted > context:
        raise HTTPError(
            400, f"{name} ({len(prompt)} tokens) + max_tokens ({wanted}) is over the context "
            f"of {context} tokens; shorten it or lower max_tokens", param="prompt",
        )  # fmt: skip


def completion_prompts(
    tok: Tokenizer, body: dict[str, Any], context: int
) -> list[tuple[list[int], str | None]]:
    """The prompts of a text completion, each (ids, its text if given as text):
    `prompt_token_ids`, or `prompt` — text, ids, or a list of several texts or id lists."""
    raw = body.get("prompt_token_ids", body.get("prompt"))
    if isinstance(raw, str):
        return [(encode(tok, raw, context, special=True), raw)]
    if isinstance(raw, list) and raw and all(type(t) is int for t in raw):
        return [(token_list(raw, "prompt"), None)]
    if isinstance(raw, list) and raw and all(isinstance(p, str | list) for p in raw):
        if len(raw) > MAX_PROMPTS:
            raise HTTPError(
                400, f"prompt holds {len(raw)} prompts; at most {MAX_PROMPTS} per request",
                param="prompt",
            )  # fmt: skip
        return [
            (encode(tok, p, context, special=True), p)
            if isinstance(p, str)
            else (token_list(p, f"prompt[{i}]"), None)
            for i, p in enumerate(raw)
        ]
    raise HTTPError(
        400,
        "prompt must be a string, a list of token ids, or a list of several of either",
        param="prompt",
    )
