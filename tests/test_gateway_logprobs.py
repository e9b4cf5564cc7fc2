"""Logprobs users ask the OpenAI-compatible API for, through real services and clients:
`top_logprobs` on chat (unary and streamed), the legacy completions' `logprobs: k` with
`echo` (prompt logprobs), batched prompts, and lm-eval's own `local-completions` backend
scoring continuations. Each figure is checked against the sampler's gRPC reply or its
ComputeLogprobs: the same policy at temperature 1."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest

from headway.modeling.tokenizer import Tokenizer
from headway.tensors import to_tensor
from headway.v1 import common_pb2, sampling_pb2
from tests.helpers_gateway import post

PROMPT = [5, 17, 33, 8, 41, 12]
I32 = common_pb2.DTYPE_INT32


def grpc_sample(stack, prompt, **params):
    """The sampler's own reply (the gateway's gRPC) for `prompt`."""
    request = sampling_pb2.SampleRequest(
        model="tiny",
        prompt_tokens=to_tensor(prompt, I32),
        params=common_pb2.SamplingParams(**params),
        include_prompt_logprobs=True,
    )
    return stack.sampler.stub.Sample(request)


def scored(stack, prompt) -> list[float]:
    """ComputeLogprobs of `prompt`: log p(token i+1 | tokens ..i)."""
    reply = stack.sampler.stub.ComputeLogprobs(
        sampling_pb2.ComputeLogprobsRequest(model="tiny", sequences=[to_tensor(prompt, I32)])
    )
    return np.frombuffer(reply.logprobs[0].data, np.float32).tolist()


def tokenizer(stack) -> Tokenizer:
    return Tokenizer.from_dir(stack.gateway.gateway.store.get_model("tiny").path)


def test_chat_top_logprobs_are_the_samplers_unary_and_streamed(gateway_stack):
    stack = gateway_stack
    client = openai.OpenAI(base_url=stack.gateway.http_url, api_key="local")
    tok = tokenizer(stack)
    ask = dict(
        model="tiny",
        messages=[{"role": "user", "content": "what is 1 plus 2?"}],
        max_tokens=6,
        temperature=0.9,
        seed=7,
        logprobs=True,
        top_logprobs=3,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    c = client.chat.completions.create(**ask)
    choice = c.choices[0]
    want = grpc_sample(
        stack, c.prompt_token_ids, max_tokens=6, temperature=0.9, seed=7, ignore_eos=True,
        top_logprobs=3,
    ).sequences[0]  # fmt: skip
    ids = np.frombuffer(want.top_token_ids.data, np.int32).reshape(-1, 3)
    lps = np.frombuffer(want.top_logprobs.data, np.float32).reshape(-1, 3)
    assert choice.token_ids == np.frombuffer(want.tokens.data, np.int32).tolist()
    assert len(choice.logprobs.content) == len(choice.token_ids)
    for i, entry in enumerate(choice.logprobs.content):
        assert [t.token for t in entry.top_logprobs] == [tok.decode([t]) for t in ids[i]]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(lps[i].tolist(), abs=1e-6)
        assert entry.top_logprobs[0].bytes == list(entry.top_logprobs[0].token.encode())
    # Streamed: the same entries, delta by delta.
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **ask):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in choice.logprobs.content]


def test_legacy_completions_echo_scores_the_prompt_and_numbers_a_batch(gateway_stack):
    """`echo` + `logprobs: k` on /v1/completions (what evaluation harnesses send): the prompt
    comes back with its logprobs (null for the first token), each position's top-k plus the
    drawn token, text offsets; a list of prompts is answered as a batch, numbered in order."""
    stack = gateway_stack
    client = openai.OpenAI(base_url=stack.gateway.http_url, api_key="local")
    tok = tokenizer(stack)
    prompts = [PROMPT, [9, 3, 27, 14]]
    c = client.completions.create(
        model="tiny", prompt=prompts, max_tokens=1, temperature=0, logprobs=2, echo=True
    )
    assert [ch.index for ch in c.choices] == [0, 1]
    assert c.usage.prompt_tokens == sum(map(len, prompts)) and c.usage.completion_tokens == 2
    for prompt, choice in zip(prompts, c.choices, strict=True):
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:-1] == pytest.approx(scored(stack, prompt), abs=1e-4)
        assert lp.tokens[: len(prompt)] == [tok.decode([t]) for t in prompt]
        assert choice.text.startswith(tok.decode(prompt))
        assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
        for t, top in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True):
            assert 1 <= len(top) <= 3 and t in top  # the top 2 and the drawn token
        # Greedy: the drawn token is the most likely one (lm-eval's is_greedy test).
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())
    # max_tokens 0 with echo: the prompt's scores alone, nothing drawn.
    c0 = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, logprobs=0, echo=True)
    only = c0.choices[0]
    assert only.text == tok.decode(PROMPT) and only.finish_reason == "length"
    assert len(only.logprobs.token_logprobs) == len(PROMPT) and c0.usage.completion_tokens == 0
    # Without echo: the completion's tokens alone, the same shape.
    plain = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=4, logprobs=1, seed=2, temperature=1.0
    )
    assert len(plain.choices[0].logprobs.token_logprobs) == 4
    assert plain.choices[0].logprobs.text_offset[0] == 0


def test_lm_eval_local_completions_scores_continuations(gateway_stack):
    """lm-eval's own `local-completions` backend (its request and its parsing) against the
    gateway: each continuation's loglikelihood is the sum of the sampler's logprobs of its
    tokens, and is_greedy holds exactly for the greedy continuation."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    stack = gateway_stack
    tok = tokenizer(stack)
    path = stack.gateway.gateway.store.get_model("tiny").path
    lm = LocalCompletionsAPI(
        base_url=f"{stack.gateway.http_url}/completions",
        model="tiny",
        tokenizer_backend="huggingface",
        tokenizer=str(path),
        num_concurrent=1,
        max_retries=1,
    )
    context = tok.decode(PROMPT)
    greedy = grpc_sample(stack, PROMPT, max_tokens=1, temperature=0).sequences[0]
    best = np.frombuffer(greedy.tokens.data, np.int32).tolist()
    other = [(best[0] + 1) % 50 + 3]
    requests = [
        Instance("loglikelihood", {}, (context, tok.decode(cont)), idx=i)
        for i, cont in enumerate([best, other])
    ]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    for (ll, is_greedy), cont, greedy_expected in zip(
        results, [best, other], [True, False], strict=True
    ):
        ids = lm.tok_encode(context + tok.decode(cont))
        want = scored(stack, ids)[-len(cont) :]
        assert ll == pytest.approx(sum(want), abs=1e-4)
        assert is_greedy is greedy_expected


BAD = {
    "chat top_logprobs over 20": (
        "chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs",
        "top_logprobs must be between 0 and 20",
    ),
    "chat top_logprobs without logprobs": (
        "chat/completions", {"top_logprobs": 2}, "top_logprobs", "needs logprobs: true",
    ),
    "chat echo": ("chat/completions", {"echo": True}, "echo", "a /v1/completions parameter"),
    "completions logprobs over 20": (
        "completions", {"logprobs": 21}, "logprobs", "logprobs must be between 0 and 20",
    ),
    "completions echo with stream": (
        "completions", {"echo": True, "stream": True}, "echo", "without streaming",
    ),
    "completions stream of two prompts": (
        "completions", {"stream": True, "prompt": [[5, 6], [7, 8]]}, "prompt",
        "a stream takes one prompt",
    ),
    "completions max_tokens 0 without echo": (
        "completions", {"max_tokens": 0}, "max_tokens", "max_tokens must be between 1",
    ),
    "completions batch with a token outside the vocabulary": (
        "completions", {"prompt": [[5, 6], [7, 10**6]]}, "prompt",
        "prompt[1][1] is token id 1000000, outside the vocabulary",
    ),
    "completions batch with a prompt over the context": (
        "completions", {"prompt": [[5, 6], [7] * 300]}, "prompt",
        "prompt[1] (300 tokens) + max_tokens (2) is over the context",
    ),
    "completions batch recording traces": (
        "completions", {"prompt": [[5, 6], [7, 8]], "return_token_ids": True}, "prompt",
        "records one turn per request",
    ),
    "completions prompt list of junk": (
        "completions", {"prompt": [[5, 6], 7]}, "prompt", "a list of several of either",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_logprob_requests_are_400_naming_the_parameter(gateway_stack, case):
    route, extra, param, fragment = BAD[case]
    body = {"model": "tiny", "max_tokens": 2}
    if route == "chat/completions":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = PROMPT
    body.update(extra)
    status, reply = post(f"{gateway_stack.gateway.http_url}/{route}", json.dumps(body).encode())
    assert status == 400, reply
    assert reply["error"]["param"] == param and fragment in reply["error"]["message"], reply
