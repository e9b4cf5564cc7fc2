"""The layers of design.md, held by import-linter ([tool.importlinter] in pyproject.toml).

`lint-imports` must pass on the tree as it is, and each contract must fail when a module
breaks it: the second test copies the four packages, adds one throwaway import per
contract, and checks that every contract reports exactly its own throwaway. (Runtime
checks of the same rules, which see what really loads, live in test_packaging.py.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("headway", "trainer_svc", "sampler_svc", "gateway")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# contract id -> (file to write or append to, the import it gets, the chain line it causes)
THROWAWAYS = {
    "services-independent": (
        "sampler_svc/layer_probe.py",
        "import trainer_svc.config",
        "sampler_svc.layer_probe -> trainer_svc.config",
    ),
    "library-below-services": (
        "headway/store/layer_probe.py",
        "import gateway.quota",
        "headway.store.layer_probe -> gateway.quota",
    ),
    "clients-without-torch": (
        "gateway/layer_probe.py",
        "import safetensors",
        "gateway.layer_probe -> safetensors",
    ),
    "sdk-without-servers": ("headway/eval.py", "import redis", "headway.eval -> redis"),
    "core-alone": (
        "headway/modeling/layer_probe.py",
        "import headway.cli",
        "headway.modeling.layer_probe -> headway.cli",
    ),
    "server-layer-without-torch": (
        "headway/server/layer_probe.py",
        "import headway.agents",
        "headway.server.layer_probe -> headway.agents",
    ),
}


def _contracts() -> dict[str, str]:
    """Contract id -> its name, from pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c["name"] for c in config["contracts"]}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: grimp must read the packages under `cwd`, not the installed ones.
    env = {**os.environ, "PYTHONPATH": str(cwd), "COLUMNS": "400"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True
    )


def _broken_sections(report: str, names: dict[str, str]) -> dict[str, str]:
    """Contract id -> the text of its section under 'Broken contracts' (one per broken one)."""
    broken = report.split("Broken contracts", 1)[1] if "Broken contracts" in report else ""
    # Unwrap the report (it folds long lines at 80 columns) so names match whole.
    flat = re.sub(r"\s+", " ", broken)
    starts = sorted((flat.find(f" {name} -"), cid) for cid, name in names.items())
    starts = [(pos, cid) for pos, cid in starts if pos >= 0]
    return {
        cid: flat[pos : starts[i + 1][0] if i + 1 < len(starts) else len(flat)]
        for i, (pos, cid) in enumerate(starts)
    }


def test_the_tree_keeps_every_layer_contract() -> None:
    names = _contracts()
    assert len(names) >= 4
    assert set(names) == set(THROWAWAYS), "each contract needs a throwaway that breaks it"
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(names)} kept, 0 broken" in done.stdout


def test_each_contract_fails_when_a_module_breaks_it(tmp_path: Path) -> None:
    names = _contracts()
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for path, line, _chain in THROWAWAYS.values():
        with open(tmp_path / path, "a") as f:
            f.write(f"\n{line}\n")

    done = _lint_imports(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"Contracts: 0 kept, {len(names)} broken" in done.stdout, done.stdout
    sections = _broken_sections(done.stdout, names)
    for cid, (_path, _line, chain) in THROWAWAYS.items():
        assert chain in sections[cid], f"{cid} did not report {chain}:\n{sections[cid]}"
        others = [THROWAWAYS[o][2] for o in THROWAWAYS if o != cid]
        assert not any(o in sections[cid] for o in others), f"{cid} reports another probe"
