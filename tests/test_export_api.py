"""`headway models export` through the gateway (issue 17 §4): ExportCheckpoint streams a
checkpoint as a PEFT adapter or a merged Hugging Face model, so a client machine needs no
access to the store (nor torch); the files are byte for byte those of an export from the
store itself. Bad requests are refused with their status and leave no files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from headway import FailedPrecondition, InvalidArgument, ModelClient, NotFound
from headway.cli import main
from headway.v1 import model_pb2, training_pb2
from tests.helpers_training import adam, batch


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_an_export_through_the_gateway_is_the_store_s_own(
    gateway_stack, tmp_path, monkeypatch, capsys, full
):
    stack = gateway_stack
    monkeypatch.setenv("HEADWAY_URL", stack.gateway.server.address)
    fork = model_pb2.ForkModelRequest(source="tiny", name="m")
    if full:
        fork.full = True
    stack.gateway.models.ForkModel(fork)
    step = stack.gateway.train.Step(
        training_pb2.StepRequest(
            model="m", data=batch(seed=3), loss_fn="cross_entropy", adam=adam()
        )
    ).optim_step.checkpoint
    stack.gateway.models.TagCheckpoint(
        model_pb2.TagCheckpointRequest(model="m", checkpoint=step, tag="trained")
    )
    formats = ["hf"] if full else ["peft", "hf"]
    store = str(stack.config.store)
    for fmt in formats:
        remote, local = tmp_path / f"remote-{fmt}", tmp_path / f"local-{fmt}"
        argv = ["models", "export", "m", "--format", fmt, "--checkpoint", "trained"]
        assert main([*argv, "-o", str(remote)]) == 0
        assert f"exported m@{step} ({fmt})" in capsys.readouterr().out
        assert main([*argv, "-o", str(local), "--store", store]) == 0
        got, want = _files(remote), _files(local)
        assert set(got) == set(want) and got == want, fmt
        expected = {"adapter_model.safetensors"} if fmt == "peft" else {"model.safetensors"}
        assert expected <= set(got) and not any(".part-" in name for name in got)


def test_bad_exports_are_refused_and_leave_nothing(gateway_stack, tmp_path):
    stack = gateway_stack
    tmp_path = tmp_path / "exports"
    tmp_path.mkdir()
    stack.gateway.models.ForkModel(
        model_pb2.ForkModelRequest(source="tiny", name="full", full=True)
    )
    stack.gateway.models.ForkModel(model_pb2.ForkModelRequest(source="tiny", name="lora"))

    async def main_() -> None:
        async with ModelClient(url=stack.gateway.server.address) as models:
            with pytest.raises(InvalidArgument, match="export format 'onnx'"):
                await models.export("lora", tmp_path / "a", "onnx")
            with pytest.raises(FailedPrecondition, match="not a LoRA model"):
                await models.export("full", tmp_path / "b", "peft")
            with pytest.raises(NotFound):
                await models.export("lora", tmp_path / "c", "peft", checkpoint="nosuch")
            with pytest.raises(NotFound):
                await models.export("nobody", tmp_path / "d", "hf")
            busy = tmp_path / "busy"
            busy.mkdir()
            (busy / "x").write_text("mine")
            with pytest.raises(InvalidArgument, match="not an empty directory"):
                await models.export("lora", busy, "peft")
            assert [p.name for p in busy.iterdir()] == ["x"]

    asyncio.run(main_())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
