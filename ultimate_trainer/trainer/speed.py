"""What makes a training step fast, as the Trainer sees it (see docs/TRAINING.md, "Batches and speed"):

- ``training_data``: the run plan's batches, rows (``PackedRows`` + ``PackedCollator``: a
  padding-free micro-batch, or packed rows) or length-grouped examples (the TokenStore view + the
  padding ``Collator``);
- the loss itself (packed inputs, the chunked loss) is ``hf.ContinuousTrainer.compute_loss``;
- ``ThreadGovernor``: keeps the intra-op thread count at the cores other processes leave free
  (core/threads.py says why).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psutil
import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ultimate_trainer.core import threads
from ultimate_trainer.core.config import Config
from ultimate_trainer.data.collate import PackedCollator, PackedRows
from ultimate_trainer.data.collate import Collator, Ordered
from ultimate_trainer.data.tokenstore import TokenStore
from ultimate_trainer.trainer.plan import RunPlan

log = logging.getLogger(__name__)


def training_data(store: TokenStore, plan: RunPlan, tokenizer: PreTrainedTokenizerBase,
                  rehearsal_from: int | None = None) -> tuple[Any, Any]:
    """``(dataset, collator)`` for what is left of ``plan``; with ``rehearsal_from`` (the store index of
    the first rehearsal line) the batches mark the rehearsal lines' tokens (``rehearsal_mask``)."""
    pad = Collator(tokenizer).pad_token_id
    if plan.rows is not None:
        return PackedRows(store, plan.remaining_rows, rehearsal_from), PackedCollator(pad)
    if rehearsal_from is not None:
        return Ordered(store, plan.remaining_order, rehearsal_from), Collator(pad_token_id=pad)
    return store.select(plan.remaining_order), Collator(pad_token_id=pad)


def rehearsal_from(prepared: Any, cfg: Config, controlled: bool = False) -> int | None:
    """The store index of ``prepared``'s first rehearsal line (stored last, data/prepare.py) when the loss
    tells rehearsal lines apart: distilled (``training.rehearsal_loss``) or weighed by the controller
    (``controlled``); else None (no marks)."""
    if not prepared.rehearsal_examples or not (controlled or cfg.training.rehearsal_loss == "distill"):
        return None
    return len(prepared.train) - prepared.rehearsal_examples


def rehearsal_loss(cfg: Config, world_size: int) -> str:
    """What this run's rehearsal lines train (``training.rehearsal_loss``): ``distill`` or ``answers``.
    FSDP and DeepSpeed shard the model behind their own forward, which the teacher's pass (the model with
    its adapter off) would bypass: with several ranks under them, the base's answers."""
    if world_size > 1 and cfg.training.distributed != "ddp":
        return "answers"
    return cfg.training.rehearsal_loss


class ThreadGovernor(TrainerCallback):
    """Every ``interval`` seconds, sets torch's intra-op threads to the cores others leave free."""

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self.enabled = not threads.user_fixed_threads()
        self.cpus = sorted(psutil.Process().cpu_affinity() or range(psutil.cpu_count() or 1))
        self.proc = psutil.Process()
        self.last: tuple[float, float, float] | None = None

    def _sample(self) -> tuple[float, float, float]:
        per_cpu = psutil.cpu_times(percpu=True)
        busy = sum(per_cpu[c].user + per_cpu[c].system + per_cpu[c].nice for c in self.cpus if c < len(per_cpu))
        own = self.proc.cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kw: Any) -> None:
        self.enabled = self.enabled and (args.use_cpu or not torch.cuda.is_available())  # CPU training only
        if self.enabled:
            self.last = self._sample()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if not self.enabled or self.last is None:
            return
        now = self._sample()
        dt = now[0] - self.last[0]
        if dt < self.interval:
            return
        elsewhere = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / dt
        self.last = now
        want = threads.free_cpus(elsewhere, len(self.cpus))
        if want != torch.get_num_threads():
            log.info("CPU: other processes use %.1f of %d cores: %d -> %d training threads", elsewhere,
                     len(self.cpus), torch.get_num_threads(), want)
            torch.set_num_threads(want)
