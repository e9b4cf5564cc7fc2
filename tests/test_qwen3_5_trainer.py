"""A Qwen3.5 base through the trainer: added (each layout), forked with LoRA and full, trained.

The trainer's gradients equal those of a reference model rebuilt from the store, the LoRA
fork adapts the linear-attention projections too, and an OptimStep writes a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from headway.v1 import model_pb2, training_pb2
from tests.conftest import train_tokenizer
from tests.helpers_training import adam, batch, reference_module
from tests.stack import TrainerStack
from tests.test_qwen3_5_model import build_multimodal, build_text
from tests.test_trainer_training import reference_loss, rel_err, trainer_grads


def qwen35_base(path: Path, layout: str) -> Path:
    """A Qwen3.5 directory made by transformers (`layout` text or multimodal) + tokenizer."""
    build = build_text if layout == "text" else build_multimodal
    build("gqa-k3-5layers", seed=11).save_pretrained(path)
    return train_tokenizer(path)


@pytest.fixture(params=["text", "multimodal"])
def stack(request: pytest.FixtureRequest, tmp_path: Path):
    stack = TrainerStack(tmp_path / "store")
    stack.add_base(qwen35_base(tmp_path / "base", request.param), "q35")
    yield stack
    stack.stop()


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_fork_trains_with_the_reference_gradients(stack, full):
    model = stack.models.GetModel(model_pb2.GetModelRequest(model="q35"))
    assert model.model_type.startswith("qwen3_5") and model.vocab_size == 96
    fork = stack.fork("m", source="q35", full=full)
    if not full:
        assert {"in_proj_qkv", "in_proj_z", "out_proj", "q_proj"} <= set(fork.lora.target_modules)
    data = batch(seed=4)
    reply = stack.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(model="m", data=data, loss_fn="cross_entropy")
    )
    module = reference_module(stack, "m")
    loss, _ = reference_loss(module, data, "cross_entropy", {})
    loss.backward()
    assert reply.metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=1e-5)
    grads = trainer_grads(stack, "m")
    ref = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref) and grads
    if not full:
        assert any(".linear_attn.in_proj_qkv.lora_A" in n for n in grads)
    for name in ref:
        assert rel_err(grads[name], ref[name]) < 1e-4, name
    step = stack.train.OptimStep(training_pb2.OptimStepRequest(model="m", adam=adam(1e-2)))
    assert step.step == 1 and step.checkpoint
    after = reference_module(stack, "m")
    with torch.no_grad():
        assert float(reference_loss(after, data, "cross_entropy", {})[0]) < float(loss)


def test_trained_lora_fork_exports_for_transformers_and_peft(stack, tmp_path):
    import argparse

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from headway.cli.local import export

    stack.fork("m", source="q35")
    stack.train.Step(
        training_pb2.StepRequest(
            model="m", data=batch(seed=5), loss_fn="cross_entropy", adam=adam(1e-2)
        )
    )
    trained = reference_module(stack, "m").eval()
    ids = torch.randint(0, 96, (2, 70), generator=torch.Generator().manual_seed(12))
    for fmt in ("hf", "peft"):
        out = tmp_path / fmt
        args = argparse.Namespace(
            store=stack.trainer.store.root, model="m", checkpoint="", output=out, format=fmt
        )
        assert export(args) == 0
        if fmt == "hf":
            exported = AutoModelForCausalLM.from_pretrained(out)
        else:  # the adapter on transformers' reading of the base directory (either layout)
            base = AutoModelForCausalLM.from_pretrained(stack.trainer.store.get_model("q35").path)
            exported = PeftModel.from_pretrained(base, out)
        with torch.no_grad():
            diff = (exported.eval()(ids, use_cache=False).logits - trained(ids)).abs().max()
        assert diff.item() <= 1e-4, fmt


def test_a_sampler_serves_a_trained_qwen35_fork_beside_a_dense_one(stack, tmp_path):
    """Either layout: the published head of a trained Qwen3.5 fork is preloaded by the
    replica and sampled greedily as full forwards of the trained model predict, and the same
    replica serves a dense fork."""
    from headway.tensors import to_tensor
    from headway.v1 import common_pb2, sampling_pb2
    from tests.helpers_training import greedy_reference
    from tests.stack import SamplerReplica, make_tiny_base, wait_until

    stack.add_base(make_tiny_base(tmp_path / "tiny-base"), "tiny")
    stack.fork("m", source="q35")
    stack.fork("dense", source="tiny")
    replica = SamplerReplica(stack.config.store, stack.prefix, max_seq_len=64)
    try:
        step = stack.train.Step(
            training_pb2.StepRequest(
                model="m", data=batch(seed=9), loss_fn="cross_entropy", adam=adam(5e-2)
            )
        ).optim_step
        wait_until(
            lambda: f"m/{step.checkpoint}" in replica.sampler.loaded_checkpoints(),
            what="the published Qwen3.5 head to load",
        )

        def request(model: str) -> sampling_pb2.SampleRequest:
            return sampling_pb2.SampleRequest(
                model=model,
                prompt_tokens=to_tensor([1, 2, 3], common_pb2.DTYPE_INT32),
                params=common_pb2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
            )

        reply = replica.stub.Sample(request("m"))
        assert reply.checkpoint == step.checkpoint
        got = np.frombuffer(reply.sequences[0].tokens.data, np.int32).tolist()
        assert got == greedy_reference(reference_module(stack, "m"), [1, 2, 3], 8)
        assert len(replica.stub.Sample(request("dense")).sequences) == 1
    finally:
        replica.stop()


def test_every_builtin_loss_and_a_custom_one_train_a_lora_fork(stack):

    from tests.test_trainer_training import LOSS_CONFIGS, custom_is_weights

    stack.fork("m", source="q35")
    data = batch(seed=6)
    module = reference_module(stack, "m")
    for loss_fn, cfg in sorted(LOSS_CONFIGS.items()):
        reply = stack.train.ForwardBackward(
            training_pb2.ForwardBackwardRequest(
                model="m", data=data, loss_fn=loss_fn, loss_fn_config=cfg
            )
        )
        with torch.no_grad():
            expected, _ = reference_loss(module, data, loss_fn, cfg)
        assert reply.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-5, abs=1e-5)
    stack.trainer._states["m"].reset_accumulation()
    stack.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(model="m", data=data, loss_fn="importance_sampling")
    )
    builtin = trainer_grads(stack, "m")
    stack.trainer._states["m"].reset_accumulation()
    # The same loss as a custom one: the client sends dloss/dlogp back.
    fwd = stack.train.ForwardCustom(training_pb2.ForwardCustomRequest(model="m", data=data))
    stack.train.BackwardCustom(
        training_pb2.BackwardCustomRequest(
            model="m", forward_id=fwd.forward_id, weights=custom_is_weights(fwd)
        )
    )
    custom = trainer_grads(stack, "m")
    assert set(custom) == set(builtin)
    for name in builtin:
        assert rel_err(custom[name], builtin[name]) <= 1e-6, name


def test_add_base_refuses_moe_and_malformed_qwen35_configs_naming_the_field(tmp_path):
    import json
    import shutil

    import grpc

    good = qwen35_base(tmp_path / "good", "multimodal")
    cases = {
        "moe": (lambda c: c.update(model_type="qwen3_5_moe"), "mixture-of-experts"),
        "layers": (
            lambda c: c["text_config"].update(layer_types=["full_attention"]),
            "text_config: layer_types must list one type per layer",
        ),
        "no-text": (lambda c: c.pop("text_config"), "needs a 'text_config'"),
    }
    stack = TrainerStack(tmp_path / "store")
    try:
        for name, (edit, message) in cases.items():
            bad = tmp_path / name
            shutil.copytree(good, bad)
            config = json.loads((bad / "config.json").read_text())
            edit(config)
            (bad / "config.json").write_text(json.dumps(config))
            with pytest.raises(grpc.RpcError) as err:
                stack.add_base(bad, name)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert message in err.value.details(), (name, err.value.details())
    finally:
        stack.stop()


def test_bf16_compute_trains_a_qwen35_fork_near_fp32(tmp_path):
    import numpy as np

    from trainer_svc.compute import ComputeMode
    from trainer_svc.precision import BF16, FP32

    stack = TrainerStack(tmp_path / "store", dtype="bf16")
    try:
        stack.add_base(qwen35_base(tmp_path / "base", "text"), "q35")
        stack.fork("m", source="q35")
        data, logprobs = batch(seed=8), {}
        for precision in (FP32, BF16):  # the same weights, the same batch
            stack.trainer.mode = ComputeMode(precision, stack.trainer.mode.kernels)
            reply = stack.train.ForwardBackward(
                training_pb2.ForwardBackwardRequest(model="m", data=data, loss_fn="cross_entropy")
            )
            logprobs[precision.name] = np.concatenate(
                [np.frombuffer(t.data, np.float32) for t in reply.logprobs]
            )
            stack.trainer._states["m"].reset_accumulation()
        diff = np.abs(logprobs["bf16"] - logprobs["fp32"])
        assert 0 < diff.max() < 0.1 and diff.mean() < 0.02  # bf16 did run, and close
    finally:
        stack.stop()
