"""The command-line flags every service shares, and the process setup they imply.

`python -m trainer_svc`, `python -m sampler_svc` and `python -m gateway` all take the
store, the Redis URL and key prefix, the internal token file and a log level, each with its
`HEADWAY_*` environment twin; the torch services also take `--threads`. One definition, so
a flag means the same everywhere and `headway serve` can pass the same arguments to each.
"""

from __future__ import annotations

import argparse
import logging
import os

from headway.server.auth import TOKEN_ENV, TOKEN_FILE_ENV
from headway.server.heads import DEFAULT_PREFIX


def on_off(value: str) -> bool:
    """An on/off setting (a flag's value or its environment twin): exactly "on" or "off".

    Nothing else is guessed at: a security switch that read "true" as off would turn
    protection off with a typo.
    """
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(
            f"must be 'on' or 'off' (as a flag or in its HEADWAY_* variable), not {value!r}"
        )
    return value == "on"


def add_common_flags(parser: argparse.ArgumentParser, *, torch_threads: bool = False) -> None:
    """Add --store, --redis, --redis-prefix, --internal-token-file, --log-level (and
    --threads for torch services)."""
    env = os.environ.get
    parser.add_argument(
        "--store",
        default=env("HEADWAY_STORE", "./headway-store"),
        help="checkpoint store directory (HEADWAY_STORE)",
    )
    parser.add_argument(
        "--redis",
        default=env("HEADWAY_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis URL (HEADWAY_REDIS_URL)",
    )
    parser.add_argument(
        "--redis-prefix",
        default=env("HEADWAY_REDIS_PREFIX", DEFAULT_PREFIX),
        help="prefix of every Redis key (HEADWAY_REDIS_PREFIX)",
    )
    parser.add_argument(
        "--internal-token-file",
        default=env(TOKEN_FILE_ENV, ""),
        help=f"file holding the secret gateways send backends, which trust team metadata only "
        f"with it ({TOKEN_FILE_ENV}; else the token itself in ${TOKEN_ENV}; none: backends "
        "listen on loopback only and trust every local caller)",
    )
    if torch_threads:
        parser.add_argument(
            "--threads",
            type=int,
            default=int(env("HEADWAY_TORCH_THREADS", "0")),
            help="torch CPU threads (HEADWAY_TORCH_THREADS; 0 = torch's default, one per "
            "core): give each process of a machine its share of the cores",
        )
    parser.add_argument(
        "--log-level", default=env("HEADWAY_LOG_LEVEL", "INFO"), help="(HEADWAY_LOG_LEVEL)"
    )


def setup_process(args: argparse.Namespace) -> None:
    """Configure logging and, when asked, torch's thread count, from the common flags."""
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if getattr(args, "threads", 0) > 0:
        import torch  # only torch services have --threads

        torch.set_num_threads(args.threads)
