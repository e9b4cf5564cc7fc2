"""The trainer runs all of its torch work on one thread (`trainer_svc.torch_thread`: why)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from headway.tensors import floats, to_tensor
from headway.v1 import model_pb2, training_pb2
from tests.helpers_training import adam, batch
from tests.stack import TrainerStack


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_every_torch_call_of_the_trainer_runs_on_its_one_torch_thread(tmp_path, tiny_base):
    seen: dict[str, set[str]] = {}

    def saw(kind: str) -> None:
        seen.setdefault(kind, set()).add(threading.current_thread().name)

    # Global hooks: each module built (a load), run forward or backward, each optimizer step.
    hooks = [
        torch.nn.modules.module.register_module_parameter_registration_hook(lambda *_: saw("load")),
        torch.nn.modules.module.register_module_forward_hook(lambda *_: saw("forward")),
        torch.nn.modules.module.register_module_full_backward_hook(lambda *_: saw("backward")),
        register_optimizer_step_pre_hook(lambda *_: saw("adamw")),
    ]
    stack = TrainerStack(tmp_path / "store", max_loaded_models=1)
    try:
        stack.add_base(tiny_base, "tiny")
        stack.fork("full", full=True)
        stack.fork("lora")
        # Two models through one slot: each call loads its model again.
        for _ in range(2):
            stack.train.Step(
                training_pb2.StepRequest(model="full", data=batch(1), loss_fn="ppo", adam=adam())
            )
            fwd = stack.train.ForwardCustom(
                training_pb2.ForwardCustomRequest(model="lora", data=batch(2))
            )
            weights = [to_tensor(np.ones_like(floats(d.logprobs, "lp"))) for d in fwd.data]
            stack.train.BackwardCustom(
                training_pb2.BackwardCustomRequest(
                    model="lora", forward_id=fwd.forward_id, weights=weights
                )
            )
            stack.train.OptimStep(training_pb2.OptimStepRequest(model="lora", adam=adam()))
        exported = stack.models.ExportCheckpoint(
            model_pb2.ExportCheckpointRequest(model="lora", format="hf")
        )
        assert sum(len(chunk.data) for chunk in exported) > 0
    finally:
        stack.stop()
        for hook in hooks:
            hook.remove()
    assert seen.keys() == {"load", "forward", "backward", "adamw"}, seen
    threads = set().union(*seen.values())
    assert len(threads) == 1 and threads.pop().startswith("trainer-torch"), seen
