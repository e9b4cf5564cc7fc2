"""Tool calling in the OpenAI-compatible chat API: the request's tools checked, the
assistant's calls parsed out of what it wrote.

- `tools` (function tools, each `parameters` a JSON Schema) are handed to the model's own
  chat template as transformers hands them (the `tools` variable), and `tool_choice` is
  `auto` (the model decides), `none` (tools shown, no call parsed), `required` or a named
  function. Those two are made to hold by starting the assistant's reply for it: the
  template family's call opening (and the name) is appended to the prompt, so the sampled
  tokens continue a call; the prompt recorded with the turn holds that opening, and the
  trained tokens are still exactly the sampled ones.
- The calls are parsed per template family, chosen from the template's own text: the
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` form of Qwen and Hermes
  templates (`HERMES`). A call that does not parse (bad JSON, no name, a tool that was
  not offered, cut by max_tokens) stays in the content as text, and is counted
  (`Parsed.malformed`, recorded on the turn).
- Token ids and logprobs are never touched: the parsed view is for the client, the tokens
  are what was sampled.

Gateway code: no torch.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from gateway.http_errors import HTTPError

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
CHOICES = ("auto", "none", "required")


@dataclass
class ToolSpec:
    """A request's checked tools: the tool list for the template, the offered names, and
    the choice ("auto", "none", "required", or "function" with `forced` its name)."""

    tools: list[dict[str, Any]]
    names: set[str]
    choice: str = "auto"
    forced: str = ""


def _bad(message: str, param: str = "tools") -> HTTPError:
    return HTTPError(400, message, param=param)


def check_tools(body: dict[str, Any]) -> ToolSpec | None:
    """The request's `tools` and `tool_choice`, checked (400 naming what is wrong); None
    without tools (a `tool_choice` other than none/auto then is 400)."""
    from jsonschema import Draft202012Validator, SchemaError

    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is None or raw == []:
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice needs tools: give tools, or drop tool_choice", "tool_choice")
        return None
    if not isinstance(raw, list):
        raise _bad("tools must be a list of {type: function, function: {...}} objects")
    tools, names = [], set()
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise _bad(f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise _bad(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -")
        if name in names:
            raise _bad(f"tools[{i}].function.name {name!r} is given twice")
        if not isinstance(fn.get("description", ""), str):
            raise _bad(f"tools[{i}].function.description must be a string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise _bad(f"tools[{i}].function.parameters must be a JSON Schema object")
        try:
            Draft202012Validator.check_schema(params)
        except SchemaError as e:
            where = "/".join(str(p) for p in e.path) or "the top"
            raise _bad(
                f"tools[{i}].function.parameters is not a JSON Schema ({e.message}, at {where})"
            ) from None
        if params.get("type", "object") != "object":
            raise _bad(f"tools[{i}].function.parameters must describe an object (type: object)")
        names.add(name)
        tools.append({"type": "function", "function": {**fn, "parameters": params}})
    spec = ToolSpec(tools, names)
    if choice is None or choice in CHOICES:
        spec.choice = choice or "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in names:
            raise _bad(
                f"tool_choice names the function {name!r}, which is not among the tools "
                f"({', '.join(sorted(names))})", "tool_choice",
            )  # fmt: skip
        spec.choice, spec.forced = "function", name
    else:
        raise _bad(
            "tool_choice must be auto, none, required or {type: function, function: {name}}",
            "tool_choice",
        )
    return spec


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as chat templates expect them: an assistant's tool call arguments as
    objects (OpenAI sends them as JSON strings; templates write them with `tojson`)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls:
            fixed = []
            for call in calls:
                fn = dict(call.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    # Not JSON: kept as written (the template shows the string).
                    with contextlib.suppress(ValueError):
                        fn["arguments"] = json.loads(fn["arguments"])
                fixed.append({**call, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


@dataclass
class Parsed:
    """An assistant reply as the client sees it: its text outside the calls (None when
    only calls), the calls (OpenAI's `tool_calls` entries), how many did not parse."""

    content: str | None
    calls: list[dict[str, Any]] = field(default_factory=list)
    malformed: int = 0


class HermesCalls:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen 2.5/3, Hermes)."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def opening(self, forced: str) -> str:
        """The start of a reply that must call a tool (`forced`: that tool)."""
        if forced:
            return f'{self.OPEN}\n{{"name": "{forced}", "arguments":'
        return f'{self.OPEN}\n{{"name": "'

    def call(self, body: str, names: set[str]) -> dict[str, Any] | None:
        """The OpenAI `tool_calls` entry of one call's body, or None if it does not parse."""
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in names:
            return None
        args = value.get("arguments", value.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(args, ensure_ascii=False)},
        }

    def parse(self, text: str, names: set[str]) -> Parsed:
        """`text` split into content and calls; a call that does not parse stays text."""
        kept: list[str] = []
        calls: list[dict[str, Any]] = []
        malformed, at = 0, 0
        while True:
            start = text.find(self.OPEN, at)
            if start < 0:
                kept.append(text[at:])
                break
            end = text.find(self.CLOSE, start + len(self.OPEN))
            if end < 0:  # unterminated (cut by max_tokens): text
                kept.append(text[at:])
                malformed += 1
                break
            call = self.call(text[start + len(self.OPEN) : end].strip(), names)
            kept.append(text[at:start])
            if call is None:
                kept.append(text[start : end + len(self.CLOSE)])
                malformed += 1
            else:
                calls.append(call)
            at = end + len(self.CLOSE)
        content = "".join(kept)
        if calls:
            content = content.strip()
        return Parsed(content or (None if calls else ""), calls, malformed)


HERMES = HermesCalls()


def parser_for(template: str | None) -> HermesCalls | None:
    """The call format of a chat template (None: one Headway does not parse)."""
    if template and HermesCalls.OPEN in template:
        return HERMES
    return None


class CallStream:
    """A streamed reply split as it comes: `feed(text)` returns the content released and
    the calls completed so far; text that may open a call is held back until it does or
    does not. `finish()` releases the rest (an unterminated call as text)."""

    def __init__(self, form: HermesCalls, names: set[str], opening: str = "") -> None:
        self.form, self.names = form, names
        self.buffer = opening
        self.calls = 0  # calls released so far
        self.malformed = 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content released, calls completed) after `text`."""
        self.buffer += text
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        open_, close = self.form.OPEN, self.form.CLOSE
        while self.buffer:
            start = self.buffer.find(open_)
            if start < 0:
                keep = _partial_suffix(self.buffer, open_)
                content.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            content.append(self.buffer[:start])
            end = self.buffer.find(close, start + len(open_))
            if end < 0:
                self.buffer = self.buffer[start:]
                break
            block = self.buffer[start : end + len(close)]
            call = self.form.call(block[len(open_) : -len(close)].strip(), self.names)
            if call is None:
                content.append(block)
                self.malformed += 1
            else:
                calls.append(call)
            self.buffer = self.buffer[end + len(close) :]
        self.calls += len(calls)
        return "".join(content), calls

    def finish(self) -> str:
        """The text still held (an unterminated call, or a partial opening)."""
        rest, self.buffer = self.buffer, ""
        if rest.startswith(self.form.OPEN):
            self.malformed += 1
        return rest


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (it may open one)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
