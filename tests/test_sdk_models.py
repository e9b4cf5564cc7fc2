"""`ModelClient` (async and blocking) against the live stack: the catalogue, forks of
each kind, checkpoint trees, heads moved back and trained from, deletes, and the errors
of each (NotFound, AlreadyExists, InvalidArgument, another team's model not seen)."""

from __future__ import annotations

import asyncio

import pytest

from headway import (
    AlreadyExists,
    InvalidArgument,
    ModelClient,
    ModelInfo,
    NotFound,
    SyncModelClient,
    TrainingClient,
)
from tests.helpers_sdk import sampled_runs, url


def test_model_client_forks_lists_moves_heads_and_deletes(gateway_stack):
    stack = gateway_stack

    async def main() -> None:
        async with ModelClient(url=url(stack)) as models:
            base = await models.get("tiny")
            assert base.kind == "base" and base.slug == base.base == "tiny"
            lora = await models.fork("tiny", "a", lora_rank=4)
            full = await models.fork("tiny", "b", full=True)
            assert (lora.kind, lora.lora_rank, lora.source) == ("lora", 4, "tiny")
            assert (full.kind, full.lora_rank) == ("full", 0) and full.trainable
            listed = {m.slug: m for m in await models.list_models()}
            assert {"tiny", "a", "b"} <= set(listed) and isinstance(listed["a"], ModelInfo)
            # A step on "a", then back to its first node: the tree keeps both.
            trainer = TrainingClient("a", url=url(stack))
            runs = await sampled_runs(stack, "a", [1.0, 0.0])
            stepped = await trainer.step(runs, learning_rate=1e-3, group_size=2)
            await trainer.close()
            tree = await models.checkpoints("a")
            assert [c.step for c in tree] == [0, 1] and tree[-1].id == stepped.checkpoint
            assert (await models.head("a")).id == stepped.checkpoint
            back = await models.set_head("a", tree[0])
            assert back.id == tree[0].id and (await models.get("a")).head_checkpoint == tree[0].id
            # A fork of a fork, from a named checkpoint.
            child = await models.fork("a", "c", checkpoint=stepped.checkpoint)
            assert child.source == "a" and child.base == "tiny"
            # Errors, each changing nothing.
            with pytest.raises(AlreadyExists):
                await models.fork("tiny", "a", lora_rank=4)
            with pytest.raises(InvalidArgument, match="lora_rank or full"):
                await models.fork("tiny", "d", lora_rank=4, full=True)
            with pytest.raises(NotFound):
                await models.get("nope")
            with pytest.raises(NotFound):
                await models.set_head("a", "not-a-checkpoint")
            assert (await models.head("a")).id == tree[0].id
            await models.delete("c")
            with pytest.raises(NotFound):
                await models.get("c")

    asyncio.run(main())
    # The blocking twin: the same calls, no event loop of the caller's.
    with SyncModelClient(url=url(stack)) as models:
        assert {m.slug for m in models.list_models()} >= {"tiny", "a", "b"}
        assert models.head("b").step == 0
        models.delete("b")
        assert "b" not in {m.slug for m in models.list_models()}
