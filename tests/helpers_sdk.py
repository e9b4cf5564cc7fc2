"""Helpers of the SDK tests (tests/test_sdk_*.py): forks through the gateway, sampled and
scored runs, checkpoint weights, and an interceptor that records (or loses) calls.

Clients point at the gateway's gRPC address (`url(stack)`), agents at its
OpenAI-compatible URL (`stack.gateway.http_url`). Models are forked with the raw stubs:
the SDK has no fork call of its own (that is the model CLI's job).
"""

from __future__ import annotations

import grpc
import torch

from headway import Run, SamplingClient, Turn
from headway.v1 import common_pb2, model_pb2
from tests.helpers_training import checkpoint_tensors

PROMPT = [5, 17, 33, 8, 41, 12]
# AdamW's first step moves each weight by about lr * sign(gradient) with the default eps,
# which would hide a gradient of the wrong size; an eps well above the gradients makes the
# update lr * g / (|g| + eps), proportional to the gradient, so weights compare gradients.
ADAM = {"learning_rate": 0.1, "eps": 1.0}


def fork(stack, name: str, source: str = "tiny") -> None:
    """Fork through the gateway. From "tiny": a fresh rank-4 adapter; from a LoRA model:
    that model's adapter at its head (same weights, fresh optimizer state)."""
    request = model_pb2.ForkModelRequest(source=source, name=name)
    if source == "tiny":
        request.lora.CopyFrom(common_pb2.LoraConfig(rank=4, alpha=8))
    stack.gateway.models.ForkModel(request)


def url(stack) -> str:
    return stack.gateway.server.address


async def sampled_runs(stack, model: str, rewards: list[float], seed: int = 0) -> list[Run]:
    """One group of runs of PROMPT sampled from `model`, scored with `rewards`."""
    sampler = SamplingClient(model, url=url(stack))
    result = await sampler.sample(
        PROMPT, n=len(rewards), max_tokens=8, seed=seed, stop_token_ids=[], ignore_eos=True
    )
    await sampler.close()
    return [
        Run(
            turns=[Turn(result.prompt_tokens, s.tokens, s.logprobs, result.checkpoint)],
            reward=r,
        )
        for s, r in zip(result.sequences, rewards, strict=True)
    ]


def weights_of(stack, sampler_path: str) -> dict[str, torch.Tensor]:
    return checkpoint_tensors(stack.trainer.store.root, sampler_path)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b) and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class Recorder(grpc.aio.UnaryUnaryClientInterceptor):
    """Records the request id of every attempt of `method`; optionally loses the first
    reply after the server applied the call (as a dropped connection would)."""

    def __init__(self, method: str, lose_first_reply: bool = False) -> None:
        self.method, self.lose_first_reply = method, lose_first_reply
        self.request_ids: list[str] = []
        self.calls = 0

    async def intercept_unary_unary(self, continuation, details, request):
        self.calls += 1
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        call = await continuation(details, request)
        if not method.endswith("/" + self.method):
            return call
        self.request_ids.append(request.request_id)
        reply = await call
        if self.lose_first_reply and len(self.request_ids) == 1:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="reply lost (injected)",
            )
        return reply
