"""The retention-aware controller's rule, as pure functions of its state and one probed evaluation (no torch).

After each probe (``trainer/controller.py`` calls ``decide``):

- **step down** when retention (probe score / the base's) is under ``eval.retention_warn +
  controller.step_down_margin`` (0.98 by default: before the warning is reached, at the first lost
  answer of a 36-question probe; measured in docs/PERFORMANCE.md): one lever moves. With
  ``controller.step_down_first`` ``rate`` (the default) the learning rate's scale is multiplied
  by ``controller.lr_factor`` (not below ``controller.min_lr_scale``); once it is at its floor,
  the rehearsal share is raised by ``controller.rehearsal_step`` instead (not above the ceiling:
  ``controller.max_rehearsal_fraction``, or the configured share when higher; never with
  rehearsal off). ``share`` moves them in the other order. Measured (docs/PERFORMANCE.md): with
  distilled rehearsal the rate first ended runs up to two probe answers higher than the share
  first; with the base's answers by cross-entropy (``training.rehearsal_loss`` answers) the
  share first was the better order, a lowered rate slowing the rehearsal that mends a dip;
- **step back** when held-out accuracy has not improved on its best for
  ``controller.stall_evaluations`` probed evaluations in a row and retention is at least
  ``eval.retention_warn + controller.safe_margin``: in the reverse order (by default the share
  lowered by ``rehearsal_step`` to the configured one, then the scale divided by ``lr_factor`` up
  to 1, the configured rate);
- **hold** otherwise (and when a step would move nothing: both at their bounds), said why.

The state is everything a decision depends on besides the probe and the evaluation, so that a run
resumed from a checkpoint (whose marker carries the state) takes the same decisions. Both act for the
rest of the run and the runs after. The learning rate is scaled. A run's rehearsal lines are drawn
at its start (a resumed run must draw the same ones), so within the run a changed share is a weight
instead (``rehearsal_weights``): each rehearsal token's loss is weighted so that the rehearsal lines
hold the new share of the loss, and the next run draws the new share. With rehearsal off
(``training.rehearsal_fraction`` 0) the share stays 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ultimate_trainer.core.config import Config

STEP_DOWN, STEP_BACK, HOLD = "step_down", "step_back", "hold"
KINDS = (STEP_DOWN, STEP_BACK, HOLD)
EPS = 1e-9


@dataclass
class ControllerState:
    """What the controller carries from one decision to the next, across runs (the checkpoint marker's ``controller``)."""

    lr_scale: float = 1.0  # times training.learning_rate
    rehearsal_extra: float = 0.0  # added to training.rehearsal_fraction for the runs that start from now
    run_rehearsal_fraction: float | None = None  # the share the run that saved this state started with
    best_accuracy: float | None = None  # best held-out accuracy at a probed evaluation
    evaluations_since_best: int = 0  # probed evaluations since the best, or since the last step
    decisions: dict[str, int] = field(default_factory=dict)  # kind -> count, all runs
    last: dict[str, Any] | None = None  # the last decision: global_step, kind, reason, time

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def assign(self, other: ControllerState) -> None:
        """Take ``other``'s values, in place (the run's checkpoint markers read this object)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(other, f.name))

    @classmethod
    def from_json(cls, data: Any) -> ControllerState:
        """The state of a marker's ``controller`` object; the initial state when there is none or it is unreadable."""
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            state = cls(**{k: v for k, v in data.items() if k in known})
            state.lr_scale = float(state.lr_scale)
            state.rehearsal_extra = float(state.rehearsal_extra)
            state.evaluations_since_best = int(state.evaluations_since_best)
            state.decisions = {str(k): int(v) for k, v in dict(state.decisions or {}).items()}
        except (TypeError, ValueError):
            return cls()
        return state


def rehearsal_ceiling(cfg: Config) -> float:
    return max(cfg.controller.max_rehearsal_fraction, cfg.training.rehearsal_fraction)


def step_down_below(cfg: Config) -> float:
    """The retention under which a probe steps down: ``eval.retention_warn + controller.step_down_margin``."""
    return round(cfg.eval.retention_warn + cfg.controller.step_down_margin, 6)


def rehearsal_share(state: ControllerState, cfg: Config) -> float:
    """The rehearsal share a run starting now takes: the configured one plus the controller's extra, bounded."""
    configured = cfg.training.rehearsal_fraction
    if not cfg.controller.enabled or configured <= 0:
        return configured
    return round(min(configured + max(state.rehearsal_extra, 0.0), rehearsal_ceiling(cfg)), 6)


def lr_scale(state: ControllerState, cfg: Config) -> float:
    """The factor on ``training.learning_rate`` now (1 with the controller off)."""
    if not cfg.controller.enabled:
        return 1.0
    return min(1.0, max(state.lr_scale, cfg.controller.min_lr_scale))


def run_share(state: ControllerState, cfg: Config, continuing: bool) -> float:
    """The rehearsal share of a run: the share its first attempt started with when it is being continued
    (an interrupted run must draw the same lines), else the share for a run starting now."""
    if continuing and cfg.controller.enabled and isinstance(state.run_rehearsal_fraction, (int, float)):
        return float(state.run_rehearsal_fraction)
    return rehearsal_share(state, cfg)


def rehearsal_weights(state: ControllerState | None, cfg: Config, run_share: float) -> tuple[float, float]:
    """``(rehearsal, other)``: the weight of a rehearsal token's loss and of any other token's in this run.

    The run drew its rehearsal lines at ``run_share`` (s); the controller's share now is t. A rehearsal
    token weighs ``w = t(1 - s) / (s(1 - t))`` times another, so the rehearsal lines hold the share t
    of the loss (``s w / (s w + 1 - s) = t``); both weights are divided by ``s w + 1 - s`` so that a
    step's loss keeps its scale (the learning rate is the controller's other lever). ``(1, 1)`` when
    they agree, with the controller off, or without rehearsal.
    """
    if state is None or not cfg.controller.enabled or not 0.0 < run_share < 1.0:
        return 1.0, 1.0
    target = rehearsal_share(state, cfg)
    if abs(target - run_share) < EPS or not 0.0 < target < 1.0:
        return 1.0, 1.0
    w = target * (1.0 - run_share) / (run_share * (1.0 - target))
    norm = run_share * w + 1.0 - run_share
    return round(w / norm, 6), round(1.0 / norm, 6)


@dataclass
class Decision:
    kind: str
    reason: str
    state: ControllerState  # after the decision


def decide(state: ControllerState, retention: float | None, accuracy: float | None, cfg: Config,
           global_step: int = 0) -> Decision | None:
    """The decision after one probed evaluation; None when there is no retention to judge (no probe).

    ``accuracy``: the evaluation's held-out accuracy in percent (None without held-out prompts: it
    never improves, so a stall is judged on retention alone). ``state`` is not changed.
    """
    if retention is None:
        return None
    c, warn = cfg.controller, cfg.eval.retention_warn
    new = ControllerState.from_json(state.to_json())
    if accuracy is not None and (new.best_accuracy is None or accuracy > new.best_accuracy + EPS):
        new.best_accuracy, new.evaluations_since_best = float(accuracy), 0
    else:
        new.evaluations_since_best += 1
    scale, share = lr_scale(new, cfg), rehearsal_share(new, cfg)
    rehearsing = cfg.training.rehearsal_fraction > 0 and c.rehearsal_step > 0
    acc = "no held-out accuracy" if accuracy is None else f"held-out accuracy {accuracy:g}%"

    rate_first = c.step_down_first == "rate"
    below = step_down_below(cfg)
    if retention < below - EPS:
        lower = max(c.min_lr_scale, scale * c.lr_factor)
        raised = new.rehearsal_extra
        if rehearsing:
            raised = min(new.rehearsal_extra + c.rehearsal_step, rehearsal_ceiling(cfg) - cfg.training.rehearsal_fraction)
        if rate_first:  # the rate down to its floor, then the share
            new_scale = lower
            new_extra = raised if new_scale >= scale - EPS else new.rehearsal_extra
        else:  # the share up to its ceiling (or no rehearsal), then the rate
            new_extra = raised
            new_scale = lower if new_extra <= new.rehearsal_extra + EPS else scale
        moved = []
        if new_scale < scale - EPS:
            moved.append(f"learning rate x{scale:g} -> x{new_scale:g}")
        if new_extra > new.rehearsal_extra + EPS:
            moved.append(f"rehearsal share {share:g} -> {round(cfg.training.rehearsal_fraction + new_extra, 6):g}")
        why = (f"retention {retention:g} < eval.retention_warn {warn:g}" if not c.step_down_margin else
               f"retention {retention:g} < eval.retention_warn {warn:g} + controller.step_down_margin {c.step_down_margin:g}")
        if not moved:
            return _done(new, HOLD, f"{why}, but the learning rate is at its floor (x{scale:g}) and the rehearsal "
                         f"share at its ceiling ({share:g})", global_step)
        new.lr_scale, new.rehearsal_extra = round(new_scale, 6), round(new_extra, 6)
        new.evaluations_since_best = 0
        return _done(new, STEP_DOWN, f"{why}: {', '.join(moved)}", global_step)

    stalled = new.evaluations_since_best >= c.stall_evaluations
    safe = retention >= warn + c.safe_margin - EPS
    at_configured = scale >= 1.0 - EPS and new.rehearsal_extra <= EPS
    if stalled and safe and not at_configured:  # in the reverse order of a step down
        raised, lowered = min(1.0, scale / c.lr_factor), max(0.0, new.rehearsal_extra - c.rehearsal_step)
        if rate_first:  # the share back to the configured one, then the rate
            new_extra = lowered
            new_scale = raised if new_extra >= new.rehearsal_extra - EPS else scale
        else:  # the rate back to the configured one, then the share
            new_scale = raised
            new_extra = lowered if new_scale <= scale + EPS else new.rehearsal_extra
        moved = []
        if new_scale > scale + EPS:
            moved.append(f"learning rate x{scale:g} -> x{new_scale:g}")
        if new_extra < new.rehearsal_extra - EPS:
            moved.append(f"rehearsal share {share:g} -> {round(cfg.training.rehearsal_fraction + new_extra, 6):g}")
        new.lr_scale, new.rehearsal_extra = round(new_scale, 6), round(new_extra, 6)
        new.evaluations_since_best = 0
        return _done(new, STEP_BACK, f"{acc}, not above its best ({new.best_accuracy if new.best_accuracy is not None else 'none'}"
                     f"{'%' if new.best_accuracy is not None else ''}) for {c.stall_evaluations} probed evaluation(s), "
                     f"retention {retention:g} >= {warn + c.safe_margin:g}: {', '.join(moved)}", global_step)

    if at_configured:
        why = f"retention {retention:g} >= {below:g}, at the configured learning rate and rehearsal share"
    elif not safe:
        why = f"retention {retention:g} is not under {below:g} but not yet safe (>= {warn + c.safe_margin:g}) to step back"
    else:
        why = (f"{acc}: {new.evaluations_since_best} of {c.stall_evaluations} probed evaluation(s) without a better "
               f"one before stepping back")
    return _done(new, HOLD, why, global_step)


def _done(state: ControllerState, kind: str, reason: str, global_step: int) -> Decision:
    state.decisions = {**state.decisions, kind: state.decisions.get(kind, 0) + 1}
    state.last = {"global_step": global_step, "kind": kind, "reason": reason}
    return Decision(kind, reason, state)
