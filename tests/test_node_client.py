"""Any language can drive Headway from the .proto files alone: a Node.js client
(`@grpc/grpc-js` + `@grpc/proto-loader`, clients/node/e2e.js) forks a model, samples it
with token ids and logprobs, trains a Step on what it sampled and samples the new head,
all through a gateway."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from headway.v1 import model_pb2
from tests.stack import GatewayNode

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "node"


@pytest.fixture
def node() -> str:
    """`node`, or a skip saying why the test cannot run (before any server starts)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: the Node.js client test needs Node.js (>= 18)")
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("clients/node/node_modules is missing: run make install")
    return node


def test_node_client_fork_sample_step_sample(node: str, sampling_stack) -> None:
    stack = sampling_stack
    gateway = GatewayNode(stack.config.store, stack.prefix, stack.server.address, http=False)
    try:
        done = subprocess.run(
            [node, str(CLIENT / "e2e.js"), gateway.server.address, "tiny", "node-fork"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, f"e2e.js exited {done.returncode}:\n{done.stderr}"
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 1, done.stdout
        seen = json.loads(lines[0])

        assert seen["ok"] is True and seen["model"] == "node-fork" and seen["step"] == 1
        assert seen["first_checkpoint"] == seen["fork_checkpoint"]
        assert seen["second_checkpoint"] == seen["step_checkpoint"] != seen["first_checkpoint"]
        assert seen["first_logprobs"] == seen["first_tokens"]
        assert len(seen["first_tokens"]) == len(seen["second_tokens"]) == 2
        assert all(1 <= n <= 8 for n in seen["first_tokens"] + seen["second_tokens"])
        assert seen["trained_tokens"] == sum(seen["first_tokens"])

        # What node saw is what the service holds, read back from Python through the gateway.
        head = gateway.models.GetHead(model_pb2.GetHeadRequest(model="node-fork"))
        assert head.id == seen["step_checkpoint"] and head.step == 1 and head.is_head
        assert head.parent_id == seen["first_checkpoint"]
        assert head.stats.loss_fn == "importance_sampling" and head.stats.num_datums == 2
        assert head.stats.num_tokens == seen["trained_tokens"]
        model = gateway.models.GetModel(model_pb2.GetModelRequest(model="node-fork"))
        assert model.head_checkpoint == seen["step_checkpoint"] and model.head_step == 1
        assert model.source == "tiny" and model.lora.rank == 8
    finally:
        gateway.stop()
