"""The `headway models` CLI against a live gateway: the tree, heads, export, errors."""

from __future__ import annotations

import pytest
import torch

from headway.cli import main
from headway.v1 import model_pb2, training_pb2
from tests.helpers_training import adam, batch


@pytest.fixture
def cli(gateway_stack, monkeypatch, capsys):
    monkeypatch.setenv("HEADWAY_URL", gateway_stack.gateway.server.address)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def train(stack, seeds: range | list[int], model: str = "m") -> list[str]:
    """One PPO Step per seed through the gateway; the new checkpoint ids."""
    return [
        stack.gateway.train.Step(
            training_pb2.StepRequest(model=model, data=batch(seed=s), loss_fn="ppo", adam=adam())
        ).optim_step.checkpoint
        for s in seeds
    ]


def test_fork_list_tree_and_head_set(cli, gateway_stack):
    assert cli("models", "fork", "tiny", "--name", "m", "--lora-rank", "4")[0] == 0
    ids = train(gateway_stack, range(2))
    code, out, _ = cli("models", "list")
    assert code == 0 and "m" in out and "lora r4" in out
    code, out, _ = cli("models", "checkpoints", "m")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 3
    assert lines[-1].startswith("▶") and ids[-1] in lines[-1]
    assert not lines[0].startswith("▶") and "reward" in lines[-1]
    code, out, _ = cli("models", "head", "m", "--set", ids[0])
    assert code == 0 and ids[0] in out
    code, out, _ = cli("models", "checkpoints", "m")
    head_line = next(line for line in out.splitlines() if line.startswith("▶"))
    assert ids[0] in head_line
    code, out, _ = cli("models", "head", "m")
    assert code == 0 and out.startswith(f"▶ {ids[0]}") and "loss:sum" in out


def test_fork_from_a_checkpoint_with_its_optimizer(cli, gateway_stack):
    """`models fork --checkpoint ID --with-optimizer` starts the fork at that node (not the
    source's head) with its optimizer state; a checkpoint the source lacks is refused."""
    from headway.v1 import model_pb2

    cli("models", "fork", "tiny", "--name", "m", "--lora-rank", "4")
    ids = train(gateway_stack, range(2))
    code, out, err = cli(
        "models", "fork", "m", "--name", "m2", "--checkpoint", ids[0], "--with-optimizer"
    )
    assert code == 0 and f"from m at {ids[0]}" in out and "optimizer state" in out, err
    models = gateway_stack.gateway.models
    tree = models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model="m")).checkpoints
    first = next(c for c in tree if c.id == ids[0])
    root = models.GetHead(model_pb2.GetHeadRequest(model="m2"))
    assert first.state_path and root.state_path == first.state_path
    assert root.sampler_path == first.sampler_path
    code, _, err = cli("models", "fork", "m", "--name", "m3", "--checkpoint", "nope")
    assert code != 0 and "nope" in err
    code, out, _ = cli("models", "list")
    assert "m3" not in out


@pytest.mark.slow
def test_export_peft_loads_in_peft_and_hf_in_transformers(cli, gateway_stack, tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cli("models", "fork", "tiny", "--name", "m", "--lora-rank", "4")
    gateway_stack.gateway.train.Step(
        training_pb2.StepRequest(
            model="m", data=batch(seed=3), loss_fn="cross_entropy", adam=adam(5e-2)
        )
    )
    store = str(gateway_stack.config.store)
    code, _, _ = cli(
        "models", "export", "m", "--format", "peft", "-o", str(tmp_path / "peft"), "--store", store
    )
    assert code == 0
    code, _, _ = cli(
        "models", "export", "m", "--format", "hf", "-o", str(tmp_path / "hf"), "--store", store
    )
    assert code == 0
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, tmp_path / "peft").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_base).eval()(ids).logits
    assert (adapted - merged).abs().max() <= 1e-4
    assert (adapted - plain).abs().max() > 1e-4  # the export carries the training


def test_bad_input_is_one_line_and_a_nonzero_exit(cli):
    code, out, err = cli("models", "head", "nope")
    assert code == 2 and out == "" and err.count("\n") == 1 and "nope" in err
    code, _, err = cli("models", "fork", "tiny", "--name", "bad name!")
    assert code == 2 and "not valid" in err
    code, _, err = cli("models", "head", "tiny", "--set", "nope")
    assert code == 2 and err.count("\n") == 1


def test_a_branch_is_indented_under_its_origin(cli, gateway_stack):
    cli("models", "fork", "tiny", "--name", "m", "--lora-rank", "4")
    ids = train(gateway_stack, range(3))
    cli("models", "head", "m", "--set", ids[0])
    [branch] = train(gateway_stack, [9])
    code, out, _ = cli("models", "checkpoints", "m")
    lines = out.strip().splitlines()
    # The chain in one column, oldest first; the branch last, indented, saying where from.
    assert code == 0 and len(lines) == 5
    assert [line.split()[0] for line in lines[1:4]] == ids
    assert lines[-1].startswith(f"▶ └ {branch}  step 2") and f"(branch from {ids[0]})" in lines[-1]


@pytest.mark.slow
def test_plot_draws_the_heads_lineage(cli, gateway_stack, tmp_path):
    cli("models", "fork", "tiny", "--name", "m", "--lora-rank", "4")
    code, _, err = cli("models", "plot", "m", "-o", str(tmp_path / "r.png"))
    assert code == 2 and "nothing to plot" in err and not (tmp_path / "r.png").exists()
    ids = train(gateway_stack, range(3))
    code, out, _ = cli("models", "plot", "m", "-o", str(tmp_path / "r.png"))
    assert code == 0 and "3 steps (1..3)" in out and "evaluations" not in out
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Evaluations recorded along the lineage: a second curve. The lineage of another
    # node; an SVG by its suffix.
    for ckpt, score in ((ids[0], 0.25), (ids[1], 0.5)):
        gateway_stack.gateway.models.RecordEval(
            model_pb2.RecordEvalRequest(
                model="m", checkpoint=ckpt, metrics={"arith/reward_mean": score}
            )
        )
    code, out, _ = cli("models", "plot", "m", "-o", str(tmp_path / "r.svg"), "--checkpoint", ids[1])
    assert code == 0 and "2 steps (1..2), evaluations arith" in out
    svg = (tmp_path / "r.svg").read_bytes()
    assert b"<svg" in svg and b"arith (eval mean reward)" in svg
    for argv, message in [
        (["nope", "-o", str(tmp_path / "x.png")], "nope"),
        (["m", "-o", str(tmp_path / "x.txt")], ".png, .pdf or .svg"),
        (["m", "-o", str(tmp_path / "missing" / "x.png")], "not a directory"),
        (["m", "-o", str(tmp_path / "x.png"), "--checkpoint", "s9"], "no checkpoint 's9'"),
    ]:
        code, _, err = cli("models", "plot", *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.glob("*.*")) == ["r.png", "r.svg"]  # nothing else


@pytest.mark.slow
def test_build_base_builds_once_with_a_progress_bar(monkeypatch, capsys, tmp_path):
    from headway.bases import tiny_arith as ta

    real = ta.build_tiny_arith
    builds = []

    def quick(out_dir, **kwargs):  # the recipe cut to 20 steps: the CLI is under test here
        builds.append(out_dir)
        return real(out_dir, steps=20, progress=kwargs.get("progress"))

    monkeypatch.setattr(ta, "build_tiny_arith", quick)
    cache = tmp_path / "cache"
    assert main(["models", "build-base", "tiny-arith", "--cache", str(cache)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(cache / "tiny-arith") and len(builds) == 1
    assert "20/20" in out.err  # the progress bar went to stderr, the path alone to stdout
    assert main(["models", "build-base", "tiny-arith", "--cache", str(cache)]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "tiny-arith") and len(builds) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["models", "build-base", "nope"])
    assert exit_.value.code == 2


def test_an_unreachable_gateway_is_said_at_once(monkeypatch, capsys):
    """No gateway at the address: one line naming the fix, exit 1, no retries."""
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HEADWAY_URL", f"127.0.0.1:{port}")
    code = main(["models", "list"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach the gateway" in err and err.count("\n") == 1
