"""A deployment with history, for the bad-input table: how a case is sent, and what must
not change when it is refused.

`World` is a secured deployment (tests/helpers_auth.py: auth on, the internal token, keys
of the teams red and blue and an admin) in which red's LoRA fork has trained two steps
on recorded traces, holds an accumulated gradient and a pending custom-loss forward, and
both teams have traces. `snapshot` reads everything a refused request must leave as it
was: every model's head and checkpoint tree, the fork's gradient, weights, accumulated
statistics and pending forwards, every trace, and every Redis key of the deployment.
Real servers, real Redis, real files throughout.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
import torch

from headway.server.auth import TEAM_HEADER, TOKEN_HEADER
from headway.v1 import common_pb2, model_pb2, trace_pb2, training_pb2
from tests.helpers_auth import SecuredStack, bearer
from tests.helpers_training import adam, batch
from tests.stack import REDIS_URL, http_call

WAIT = 120.0  # a deadline that only catches hangs: every call waits for its reply
FORK, BLUE_FORK = "red-m", "blue-m"
CHAT = {"messages": [{"role": "user", "content": "what is 2 plus 3?"}], "max_tokens": 3}


def forged_token() -> str:
    """A token of the right length that is not the deployment's."""
    return "forged-token-" + "x" * 32


@dataclass
class World:
    """The deployment and the names its cases refer to (see the module doc)."""

    stack: SecuredStack
    traces: list[str]  # red's traces with a reward
    unrewarded: str  # a red trace with no reward
    blue_trace: str
    forward_id: str  # red's pending ForwardCustom
    forward_lengths: list[int]  # its datums' lengths
    first_checkpoint: str  # red's fork's step-0 checkpoint (not its head)
    blue_checkpoint: str  # the head of blue's fork
    store: Path = field(init=False)

    def __post_init__(self) -> None:
        self.store = self.stack.store

    def metadata(self, who: str) -> list[tuple[str, str]]:
        """What a caller sends: a team's key ("red", "blue", "admin"), no key ("nobody"),
        an unknown key ("stranger"), or, straight to a backend, a claimed team without
        the internal token ("claims-red") or with a wrong one ("forged"), or a gateway's
        own metadata with the real token ("token-red")."""
        if who in self.stack.keys:
            return self.stack.md(who)
        claims = [(TEAM_HEADER, "red")]
        return {
            "nobody": [],
            "stranger": bearer("hw_" + "0" * 40),
            "claims-red": claims,
            "forged": [*claims, (TOKEN_HEADER, forged_token())],
            "token-red": [*claims, (TOKEN_HEADER, self.stack.token)],
        }[who]

    def channel(self, via: str) -> grpc.Channel:
        """The gateway's channel, or a backend's own ("trainer", "sampler")."""
        return {
            "gateway": self.stack.gateway.channel,
            "trainer": self.stack.trainer.channel,
            "sampler": self.stack.sampler.channel,
        }[via]

    @property
    def http_url(self) -> str:
        return self.stack.gateway.http_url.removesuffix("/v1")


# ------------------------------------------------------------------------- sending


def call_grpc(
    world: World, via: str, rpc: str, request: Any, who: str, streaming: bool = False
) -> Any:
    """Call `rpc` ("TrainingService.OptimStep") with a message or raw bytes; the reply
    (a list of chunks for a stream). Raises grpc.RpcError."""
    service, method = rpc.split(".")
    path = f"/headway.v1.{service}/{method}"
    serialize = lambda m: m if isinstance(m, bytes) else m.SerializeToString()  # noqa: E731
    channel = world.channel(via)
    md = world.metadata(who)
    if streaming:
        call = channel.unary_stream(path, request_serializer=serialize)
        return list(call(request, metadata=md, timeout=WAIT))
    call = channel.unary_unary(path, request_serializer=serialize)
    return call(request, metadata=md, timeout=WAIT)


def call_http(
    world: World,
    route: str,
    body: Any,
    who: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict]:
    """`route` ("POST /v1/chat/completions") with a body: raw bytes, None, or anything
    else encoded as JSON; (status, the reply's JSON, or {"raw": text} if it is not JSON)."""
    method, path = route.split(" ", 1)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    sent = {}
    if who != "nobody":
        key = world.stack.keys.get(who, "hw_" + "0" * 40)
        sent["Authorization"] = f"Bearer {key}"
    sent.update(headers or {})
    status, _, reply = http_call(world.http_url + path, data, sent, method)
    return status, reply


def chat(world: World, who: str, **extra: Any) -> dict:
    """A successful chat completion (setup only)."""
    status, reply = call_http(
        world, "POST /v1/chat/completions", {"model": FORK, **CHAT, **extra}, who
    )
    assert status == 200, reply
    return reply


# ------------------------------------------------------------------------- building


def build_world(root: Path) -> World:
    """The deployment of the module doc, its history made through the gateway."""
    stack = SecuredStack(root)
    try:
        return _history(stack)
    except BaseException:
        stack.stop()
        raise


def _history(stack: SecuredStack) -> World:
    gw = stack.gateway
    for who, name in (("red", FORK), ("blue", BLUE_FORK)):
        request = model_pb2.ForkModelRequest(source="tiny", name=name)
        request.lora.rank, request.lora.alpha = 4, 8
        gw.models.ForkModel(request, metadata=stack.md(who), timeout=WAIT)
    first = stack.trainer.trainer.store.head(FORK)
    world = World(stack, [], "", "", "", [], first, stack.trainer.trainer.store.head(BLUE_FORK))
    recorded = [chat(world, "red", return_token_ids=True, seed=i)["trace_id"] for i in range(4)]
    for i, trace in enumerate(recorded[:3]):
        reward = trace_pb2.SetRewardRequest(trace_id=trace, reward=float(i % 2))
        gw.traces.SetReward(reward, metadata=stack.md("red"), timeout=WAIT)
    world.traces, world.unrewarded = recorded[:3], recorded[3]
    status, reply = call_http(
        world,
        "POST /v1/chat/completions",
        {"model": BLUE_FORK, **CHAT, "return_token_ids": True},
        "blue",
    )
    assert status == 200, reply
    world.blue_trace = reply["trace_id"]
    # Two steps on the traces: the fork has a tree and a head that is not its root.
    for step in range(2):
        items = [common_pb2.TrainingItem(trace_id=t) for t in world.traces]
        request = training_pb2.StepRequest(
            model=FORK, data=[*items, *batch(seed=step)], loss_fn="importance_sampling"
        )
        request.adam.CopyFrom(adam())
        gw.train.Step(request, metadata=stack.md("red"), timeout=WAIT)
    # Work in progress that a refused call must not touch: a gradient and a forward.
    gw.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(
            model=FORK, data=batch(seed=7), loss_fn="importance_sampling"
        ),
        metadata=stack.md("red"),
        timeout=WAIT,
    )
    forward = gw.train.ForwardCustom(
        training_pb2.ForwardCustomRequest(model=FORK, data=batch(seed=8)),
        metadata=stack.md("red"),
        timeout=WAIT,
    )
    world.forward_id = forward.forward_id
    world.forward_lengths = [int(d.logprobs.shape[0]) for d in forward.data]
    return world


# ------------------------------------------------------------------------ snapshots


def snapshot(world: World) -> dict[str, Any]:
    """Everything a refused request must leave as it was (see the module doc)."""
    stack = world.stack
    store = stack.trainer.trainer.store
    models = {
        m.slug: (m.team, store.head(m.slug), [c.id for c in store.list_checkpoints(m.slug)])
        for m in store.list_models()
    }
    tree = stack.gateway.models.ListCheckpoints(
        model_pb2.ListCheckpointsRequest(model=FORK), metadata=stack.md("red"), timeout=WAIT
    )
    state = stack.trainer.trainer._states.get(FORK)
    assert state is not None, "the fork's training state was dropped"
    traces = {
        trace: stack.gateway.traces.GetTrace(
            trace_pb2.GetTraceRequest(trace_id=trace), metadata=stack.md(who), timeout=WAIT
        ).SerializeToString()
        for trace, who in [
            *((t, "red") for t in (*world.traces, world.unrewarded)),
            (world.blue_trace, "blue"),
        ]
    }
    return {
        "models (head, checkpoints)": models,
        "the fork's tree over gRPC": tree.SerializeToString(),
        "the fork's gradient": {
            n: p.grad.clone() for n, p in state.params.items() if p.grad is not None
        },
        "the fork's weights": {n: p.detach().clone() for n, p in state.params.items()},
        "the fork's accumulated statistics": dataclasses.asdict(state.acc),
        "the fork's pending forwards": sorted(state.forwards),
        "the traces": traces,
        "the Redis keys": redis_state(stack.trainer.prefix),
    }


def redis_state(prefix: str) -> dict[bytes, tuple[bytes, int]]:
    """Every key of the deployment with its serialized value and absolute expiry, except
    the replica registry (heartbeats rewrite it on their own)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        out = {}
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            if key.startswith(f"{prefix}replica".encode()):
                continue
            out[key] = (client.dump(key), client.pexpiretime(key))
        return out
    finally:
        client.close()


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The parts of two snapshots that differ, by name."""
    changed = []
    for what, old in before.items():
        new = after[what]
        if isinstance(old, dict) and old and isinstance(next(iter(old.values())), torch.Tensor):
            same = old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
        else:
            same = old == new
        if not same:
            changed.append(what)
    return changed
