"""A run's plan: which examples (or rows of them) each optimizer step trains, in which order, how many steps.

The order is drawn from the run id (core/manifest.py), so the same run planned again (after a
crash, on the same files) gives the same steps, and an interrupted attempt continues after the
steps its checkpoint says it trained (``CheckpointMarker.run_step``). ``RunPlan.run_step`` is the
one conversion from the Trainer's global step to the run's step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core.config import Config

if TYPE_CHECKING:  # numpy is imported when a plan is made: a dry run's imports stay light
    import numpy as np


@dataclass
class RunPlan:
    run_id: str
    order: list[int]  # indices into the token store, every epoch of this run concatenated
    examples_per_step: int  # examples per optimizer step; rows per step when there are rows
    total_steps: int
    done_steps: int  # steps already trained by an interrupted attempt of this same run
    steps_per_epoch: int
    rows: list[list[int]] | None = None  # flat or packed: ``order`` cut into rows of store indices (data/packing.py)
    layout: str = "grouped"  # data/packing.py: flat (a micro-batch a row), rows (packed) or grouped
    start_step: int = 0  # the global step this attempt starts at (the start point's)

    def run_step(self, global_step: int) -> int:
        """Steps of this run done at ``global_step``: the one conversion from the Trainer's count to the run's."""
        return self.done_steps + global_step - self.start_step

    @property
    def micro_batch(self) -> int | None:
        """Rows a forward pass takes when flat (one: the micro-batch is the row), else None (the config's)."""
        return 1 if self.layout == "flat" and self.rows is not None else None

    @property
    def remaining_order(self) -> list[int]:
        return self.order[self.done_steps * self.examples_per_step:]

    @property
    def remaining_rows(self) -> list[list[int]]:
        return (self.rows or [])[self.done_steps * self.examples_per_step:]

    def examples_of_step(self, run_step: int) -> list[int]:
        """Store indices of the examples trained by the ``run_step``-th step of the run (0-based)."""
        a, b = run_step * self.examples_per_step, (run_step + 1) * self.examples_per_step
        return [i for row in self.rows[a:b] for i in row] if self.rows is not None else self.order[a:b]



def plan_run(n_examples: int, run_id: str, cfg: Config, resume: ck.CheckpointInfo | None,
             lengths: np.ndarray | None = None, layout: str = "grouped", step_scale: int = 1) -> RunPlan:
    """The run's order; with ``lengths`` also its batches (data/packing.py ``layout`` kinds: padding-free
    micro-batches a row each, packed rows, or length-grouped examples).

    ``step_scale`` > 1: the ranks' accumulation could not be split (``distributed.accumulation``),
    so a step trains that many times the configured examples.
    """
    import numpy as np

    from ultimate_trainer.data.packing import lay_out

    per_step = cfg.training.gradient_accumulation_steps * step_scale  # flat: rows (micro-batches) per step
    if layout != "flat" or lengths is None:
        per_step *= cfg.training.batch_size  # examples, or packed rows, per step
    total_examples = max(1, math.ceil(cfg.training.epochs_per_file * n_examples)) if n_examples else 0
    rng = np.random.default_rng([cfg.training.seed, int(run_id, 16) % (2**32)])
    order: list[int] = []
    while len(order) < total_examples:
        order.extend(rng.permutation(n_examples).tolist())
    order = order[:total_examples]
    rows = None
    if lengths is not None:
        order, rows = lay_out(order, lengths, cfg.training.batch_size, cfg.training.max_seq_length,
                              cfg.training.seed, layout)
    units = len(rows) if rows is not None else total_examples
    total_steps = math.ceil(units / per_step)
    per_epoch = units * n_examples / total_examples if total_examples else 0
    done = min(ck.steps_done(resume.marker, run_id), total_steps) if resume is not None else 0
    return RunPlan(run_id, order, per_step, total_steps, done, max(1, math.ceil(per_epoch / per_step)), rows,
                   layout if lengths is not None else "grouped")
