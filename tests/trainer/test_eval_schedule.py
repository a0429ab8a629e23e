"""When a run evaluates: every eval_steps, at its end, and not twice within half an interval."""

from __future__ import annotations

import pytest

from ultimate_trainer.trainer.hf import evaluation_due


def due_steps(first: int, last: int, every: int) -> list[int]:
    """The steps after which a run from global step ``first`` (exclusive) to ``last`` evaluates."""
    return [s for s in range(first + 1, last + 1) if evaluation_due(s, last, every)]


@pytest.mark.parametrize("first, last, every, expected", [
    (0, 106, 25, [25, 50, 75, 106]),       # 100 is 6 steps before the end: the end's evaluation covers it
    (0, 113, 25, [25, 50, 75, 100, 113]),  # 13 steps before the end: at least half an interval, kept
    (0, 100, 25, [25, 50, 75, 100]),       # the end falls on the schedule: one evaluation there
    (0, 7, 25, [7]),                       # a run shorter than an interval is evaluated at its end
    (141, 160, 10, [150, 160]),            # the schedule follows the global step across runs
    (141, 154, 10, [154]),                 # 150 is 4 steps before this run's end
    (0, 50, 0, []),                        # eval_steps 0: never
])
def test_evaluation_schedule(first, last, every, expected):
    assert due_steps(first, last, every) == expected
