"""ModelService over gRPC: bases, forks (copy-on-write), the tree, heads, deletion, teams."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
import torch

from headway.modeling import load_model
from headway.store import META_FILE
from headway.v1 import model_pb2, training_pb2
from tests.helpers_training import adam, batch
from tests.stack import team_md


def _code(call) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code().name, err.value.details()


def test_add_base_references_the_directory_and_has_an_active_checkpoint(trainer_stack, tiny_base):
    stack = trainer_stack
    model = stack.models.GetModel(model_pb2.GetModelRequest(model="tiny"))
    assert model.is_base and not model.trainable and model.path == str(tiny_base)
    assert model.model_type == "qwen3" and model.vocab_size == 96 and model.max_context == 256
    assert model.head_checkpoint and model.eos_token_ids
    head = stack.models.GetHead(model_pb2.GetHeadRequest(model="tiny"))
    assert head.step == 0 and head.is_head and head.sampler_path == ""
    # Referenced, not copied: no weights live in the store for a base.
    assert not list((stack.trainer.store.root).rglob("*.safetensors"))


def test_add_base_refuses_what_does_not_load(trainer_stack, tmp_path, tiny_base):
    stack = trainer_stack
    code, msg = _code(lambda: stack.add_base(tmp_path / "nowhere", "x"))
    assert code == "INVALID_ARGUMENT" and "not a directory" in msg
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(config))
    code, msg = _code(lambda: stack.add_base(broken, "x"))
    assert code == "INVALID_ARGUMENT" and "model_type 'gpt2' is not supported" in msg
    no_tok = tmp_path / "no-tok"
    shutil.copytree(tiny_base, no_tok)
    (no_tok / "tokenizer.json").unlink()
    code, msg = _code(lambda: stack.add_base(no_tok, "x"))
    assert code == "INVALID_ARGUMENT" and "tokenizer.json" in msg
    assert _code(lambda: stack.add_base(tiny_base, "tiny"))[0] == "ALREADY_EXISTS"
    assert _code(lambda: stack.add_base(tiny_base, "bad name!"))[0] == "INVALID_ARGUMENT"
    names = [m.slug for m in stack.models.ListModels(model_pb2.ListModelsRequest()).models]
    assert names == ["tiny"]


def test_lora_fork_root_is_a_peft_adapter_equal_to_the_base(trainer_stack, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stack = trainer_stack
    model = stack.fork("f", rank=8)
    assert model.lora.rank == 8 and model.lora.alpha == 16 and model.source == "tiny"
    head = stack.models.GetHead(model_pb2.GetHeadRequest(model="f"))
    assert head.step == 0 and head.parent_id == "base" and head.state_path == ""
    adapter = stack.trainer.store.root / head.sampler_path
    hf = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    peft = PeftModel.from_pretrained(hf, adapter).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    base, _ = load_model(tiny_base)
    with torch.no_grad():
        assert (peft(ids).logits - base(ids)).abs().max() <= 1e-5


def test_full_fork_references_its_source_copy_on_write(trainer_stack):
    stack = trainer_stack
    stack.fork("full", full=True)
    ckpts = stack.trainer.store.model_dir("full") / "checkpoints"
    (root,) = list(ckpts.iterdir())
    assert [p.name for p in root.iterdir()] == [META_FILE], "a fork copied files"
    meta = json.loads((root / META_FILE).read_text())
    assert meta["ref"] == {"model": "tiny", "checkpoint": "base"}
    # Training it writes its own weights; the second fork of it references them.
    stack.train.Step(
        training_pb2.StepRequest(
            model="full", data=batch(seed=1), loss_fn="cross_entropy", adam=adam()
        )
    )
    child = stack.fork("child", source="full", full=True)
    head = stack.models.GetHead(model_pb2.GetHeadRequest(model="child"))
    parent = stack.models.GetHead(model_pb2.GetHeadRequest(model="full"))
    assert head.sampler_path == parent.sampler_path and child.source == "full"


def test_fork_of_a_lora_model_continues_its_adapter_or_merges_it(trainer_stack):
    stack = trainer_stack
    stack.fork("a", rank=4)
    stack.train.Step(
        training_pb2.StepRequest(
            model="a", data=batch(seed=2), loss_fn="cross_entropy", adam=adam(1e-2)
        )
    )
    a_head = stack.models.GetHead(model_pb2.GetHeadRequest(model="a"))
    same = stack.fork("same", source="a", rank=4)
    assert same.lora.rank == 4
    assert (
        stack.models.GetHead(model_pb2.GetHeadRequest(model="same")).sampler_path
        == a_head.sampler_path
    )
    merged = stack.fork("merged", source="a", full=True)
    assert merged.full
    # The full fork's weights are a's merged weights: same logprobs on the same data.
    data = batch(seed=3)
    lps = []
    for name in ("a", "merged"):
        r = stack.train.ForwardBackward(
            training_pb2.ForwardBackwardRequest(model=name, data=data, loss_fn="cross_entropy")
        )
        lps.append([torch.frombuffer(bytearray(t.data), dtype=torch.float32) for t in r.logprobs])
    for x, y in zip(*lps, strict=True):
        assert torch.allclose(x, y, atol=1e-5)


def test_a_full_fork_from_a_checkpoint_continues_its_optimizer_state(trainer_stack):
    """ForkModel(checkpoint=, with_optimizer=True) of a full model: the fork's root is that
    checkpoint (not the head), referenced with its optimizer state, and the fork's next
    step writes exactly the weights the source's next step from there writes."""
    from tests.helpers_training import checkpoint_tensors

    stack = trainer_stack
    stack.fork("src", full=True)

    def step(model: str, seed: int) -> training_pb2.StepResponse:
        request = training_pb2.StepRequest(
            model=model, data=batch(seed=seed), loss_fn="cross_entropy", adam=adam(1e-2)
        )
        return stack.train.Step(request)

    first = step("src", 1).optim_step
    step("src", 2)  # the head moves on: the fork must start from `first`, not the head
    fork = model_pb2.ForkModelRequest(
        source="src", name="resumed", full=True, checkpoint=first.checkpoint,
        with_optimizer=True,
    )  # fmt: skip
    stack.models.ForkModel(fork)
    root = stack.models.GetHead(model_pb2.GetHeadRequest(model="resumed"))
    assert root.sampler_path == first.sampler_path and root.state_path == first.state_path
    stack.models.SetHead(model_pb2.SetHeadRequest(model="src", checkpoint=first.checkpoint))
    store = stack.trainer.store.root
    want = checkpoint_tensors(store, step("src", 3).optim_step.sampler_path)
    got = checkpoint_tensors(store, step("resumed", 3).optim_step.sampler_path)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=name)


def test_list_checkpoints_is_the_tree_oldest_first_with_the_head_marked(trainer_stack):
    stack = trainer_stack
    stack.fork("m")
    ids = []
    for seed in range(3):
        r = stack.train.Step(
            training_pb2.StepRequest(
                model="m", data=batch(seed=seed), loss_fn="ppo", adam=adam(1e-3)
            )
        )
        ids.append(r.optim_step.checkpoint)
    tree = stack.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model="m"))
    assert [c.step for c in tree.checkpoints] == [0, 1, 2, 3]
    assert [c.id for c in tree.checkpoints][1:] == ids and tree.head == ids[-1]
    assert [c.is_head for c in tree.checkpoints] == [False, False, False, True]
    assert [c.parent_id for c in tree.checkpoints][1:] == [tree.checkpoints[0].id, *ids[:2]]
    stats = tree.checkpoints[1].stats
    assert stats.loss_fn == "ppo" and stats.num_datums == 3 and stats.learning_rate == 1e-3
    assert {"loss:sum", "ratio/mean", "clip/fraction", "kl/sampler_trainer"} <= set(stats.metrics)
    assert stats.reward_mean == pytest.approx(sum(d.datum.reward for d in batch(seed=0)) / 3)


def test_set_head_to_an_unknown_checkpoint_changes_nothing(trainer_stack):
    stack = trainer_stack
    stack.fork("m")
    before = stack.models.GetHead(model_pb2.GetHeadRequest(model="m"))
    code, msg = _code(
        lambda: stack.models.SetHead(model_pb2.SetHeadRequest(model="m", checkpoint="nope"))
    )
    assert code == "NOT_FOUND" and "nope" in msg
    code, _ = _code(
        lambda: stack.models.SetHead(model_pb2.SetHeadRequest(model="m", checkpoint="base"))
    )
    assert code == "NOT_FOUND"  # a checkpoint of another model (the base) is not this model's
    assert stack.models.GetHead(model_pb2.GetHeadRequest(model="m")) == before


def test_delete_is_refused_while_another_model_forks_from_it(trainer_stack):
    stack = trainer_stack
    stack.fork("parent")
    stack.fork("child", source="parent")
    code, msg = _code(
        lambda: stack.models.DeleteModel(model_pb2.DeleteModelRequest(model="parent"))
    )
    assert code == "FAILED_PRECONDITION" and "child" in msg
    code, _ = _code(lambda: stack.models.DeleteModel(model_pb2.DeleteModelRequest(model="tiny")))
    assert code == "FAILED_PRECONDITION"
    stack.models.DeleteModel(model_pb2.DeleteModelRequest(model="child"))
    stack.models.DeleteModel(model_pb2.DeleteModelRequest(model="parent"))
    names = [m.slug for m in stack.models.ListModels(model_pb2.ListModelsRequest()).models]
    assert names == ["tiny"]
    assert (
        _code(lambda: stack.models.GetModel(model_pb2.GetModelRequest(model="parent")))[0]
        == "NOT_FOUND"
    )


def test_another_teams_model_is_not_found_on_every_rpc(trainer_stack):
    stack = trainer_stack
    stack.fork("secret", team="red")
    blue = team_md("blue")
    calls = [
        lambda: stack.models.GetModel(model_pb2.GetModelRequest(model="secret"), metadata=blue),
        lambda: stack.models.GetHead(model_pb2.GetHeadRequest(model="secret"), metadata=blue),
        lambda: stack.models.ListCheckpoints(
            model_pb2.ListCheckpointsRequest(model="secret"), metadata=blue
        ),
        lambda: stack.models.SetHead(
            model_pb2.SetHeadRequest(model="secret", checkpoint="x"), metadata=blue
        ),
        lambda: stack.models.DeleteModel(
            model_pb2.DeleteModelRequest(model="secret"), metadata=blue
        ),
        lambda: stack.train.ForwardBackward(
            training_pb2.ForwardBackwardRequest(model="secret", data=batch(), loss_fn="ppo"),
            metadata=blue,
        ),
        lambda: stack.train.OptimStep(
            training_pb2.OptimStepRequest(model="secret", adam=adam()), metadata=blue
        ),
    ]
    for call in calls:
        code, msg = _code(call)
        assert code == "NOT_FOUND" and msg == "model 'secret' not found"
    visible = [
        m.slug for m in stack.models.ListModels(model_pb2.ListModelsRequest(), metadata=blue).models
    ]
    assert visible == ["tiny"]
    red = [
        m.slug
        for m in stack.models.ListModels(
            model_pb2.ListModelsRequest(), metadata=team_md("red")
        ).models
    ]
    assert red == ["tiny", "secret"]


def test_a_name_with_a_trailing_newline_is_refused(trainer_stack):
    """`$` in the slug pattern also matched before a final newline: "m\\n" made a model
    directory with a newline in its name."""
    stack = trainer_stack
    code, msg = _code(lambda: stack.fork("m\n"))
    assert code == "INVALID_ARGUMENT" and "is not valid" in msg
    names = [m.slug for m in stack.models.ListModels(model_pb2.ListModelsRequest()).models]
    assert names == ["tiny"]
    assert [p.name for p in stack.trainer.store.models_dir.iterdir()] == ["tiny"]


LORA_CASES = {
    "rank over what samplers serve": ({"rank": 65}, "over the trainer's limit of 64"),
    # The tiny base's k_proj maps 64 → 32: a rank above 32 adds nothing but parameters.
    "rank over a projection's width": (
        {"rank": 48},
        "min(in_features, out_features) = 32 of k_proj",
    ),
    "negative rank": ({"rank": -1}, "must be >= 1"),
    "NaN alpha": ({"rank": 4, "alpha": float("nan")}, "alpha is nan"),
    "infinite alpha": ({"rank": 4, "alpha": float("inf")}, "finite number > 0"),
    "negative alpha": ({"rank": 4, "alpha": -2.0}, "finite number > 0"),
    "unknown projection": ({"rank": 4, "target_modules": ["q_proj", "qkv"]}, "['qkv']"),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_settings_beyond_the_samplers_or_the_model_are_refused(trainer_stack, case):
    from headway.v1 import common_pb2

    fields, fragment = LORA_CASES[case]
    stack = trainer_stack
    request = model_pb2.ForkModelRequest(
        source="tiny", name="f", lora=common_pb2.LoraConfig(**fields)
    )
    code, msg = _code(lambda: stack.models.ForkModel(request))
    assert code == "INVALID_ARGUMENT" and fragment in msg, msg
    names = [m.slug for m in stack.models.ListModels(model_pb2.ListModelsRequest()).models]
    assert names == ["tiny"]


def test_lora_defaults_and_repeated_target_modules(trainer_stack):
    from headway.v1 import common_pb2

    stack = trainer_stack
    default = stack.models.ForkModel(
        model_pb2.ForkModelRequest(source="tiny", name="d", lora=common_pb2.LoraConfig())
    )
    assert default.lora.rank == 32 and default.lora.alpha == 32
    repeated = common_pb2.LoraConfig(rank=64 // 4, target_modules=["q_proj"] * 10_000)
    model = stack.models.ForkModel(
        model_pb2.ForkModelRequest(source="tiny", name="q", lora=repeated)
    )
    assert list(model.lora.target_modules) == ["q_proj"]
