"""Checkpoint tags (issue 17 §4): a name for a checkpoint, accepted wherever a checkpoint
id is (SetHead, ForkModel's checkpoint, a KL reference, a Sample's pin), listed on its
checkpoint; a tag that exists, a bad name, an unknown checkpoint or a base are refused and
change nothing; another team's model is not seen. Through the trainer, the SDK and the
CLI."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from headway import AlreadyExists, ModelClient, NotFound, SamplingClient
from headway.cli import main
from headway.v1 import model_pb2, training_pb2
from tests.helpers_training import batch, train_steps
from tests.stack import team_md


def _tag(stack, model: str, checkpoint: str, name: str, remove: bool = False, team: str = ""):
    return stack.models.TagCheckpoint(
        model_pb2.TagCheckpointRequest(model=model, checkpoint=checkpoint, tag=name, remove=remove),
        metadata=team_md(team),
    )


def _tags(stack, model: str) -> dict[str, list[str]]:
    listed = stack.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model=model))
    return {c.id: list(c.tags) for c in listed.checkpoints}


def test_a_tag_names_a_checkpoint_wherever_an_id_is_taken(trainer_stack):
    stack = trainer_stack
    stack.fork("m")
    root = stack.trainer.store.root_checkpoint("m").id
    first, second = train_steps(stack, "m", 2)
    assert _tag(stack, "m", first, "warm").id == first
    assert _tag(stack, "m", "warm", "also-warm").id == first  # a tag of a tag: its node
    assert _tag(stack, "m", root, "start.v1").id == root
    assert _tags(stack, "m") == {root: ["start.v1"], first: ["also-warm", "warm"], second: []}
    head = stack.models.GetHead(model_pb2.GetHeadRequest(model="m"))
    assert head.id == second and list(head.tags) == []
    # SetHead by tag.
    moved = stack.models.SetHead(model_pb2.SetHeadRequest(model="m", checkpoint="warm"))
    assert moved.id == first and moved.is_head and list(moved.tags) == ["also-warm", "warm"]
    # A fork from a tag starts at its node.
    fork = stack.models.ForkModel(
        model_pb2.ForkModelRequest(source="m", name="f", checkpoint="warm")
    )
    assert stack.trainer.store.root_checkpoint(fork.slug).parent_id == first
    # A KL reference by tag: its policy is the head's own, so the divergence is 0.
    reply = stack.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(
            model="m",
            data=batch(seed=9),
            loss_fn="cross_entropy",
            kl_penalty=training_pb2.KlPenalty(coef=0.1, reference="warm"),
        )
    )
    assert reply.metrics["kl/reference"] == pytest.approx(0.0, abs=1e-6)
    # Removed: the name is free again, and no longer resolves.
    assert _tag(stack, "m", "", "warm", remove=True).id == first
    with pytest.raises(grpc.RpcError) as err:
        stack.models.SetHead(model_pb2.SetHeadRequest(model="m", checkpoint="warm"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert _tag(stack, "m", second, "warm").id == second


def test_bad_tags_are_refused_and_change_nothing(trainer_stack):
    stack = trainer_stack
    stack.fork("m")
    stack.fork("theirs", team="other")
    (first,) = train_steps(stack, "m", 1)
    _tag(stack, "m", first, "best")
    before = _tags(stack, "m")
    cases = [
        (("m", first, "best"), grpc.StatusCode.ALREADY_EXISTS, "already names checkpoint"),
        (("m", first, "s000001-beef"), grpc.StatusCode.INVALID_ARGUMENT, "not a tag name"),
        (("m", first, "9lives"), grpc.StatusCode.INVALID_ARGUMENT, "not a tag name"),
        (("m", first, "x" * 65), grpc.StatusCode.INVALID_ARGUMENT, "not a tag name"),
        (("m", first, "a/b"), grpc.StatusCode.INVALID_ARGUMENT, "not a tag name"),
        (("m", first, ""), grpc.StatusCode.INVALID_ARGUMENT, "tag is empty"),
        (("m", "", "new"), grpc.StatusCode.INVALID_ARGUMENT, "checkpoint is empty"),
        (("m", "s000009-00000000", "new"), grpc.StatusCode.NOT_FOUND, "not found"),
        (("m", "nosuchtag", "new"), grpc.StatusCode.NOT_FOUND, "not found"),
        (
            ("tiny", stack.trainer.store.head("tiny"), "new"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "",
        ),
        (("theirs", stack.trainer.store.head("theirs"), "new"), grpc.StatusCode.NOT_FOUND, ""),
    ]
    for (model, ckpt, name), code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            _tag(stack, model, ckpt, name)
        assert err.value.code() == code, (model, ckpt, name, err.value.details())
        assert words in err.value.details(), err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _tag(stack, "m", "", "nosuch", remove=True)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert _tags(stack, "m") == before
    assert stack.trainer.store.tags("theirs") == {}


def test_tags_from_the_sdk_and_the_cli(gateway_stack, monkeypatch, capsys):
    stack = gateway_stack
    monkeypatch.setenv("HEADWAY_URL", stack.gateway.server.address)

    async def sdk() -> str:
        async with ModelClient(url=stack.gateway.server.address) as models:
            await models.fork("tiny", "m", lora_rank=4)
            root = (await models.head("m")).id
            tagged = await models.tag("m", root, "start")
            assert tagged.id == root and tagged.tags == ["start"]
            with pytest.raises(AlreadyExists, match="already names checkpoint"):
                await models.tag("m", root, "start")
            # A Sample pinned by tag is served by (and names) the tagged checkpoint.
            async with SamplingClient("m", url=stack.gateway.server.address) as sampler:
                result = await sampler.sample([1, 2, 3], max_tokens=2, checkpoint="start")
            assert result.checkpoint == root
            assert (await models.untag("m", "start")).id == root
            with pytest.raises(NotFound):
                await models.untag("m", "start")
            return root

    root = asyncio.run(sdk())
    assert main(["models", "tag", "m", root, "base-line"]) == 0
    assert "tagged m" in capsys.readouterr().out
    assert main(["models", "checkpoints", "m"]) == 0
    assert f"{root}  [base-line]" in capsys.readouterr().out
    assert main(["models", "head", "m", "--set", "base-line"]) == 0
    assert root in capsys.readouterr().out
    assert main(["models", "tag", "m", "base-line", "--delete"]) == 0
    assert "removed tag base-line" in capsys.readouterr().out
    assert main(["models", "tag", "m", "--delete", "base-line"]) != 0
    assert "no tag 'base-line'" in capsys.readouterr().err
