"""A taskset for the evaluation tests, importable as `tests.helpers_evals:tasks` (what
`headway models eval --taskset` takes)."""

from __future__ import annotations

from headway.eval import Task, Taskset
from headway.types import Run


def parity(run: Run) -> float:
    """A reward with spread on an untrained model: the parity of the reply's length."""
    return float(len(run.text) % 2)


def tasks() -> Taskset:
    return Taskset([Task("what is 3 plus 4?", parity), Task("what is 10 plus 2?", parity)])
