"""Accuracy per skill for the live page: the last evaluation's breakdown and a short trend per skill.

A skill is an example's ``metadata.skill`` (recorded as ``skill`` in ``history/examples.jsonl``),
else its file. Followed incrementally (``JsonlFollower``): each poll reads only what was appended.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ultimate_trainer.core import status
from ultimate_trainer.web.history import JsonlFollower

TREND_EVALS = 10  # evaluations kept per skill for the trend


def _skill(rec: dict[str, Any]) -> str:
    if isinstance(rec.get("skill"), str) and rec["skill"]:
        return rec["skill"]
    source = str(rec.get("source") or "?")
    return source.rsplit(":", 1)[0] if ":" in source else source


class SkillTracker:
    """Per evaluation (global step) and skill: answers and right answers, the newest ``TREND_EVALS`` steps."""

    def __init__(self, status_dir: str | Path):
        self.follower = JsonlFollower(Path(status_dir) / status.EXAMPLES_HISTORY)
        self.steps: dict[int, dict[str, list[int]]] = {}
        self.lock = threading.Lock()

    def refresh(self) -> None:
        reset, records = self.follower.poll()
        if reset:
            self.steps.clear()
        for rec in records:
            step, ok = rec.get("global_step"), rec.get("correct")
            if not isinstance(step, int) or not isinstance(ok, bool):
                continue
            tally = self.steps.setdefault(step, {}).setdefault(_skill(rec), [0, 0])
            tally[0] += ok
            tally[1] += 1
        for old in sorted(self.steps)[:-TREND_EVALS]:
            del self.steps[old]

    def snapshot(self) -> dict[str, Any]:
        """``{"step": last evaluation's step, "skills": [{skill, correct, total, accuracy, trend}]}``;
        ``trend`` is ``[[step, accuracy], ...]`` over the kept evaluations that asked the skill."""
        with self.lock:
            self.refresh()
            if not self.steps:
                return {"step": None, "skills": []}
            last = max(self.steps)
            out = []
            for skill, (c, n) in sorted(self.steps[last].items()):
                trend = [[s, round(100.0 * t[skill][0] / t[skill][1], 1)]
                         for s, t in sorted(self.steps.items()) if skill in t]
                out.append({"skill": skill, "correct": c, "total": n, "accuracy": round(100.0 * c / n, 1),
                            "trend": trend})
            return {"step": last, "skills": out}
