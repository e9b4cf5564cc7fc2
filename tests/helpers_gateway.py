"""What the gateway tests share: a Sample of a fixed prompt, the status of a failed call, a
raw HTTP POST."""

from __future__ import annotations

import grpc
import pytest

from headway.tensors import to_tensor
from headway.v1 import common_pb2, sampling_pb2
from tests.stack import http_call

PROMPT = [5, 17, 33, 8, 41, 12]
I32 = common_pb2.DTYPE_INT32


def sample_req(model, checkpoint="", **params):
    """A SampleRequest of `PROMPT` for `model` (pinned to `checkpoint` if given)."""
    return sampling_pb2.SampleRequest(
        model=model,
        prompt_tokens=to_tensor(PROMPT, I32),
        checkpoint=checkpoint,
        params=common_pb2.SamplingParams(**params),
    )


def code_of(call) -> tuple[str, str]:
    """(status code name, details) of the gRPC error `call()` must raise."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code().name, err.value.details()


def post(
    url: str, body: bytes | list[bytes], headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    """A raw HTTP POST (a list body is sent chunked): (status, reply JSON)."""
    status, _, reply = http_call(url, body, headers)
    return status, reply
