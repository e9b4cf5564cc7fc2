"""`headway models ...`: the model catalogue and checkpoint trees, from a terminal.

Talks to the gateway (`HEADWAY_URL`, default 127.0.0.1:50051; key from `HEADWAY_API_KEY`)
through the SDK's `SyncModelClient` (no retries: a terminal shows a failure at once), and
imports no torch (an import-linter contract checks):
`export` and `build-base`, which run torch on this machine, live in `headway.cli.local`.
Errors are one line on stderr and a non-zero exit: 2 for bad input, 1 for everything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from headway.client.models import SyncModelClient
from headway.errors import HeadwayError, Unavailable
from headway.types import Checkpoint


def _client(args: argparse.Namespace) -> SyncModelClient:
    # The SDK's settings: the same address and key defaults, the same URL schemes.
    return SyncModelClient(args.url or None, max_retries=0)


def _run(name: str, fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except Unavailable as e:
            print(
                f"headway {name}: cannot reach the gateway ({e.message}); is "
                "`headway serve` running, and HEADWAY_URL right?",
                file=sys.stderr,
            )
            return 1
        except HeadwayError as e:
            print(f"headway {name}: {e.message}", file=sys.stderr)
            return 2 if e.user_error else 1
        except (ValueError, OSError) as e:
            print(f"headway {name}: {e}", file=sys.stderr)
            return 2

    return wrapped


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models(with_size=args.size)
    rows = []
    for m in models:
        kind = f"lora r{m.lora_rank}" if m.kind == "lora" else m.kind
        row = [m.slug, m.base, "yes" if m.trainable else "no", kind, str(m.head_step)]
        rows.append(row + ([_size(m.store_bytes) if m.trainable else "-"] if args.size else []))
    _table(rows, ["SLUG", "BASE", "TRAINABLE", "KIND", "HEAD STEP"] + (["STORE"] * args.size))
    if args.size:
        teams: dict[str, int] = {}
        for m in models:
            if m.trainable:
                teams[m.team] = teams.get(m.team, 0) + m.store_bytes
        for team, total in sorted(teams.items()):
            print(f"team {team or '(local)'}: {_size(total)} in the store")
    return 0


def _size(n: int) -> str:
    """Bytes for people: 1.5 GB, 320.0 MB, 12.0 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _prune(args: argparse.Namespace) -> int:
    rules = {"keep_last": args.keep_last, "keep_every": args.keep_every,
             "keep_lineage": args.keep_lineage}  # fmt: skip
    with _client(args) as client:
        if args.save:
            client.set_retention(args.model, **rules)
            print(f"retention of {args.model}: {_rules(rules)}, applied after every step")
            return 0
        pruned = client.prune(args.model, dry_run=args.dry_run, **rules)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(pruned.deleted)} checkpoint(s), {_size(pruned.freed_bytes)}")
    for ckpt in pruned.deleted:
        print(f"  - {ckpt}")
    for ckpt, why in sorted(pruned.kept.items()):
        print(f"  = {ckpt}  ({why})")
    return 0


def _rules(rules: dict[str, int]) -> str:
    said = [f"{k.replace('_', ' ')} {v}" for k, v in rules.items() if v]
    return ", ".join(said) or "keep everything"


def _delete_checkpoint(args: argparse.Namespace) -> int:
    with _client(args) as client:
        freed = client.delete_checkpoint(args.model, args.checkpoint)
    print(f"deleted checkpoint {args.checkpoint} of {args.model} ({_size(freed)})")
    return 0


def _fork(args: argparse.Namespace) -> int:
    # Neither --full nor --lora-rank: the service's default, LoRA as the source is (or
    # rank 32 over a base).
    with _client(args) as client:
        m = client.fork(
            args.source,
            args.name,
            lora_rank=args.lora_rank,
            full=args.full,
            checkpoint=args.checkpoint,
            with_optimizer=args.with_optimizer,
        )
    kind = "full fine-tuning" if m.kind == "full" else f"LoRA rank {m.lora_rank}"
    start = f"{args.source} at {args.checkpoint}" if args.checkpoint else args.source
    state = ", with its optimizer state" if args.with_optimizer else ""
    print(f"forked {m.slug} from {start} ({kind}{state}); head {m.head_checkpoint}")
    return 0


def _stats(c: Checkpoint) -> str:
    evals = "  ".join(
        f"{k} {v:.3f}" for k, v in sorted(c.evals.items()) if k.endswith(("/reward_mean", "@1"))
    )
    if c.stats is None:
        return evals
    s = c.stats
    line = (
        f"reward {s.reward_mean:.3f}  loss {s.loss:.4g}  tokens {s.num_tokens}  "
        f"lr {s.learning_rate:g}"
    )
    return f"{line}  {evals}" if evals else line


def _checkpoints(args: argparse.Namespace) -> int:
    with _client(args) as client:
        tree = client.checkpoints(args.model)
    ids = {c.id for c in tree}
    children: dict[str, list[Checkpoint]] = {}
    roots = []
    for c in tree:  # oldest first
        if c.parent_id in ids:
            children.setdefault(c.parent_id, []).append(c)
        else:
            roots.append(c)

    for line in tree_lines(roots, children):
        print(line)
    return 0


def tree_lines(roots: list[Checkpoint], children: dict[str, list[Checkpoint]]) -> list[str]:
    """The tree as lines, oldest first: a chain of steps stays in one column; a later
    child of a node (a branch made after `models head --set`) is indented one level under
    the end of the line it branches from, with `└` and the node it starts from."""
    lines: list[str] = []

    def line(c: Checkpoint, depth: int, branch_of: str) -> None:
        mark = "▶" if c.is_head else " "
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.created.timestamp()))
        lead = "  " * (depth - 1) + "└ " if depth else ""
        origin = f"  (branch from {branch_of})" if branch_of else ""
        tags = f"  [{', '.join(c.tags)}]" if c.tags else ""
        lines.append(
            f"{mark} {lead}{c.id}{tags}  step {c.step}  {when}  {_stats(c)}{origin}".rstrip()
        )

    def chain(c: Checkpoint, depth: int, branch_of: str = "") -> None:
        # Iterative along the chain (a long run must not hit the recursion limit);
        # recursive only into branches, which are few.
        branches: list[tuple[Checkpoint, str]] = []
        node: Checkpoint | None = c
        while node is not None:
            line(node, depth, branch_of)
            branch_of = ""
            kids = children.get(node.id, [])
            branches.extend((kid, node.id) for kid in kids[1:])
            node = kids[0] if kids else None
        for kid, parent in branches:
            chain(kid, depth + 1, parent)

    for root in roots:
        chain(root, 0)
    return lines


def _head(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.set:
            c = client.set_head(args.model, args.set)
            print(f"head of {args.model} is now {c.id} (step {c.step})")
            return 0
        c = client.head(args.model)
    tags = f"  [{', '.join(c.tags)}]" if c.tags else ""
    print(f"▶ {c.id}{tags}  step {c.step}  parent {c.parent_id or '-'}")
    if c.stats is not None:
        s = c.stats
        print(f"  loss_fn {s.loss_fn}  datums {s.num_datums}  tokens {s.num_tokens}")
        print(f"  learning rate {s.learning_rate:g}")
        print(f"  reward mean {s.reward_mean:.4f}  std {s.reward_std:.4f}  loss {s.loss:.6g}")
        for key in sorted(s.metrics):
            print(f"  {key} {s.metrics[key]:.6g}")
    for key in sorted(c.evals):
        print(f"  eval {key} {c.evals[key]:.6g}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import asyncio
    import importlib

    from headway.eval import Taskset, evaluate

    module, _, attr = args.taskset.partition(":")
    if not module or not attr:
        raise ValueError(f"--taskset {args.taskset!r}: give module:function (a Taskset maker)")
    sys.path.insert(0, os.getcwd())  # a module of the working directory, as python -m does
    try:
        made = getattr(importlib.import_module(module), attr)()
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--taskset {args.taskset!r}: {e}") from e
    if not isinstance(made, Taskset):
        raise ValueError(f"--taskset {args.taskset!r} made a {type(made).__name__}, not a Taskset")
    result = asyncio.run(
        evaluate(
            args.model,
            made,
            checkpoint=args.checkpoint,
            group=args.group,
            name=args.name,
            success=args.success,
            url=args.url or None,
            completion_kwargs={"max_tokens": args.max_tokens},
        )
    )
    print(f"evaluated {args.model}@{result.checkpoint} on {len(made)} task(s) x {args.group}")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key} {value:.6g}")
    return 0


def _tag(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.delete:
            c = client.untag(args.model, args.name)
            print(f"removed tag {args.name} of {args.model} (it named {c.id}, step {c.step})")
            return 0
        if not args.checkpoint:
            raise SystemExit("headway models tag: give the CHECKPOINT to name (or --delete)")
        c = client.tag(args.model, args.checkpoint, args.name)
    print(f"tagged {args.model} {c.id} (step {c.step}) {args.name}")
    return 0


def _add_base(args: argparse.Namespace) -> int:
    with _client(args) as client:
        m = client.add_base(os.path.abspath(args.path), args.name)
    print(
        f"registered base {m.slug} ({m.model_type}, vocab {m.vocab_size}, context {m.max_context})"
    )
    return 0


def _delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.model)
    print(f"deleted {args.model}")
    return 0


def _lineage(checkpoints: list[Checkpoint], last: str) -> list[Checkpoint]:
    """The checkpoints from the root to `last`, following parent ids."""
    by_id = {c.id: c for c in checkpoints}
    line = []
    node = by_id.get(last)
    while node is not None:
        line.append(node)
        node = by_id.get(node.parent_id)
    return line[::-1]


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    with _client(args) as client:
        tree = client.checkpoints(args.model)
    last = args.checkpoint or next((c.id for c in tree if c.is_head), "")
    if last not in {c.id for c in tree}:
        raise ValueError(
            f"{args.model} has no checkpoint {last!r}: see `headway models checkpoints`"
        )
    # Nodes that trained (the fork's first node carries no stats of its own).
    line = [c for c in _lineage(tree, last) if c.stats is not None]
    if not line:
        raise ValueError(f"{args.model} has no trained checkpoint up to {last}: nothing to plot")
    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"{out}: the plot is written as .png, .pdf or .svg; name it so")
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent} is not a directory")

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    steps = [c.step for c in line]
    mean = [c.stats.reward_mean for c in line]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5))
    top.plot(steps, mean, marker="o", label="mean reward")
    # The evaluations recorded along the lineage (headway.eval.evaluate): a second curve
    # per evaluation name, root included (the score before training).
    evals = _eval_curves(_lineage(tree, last))
    for name, points in sorted(evals.items()):
        xs, ys = zip(*points, strict=True)
        top.plot(xs, ys, marker="s", linestyle="--", label=f"{name} (eval mean reward)")
    top.set_ylabel("reward")
    top.legend(loc="best")
    top.set_title(f"{args.model}: the head's lineage, up to {last}")
    bottom.plot(steps, [c.stats.loss for c in line], marker="o", color="tab:red")
    bottom.set_ylabel("loss")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    shown = f", evaluations {', '.join(sorted(evals))}" if evals else ""
    print(f"wrote {out}: reward and loss of {len(line)} steps ({steps[0]}..{steps[-1]}){shown}")
    return 0


def _eval_curves(line: list[Checkpoint]) -> dict[str, list[tuple[int, float]]]:
    """Evaluation name → (step, mean reward) along `line`, where one was recorded."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for c in line:
        for key, value in c.evals.items():
            if key.endswith("/reward_mean"):
                curves.setdefault(key.removesuffix("/reward_mean"), []).append((c.step, value))
    return curves


# Registers one `headway models NAME` command: (name, function, help) -> its parser.
CommandFactory = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def add_commands(commands: Any) -> CommandFactory:
    """Register `headway models ...` under the top-level subcommands; return the factory
    that adds one more (`headway.cli.local` adds the commands that run torch here)."""
    models = commands.add_parser(
        "models",
        help="models and checkpoint trees",
        description="Models, their checkpoint trees and heads.",
    )
    sub = models.add_subparsers(dest="models_command", metavar="COMMAND")
    models.set_defaults(func=lambda _a: (models.print_help(sys.stderr), 2)[1])

    def command(
        name: str, fn: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--url", default="", help="gateway address (default $HEADWAY_URL)")
        p.set_defaults(func=_run(f"models {name}", fn))
        return p

    p = command(
        "list", _list, "list the models you can see (slug, base, trainable, kind, head step)"
    )
    p.add_argument(
        "--size", action="store_true", help="with each model's and team's bytes in the store"
    )
    p = command("fork", _fork, "fork a trainable model from a base or one of your models")
    p.add_argument("source")
    p.add_argument("--name", required=True)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--lora-rank", type=int, default=0, help="LoRA rank (default: the source's, or 32)"
    )
    mode.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument(
        "--checkpoint", default="", help="the source's checkpoint to start from (default: head)"
    )
    p.add_argument(
        "--with-optimizer",
        action="store_true",
        help="continue that checkpoint's optimizer state too (same kind of fork as the source)",
    )
    p = command("checkpoints", _checkpoints, "the checkpoint tree, oldest first (▶ = head)")
    p.add_argument("model")
    p = command("head", _head, "the head checkpoint and its stats; --set moves it")
    p.add_argument("model")
    p.add_argument("--set", metavar="CHECKPOINT", default="", help="roll back / branch here")
    p = command(
        "eval",
        _eval,
        "run a taskset on a checkpoint and record the results on it (mean reward, pass@k)",
    )
    p.add_argument("model")
    p.add_argument("--taskset", required=True, help="module:function returning a Taskset")
    p.add_argument("--checkpoint", default="", help="id or tag (default: the head)")
    p.add_argument("--group", type=int, default=4, help="runs per task (the k of pass@k)")
    p.add_argument("--name", default="eval", help="prefix of the recorded metrics")
    p.add_argument("--success", type=float, default=1.0, help="reward at which a run passes")
    p.add_argument("--max-tokens", type=int, default=64)
    p = command(
        "tag",
        _tag,
        "name a checkpoint (the tag works wherever a checkpoint id does); --delete removes one",
    )
    p.add_argument("model")
    p.add_argument("checkpoint", nargs="?", default="", help="id or tag (not with --delete)")
    p.add_argument("name")
    p.add_argument("--delete", action="store_true", help="remove the tag NAME")
    p = command(
        "prune",
        _prune,
        "delete the checkpoints these rules do not keep (none: the model's own policy); the "
        "head, the root, tagged checkpoints and those other models are built on always stay",
    )
    p.add_argument("model")
    p.add_argument("--keep-last", type=int, default=0, metavar="K", help="the K newest")
    p.add_argument("--keep-every", type=int, default=0, metavar="M", help="steps multiple of M")
    p.add_argument(
        "--keep-lineage", type=int, default=0, metavar="D", help="the head's last D ancestors"
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would go")
    p.add_argument(
        "--save", action="store_true", help="make these the model's policy, applied every step"
    )
    p = command(
        "delete-checkpoint",
        _delete_checkpoint,
        "delete one checkpoint (refused, with the reason, for the head, the root, a tagged "
        "one, and one another model is built on)",
    )
    p.add_argument("model")
    p.add_argument("checkpoint", help="id or tag")
    p = command(
        "add-base",
        _add_base,
        "register a Hugging Face directory of the servers as a base (admin keys, under the "
        "trainer's --base-root; any directory in local mode)",
    )
    p.add_argument("path")
    p.add_argument("--name", default="")
    p = command("delete", _delete, "delete one of your models")
    p.add_argument("model")
    p = command("plot", _plot, "plot reward and loss along the head's lineage (matplotlib)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="the image file (.png, .pdf, .svg)")
    p.add_argument(
        "--checkpoint", default="", help="plot the lineage of this node (default: the head)"
    )
    return command
