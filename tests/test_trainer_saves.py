"""Checkpoint saves in every durability mode (`TrainerConfig.sync_saves`, and the
optimizer state deferred to the background: `defer_state_bytes`): a trainer restarted on
the store continues exactly as one that never stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from headway.v1 import training_pb2
from tests.helpers_training import adam, batch, checkpoint_tensors
from tests.stack import TrainerStack


def _train(stack: TrainerStack, model: str, seeds: list[int]) -> training_pb2.OptimStepResponse:
    reply = None
    for seed in seeds:
        request = training_pb2.StepRequest(
            model=model, data=batch(seed=seed), loss_fn="ppo", adam=adam(1e-2)
        )
        reply = stack.train.Step(request).optim_step
    assert reply is not None
    return reply


def _files(store: Path, reply: training_pb2.OptimStepResponse) -> dict[str, torch.Tensor]:
    out = dict(checkpoint_tensors(store, reply.sampler_path))
    out.update({f"opt.{k}": v for k, v in load_file(str(store / reply.state_path)).items()})
    return out


MODES = {
    "async": {},  # tiny states: written with the weights, fsynced in the background
    "deferred": {"defer_state_bytes": 0},  # every optimizer state written after the reply
    "sync": {"sync_saves": True},
    # every weights file written over a spare allocated ahead (headway.store.pages)
    "spare": {"defer_state_bytes": 0, "spare_min_bytes": 0, "direct_state_bytes": 0},
    # every optimizer state written around the page cache (tensorfile.write_plan_direct)
    "direct": {"defer_state_bytes": 0, "direct_state_bytes": 1},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_a_restarted_trainer_continues_bit_for_bit(tmp_path, tiny_base, full, mode):
    store = tmp_path / "store"
    stack = TrainerStack(store, **MODES[mode])
    try:
        stack.add_base(tiny_base, "tiny")
        stack.fork("m", full=full)
        stack.fork("kept", source="m", full=full)  # the same starting weights
        kept = _train(stack, "kept", [3, 4, 5])  # never leaves memory
        _train(stack, "m", [3, 4])
        # Each model tries its writes over a spare and as new files (SpareChoice): after
        # m's second step its third writes each of its files over one, made ahead.
        store_ = stack.trainer.store
        names = ["adapter_model.safetensors" if not full else "weights.safetensors"]
        names.append("optimizer.safetensors")
        store_.wait_deferred("m", store_.head("m"))  # the write that has them made
        made = {n: store_.take_spare("m", n, wait=True) for n in names}
        assert all(made.values()) == (mode == "spare"), made
        assert all(p is None or p.stat().st_size > 0 for p in made.values())
    finally:
        stack.stop()  # drains the background fsyncs
    # A checkpoint with files written over spares is marked durable once fsynced (then
    # recovery no longer looks for holes in them).
    for meta in store.glob("models/*/checkpoints/*/meta.json"):
        if json.loads(meta.read_text()).get("sized_first"):
            assert (meta.parent / ".durable").exists(), meta
    stack = TrainerStack(store, **MODES[mode])  # restores m from its head on disk
    try:
        restored = _train(stack, "m", [5])
    finally:
        stack.stop()
    a, b = _files(store, kept), _files(store, restored)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the restored model diverged"


def test_the_kept_weights_layout_follows_the_parameters(tmp_path):
    """The weights file is laid out over the parameters' memory once and kept (AdamW
    changes them in place); a parameter given new memory (a reload) makes it again: every
    write holds the values the parameters have then."""
    from types import SimpleNamespace

    from headway.modeling import ModelConfig, Transformer
    from headway.modeling.load import hf_state_dict
    from headway.store.tensorfile import write_plan
    from tests.stack import TINY_DIMS
    from trainer_svc.state import weights_plan

    module = Transformer(ModelConfig(**TINY_DIMS, model_type="qwen3", qk_norm=True))
    module.init_weights(seed=0)
    params = dict(module.named_parameters())
    state = SimpleNamespace(
        record=SimpleNamespace(lora=None),
        module=module,
        params=params,
        saved_layout=None,
        on_cpu=True,
    )

    def written(name: str) -> dict[str, torch.Tensor]:
        write_plan(tmp_path / name, weights_plan(state))
        return load_file(str(tmp_path / name))

    def assert_holds_the_parameters(tensors: dict[str, torch.Tensor]) -> None:
        want = hf_state_dict(module)
        assert tensors.keys() == want.keys()
        assert all(torch.equal(tensors[k], want[k]) for k in want)

    first = weights_plan(state)
    assert weights_plan(state) is first  # kept
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)  # in place, as AdamW
    assert_holds_the_parameters(written("a.safetensors"))
    assert weights_plan(state) is first
    moved = next(iter(params.values()))
    moved.data = moved.data.clone() * 3  # new memory
    assert_holds_the_parameters(written("b.safetensors"))
    assert weights_plan(state) is not first
