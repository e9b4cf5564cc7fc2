"""The one validator of a `Turn` (see common.proto): what the gateway checks before it
records a turn in a trace and what the trainer checks before it trains on one.

A turn is prompt_tokens (non-empty, 1-D INT32/INT64 ids >= 0), completion_tokens (the same,
possibly empty or absent) and completion_logprobs (one finite float per completion token;
absent only when there are none). Errors are `InvalidArgument` naming the field's path,
e.g. "data[4].trajectory.turns[1].completion_logprobs has 3 values but ...".

numpy only: no torch, no grpc, so the gateway and the SDK can import it.
"""

from __future__ import annotations

import numpy as np

from headway.errors import InvalidArgument
from headway.tensors import floats, is_set, require_finite, tokens
from headway.v1 import common_pb2


def turn_arrays(
    turn: common_pb2.Turn, path: str = "turn"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate `turn` and decode it: (prompt int64[P], completion int64[C], logprobs
    float32[C]). `path` prefixes every error message."""
    if not is_set(turn, "prompt_tokens"):
        raise InvalidArgument(
            f"{path}.prompt_tokens is required: the token ids the model read before this turn"
        )
    prompt = tokens(turn.prompt_tokens, f"{path}.prompt_tokens")
    if len(prompt) == 0:
        raise InvalidArgument(
            f"{path}.prompt_tokens is empty: a turn's prompt needs at least one token"
        )
    # An absent completion is the allowed C = 0 (the turn trains nothing), and then there
    # are no logprobs to require either.
    completion = (
        tokens(turn.completion_tokens, f"{path}.completion_tokens")
        if is_set(turn, "completion_tokens")
        else np.zeros(0, dtype=np.int64)
    )
    if is_set(turn, "completion_logprobs"):
        logprobs = floats(turn.completion_logprobs, f"{path}.completion_logprobs", finite=False)
        if len(logprobs) != len(completion):
            raise InvalidArgument(
                f"{path}.completion_logprobs has {len(logprobs)} values but "
                f"{path}.completion_tokens has {len(completion)}: send one logprob per "
                "completion token"
            )
        require_finite(logprobs, f"{path}.completion_logprobs")
    elif len(completion):
        raise InvalidArgument(
            f"{path}.completion_logprobs is required: one logprob per completion token "
            f"({len(completion)} here), as returned by sampling"
        )
    else:
        logprobs = np.zeros(0, dtype=np.float32)
    return prompt, completion, logprobs
