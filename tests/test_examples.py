"""The README's training loop (`examples/train.py`) and `make demo` (`examples/demo.py`) run.

The README shows `examples/train.py` verbatim (checked here), so running the file runs the
README's example: a few steps against a real stack with the tiny-arith base. The demo runs
as `make demo` does, shortened, with its base cache pointed at this session's build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from headway.v1 import common_pb2, model_pb2

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = ROOT / "examples" / "train.py"
DEMO_PY = ROOT / "examples" / "demo.py"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_the_readme_shows_examples_train_py_verbatim():
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert TRAIN_PY.read_text() in blocks, "README.md must show examples/train.py as it is"


@pytest.mark.slow
def test_examples_train_py_trains_against_a_stack(gateway_stack, tiny_arith):
    stack = gateway_stack
    stack.add_base(tiny_arith[0], "tiny-arith")
    request = model_pb2.ForkModelRequest(source="tiny-arith", name="arith-rl")
    request.lora.CopyFrom(common_pb2.LoraConfig(rank=0))
    stack.gateway.models.ForkModel(request)
    env = {
        **os.environ,
        "HEADWAY_URL": stack.gateway.server.address,
        "HEADWAY_HTTP_URL": stack.gateway.http_url,
    }
    run = subprocess.run(
        [sys.executable, str(TRAIN_PY), "--steps", "2", "--tasks", "4", "--group", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["optim", "1"], ["optim", "2"]], run.stdout
    head = stack.gateway.models.GetHead(model_pb2.GetHeadRequest(model="arith-rl"))
    assert head.step == 2 and head.id in lines[-1]
    # Each step trained on 4 problems x 4 rollouts, scored by the tiny-arith reward (0 or 1
    # per rollout): the trainer's mean is the one the loop printed, a multiple of 1/16.
    printed = lines[-1].split("mean reward")[1].strip()
    assert head.stats.num_datums == 16
    assert f"{head.stats.reward_mean:.3f}" == printed, (head.stats.reward_mean, run.stdout)
    assert (head.stats.reward_mean * 16) == pytest.approx(round(head.stats.reward_mean * 16))


@pytest.mark.slow
def test_make_demo_runs_end_to_end(tmp_path, tiny_arith):
    home = tmp_path / "home"
    shutil.copytree(tiny_arith[0], home / "bases" / "tiny-arith")  # a cache hit: no rebuild
    env = {**os.environ, "HEADWAY_HOME": str(home)}
    env.pop("HEADWAY_URL", None)
    env.pop("HEADWAY_HTTP_URL", None)
    demo = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, str(DEMO_PY), "--dir", str(demo), "--steps", "3", "--tasks", "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = run.stdout
    assert run.returncode == 0, f"{out[-3000:]}\n{run.stderr[-3000:]}"
    assert f"base at {home / 'bases' / 'tiny-arith'}" in out
    assert "$ headway models fork tiny-arith --name arith-rl" in out
    assert re.search(r"^\s+3\s+\d\.\d{3}\s+\d\.\d{2}$", out, flags=re.MULTILINE), out
    # The rollback: the head moved to step 2, sampling came from it, training branched.
    rolled = re.search(r"head of arith-rl is now (\S+) \(step 2\)", out)
    assert rolled, out
    assert f"sampling now comes from {rolled.group(1)} (step 2)" in out
    assert re.search(r"^▶\s+└ \S+\s+step 3 .*\(branch from " + rolled.group(1), out, re.MULTILINE)
    assert (demo / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo / "store" / "models" / "arith-rl" / "HEAD").is_file()
