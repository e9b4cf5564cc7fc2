"""Tool calling through the OpenAI-compatible API, with the official `openai` client, on a
model whose chat template is Qwen 2.5's tool-aware one: the model is first taught (a few
cross_entropy steps on the trainer) to answer the weather question with a call and the
tool's result with a sentence, then asked through the gateway. Calls come back parsed
(unary and streamed), the token ids are the sampled ones, a multi-turn exchange with the
tool's result continues token for token, tool_choice forces a call, a cut call stays text
and is counted on the trace, and bad tools are 400s that say what to fix."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest

from gateway.continuation import continue_trajectory, digest
from gateway.tool_calls import template_messages
from headway.modeling.tokenizer import Tokenizer
from headway.tensors import to_tensor
from headway.v1 import common_pb2, sampling_pb2, trace_pb2, training_pb2
from tests.helpers_gateway import post
from tests.helpers_tools import ANSWER, ASK, CALL, RESULT, TOOLS, make_tool_base
from tests.helpers_training import adam

CALLED = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
}  # fmt: skip
FOLLOW = [*ASK, CALLED, {"role": "tool", "tool_call_id": "call_1", "content": RESULT}]


def datum(prompt: list[int], reply: list[int]) -> common_pb2.TrainingItem:
    """Cross-entropy on `reply` after `prompt` (prompt positions weighted 0)."""
    seq = prompt + reply
    weights = np.r_[np.zeros(len(prompt) - 1), np.ones(len(reply))].astype(np.float32)
    return common_pb2.TrainingItem(
        datum=common_pb2.Datum(
            input_tokens=to_tensor(seq[:-1]),
            target_tokens=to_tensor(seq[1:]),
            weights=to_tensor(weights),
        )
    )


def greedy(stack, model: str, prompt: list[int], n: int) -> list[int]:
    request = sampling_pb2.SampleRequest(
        model=model,
        prompt_tokens=to_tensor(prompt, common_pb2.DTYPE_INT32),
        params=common_pb2.SamplingParams(max_tokens=n, temperature=0.0),
    )
    reply = stack.gateway.sampling.Sample(request)
    return np.frombuffer(reply.sequences[0].tokens.data, np.int32).tolist()


@pytest.fixture
def tool_stack(gateway_stack, tmp_path):
    """The gateway stack with "agent": a full fork of the Qwen 2.5-template base taught to
    call get_weather for the question and to answer the tool's result."""
    stack = gateway_stack
    path = make_tool_base(tmp_path / "qwen-tools")
    stack.add_base(path, "qwen-tools")
    stack.fork("agent", source="qwen-tools", full=True)
    tok = Tokenizer.from_dir(path)
    end = [tok.token_to_id("<|im_end|>")]
    ask, call = (
        tok.apply_chat_template(ASK, tools=TOOLS),
        tok.encode(CALL, add_special_tokens=False),
    )
    # The second prompt as the gateway makes it: the call's tokens as sampled, then the rest.
    asked = digest(tok.render_chat(ASK, tools=TOOLS))
    follow = continue_trajectory(
        tok, template_messages(FOLLOW), ask, call + end, {"tools": TOOLS}, "", asked
    )
    lessons = [
        (ask, call + end),
        (follow.prompt, tok.encode(ANSWER, add_special_tokens=False) + end),
    ]
    data = [datum(p, r) for p, r in lessons]
    learned = False
    for step in range(300):  # until both replies are the greedy ones (a few dozen steps)
        stack.train.Step(training_pb2.StepRequest(
            model="agent", data=data, loss_fn="cross_entropy", adam=adam(1e-2)))  # fmt: skip
        if step % 5 == 4 and all(greedy(stack, "agent", p, len(r)) == r for p, r in lessons):
            learned = True
            break
    assert learned, "the tiny model did not learn the two replies"
    stack.tok, stack.lessons = tok, lessons
    return stack


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway.http_url, api_key="local")


def test_a_tool_call_comes_back_parsed_and_token_exact_unary_and_streamed(tool_stack):
    stack = tool_stack
    c = client(stack).chat.completions.create(
        model="agent", messages=ASK, tools=TOOLS, temperature=0, max_tokens=32,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    choice = c.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id.startswith("call_")
    prompt, reply = stack.lessons[0]
    assert c.prompt_token_ids == prompt and choice.token_ids == reply  # the sampled ones
    # Streamed: the call arrives whole in a delta, then finish_reason tool_calls.
    calls, finish, content, trace_id = [], None, "", ""
    for chunk in client(stack).chat.completions.create(
        model="agent", messages=ASK, tools=TOOLS, temperature=0, max_tokens=32, stream=True,
        extra_body={"return_token_ids": True},
    ):  # fmt: skip
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
        trace_id = (chunk.choices[0].model_extra or {}).get("trace_id") or trace_id
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    assert calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    # The message rebuilt from the deltas continues the streamed turn token for token.
    message = {
        "role": "assistant",
        "content": content or None,
        "tool_calls": [
            {
                "id": calls[0].id,
                "type": "function",
                "function": {
                    "name": calls[0].function.name,
                    "arguments": calls[0].function.arguments,
                },
            }
        ],
    }
    follow = [*ASK, message, {"role": "tool", "tool_call_id": calls[0].id, "content": RESULT}]
    after = client(stack).chat.completions.create(
        model="agent", messages=follow, tools=TOOLS, temperature=0, max_tokens=32,
        extra_body={"return_token_ids": True, "trace_id": trace_id},
    )  # fmt: skip
    assert after.prompt_continued is True and after.choices[0].message.content == ANSWER


def test_a_multi_turn_exchange_with_the_tools_result_continues_token_for_token(tool_stack):
    stack = tool_stack
    api = client(stack)
    first = api.chat.completions.create(
        model="agent", messages=ASK, tools=TOOLS, temperature=0, max_tokens=32,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    message = first.choices[0].message
    call = message.tool_calls[0]
    conversation = [
        *ASK,
        message.model_dump(exclude_none=True),  # the assistant's turn as the client got it
        {"role": "tool", "tool_call_id": call.id, "content": RESULT},
    ]
    second = api.chat.completions.create(
        model="agent", messages=conversation, tools=TOOLS, temperature=0, max_tokens=32,
        extra_body={"return_token_ids": True, "trace_id": first.trace_id},
    )  # fmt: skip
    assert second.choices[0].message.content == ANSWER
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].finish_reason == "stop"
    so_far = first.prompt_token_ids + first.choices[0].token_ids
    assert second.prompt_continued is True
    assert second.prompt_token_ids[: len(so_far)] == so_far  # the sampled call, exactly
    # Re-rendering would give other tokens for the same text (this tokenizer merges across
    # the call's boundaries differently): the trajectory keeps the sampled ones.
    rendered = stack.tok.apply_chat_template(template_messages(FOLLOW), tools=TOOLS)
    assert stack.tok.decode(rendered) == stack.tok.decode(second.prompt_token_ids)
    assert rendered[: len(so_far)] != so_far
    trace = stack.gateway.traces.GetTrace(trace_pb2.GetTraceRequest(trace_id=first.trace_id))
    assert len(trace.turns) == 2


def test_tool_choice_forces_none_or_a_named_call_and_a_cut_call_stays_text(tool_stack):
    stack = tool_stack
    api = client(stack)
    # A named function: the reply is started with its call, so it calls it.
    named = api.chat.completions.create(
        model="agent", messages=ASK, tools=TOOLS, temperature=0, max_tokens=32,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    opening = '<tool_call>\n{"name": "get_time", "arguments":'
    assert stack.tok.decode(named.prompt_token_ids).endswith(opening)
    calls = named.choices[0].message.tool_calls or []
    assert all(c.function.name == "get_time" for c in calls)
    # none: the tools are shown, the reply is text (the call the model writes included).
    plain = api.chat.completions.create(
        model="agent", messages=ASK, tools=TOOLS, temperature=0, max_tokens=32,
        tool_choice="none",
    )  # fmt: skip
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].message.content == CALL and plain.choices[0].finish_reason == "stop"
    # Cut by max_tokens: no call, the text as written, the malformed call on the trace.
    cut = api.chat.completions.create(
        model="agent", messages=ASK, tools=TOOLS, temperature=0, max_tokens=4,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    assert cut.choices[0].message.tool_calls is None
    assert CALL.startswith(cut.choices[0].message.content)
    assert cut.choices[0].finish_reason == "length"
    trace = stack.gateway.traces.GetTrace(trace_pb2.GetTraceRequest(trace_id=cut.trace_id))
    assert trace.turns[0].malformed_tool_calls == 1


BAD_TOOLS = {
    "parameters not a JSON Schema": (
        {"tools": [{"type": "function",
                    "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
        "tools", "is not a JSON Schema",
    ),
    "parameters not an object": (
        {"tools": [{"type": "function",
                    "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools", "must describe an object",
    ),
    "a tool without a name": (
        {"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools", "name must be",
    ),
    "tool_choice naming no tool": (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice", "'nope', which is not among the tools",
    ),
    "tool_choice without tools": ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    "tool_choice of another kind": (
        {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be auto, none",
    ),
    "tool_calls that are not a list": (
        {"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": "x"}]},
        "messages", "tool_calls must be a list",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_TOOLS))
def test_bad_tools_are_400_naming_the_parameter(tool_stack, case):
    extra, param, fragment = BAD_TOOLS[case]
    body = {"model": "agent", "messages": ASK, "max_tokens": 2, **extra}
    status, reply = post(
        f"{tool_stack.gateway.http_url}/chat/completions", json.dumps(body).encode()
    )
    assert status == 400, reply
    assert reply["error"]["param"] == param and fragment in reply["error"]["message"], reply


def test_tools_for_a_template_without_a_call_format_are_refused(gateway_stack):
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 2}
    status, reply = post(
        f"{gateway_stack.gateway.http_url}/chat/completions", json.dumps(body).encode()
    )
    assert status == 400 and "no tool-call format" in reply["error"]["message"], reply
