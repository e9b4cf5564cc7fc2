"""The `headway` command line.

Only what works today is here; the model, serving and key commands arrive with the
services they drive.
"""

from __future__ import annotations

import argparse
from importlib.metadata import version


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `headway` console script."""
    parser = argparse.ArgumentParser(
        prog="headway", description="Headway: train language models with rewards."
    )
    parser.add_argument("--version", action="version", version=f"headway {version('headway')}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
