"""The retention-aware controller while training: decides after each probe, applies the learning rate.

``ControllerCallback`` runs after ``ProbeCallback``. When the probe has scored (rank 0 only, like
every evaluation), it asks the rule (``control_rule.decide``) with the probe's retention and the
evaluation's held-out accuracy, logs the decision and why, appends it to
``history/controller.jsonl`` and sets ``training_status.json``'s ``controller``. The learning rate
is applied through the Trainer's own scheduler, a ``LambdaLR``: its ``base_lrs`` (and the optimizer
groups' ``initial_lr``) become ``training.learning_rate × scale`` and each group's ``lr`` the new
base times the schedule's factor at its current step, so warm-up and decay keep their shape and
the scheduler saved with the next checkpoint carries the scaled rate. A changed rehearsal share
acts at once as the weights of ``token_weights`` (``control_rule.rehearsal_weights``), which the
trainer's loss reads at every micro-batch; the next run draws it. The state goes into every
checkpoint marker (``hf.SealCallback`` writes it at each save), so a resumed run and the next run start from it.

Several ranks: only rank 0 evaluates and decides; at every step where an evaluation is due (the
same steps on every rank) all ranks take rank 0's state in one collective, so each applies the
same learning rate at the same step.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from ultimate_trainer.core import status as st
from ultimate_trainer.core.config import Config
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.trainer import distributed
from ultimate_trainer.trainer.hf import evaluation_due
from ultimate_trainer.trainer.control_rule import (ControllerState, Decision, decide, lr_scale, rehearsal_share,
                                                   rehearsal_weights, step_down_below)
from ultimate_trainer.trainer.reporter import StatusReporter

log = logging.getLogger(__name__)


def apply_learning_rate(optimizer: Any, lr_scheduler: Any, learning_rate: float) -> bool:
    """Make ``learning_rate`` the schedule's base rate from the current step on; False when there is no LambdaLR."""
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    lambdas = getattr(sched, "lr_lambdas", None)
    if optimizer is None or lambdas is None:
        return False
    sched.base_lrs = [learning_rate] * len(lambdas)
    for group, factor in zip(optimizer.param_groups, lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]  # what the Trainer logs as the step's rate
    return True


def status_record(state: ControllerState, cfg: Config, run_share: float) -> dict[str, Any]:
    """``training_status.json``'s ``controller``."""
    scale = lr_scale(state, cfg)
    return {"enabled": cfg.controller.enabled, "lr_scale": scale,
            "learning_rate": cfg.training.learning_rate * scale,
            "configured_learning_rate": cfg.training.learning_rate,
            "rehearsal_fraction": run_share, "next_rehearsal_fraction": rehearsal_share(state, cfg),
            "rehearsal_weight": rehearsal_weights(state, cfg, run_share)[0],
            "configured_rehearsal_fraction": cfg.training.rehearsal_fraction,
            "decisions": dict(state.decisions), "last": state.last}


class ControllerCallback(TrainerCallback):
    def __init__(self, cfg: Config, reporter: StatusReporter, state: ControllerState, run_share: float,
                 evaluation: Any, probe: Any, run_id: str, world: distributed.World | None = None):
        self.cfg, self.reporter, self.state, self.run_share = cfg, reporter, state, run_share
        self.evaluation, self.probe, self.run_id = evaluation, probe, run_id  # hf.EvalCallback, ProbeCallback
        self.world = world or distributed.World()
        self.history = reporter.dir / st.CONTROLLER_HISTORY
        self.seen_probes = probe.probes if probe is not None else 0
        self.state.run_rehearsal_fraction = run_share

    def token_weights(self) -> tuple[float, float]:
        """``(rehearsal, other)`` loss weights of a token now (``control_rule.rehearsal_weights``)."""
        return rehearsal_weights(self.state, self.cfg, self.run_share)

    def learning_rate(self) -> float:
        return self.cfg.training.learning_rate * lr_scale(self.state, self.cfg)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: Any = None, lr_scheduler: Any = None, **kw: Any):
        self.reporter.update(controller=status_record(self.state, self.cfg, self.run_share))
        self._step(state, optimizer, lr_scheduler, sync=True)  # the probe before the first step, if there was one

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    optimizer: Any = None, lr_scheduler: Any = None, **kw: Any):
        self._step(state, optimizer, lr_scheduler,
                   sync=evaluation_due(state.global_step, state.max_steps, self.cfg.eval_steps))

    def _step(self, state: TrainerState, optimizer: Any, lr_scheduler: Any, sync: bool) -> None:
        before, weights_before = lr_scale(self.state, self.cfg), self.token_weights()
        if self.probe is not None and self.probe.probes != self.seen_probes:
            self.seen_probes = self.probe.probes
            self._decide(state.global_step)
        if self.world.size > 1 and sync:  # every rank at the same steps: rank 0's state is everyone's
            self.state.assign(ControllerState.from_json(distributed.gather(self.state.to_json())[0]))
        rehearsal, other = self.token_weights()
        if (rehearsal, other) != weights_before and self.world.is_main:
            log.info("rehearsal lines weigh x%g in the loss from step %d (share %g drawn, %g now)",
                     rehearsal / other, state.global_step + 1, self.run_share, rehearsal_share(self.state, self.cfg))
        if lr_scale(self.state, self.cfg) != before:
            apply_learning_rate(optimizer, lr_scheduler, self.learning_rate())
            if not self.world.is_main:
                log.info("rank %d: learning rate x%g (%g) from step %d, rank 0's controller decision", self.world.rank,
                         lr_scale(self.state, self.cfg), self.learning_rate(), state.global_step + 1)

    def _decide(self, global_step: int) -> Decision | None:
        record = self.probe.last or {}
        accuracy = self.evaluation.last_accuracy if self.evaluation is not None else None
        decision = decide(self.state, record.get("retention"), accuracy, self.cfg, global_step)
        if decision is None:
            return None
        before = ControllerState.from_json(self.state.to_json())
        self.state.assign(decision.state)  # in place: the run's checkpoint markers read this object
        self.state.last = {**(self.state.last or {}), "time": now_iso()}
        log_fn = log.warning if decision.kind == "step_down" else log.info
        log_fn("controller at step %d: %s (%s)", global_step, decision.kind.replace("_", " "), decision.reason)
        if self.world.is_main:
            st.append_jsonl(self.history, {
                "time": self.state.last["time"], "global_step": global_step, "run_id": self.run_id,
                "kind": decision.kind, "reason": decision.reason, "retention": record.get("retention"),
                "retention_warn": self.cfg.eval.retention_warn,
                "step_down_below": step_down_below(self.cfg),
                "accuracy": accuracy,
                "best_accuracy": self.state.best_accuracy,
                "evaluations_since_best": self.state.evaluations_since_best,
                "lr_scale_before": lr_scale(before, self.cfg), "lr_scale": lr_scale(self.state, self.cfg),
                "learning_rate": self.learning_rate(),
                "rehearsal_fraction_before": rehearsal_share(before, self.cfg),
                "rehearsal_fraction": rehearsal_share(self.state, self.cfg),
                "run_rehearsal_fraction": self.run_share,
                "rehearsal_weight": self.token_weights()[0]})
            self.reporter.update(controller=status_record(self.state, self.cfg, self.run_share))
            self.reporter.write()
        return decision
