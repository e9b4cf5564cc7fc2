"""The compute dtypes a service's `--dtype` accepts, named once for the trainer, the
samplers and `headway serve` (no torch here: the CLI checks the flag before starting any
service, and each service maps the name to its torch dtype)."""

from __future__ import annotations

# What `--dtype` accepts (the torch spellings too, any case) → the canonical name.
DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}


def dtype_name(name: str) -> str:
    """The canonical dtype name for `name` ("fp32" or "bf16"); ValueError otherwise."""
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(
            f"dtype must be one of fp32, bf16 (or float32, bfloat16); got {name!r}"
        ) from None
