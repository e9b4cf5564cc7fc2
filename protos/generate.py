"""Generate the Python stubs of Headway's gRPC contract from protos/headway/v1/*.proto.

The protoc bundled with grpcio-tools does the work (no system protoc needed), so the output
depends only on the .proto files and the installed grpcio-tools version, and two runs give
identical bytes. For each proto it writes `headway/v1/<name>_pb2.py`, `<name>_pb2.pyi` and
`<name>_pb2_grpc.py` under the output root, plus a fixed `headway/v1/__init__.py`. Stubs
left from a deleted proto are removed first, so the output holds exactly the current set.

    python protos/generate.py            # into the repository (what `make protos` runs)
    python protos/generate.py --out DIR  # somewhere else (tests/test_protos.py does this)
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
"""The protoc include root: proto files live at headway/v1/*.proto beneath it."""

REPO_ROOT = PROTO_ROOT.parent
"""Default output root: the stubs land in the `headway.v1` package of the repository."""

PACKAGE_DIR = Path("headway", "v1")
"""Where the protos sit under PROTO_ROOT, and where their stubs go under an output root."""

INIT_TEXT = (
    '"""Generated gRPC contract of Headway (package headway.v1); '
    'regenerate with `make protos`."""\n'
)
"""Content of the generated package's __init__.py."""

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
"""File name endings protoc produces for each proto."""


def proto_files() -> list[Path]:
    """Return the contract's .proto files, sorted."""
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def well_known_include() -> Path:
    """Return grpc_tools' bundled include dir holding google/protobuf/*.proto."""
    return Path(str(resources.files("grpc_tools") / "_proto"))


def run_protoc(args: list[str]) -> None:
    """Run the bundled protoc with both include roots and `args`; raise if it fails."""
    argv = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known_include()}", *args]
    code = protoc.main(argv)
    if code != 0:
        raise RuntimeError(f"protoc exited with {code}: {' '.join(argv)}")


def generate(out_root: Path) -> list[Path]:
    """Generate the stubs under `out_root`/headway/v1 and return the files written, sorted."""
    out_root = Path(out_root).resolve()
    package = out_root / PACKAGE_DIR
    package.mkdir(parents=True, exist_ok=True)
    for stale in package.iterdir():
        if stale.is_file() and stale.name.endswith(GENERATED_SUFFIXES):
            stale.unlink()
    sources = proto_files()
    if not sources:
        raise FileNotFoundError(f"no .proto files in {PROTO_ROOT / PACKAGE_DIR}")
    run_protoc(
        [
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            *(str(path) for path in sources),
        ]
    )
    init = package / "__init__.py"
    init.write_text(INIT_TEXT, encoding="utf-8")
    written = [
        package / f"{path.stem}{suffix}" for path in sources for suffix in GENERATED_SUFFIXES
    ]
    missing = [path for path in written if not path.is_file()]
    if missing:
        raise RuntimeError(f"protoc did not write {', '.join(map(str, missing))}")
    return sorted([init, *written])


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: parse `--out` and generate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="output root; stubs go to OUT/headway/v1 (default: the repository root)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
