"""The divergence guard: a bad optimizer step is caught before its update is applied, and never kept.

At every optimizer step, after the backward passes and gradient clipping but before
``optimizer.step()`` (the Trainer's ``on_pre_optimizer_step`` event), the guard looks at the step's
training loss (its micro-batches' losses summed, as the Trainer's ``compute_loss`` hands them to
``observe_loss``; the chunked loss never goes through the model's own output; with the retention-aware
controller's rehearsal weights, the plain loss, every target token counted once) and the gradient norm:

- a non-finite loss or gradient is an anomaly;
- so is a loss spike or growth (``stability.SpikeRule``): a loss far above what the step's mix of
  sources (this run's files, replay, rehearsal) predicts from the recent accepted steps, of this
  run and of earlier ones (``history/guard_window.json``), or more than ``guard.max_growth`` times
  the lowest level of this run, or above 1.25 x ln(vocabulary): worse than a uniform guess; in a
  run's first steps, before its own files' level is known, more than ``guard.new_file_growth``
  times what earlier runs' files cost when they were new (kept in the same file).

An anomalous step's update is skipped exactly: every gradient is set to ``None``, and PyTorch's
optimizers (AdamW, and bitsandbytes' 8-bit ones) leave a parameter without a gradient untouched:
no moment update, no weight decay, no step count. The adapter and the optimizer state after the
step are those before it. (The Trainer still counts the step, and the learning-rate schedule moves
one step on.) The event is written to ``history/anomalies.jsonl`` with the files and examples of
the step; after ``guard.max_anomalies`` anomalies in one run the run stops with ``Diverged``
(train.py exits ``Exit.DIVERGED``) naming the files to blame, and the daemon fails them.

With several processes the decision is one for all: every rank's loss and gradient figures are
summed in one all-reduce, every rank applies the same rule to the same numbers, and a last
all-reduce of the verdicts (max) makes "skip" win if any rank said so. So the ranks skip the same
steps, their replicas stay identical, they count the same anomalies and stop at the same step
(each exits with the guard's code); rank 0 alone writes the anomalies and the window.

The rules themselves are pure functions in ``trainer/stability.py``, which the recipe imports
without torch.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from ultimate_trainer.core import status as st
from ultimate_trainer.core.config import GuardConfig
from ultimate_trainer.trainer import distributed
from ultimate_trainer.trainer.reporter import StatusReporter
from ultimate_trainer.trainer.plan import RunPlan
from ultimate_trainer.trainer.stability import (NEW_LEVELS_KEPT, USER, Diverged, Observation, SpikeRule, culprits,
                                                loss_slope, shares_of, stability_score)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ultimate_trainer.data.prepare import Prepared

log = logging.getLogger(__name__)


def load_window(path: Path | None) -> list[Observation]:
    """The accepted steps an earlier run left in ``history/guard_window.json`` (none when absent or unreadable)."""
    data = st.read_json(path) if path else None
    steps = data.get("steps") if data else None
    if not isinstance(steps, list):
        return []
    return [o for o in (Observation.from_json(r) for r in steps) if o is not None]


def load_new_levels(path: Path | None) -> list[dict[str, Any]]:
    """``new_file_levels`` of ``history/guard_window.json``: ``{"run_id", "level"}`` of the earlier runs, oldest first."""
    data = st.read_json(path) if path else None
    levels = data.get("new_file_levels") if data else None
    out = []
    for rec in levels if isinstance(levels, list) else []:
        try:
            level = float(rec["level"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(level) and level > 0:
            out.append({"run_id": str(rec.get("run_id")), "level": level})
    return out[-NEW_LEVELS_KEPT:]


# --------------------------------------------------------------------------- the callback

class GuardCallback(TrainerCallback):
    """Checks each step before its update; skips the update of an anomalous one; stops after too many.

    ``describe_step(global_step)`` names what the step at ``global_step`` trained on:
    ``{"files": [...], "examples": [...]}`` (``step_describer``); ``step_sources(global_step)``
    its target tokens by source (``{"user": n, "replay": n, "rehearsal": n}``, ``step_sources``
    below); ``window_path``: where the accepted steps are kept for the next run (rank 0 writes it).
    """

    def __init__(self, cfg: GuardConfig, reporter: StatusReporter, describe_step: Callable[[int], dict[str, Any]],
                 run_id: str, step_sources: Callable[[int], dict[str, float]] | None = None,
                 window_path: Path | None = None, world: distributed.World | None = None):
        self.cfg, self.reporter, self.describe_step, self.run_id = cfg, reporter, describe_step, run_id
        self.step_sources = step_sources or (lambda step: {USER: 1.0})
        self.window_path, self.world = window_path, world or distributed.World()
        self.rule = SpikeRule(cfg.spike_k, cfg.window, cfg.min_history, cfg.min_run_steps, cfg.max_growth,
                              new_file_growth=cfg.new_file_growth)
        # an attempt of this same run after a crash does not judge its files against their own first level
        self.new_levels = [r for r in load_new_levels(window_path) if r["run_id"] != run_id]
        self.rule.seed(load_window(window_path), [r["level"] for r in self.new_levels])
        self.flags: deque[bool] = deque(maxlen=cfg.window)  # whether each recent step was an anomaly
        self.events: list[dict[str, Any]] = []
        self.accepted: deque[int] = deque(maxlen=BLAME_STEPS)  # this run's last accepted steps: their files
        self.skipped: dict[int, dict[str, Any]] = {}  # global step -> its real loss and grad norm (text when non-finite)
        self.run_losses: deque[float] = deque(maxlen=cfg.window)  # this run's accepted step losses (score, slope)
        self.total = 0
        self._loss_sum: Any = None
        self.stability: dict[str, Any] = {  # what training_status.json and history/steps.jsonl say of it
            "loss_slope": None, "score": None, "anomalies": reporter.anomalies_before, "anomalies_this_run": 0,
            "last_anomaly": None}

    def observe_loss(self, loss: Any) -> None:
        """One training micro-batch's loss (``hf.ContinuousTrainer.loss_observers``)."""
        loss = loss.float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kw: Any):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and vocab > 1:
            self.rule.chance = math.log(vocab)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self._loss_sum = None

    def _figures(self, model: Any) -> tuple[list[Any], float | None, float | None, bool]:
        """``(params with a gradient, step loss, grad norm, whether some rank saw a non-finite value)``,
        the same on every rank: one all-reduce of every rank's figures."""
        import torch

        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        device = grads[0].device if grads else (self._loss_sum.device if self._loss_sum is not None else "cpu")
        zero = torch.zeros((), device=device)
        sq = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum().to(device) if grads else zero
        loss = self._loss_sum.float().reshape(()).to(device) if self._loss_sum is not None else None
        bad_loss = ~torch.isfinite(loss) if loss is not None else torch.zeros((), dtype=torch.bool, device=device)
        bad_grad = ~torch.isfinite(sq)
        # [finite loss, ranks with a loss, ranks with a non-finite loss, ranks with a non-finite gradient, sum of
        # squared gradient norms]; a non-finite value is carried by its flag, never summed.
        v = torch.stack([torch.where(bad_loss, zero, loss if loss is not None else zero),
                         torch.tensor(float(loss is not None), device=device), bad_loss.float(), bad_grad.float(),
                         torch.where(bad_grad, zero, sq)]).double()
        if self.world.size > 1 and distributed.active():
            import torch.distributed as dist

            dist.all_reduce(v)
        total, n, nonfinite_loss, nonfinite_grad, sq_sum = v.tolist()  # one transfer to the host
        n_ranks = max(1, self.world.size if distributed.active() else 1)
        step_loss = None
        if n:  # a non-finite loss is recorded as this rank's own (nan, inf), or nan when another rank's was
            raw = float(loss) if nonfinite_loss and loss is not None else math.nan
            step_loss = total / n if not nonfinite_loss else (raw if not math.isfinite(raw) else math.nan)
        if nonfinite_grad:
            grad_norm = math.nan
        else:  # DDP: the gradients are the same on every rank; sharded engines: each rank holds its part
            sharded = distributed.active() and getattr(model, "_is_fsdp_managed_module", False)
            grad_norm = math.sqrt(sq_sum if sharded else sq_sum / n_ranks) if grads or sq_sum else None
        return params, step_loss, grad_norm, bool(nonfinite_loss or nonfinite_grad)

    def _agree(self, skip: bool) -> bool:
        """Every rank's verdict, max-reduced: one rank's "skip" skips the step everywhere."""
        if self.world.size <= 1 or not distributed.active():
            return skip
        import torch
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([1.0 if skip else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: Any = None, **kw: Any):
        if not self.cfg.enabled:
            return
        params, loss, gnorm, nonfinite = self._figures(model)
        global_step = state.global_step + 1
        shares = shares_of(self.step_sources(global_step))
        kind, threshold = None, None
        if loss is not None and not math.isfinite(loss):
            kind = "non-finite loss"
        elif nonfinite or (gnorm is not None and not math.isfinite(gnorm)):
            kind = "non-finite gradient"
        elif loss is not None:
            verdict = self.rule.judge(loss, shares)
            kind, threshold = verdict.kind, verdict.threshold
        if self._agree(kind is not None) and kind is None:
            kind = "anomaly on another rank"
        if kind is None:
            if loss is not None:
                self.rule.accept(loss, shares)
                self.run_losses.append(loss)
            self.accepted.append(global_step)
            self.flags.append(False)
            self._publish(global_step, shares)
            return
        for p in params:  # an optimizer skips a parameter without a gradient: the update is not applied
            p.grad = None
        self.flags.append(True)
        self._record(global_step, kind, loss, gnorm, threshold, shares)
        self._publish(global_step, shares)

    def _record(self, global_step: int, kind: str, loss: float | None, gnorm: float | None,
                threshold: float | None, shares: dict[str, float]) -> None:
        self.total += 1
        self.skipped[global_step] = {"loss": _finite_or_str(loss), "grad_norm": _finite_or_str(gnorm), "kind": kind}
        described = self.describe_step(global_step) if self.world.is_main else {"files": [], "examples": []}
        event = {"global_step": global_step, "run_id": self.run_id, "kind": kind,
                 "loss": _finite_or_str(loss), "grad_norm": _finite_or_str(gnorm),
                 "threshold": None if threshold is None else round(threshold, 6),
                 "shares": {k: round(v, 4) for k, v in shares.items()},
                 "action": "update skipped", "anomalies_this_run": self.total, **described}
        self.events.append(event)
        self.reporter.log_anomaly(event)
        if self.world.is_main:
            files = described.get("files") or []
            others = [k for k, v in sorted(shares.items()) if v > 0 and k != USER]
            log.warning("step %d: %s (loss %s, grad norm %s%s): update skipped; %s", global_step, kind,
                        event["loss"], event["grad_norm"], f", threshold {threshold:.4g}" if threshold else "",
                        f"files {', '.join(files)}" if files else
                        f"no line of this run's files ({' and '.join(others) or 'no'} lines only)")

    def _publish(self, global_step: int, shares: dict[str, float]) -> None:
        recent = list(self.run_losses)[-self.cfg.slope_steps:]
        slope = loss_slope(recent)
        last = self.events[-1] if self.events else None
        self.stability = {
            "loss_slope": None if slope is None else round(slope, 6),
            "score": stability_score(list(self.run_losses), sum(self.flags), self.cfg.window),
            "anomalies": self.reporter.anomalies_before + self.total,
            "anomalies_this_run": self.total,
            "shares": {k: round(v, 4) for k, v in shares.items()},  # the last step's target tokens by source
            "last_anomaly": None if last is None else {k: last.get(k) for k in
                                                       ("global_step", "kind", "files", "loss", "grad_norm")},
        }
        self.reporter.update(stability=self.stability)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if self.cfg.enabled and self.total >= self.cfg.max_anomalies:
            clean = {f for step in self.accepted for f in self.describe_step(step).get("files") or []} \
                if self.world.is_main else set()
            files = culprits(self.events, clean)
            last = self.events[-1]
            reason = (f"diverged: {self.total} anomalies in this run (last: {last['kind']} at step "
                      f"{last['global_step']}); files: {', '.join(files) or 'unknown'}")
            self.reporter.update(diverged={"reason": reason, "files": files, "run_id": self.run_id})
            self._log_stopping_step(state.global_step)
            raise Diverged(reason, files)

    def _log_stopping_step(self, global_step: int) -> None:
        """The step whose anomaly stops the run ends it before the Trainer logs it: record it here, as
        RunCallback records a skipped step (its real loss and grad norm, null and text when not finite)."""
        skipped = self.skipped.get(global_step)
        if skipped is None:
            return
        record: dict[str, Any] = {"global_step": global_step, "run_id": self.run_id, "skipped": True,
                                  "anomaly": skipped["kind"]}
        for k in ("loss", "grad_norm"):
            real = skipped[k]
            record[k] = real if isinstance(real, (int, float)) else None
            if isinstance(real, str):
                record[f"{k}_text"] = real
        self.reporter.log_step({**record, "loss_slope": self.stability.get("loss_slope"),
                                "stability_score": self.stability.get("score"),
                                "anomalies": self.stability.get("anomalies"), "shares": self.stability.get("shares")})

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.save_window()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.save_window()

    def save_window(self) -> None:
        """Rank 0 keeps this run's accepted steps (as the window holds them) for the next run to judge from."""
        if not (self.cfg.enabled and self.window_path and self.world.is_main and self.reporter.live):
            return
        try:
            mine = [] if self.rule.new_level is None else [{"run_id": self.run_id,
                                                            "level": round(self.rule.new_level, 6)}]
            st.atomic_write_json(self.window_path, {"schema_version": st.SCHEMA_VERSION, "run_id": self.run_id,
                                                    "steps": [o.to_json() for o in self.rule.window],
                                                    "new_file_levels": (self.new_levels + mine)[-NEW_LEVELS_KEPT:]})
        except OSError as e:  # the next run judges from its own steps only
            log.warning("could not keep the guard's window (%s)", e)


def _finite_or_str(x: float | None) -> float | str | None:
    """JSON has no NaN: a non-finite number is written as the string ``"nan"``/``"inf"``."""
    if x is None:
        return None
    return round(x, 6) if math.isfinite(x) else str(x)


PREVIEW_CHARS = 200
BLAME_STEPS = 200  # accepted steps whose files are spared the blame when the guard stops a run


def step_sources(plan: RunPlan, prepared: Prepared, files: list[Path]) -> Callable[[int], dict[str, float]]:
    """The target tokens of the step ending at a global step, by source.

    The token store holds the run's ``files``' examples first, then the replayed lines, then the
    rehearsed answers (data/prepare.py), so a store index names its source.
    """
    user = sum(prepared.reports[str(f)].train_examples for f in files)
    replay = user + int(prepared.replay_examples or 0)
    store = prepared.train
    count = getattr(store, "target_count", None) or (lambda i: sum(1 for t in store[i]["labels"] if t != -100))
    names = ("user", "replay", "rehearsal")

    def sources(global_step: int) -> dict[str, float]:
        out = dict.fromkeys(names, 0.0)
        for idx in plan.examples_of_step(plan.run_step(global_step) - 1):
            idx = int(idx)
            n = float(count(idx))
            out[names[0] if idx < user else names[1] if idx < replay else names[2]] += n
        return out

    return sources


def step_describer(plan: RunPlan, prepared: Prepared, files: list[Path],
                   tokenizer: PreTrainedTokenizerBase) -> Callable[[int], dict[str, Any]]:
    """What the optimizer step ending at a global step trained on.

    The token store holds each file's trained examples contiguously, in the order of ``files``, so a
    store index names its file and its place among that file's trained examples.
    """
    import bisect

    names = [f.name for f in files]
    counts = [prepared.reports[str(f)].train_examples for f in files]
    ends = [sum(counts[:i + 1]) for i in range(len(counts))]

    def describe(global_step: int) -> dict[str, Any]:
        examples = []
        for idx in plan.examples_of_step(plan.run_step(global_step) - 1):
            f = bisect.bisect_right(ends, idx)
            if f >= len(names):
                continue
            first = ends[f - 1] if f else 0
            try:
                text = tokenizer.decode(prepared.train[idx]["input_ids"], skip_special_tokens=True)
            except Exception:  # a preview is a courtesy; the file and position are what matter
                text = ""
            examples.append({"file": names[f], "example": idx - first + 1, "text": text[:PREVIEW_CHARS]})
        return {"files": sorted({e["file"] for e in examples}), "examples": examples}

    return describe
