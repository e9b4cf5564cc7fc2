"""`--device`: the names accepted, refusals before anything loads, and the invariants on
each device (prefill + decode = full forward, sampler logprobs = trainer logprobs, through
the engine, the services and the gateway).

Every test that takes `device` runs on the CPU here; its `cuda` twin is marked `gpu` and
skips, saying why, where torch sees no CUDA device (`make gpu-check` runs them on a GPU).
"""

from __future__ import annotations

import io
import sys
from importlib import import_module
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from headway.channels import CHANNEL_OPTIONS
from headway.modeling import load_model, token_logprobs
from headway.modeling.devices import default_dtype, device_name, resolve_dtype
from headway.modeling.placement import host_lists, settle, to_device, to_host
from headway.tensors import to_tensor
from headway.v1 import (
    common_pb2,
    model_pb2,
    model_pb2_grpc,
    sampling_pb2,
    sampling_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from tests.helpers_training import adam, batch
from tests.stack import SamplerReplica, TrainerStack, make_tiny_base

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PROMPT = [5, 17, 33, 8, 41, 12]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


# ---------------------------------------------------------------- names and refusals
@pytest.mark.parametrize(
    ("name", "canonical"),
    [("", ""), ("cpu", "cpu"), ("CPU", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda:0"),
     (" cuda:01 ", "cuda:1")],
)  # fmt: skip
def test_device_names_have_one_spelling(name: str, canonical: str) -> None:
    assert device_name(name) == canonical


@pytest.mark.parametrize("name", ["gpu", "mps", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "cuda0"])
def test_a_bad_device_name_is_refused_naming_what_is_accepted(name: str) -> None:
    with pytest.raises(ValueError, match=rf"device must be cpu, cuda or cuda:N .*; got {name!r}"):
        device_name(name)


def test_the_default_dtype_follows_the_device() -> None:
    assert default_dtype("cpu") == "fp32" and default_dtype("cuda:1") == "bf16"
    assert resolve_dtype("", "cuda") == "bf16" and resolve_dtype("", "cpu") == "fp32"
    assert resolve_dtype("float32", "cuda") == "fp32"  # an explicit dtype wins
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16"):
        resolve_dtype("fp8", "cpu")


@no_cuda
def test_without_cuda_the_default_is_the_cpu_and_cuda_is_refused() -> None:
    assert settle("", "") == ("cpu", "fp32")
    with pytest.raises(
        ValueError,
        match=r"^--device: device 'cuda:0': CUDA is not available on this machine .*use --device "
        "cpu$",
    ):
        settle("cuda:0", "")


@pytest.mark.gpu
def test_with_cuda_the_default_is_the_gpu_in_bf16_and_a_missing_index_is_refused() -> None:
    assert settle("", "") == ("cuda", "bf16")
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"this machine has {count} CUDA device\(s\)"):
        settle(f"cuda:{count}", "")


def _service_refusal(module: str, argv: list[str], tmp_path: Path, monkeypatch, capsys) -> str:
    """Run `python -m module` in-process with `argv`; its usage error (exit 2)."""
    for var in ("HEADWAY_DEVICE", "HEADWAY_DTYPE"):
        monkeypatch.delenv(var, raising=False)
    store = tmp_path / "store"
    monkeypatch.setattr(sys, "argv", [module, "--store", str(store), *argv])
    with pytest.raises(SystemExit) as exit_:
        import_module(f"{module}.__main__").main()
    assert exit_.value.code == 2
    assert not store.exists(), "the service got as far as opening its store"
    return capsys.readouterr().err


@pytest.mark.parametrize("module", ["trainer_svc", "sampler_svc"])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "gpu"], "--device: device must be cpu, cuda or cuda:N"),
        (["--device", "cpu", "--dtype", "fp8"], "--dtype: dtype must be one of fp32, bf16"),
    ],
)
def test_a_service_refuses_a_bad_device_or_dtype_before_loading_anything(
    module, argv, message, tmp_path, monkeypatch, capsys
) -> None:
    assert message in _service_refusal(module, argv, tmp_path, monkeypatch, capsys)


@no_cuda
@pytest.mark.parametrize("module", ["trainer_svc", "sampler_svc"])
def test_a_service_refuses_cuda_on_a_machine_without_it(
    module, tmp_path, monkeypatch, capsys
) -> None:
    err = _service_refusal(module, ["--device", "cuda"], tmp_path, monkeypatch, capsys)
    assert "--device: device 'cuda': CUDA is not available on this machine" in err


def test_serve_passes_its_device_to_the_torch_services_only(tmp_path: Path) -> None:
    """`headway serve --device cuda:1` reaches the trainer and every sampler (not the
    gateway), spelled one way; without it none is passed; a bad name is refused before
    anything starts (serve checks the name; each service checks the device exists)."""
    from headway.cli import build_parser
    from headway.cli.serve import ConfigError, LocalStack
    from headway.cli.serve_config import serve_config
    from tests.helpers_serve import stack_config

    def argvs(**flags: object) -> dict[str, list[str]]:
        config = stack_config(tmp_path, samplers=2, **flags)  # free ports: plan() checks them
        return {s.name: s.argv for s in LocalStack(config).plan()}

    assert not any("--device" in argv for argv in argvs().values())
    gpu = argvs(device="CUDA:01")
    for name in ("trainer", "sampler-0", "sampler-1"):
        assert gpu[name][gpu[name].index("--device") + 1] == "cuda:1", name
    assert "--device" not in gpu["gateway"]
    with pytest.raises(ConfigError, match=r"--device: device must be cpu, cuda or cuda:N"):
        argvs(device="gpu")
    args = build_parser().parse_args(["serve", "--store", str(tmp_path), "--device", "cpu"])
    assert serve_config(args).device == "cpu"


# ---------------------------------------------------------------- host ↔ device copies
def test_host_and_device_copies_cost_nothing_on_the_cpu() -> None:
    t = torch.arange(4.0)
    assert to_device(t, "cpu") is t
    assert to_host({"t": t})["t"].data_ptr() == t.data_ptr()
    assert host_lists(torch.tensor([3, 1]), torch.tensor([-0.5, -1.25])) == [
        [3, 1],
        [-0.5, -1.25],
    ]


@pytest.mark.gpu
def test_device_tensors_reach_the_host_exactly_through_pinned_buffers() -> None:
    tokens = torch.tensor([3, 2**40 + 1], device="cuda")
    lps = torch.tensor([-0.1, -2.5], device="cuda")
    assert host_lists(tokens, lps) == [tokens.cpu().tolist(), lps.cpu().tolist()]
    host = to_host({"x": torch.ones(3, device="cuda")})["x"]
    assert host.device.type == "cpu" and host.is_pinned()
    assert to_device(torch.ones(3), "cuda").device.type == "cuda"


# ---------------------------------------------------------------- invariants per device
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_and_decode_equal_the_full_forward_on(device: str, tmp_path: Path) -> None:
    """The engine's logprob of each sampled token (prefill, then decode steps, rows of two
    requests together) is the full forward's, fp32, on `device`."""
    from sampler_svc.engine import Engine, GenerationJob
    from sampler_svc.requests import row_generator
    from sampler_svc.sampling import DrawParams

    model, _ = load_model(make_tiny_base(tmp_path / "base"))
    model = model.to(device)
    engine = Engine(model, None, max_batch=4, max_seq_len=64)
    assert engine.caches[0].k.device.type == device
    got: dict[tuple[int, int], list[tuple[int, float]]] = {}

    def job(j: int, prompt: list[int]) -> GenerationJob:
        def emit(kind: str, row: int, payload: object) -> None:
            if kind == "token":
                got.setdefault((j, row), []).append(payload)  # type: ignore[arg-type]

        draws = [DrawParams(1.0, 1.0, 0, row_generator(j, i)) for i in range(2)]
        return GenerationJob(prompt, 2, 8, frozenset(), draws, emit=emit)

    prompts = [PROMPT, PROMPT[:3]]
    engine.admit(job(0, prompts[0]))
    engine.step()
    engine.admit(job(1, prompts[1]))  # joins the batch mid-way
    while engine.rows:
        engine.step()
    assert len(got) == 4
    with torch.no_grad():
        for (j, _), pairs in got.items():
            seq = prompts[j] + [t for t, _ in pairs]
            ids = torch.tensor([seq], device=device)
            full = token_logprobs(model(ids)[0, :-1], ids[0, 1:])[len(prompts[j]) - 1 :]
            sampled = torch.tensor([lp for _, lp in pairs])
            assert (full.cpu() - sampled).abs().max() <= 1e-4


def _trained(stack: TrainerStack, name: str, *, full: bool, steps: int) -> str:
    stack.fork(name, full=full, rank=4)
    for s in range(steps):
        reply = stack.train.Step(
            training_pb2.StepRequest(
                model=name, data=batch(seed=50 + s), loss_fn="cross_entropy", adam=adam(5e-2)
            )
        )
    return reply.optim_step.checkpoint


def _agreement(sampling, training, model: str, checkpoint: str = "") -> float:
    """Sample `model` (shaped draw) and score the samples with the trainer: the largest
    difference between sampler and trainer logprobs of the sampled tokens."""
    reply = sampling.Sample(
        sampling_pb2.SampleRequest(
            model=model,
            prompt_tokens=to_tensor(PROMPT, common_pb2.DTYPE_INT32),
            checkpoint=checkpoint,
            params=common_pb2.SamplingParams(
                n=3, max_tokens=10, temperature=0.8, top_p=0.9, top_k=20, seed=4, ignore_eos=True
            ),
        ),
        timeout=300,
    )
    if checkpoint:
        assert reply.checkpoint == checkpoint
    data, sampled = [], []
    for seq in reply.sequences:
        tokens = np.frombuffer(seq.tokens.data, np.int32).tolist()
        full_seq = PROMPT + tokens
        weights = np.r_[np.zeros(len(PROMPT) - 1), np.ones(len(tokens))].astype(np.float32)
        item = common_pb2.Datum(
            input_tokens=to_tensor(full_seq[:-1]),
            target_tokens=to_tensor(full_seq[1:]),
            weights=to_tensor(weights),
        )
        data.append(common_pb2.TrainingItem(datum=item))
        sampled.append(np.frombuffer(seq.logprobs.data, np.float32))
    fb = training.ForwardBackward(
        training_pb2.ForwardBackwardRequest(model=model, data=data, loss_fn="cross_entropy"),
        timeout=300,
    )
    worst = 0.0
    for lp, trainer_lp in zip(sampled, fb.logprobs, strict=True):
        t = np.frombuffer(trainer_lp.data, np.float32)[len(PROMPT) - 1 :]
        worst = max(worst, float(np.abs(t - lp).max()))
    return worst


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_and_trainer_logprobs_agree_on(device: str, tmp_path: Path) -> None:
    """A trainer and a sampler on `device` (fp32): a LoRA fork and a full fork (whose
    second head is copied into the sampler's idle engine on that device) sample with the
    logprobs the trainer computes."""
    trainer = TrainerStack(tmp_path / "store", device=device, dtype="fp32")
    replica = None
    try:
        trainer.add_base(make_tiny_base(tmp_path / "base"), "tiny")
        replica = SamplerReplica(
            trainer.config.store, trainer.prefix, device=device, dtype="fp32", max_seq_len=256
        )
        assert trainer.trainer.device.type == replica.sampler.device.type == device
        head = _trained(trainer, "lora", full=False, steps=1)
        assert _agreement(replica.stub, trainer.train, "lora", head) <= 1e-4
        head = _trained(trainer, "full", full=True, steps=1)
        assert _agreement(replica.stub, trainer.train, "full", head) <= 1e-4
        reply = trainer.train.OptimStep(training_pb2.OptimStepRequest(model="full", adam=adam()))
        assert _agreement(replica.stub, trainer.train, "full", reply.checkpoint) <= 1e-4
    finally:
        if replica is not None:
            replica.stop()
        trainer.stop()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_serve_on_a_device_samples_and_trains_through_the_gateway(
    device: str, tmp_path: Path
) -> None:
    """`headway serve --device <device> --dtype fp32`: the trainer and a sampler run as
    processes with that flag; through the gateway a fork is sampled, its samples scored
    by the trainer with the same logprobs, trained, and its new head sampled."""
    from headway.cli.serve import LocalStack
    from tests.helpers_serve import stack_config, supervised

    base = make_tiny_base(tmp_path / "tiny-base")
    stack = LocalStack(stack_config(tmp_path, device=device, dtype="fp32"), out=io.StringIO())
    try:
        stack.start()
        for name in ("trainer", "sampler-0"):
            argv = stack.service(name).argv
            assert argv[argv.index("--device") + 1] == device, name

        def body() -> None:
            with grpc.insecure_channel(stack.config.listen, options=CHANNEL_OPTIONS) as channel:
                models = model_pb2_grpc.ModelServiceStub(channel)
                sampling = sampling_pb2_grpc.SamplingServiceStub(channel)
                training = training_pb2_grpc.TrainingServiceStub(channel)
                models.AddBase(model_pb2.AddBaseRequest(path=str(base), name="tiny"), timeout=300)
                fork = models.ForkModel(
                    model_pb2.ForkModelRequest(
                        source="tiny", name="fork", lora=common_pb2.LoraConfig(rank=4, alpha=8)
                    ),
                    timeout=300,
                )
                assert _agreement(sampling, training, "fork", fork.head_checkpoint) <= 1e-4
                step = training.OptimStep(
                    training_pb2.OptimStepRequest(model="fork", adam=adam()), timeout=300
                )
                assert _agreement(sampling, training, "fork", step.checkpoint) <= 1e-4

        supervised(stack, body)
    finally:
        stack.stop()
