"""The divergence guard: a bad optimizer step is caught before its update is applied, and never kept.

At every optimizer step, after the backward passes and gradient clipping but before
``optimizer.step()`` (the Trainer's ``on_pre_optimizer_step`` event), the guard looks at the step's
training loss (its micro-batches' losses summed, as the Trainer's ``compute_loss`` hands them to
``observe_loss``; the chunked loss never goes through the model's own output) and the gradient norm:

- a non-finite loss or gradient is an anomaly;
- so is a loss spike: a loss above ``median + k * max(1.4826 * MAD, 0.05 * median)`` of the last
  ``guard.window`` accepted step losses, once ``guard.min_history`` of them are known.

An anomalous step's update is skipped exactly: every gradient is set to ``None``, and PyTorch's
optimizers (AdamW, and bitsandbytes' 8-bit ones) leave a parameter without a gradient untouched:
no moment update, no weight decay, no step count. The adapter and the optimizer state after the
step are those before it. (The Trainer still counts the step, and the learning-rate schedule moves
one step on.) The event is written to ``history/anomalies.jsonl`` with the files and examples of
the step; after ``guard.max_anomalies`` anomalies in one run the run stops with ``Diverged``
(train.py exits ``Exit.DIVERGED``) naming the files to blame, and the daemon fails them.

The rules themselves (``spike_threshold``, ``loss_slope``, ``stability_score``) are pure functions
in ``trainer/stability.py``, which the recipe imports without torch.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any, Callable

from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from ultimate_trainer.core.config import GuardConfig
from ultimate_trainer.trainer.reporter import StatusReporter
from ultimate_trainer.trainer.stability import Diverged, culprits, loss_slope, spike_threshold, stability_score

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the callback

class GuardCallback(TrainerCallback):
    """Checks each step before its update; skips the update of an anomalous one; stops after too many.

    ``describe_step(global_step)`` names what the step at ``global_step`` trained on:
    ``{"files": [...], "examples": [...]}`` (recipe.RunState.step_examples).
    """

    def __init__(self, cfg: GuardConfig, reporter: StatusReporter, describe_step: Callable[[int], dict[str, Any]],
                 run_id: str):
        self.cfg, self.reporter, self.describe_step, self.run_id = cfg, reporter, describe_step, run_id
        self.losses: deque[float] = deque(maxlen=cfg.window)  # accepted step losses, for the spike rule
        self.flags: deque[bool] = deque(maxlen=cfg.window)  # whether each recent step was an anomaly
        self.events: list[dict[str, Any]] = []
        self.total = 0
        self._loss_sum: Any = None
        self.stability: dict[str, Any] = {  # what training_status.json and history/steps.jsonl say of it
            "loss_slope": None, "score": None, "anomalies": reporter.anomalies_before, "anomalies_this_run": 0,
            "last_anomaly": None}

    def observe_loss(self, loss: Any) -> None:
        """One training micro-batch's loss (``hf.ContinuousTrainer.loss_observers``)."""
        loss = loss.float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self._loss_sum = None

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: Any = None, **kw: Any):
        if not self.cfg.enabled:
            return
        import torch

        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
        loss_t = self._loss_sum
        present = [t.float().reshape(()).to(grads[0].device if grads else t.device)
                   for t in (loss_t, grad_norm) if t is not None]
        values = torch.stack(present).tolist() if present else []  # one transfer to the host for both
        loss = values[0] if loss_t is not None else None
        gnorm = values[-1] if grad_norm is not None else None

        kind, threshold = None, None
        if loss is not None and not math.isfinite(loss):
            kind = "non-finite loss"
        elif gnorm is not None and not math.isfinite(gnorm):
            kind = "non-finite gradient"
        elif loss is not None:
            threshold = spike_threshold(self.losses, self.cfg.spike_k, self.cfg.min_history)
            if threshold is not None and loss > threshold:
                kind = "loss spike"
        if kind is None:
            if loss is not None:
                self.losses.append(loss)
            self.flags.append(False)
            self._publish(state.global_step + 1, loss)
            return
        for p in params:  # an optimizer skips a parameter without a gradient: the update is not applied
            p.grad = None
        self.flags.append(True)
        self._record(state.global_step + 1, kind, loss, gnorm, threshold)

    def _record(self, global_step: int, kind: str, loss: float | None, gnorm: float | None,
                threshold: float | None) -> None:
        self.total += 1
        described = self.describe_step(global_step)
        event = {"global_step": global_step, "run_id": self.run_id, "kind": kind,
                 "loss": _finite_or_str(loss), "grad_norm": _finite_or_str(gnorm),
                 "threshold": None if threshold is None else round(threshold, 6),
                 "action": "update skipped", "anomalies_this_run": self.total, **described}
        self.events.append(event)
        self.reporter.log_anomaly(event)
        log.warning("step %d: %s (loss %s, grad norm %s%s): update skipped; files %s", global_step, kind,
                    event["loss"], event["grad_norm"], f", threshold {threshold:.4g}" if threshold else "",
                    ", ".join(described.get("files") or []) or "?")
        self._publish(global_step, None)

    def _publish(self, global_step: int, loss: float | None) -> None:
        recent = list(self.losses)[-self.cfg.slope_steps:]
        slope = loss_slope(recent)
        last = self.events[-1] if self.events else None
        self.stability = {
            "loss_slope": None if slope is None else round(slope, 6),
            "score": stability_score(list(self.losses), sum(self.flags), self.cfg.window),
            "anomalies": self.reporter.anomalies_before + self.total,
            "anomalies_this_run": self.total,
            "last_anomaly": None if last is None else {k: last.get(k) for k in ("global_step", "kind", "files")},
        }
        self.reporter.update(stability=self.stability)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if self.cfg.enabled and self.total >= self.cfg.max_anomalies:
            files = culprits(self.events)
            last = self.events[-1]
            reason = (f"diverged: {self.total} anomalies in this run (last: {last['kind']} at step "
                      f"{last['global_step']}); files: {', '.join(files) or 'unknown'}")
            self.reporter.update(diverged={"reason": reason, "files": files, "run_id": self.run_id})
            raise Diverged(reason, files)


def _finite_or_str(x: float | None) -> float | str | None:
    """JSON has no NaN: a non-finite number is written as the string ``"nan"``/``"inf"``."""
    if x is None:
        return None
    return round(x, 6) if math.isfinite(x) else str(x)


PREVIEW_CHARS = 200


def step_describer(run: Any) -> Callable[[int], dict[str, Any]]:
    """For a ``recipe.RunState``: what the optimizer step ending at a global step trained on.

    The token store holds each file's trained examples contiguously, in the order of ``run.files``,
    so a store index names its file and its place among that file's trained examples.
    """
    import bisect

    names = [f.name for f in run.files]
    counts = [int(run.prepared.reports[str(f)].get("train_examples") or 0) for f in run.files]
    ends = [sum(counts[:i + 1]) for i in range(len(counts))]

    def describe(global_step: int) -> dict[str, Any]:
        p = run.plan
        examples = []
        for idx in p.examples_of_step(p.run_step(global_step) - 1):
            f = bisect.bisect_right(ends, idx)
            if f >= len(names):
                continue
            first = ends[f - 1] if f else 0
            try:
                text = run.tokenizer.decode(run.prepared.train[idx]["input_ids"], skip_special_tokens=True)
            except Exception:  # a preview is a courtesy; the file and position are what matter
                text = ""
            examples.append({"file": names[f], "example": idx - first + 1, "text": text[:PREVIEW_CHARS]})
        return {"files": sorted({e["file"] for e in examples}), "examples": examples}

    return describe
