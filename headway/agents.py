"""Agents: roll a model out through the gateway's OpenAI-compatible API and record `Run`s.

```python
agent = create_agent("arith-rl", completion_kwargs={"extra_body": {"return_token_ids": True}})
run = await agent.run("what is 12 plus 7?")
run.turns[0].completion_tokens, run.turns[0].completion_logprobs, run.trace_id
```

The agent is a plain chat loop over the official `openai` client (`AsyncOpenAI`), so
anything that speaks OpenAI can stand in for it. With `return_token_ids` in the completion
kwargs' `extra_body` (training rollouts), every turn records the exact prompt and
completion token ids, the per-token sampling logprobs and the checkpoint that produced it,
and the gateway records the same turns in a trace whose id the run keeps; later turns pass
that `trace_id` so that one episode is one trace. A later turn's prompt is then the
trajectory's tokens so far, exactly as sampled, followed by the tokenization of what the
chat template adds for the new messages (`gateway.continuation`): the tokens trained on
are the tokens sampled, and the trainer makes one sequence of the episode. Where the
template cannot be continued that way (it rewrites earlier turns), the gateway renders the
conversation anew and says so; the run lists those turns in `run.info["rerendered_turns"]`
(the trainer starts a new sequence at each: still correct data, see `Trajectory`).

A gateway that cannot serve for a while (503: no sampler replica up, e.g. while one
restarts; or not answering at all while it restarts) is retried with backoff for up to
`retry_timeout` seconds per turn, under the turn's Idempotency-Key; the `openai` client's
own retries (429 at capacity, 409, timeouts) happen within each attempt.

No torch, no grpc: `openai` is imported when the first agent is created.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from headway.channels import GATEWAY_HTTP_ADDRESS
from headway.client.settings import DEFAULT_RETRY_TIMEOUT, api_key_from_env, retry_delay
from headway.errors import HeadwayError, InvalidArgument, Unavailable, from_http
from headway.types import Run, Turn

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_HTTP_URL", "Agent", "Tool", "create_agent"]

DEFAULT_HTTP_URL = f"http://{GATEWAY_HTTP_ADDRESS}/v1"
# The first delay between attempts while the gateway is unavailable (503 or unreachable),
# in seconds; how long a turn is retried, and the backoff's growth, are the gRPC
# clients' (`headway.client.settings`).
RETRY_BACKOFF = 0.5

# A tool (the environment's side of a multi-turn episode): given the assistant's reply,
# the next message (its content, or a whole message dict), or None to end the episode.
Tool = Callable[[str], "str | Mapping[str, Any] | None | Awaitable[str | Mapping[str, Any] | None]"]


def _http_error(e: Exception) -> HeadwayError:
    """An `openai` error as the `HeadwayError` the gateway meant, with the server's text:
    the gRPC status name its error body carries (so HTTP and gRPC give the same error),
    else its HTTP status; no HTTP answer at all is Unavailable."""
    status = getattr(e, "status_code", None)
    body = getattr(e, "body", None)
    body = body if isinstance(body, dict) else {}
    message = body.get("message") or getattr(e, "message", None) or str(e)
    if status is None:  # no HTTP answer at all: connection refused, timeout
        return Unavailable(f"gateway HTTP API unreachable: {message}")
    response = getattr(e, "response", None)
    retry_ms = getattr(response, "headers", {}).get("retry-after-ms") if response else None
    return from_http(
        status,
        message,
        body.get("status") if isinstance(body.get("status"), str) else None,
        int(retry_ms) if retry_ms and retry_ms.isdigit() else None,
    )


def _extra(obj: Any, name: str) -> Any:
    """A non-OpenAI field of a response object (the gateway's additions), or None."""
    value = getattr(obj, name, None)
    if value is None:
        extra = getattr(obj, "model_extra", None) or {}
        value = extra.get(name)
    return value


class Agent:
    """A chat agent over one model, talking to the gateway's OpenAI-compatible endpoint.

    Build it with `create_agent`. `run()` plays one episode and returns a `Run`; runs are
    independent, so one agent can play many episodes concurrently.
    """

    def __init__(
        self,
        model: str,
        completion_kwargs: Mapping[str, Any] | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        system_prompt: str | None = None,
        max_retries: int | None = None,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        retry_backoff: float = RETRY_BACKOFF,
    ) -> None:
        self.model = model
        self.max_retries = max_retries
        self.retry_timeout = retry_timeout
        self.retry_backoff = retry_backoff
        self.completion_kwargs = dict(completion_kwargs or {})
        self.base_url = base_url or os.environ.get("HEADWAY_HTTP_URL") or DEFAULT_HTTP_URL
        # The openai client insists on a key; local mode (auth off) ignores it.
        self.api_key = api_key or api_key_from_env() or "local"
        self.system_prompt = system_prompt
        n = self.completion_kwargs.get("n")
        if n not in (None, 1):
            raise InvalidArgument(
                f"completion_kwargs n={n}: an agent run is one trajectory; run the task "
                "several times instead (Job.start(..., group=n))"
            )
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def records_tokens(self) -> bool:
        """True when turns carry token ids and logprobs (training rollouts)."""
        extra = self.completion_kwargs.get("extra_body") or {}
        return bool(extra.get("return_token_ids"))

    def _openai(self) -> Any:
        # httpx connection pools belong to the loop they were opened on: one client per loop.
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            from openai import AsyncOpenAI

            retries = {} if self.max_retries is None else {"max_retries": self.max_retries}
            self._client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, **retries)
            self._loop = loop
        return self._client

    def _messages(self, task: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if isinstance(task, str):
            messages = [{"role": "user", "content": task}]
        else:
            messages = [dict(m) for m in task]
            if not messages:
                raise InvalidArgument("the task's messages are empty: give at least one")
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    async def _complete(self, messages: list[dict[str, Any]], trace_id: str) -> Any:
        import openai

        kwargs = copy.deepcopy(self.completion_kwargs)
        if self.records_tokens:
            # The turn is recorded in a trace: one key per turn, reused by the openai
            # client's own retries, so a retried request never records the turn twice.
            headers = kwargs.get("extra_headers") or {}
            kwargs["extra_headers"] = {"Idempotency-Key": f"hw-{uuid.uuid4().hex}", **headers}
        if trace_id:
            # Append this turn to the episode's trace instead of starting a new one.
            kwargs["extra_body"] = {**(kwargs.get("extra_body") or {}), "trace_id": trace_id}
        give_up = time.monotonic() + self.retry_timeout
        attempt = 0
        while True:
            try:
                return await self._openai().chat.completions.create(
                    model=self.model, messages=messages, **kwargs
                )
            except openai.APIError as e:
                error = _http_error(e)
                left = give_up - time.monotonic()
                if not isinstance(error, Unavailable) or left <= 0:
                    raise error from e
            delay = retry_delay(attempt, self.retry_backoff)  # jittered, capped at 10 s
            log.info("gateway unavailable (%s): retrying in %.1f s", error.message, delay)
            await asyncio.sleep(min(delay, left))
            attempt += 1

    async def run(
        self,
        task: str | Sequence[Mapping[str, Any]],
        max_turns: int = 1,
        tool: Tool | None = None,
    ) -> Run:
        """Play one episode: `task` is the user prompt or a list of chat messages.

        Each turn asks the model for a reply. After a turn, `tool(reply_text)` (sync or
        async) gives the next message, as content for a "user" message or a whole message
        dict; None ends the episode, as does reaching `max_turns` (without a tool there is
        nothing to continue with, so one turn is played). The `Run` holds the messages,
        one `Turn` per reply when token ids are recorded, and the trace id; its reward is
        None until scored.
        """
        if max_turns < 1:
            raise InvalidArgument(f"max_turns is {max_turns}: it must be >= 1")
        messages = self._messages(task)
        run = Run(messages=messages, model=self.model)
        for turn_index in range(max_turns):
            response = await self._complete(messages, run.trace_id)
            choice = response.choices[0]
            text = choice.message.content or ""
            messages.append({"role": "assistant", "content": text})
            if self.records_tokens:
                run.turns.append(self._turn(response, choice))
                run.trace_id = _extra(choice, "trace_id") or _extra(response, "trace_id") or ""
                if _extra(response, "prompt_continued") is False:
                    # The gateway could not extend the trajectory token for token (see
                    # gateway.continuation): this turn's prompt was rendered anew, and
                    # the trainer starts a new sequence at it.
                    run.info.setdefault("rerendered_turns", []).append(turn_index)
            if tool is None or turn_index == max_turns - 1:
                break
            following = tool(text)
            if inspect.isawaitable(following):
                following = await following
            if following is None:
                break
            if isinstance(following, str):
                messages.append({"role": "user", "content": following})
            else:
                messages.append(dict(following))
        return run

    @staticmethod
    def _turn(response: Any, choice: Any) -> Turn:
        prompt = _extra(choice, "prompt_token_ids") or _extra(response, "prompt_token_ids")
        tokens = _extra(choice, "token_ids")
        if prompt is None or tokens is None:
            raise InvalidArgument(
                "the completion has no prompt_token_ids / token_ids although return_token_ids "
                "was requested: is base_url a Headway gateway?"
            )
        content = choice.logprobs.content if choice.logprobs is not None else None
        logprobs = [float(t.logprob) for t in content or []]
        if len(logprobs) != len(tokens):
            raise InvalidArgument(
                f"the completion has {len(tokens)} token ids but {len(logprobs)} logprobs"
            )
        return Turn(
            prompt_tokens=list(prompt),
            completion_tokens=list(tokens),
            completion_logprobs=logprobs,
            checkpoint=_extra(response, "checkpoint") or "",
        )

    async def close(self) -> None:
        """Close the HTTP client (a later run opens a new one)."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.close()
        self._client, self._loop = None, None


def create_agent(
    model: str,
    completion_kwargs: Mapping[str, Any] | None = None,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    system_prompt: str | None = None,
    max_retries: int | None = None,
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    retry_backoff: float = RETRY_BACKOFF,
) -> Agent:
    """An agent sampling `model` through the gateway's OpenAI-compatible endpoint.

    `completion_kwargs` go to every `chat.completions.create` call (max_tokens,
    temperature, ..., and `extra_body={"return_token_ids": True}` to record training
    rollouts). `base_url` defaults to `HEADWAY_HTTP_URL` (else http://127.0.0.1:8000/v1),
    `api_key` to `HEADWAY_API_KEY`. `system_prompt` is prepended to tasks that have none.
    `max_retries` is the openai client's (default 2: timeouts, 429 "at capacity" and 5xx
    are retried with a backoff; each turn's Idempotency-Key makes that safe). A gateway
    that stays unavailable (503, or unreachable) is retried on top of that, with backoff,
    for up to `retry_timeout` seconds per turn (a sampler or the gateway restarting),
    the first retry after about `retry_backoff` seconds, doubling up to 10 s.
    """
    return Agent(
        model,
        completion_kwargs,
        base_url=base_url,
        api_key=api_key,
        system_prompt=system_prompt,
        max_retries=max_retries,
        retry_timeout=retry_timeout,
        retry_backoff=retry_backoff,
    )
