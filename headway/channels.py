"""gRPC channel settings every client and service shares: the gateway's default address,
message limits and reconnects.

The SDK dials the gateway with them, the gateway dials the trainer and the samplers with
them, and servers accept what they allow (see `headway.server.grpc.SERVER_OPTIONS`).
No torch, no server code: part of what `pip install headway` brings.
"""

from __future__ import annotations

# Where a deployment's gateway listens when nothing else is said (`python -m gateway`,
# `headway serve`), hence where clients dial by default: gRPC, and the OpenAI-compatible HTTP.
GATEWAY_ADDRESS = "127.0.0.1:50051"
GATEWAY_HTTP_ADDRESS = "127.0.0.1:8000"

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # training batches and logprob tensors are large
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A restarted service is dialled again within 2 s (gRPC's default backoff grows to
    # 120 s, far too long for a trainer or replica that is back after a crash).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
