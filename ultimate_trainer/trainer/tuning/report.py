"""The search's candidates and what it says about them: the best-pick rule, the table, the JSON report.

No torch here: ``search.py`` fills ``Result`` records; everything that decides or prints is here.

**The rule.** Among the candidates that finished their steps, those that kept what the base knew
(retention >= ``eval.retention_warn``; with the probe off every finished candidate counts) qualify;
the best is the one with the highest held-out accuracy, ties broken by the lower held-out loss,
then the higher retention, then the order of the table. When none qualifies there is no best: the
report says so, names the candidate with the highest retention for information, and
``--write-config`` writes nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ultimate_trainer.core import status as st
from ultimate_trainer.core.config import Config, from_dict
from ultimate_trainer.core.times import now_iso

DONE, STOPPED, FAILED, DIVERGED, SKIPPED = "done", "stopped", "failed", "diverged", "skipped"


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def default_lrs(lr: float) -> list[float]:
    """Three learning rates around the configured one: half, it, double (at most 1.0)."""
    return sorted({_round(min(1.0, x)) for x in (lr / 2, lr, lr * 2) if x > 0}) or [lr]


def default_ranks(r: int) -> list[int]:
    """Two ranks: half the configured one and it (1 and 2 when it is 1)."""
    return sorted({max(1, r // 2), r}) if r > 1 else [1, 2]


def candidate_config(cfg: Config, lr: float, rank: int) -> Config:
    """``cfg`` with ``training.learning_rate`` and ``lora.r`` set (alpha as configured), validated
    (``ConfigError`` names a value out of range)."""
    data = cfg.to_dict()
    data["training"]["learning_rate"], data["lora"]["r"] = lr, rank
    return from_dict(data)


@dataclass
class Result:
    """One candidate (or the start point itself, ``lr`` None) and what it gave."""

    lr: float | None
    rank: int | None
    status: str = SKIPPED  # done | stopped | failed | diverged | skipped
    steps: int = 0  # optimizer steps trained
    planned_steps: int = 0
    train_loss: float | None = None  # mean of the last (up to) 5 steps' losses
    accuracy: float | None = None  # held-out accuracy, percent
    correct: int | None = None
    total: int | None = None
    val_loss: float | None = None  # held-out loss
    retention: float | None = None  # probe score / the base's
    probe_correct: int | None = None
    seconds: float | None = None
    reason: str | None = None  # why stopped, failed, diverged or skipped

    @property
    def name(self) -> str:
        return "start" if self.lr is None else f"lr={self.lr:g} r={self.rank}"


def qualifies(r: Result, warn: float) -> bool:
    return r.status == DONE and r.accuracy is not None and (r.retention is None or r.retention >= warn)


def pick_best(results: list[Result], warn: float) -> tuple[int | None, str]:
    """Index of the best candidate in ``results`` by the module's rule (None: none qualifies), and why."""
    finished = [i for i, r in enumerate(results) if r.status == DONE and r.accuracy is not None]
    if not finished:
        return None, "no candidate finished: nothing to recommend"
    ok = [i for i in finished if qualifies(results[i], warn)]
    if not ok:
        safest = max(finished, key=lambda i: (results[i].retention or 0.0, results[i].accuracy or 0.0))
        return None, (f"no candidate kept retention >= {warn:g} (the highest was {results[safest].retention:g}, "
                      f"{results[safest].name}): nothing to recommend; try lower learning rates "
                      f"(--lrs) or more rehearsal (training.rehearsal_fraction)")

    def key(i: int) -> tuple[float, float, float, int]:
        r = results[i]
        loss = r.val_loss if r.val_loss is not None and math.isfinite(r.val_loss) else math.inf
        return (r.accuracy or 0.0, -loss, r.retention if r.retention is not None else 0.0, -i)

    best = max(ok, key=key)
    unmeasured = " (retention not measured: the probe is off)" if results[best].retention is None else ""
    return best, (f"highest held-out accuracy among the {len(ok)} of {len(finished)} finished candidates "
                  f"with retention >= {warn:g}{unmeasured}")


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(start: Result | None, results: list[Result], best: int | None) -> str:
    """The per-candidate table (plain text, one line each; ``*`` marks the best)."""
    head = f"{'':2}{'lr':>9} {'rank':>5} {'steps':>7} {'train loss':>10} {'held-out acc':>12} {'held-out loss':>13} " \
           f"{'retention':>9} {'seconds':>8}  status"
    lines = [head]
    rows = ([(start, False)] if start is not None else []) + [(r, i == best) for i, r in enumerate(results)]
    for r, is_best in rows:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.1f}% {r.correct}/{r.total}"
        steps = f"{r.steps}/{r.planned_steps}" if r.lr is not None else "0"
        status = r.status + (f": {r.reason}" if r.reason and r.status != DONE else "")
        lines.append(f"{'* ' if is_best else '  '}{'start' if r.lr is None else format(r.lr, 'g'):>9} "
                     f"{_cell(r.rank, 'd'):>5} {steps:>7} {_cell(r.train_loss, '.4f'):>10} {acc:>12} "
                     f"{_cell(r.val_loss, '.4f'):>13} {_cell(r.retention, '.3f'):>9} {_cell(r.seconds, '.0f'):>8}  "
                     f"{'start point' if r.lr is None else status}")
    return "\n".join(lines)


def report(*, start: Result | None, results: list[Result], best: int | None, why: str, context: dict[str, Any],
           stopped: bool) -> dict[str, Any]:
    """The JSON report (docs/TUNING.md): the context, the start point's scores, each candidate, the pick."""
    return st.finite({"schema_version": 1, "created_at": now_iso(), **context, "stopped": stopped,
                      "start": asdict(start) if start is not None else None,
                      "candidates": [asdict(r) for r in results],
                      "best": None if best is None else {"index": best, "learning_rate": results[best].lr,
                                                         "lora_r": results[best].rank},
                      "rule": why})


def write_report(path: Path, data: dict[str, Any]) -> Path:
    st.atomic_write_json(path, data)
    return path
